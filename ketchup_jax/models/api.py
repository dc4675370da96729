"""User-facing model object: `load`, `init`, and `T5LM` with jitted methods."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from ketchup_jax import partitioning
from ketchup_jax.models import hf_io
from ketchup_jax.models import sampling
from ketchup_jax.models import t5
from ketchup_jax.models.config import get_config
from ketchup_jax.models.config import T5Config

_STATIC = ("config", "mesh", "rules")
_forward_jit = jax.jit(t5.forward, static_argnames=_STATIC)
_sample_jit = jax.jit(sampling.sample,
                      static_argnames=_STATIC + ("max_new_tokens",))


def place_params(params: t5.Params, config: T5Config, mesh: Mesh | None, *,
                 rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES
                 ) -> t5.Params:
  """Puts parameters on device, sharded by their logical axes over `mesh`.

  Args:
    params: Parameter tree (numpy or jax leaves).
    config: Model config (gives the logical axes and `param_dtype`).
    mesh: Device mesh, or None for the default device.
    rules: Logical axis rules.

  Returns:
    The parameter tree as `jax.Array`s in `config.param_dtype`.
  """
  params = jax.tree.map(lambda x: np.asarray(x, config.param_dtype)
                        if isinstance(x, np.ndarray) else
                        x.astype(config.param_dtype), params)
  if mesh is None:
    return jax.device_put(params)
  shardings = partitioning.tree_shardings(t5.logical_axes(config), params,
                                          mesh, rules=rules)
  return jax.device_put(params, shardings)


@dataclasses.dataclass
class T5LM:
  """A T5 model with its parameters.

  Attributes:
    config: Hyperparameters (static).
    params: Parameter pytree (see `ketchup_jax.models.t5`).
    mesh: Optional device mesh the parameters are sharded over.
    rules: Logical axis rules used with `mesh`.
  """
  config: T5Config
  params: t5.Params
  mesh: Mesh | None = None
  rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES

  def _put_batch(self, *arrays: Any) -> tuple[jax.Array, ...]:
    out = []
    for a in arrays:
      a = jnp.asarray(a, jnp.int32)
      if self.mesh is not None:
        sharding = partitioning.logical_to_sharding(
            ("batch", "length"), self.mesh, rules=self.rules, shape=a.shape)
        a = jax.device_put(a, sharding)
      out.append(a)
    return tuple(out)

  def logits(self, input_ids: Any, attention_mask: Any,
             decoder_input_ids: Any,
             decoder_attention_mask: Any | None = None) -> jax.Array:
    """Teacher-forced float32 logits `[batch, tgt_len, vocab]`.

    Args:
      input_ids: `[batch, src_len]` encoder ids.
      attention_mask: `[batch, src_len]`, 1 = real token.
      decoder_input_ids: `[batch, tgt_len]`, targets shifted right with the
        decoder start id (pad, 0) first.
      decoder_attention_mask: `[batch, tgt_len]`; all ones if None.
    """
    if decoder_attention_mask is None:
      decoder_attention_mask = np.ones(np.shape(decoder_input_ids), np.int32)
    batch = self._put_batch(input_ids, attention_mask, decoder_input_ids,
                            decoder_attention_mask)
    return _forward_jit(self.params, self.config, *batch, mesh=self.mesh,
                        rules=self.rules)

  def sample(self, input_ids: Any, attention_mask: Any, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0,
             rng: jax.Array | None = None) -> sampling.SampleOutput:
    """Like `generate`, returning tokens, log-probs, lengths and done flags."""
    sampling.check_options(max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p)
    input_ids, attention_mask = self._put_batch(input_ids, attention_mask)
    return _sample_jit(self.params, self.config, input_ids, attention_mask,
                       rng, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       mesh=self.mesh, rules=self.rules)

  def generate(self, input_ids: Any, attention_mask: Any, *,
               max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, rng: jax.Array | None = None) -> jax.Array:
    """Generated ids `[batch, max_new_tokens]`, pad after EOS.

    Args:
      input_ids: `[batch, src_len]` encoder ids.
      attention_mask: `[batch, src_len]`.
      max_new_tokens: Decoder positions to generate (static).
      temperature: 0 = greedy; otherwise sampling temperature.
      top_k: Keep only the k most likely tokens (0 = all).
      top_p: Nucleus sampling mass (1 = all).
      rng: PRNG key for sampling.
    """
    return self.sample(input_ids, attention_mask,
                       max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, rng=rng).tokens

  def save_pretrained(self, path: str | os.PathLike[str]) -> None:
    """Writes an HF directory loadable by `T5ForConditionalGeneration`.

    Multi-host: call on every process (cross-host shards are all-gathered);
    process 0 writes.
    """
    hf_io.save_checkpoint(self.params, self.config, path)


def load(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES,
    revision: str | None = None,
    local_files_only: bool = False,
) -> T5LM:
  """Loads an HF T5 / FLAN-T5 checkpoint (directory or hub name).

  Args:
    path_or_name: Directory with `config.json` + weights, or a hub repo id.
    dtype: Compute dtype; `T5Config`'s default (bfloat16) if None.
    param_dtype: Parameter dtype; float32 if None.
    mesh: Optional mesh to shard the parameters over (logical rules).
    rules: Logical axis rules.
    revision: Hub revision.
    local_files_only: Never use the network for hub names.

  Returns:
    The model.
  """
  overrides = {}
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  config, params = hf_io.load_checkpoint(
      path_or_name, revision=revision, local_files_only=local_files_only,
      **overrides)
  return T5LM(config=config, params=place_params(params, config, mesh,
                                                 rules=rules),
              mesh=mesh, rules=rules)


def init(
    config_or_size_name: T5Config | str,
    rng: jax.Array,
    *,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES,
    **config_overrides: Any,
) -> T5LM:
  """A randomly initialised model.

  Args:
    config_or_size_name: A `T5Config` or a size name (`tiny`, `small`, ...).
    rng: PRNG key.
    mesh: Optional mesh to shard the parameters over.
    rules: Logical axis rules.
    **config_overrides: Config fields to change (`dtype`, `vocab_size`, ...).

  Returns:
    The model.
  """
  if isinstance(config_or_size_name, str):
    config = get_config(config_or_size_name, **config_overrides)
  else:
    config = config_or_size_name.replace(**config_overrides)
  params = t5.init_params(config, rng)
  return T5LM(config=config, params=place_params(params, config, mesh,
                                                 rules=rules),
              mesh=mesh, rules=rules)
