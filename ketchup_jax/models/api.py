"""User-facing model objects: `load`, `init`, `T5LM` and `DecoderLM`.

`load` dispatches on the checkpoint's `model_type` (`hf_io.SUPPORTED`). The
compute dtype defaults to the platform's (`default_dtype`): float32 on CPU,
bfloat16 on TPU / GPU; an explicit `dtype=` wins.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from ketchup_jax import partitioning
from ketchup_jax.models import decoder
from ketchup_jax.models import family
from ketchup_jax.models import gguf_io
from ketchup_jax.models import hf_io
from ketchup_jax.models import sampling
from ketchup_jax.models import t5
from ketchup_jax.models.config import get_config
from ketchup_jax.models.config import SIZES
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.decoder_config import DECODER_SIZES
from ketchup_jax.models.decoder_config import DecoderConfig
from ketchup_jax.models.decoder_config import get_decoder_config

_STATIC = ("config", "mesh", "rules")
_forward_jit = jax.jit(t5.forward, static_argnames=_STATIC)
_decoder_forward_jit = jax.jit(decoder.forward, static_argnames=_STATIC)
_sample_jit = jax.jit(sampling.sample,
                      static_argnames=_STATIC + ("max_new_tokens",))


def default_dtype() -> jnp.dtype:
  """The compute dtype when none is asked for: float32 on CPU (no bf16
  units there, and bf16 is slower and about 1 % off), bfloat16 elsewhere."""
  return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else
                   jnp.bfloat16)


def place_params(params: t5.Params, config: family.Config, mesh: Mesh | None,
                 *, rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES
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
  shardings = partitioning.tree_shardings(family.logical_axes(config), params,
                                          mesh, rules=rules)
  return jax.device_put(params, shardings)


@dataclasses.dataclass
class _LM:
  """A model with its parameters.

  Attributes:
    config: Hyperparameters (static).
    params: Parameter pytree.
    mesh: Optional device mesh the parameters are sharded over.
    rules: Logical axis rules used with `mesh`.
  """
  config: Any
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
      input_ids: `[batch, src_len]` prompt ids.
      attention_mask: `[batch, src_len]`.
      max_new_tokens: Tokens to generate (static).
      temperature: 0 = greedy; otherwise sampling temperature.
      top_k: Keep only the k most likely tokens (0 = all).
      top_p: Nucleus sampling mass (1 = all).
      rng: PRNG key for sampling.
    """
    return self.sample(input_ids, attention_mask,
                       max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, rng=rng).tokens

  def save_pretrained(self, path: str | os.PathLike[str]) -> None:
    """Writes an HF directory loadable by transformers.

    Multi-host: call on every process (cross-host shards are all-gathered);
    process 0 writes.
    """
    hf_io.save_checkpoint(self.params, self.config, path)


@dataclasses.dataclass
class DecoderLM(_LM):
  """A decoder-only model (Llama / Qwen2 / Qwen3) with its parameters."""
  config: DecoderConfig

  def logits(self, input_ids: Any, attention_mask: Any) -> jax.Array:
    """float32 logits `[batch, length, vocab]`; `[:, t]` predicts token t+1.

    Args:
      input_ids: `[batch, length]`, padded on either side (positions come
        from the mask, as HF `generate` computes them).
      attention_mask: `[batch, length]`, 1 = real token.
    """
    batch = self._put_batch(input_ids, attention_mask)
    return _decoder_forward_jit(self.params, self.config, *batch,
                                mesh=self.mesh, rules=self.rules)


@dataclasses.dataclass
class T5LM(_LM):
  """A T5 model with its parameters."""
  config: T5Config

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


def _wrap(config: family.Config, params: t5.Params, mesh: Mesh | None,
          rules: partitioning.LogicalRules) -> T5LM | DecoderLM:
  cls = DecoderLM if isinstance(config, DecoderConfig) else T5LM
  return cls(config=config, params=place_params(params, config, mesh,
                                                rules=rules),
             mesh=mesh, rules=rules)


# Any family's model object (what `load` and `init` return).
LM = T5LM | DecoderLM


def load(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES,
    revision: str | None = None,
    local_files_only: bool = False,
) -> T5LM | DecoderLM:
  """Loads an HF checkpoint (directory or hub name) by its `model_type`, or a
  GGUF file.

  `t5` / `mt5` give a `T5LM`; `llama`, `qwen2` (Qwen1.5 / Qwen2.5) and
  `qwen3` a `DecoderLM`; a `.gguf` file of the `llama` architecture
  (`gguf_io`, quantised weights dequantised) a `DecoderLM`.

  Args:
    path_or_name: Directory with `config.json` + weights, a hub repo id, or
      a `.gguf` file.
    dtype: Compute dtype; `default_dtype()` (float32 on CPU, bfloat16 on
      TPU / GPU) if None.
    param_dtype: Parameter dtype; float32 if None.
    mesh: Optional mesh to shard the parameters over (logical rules).
    rules: Logical axis rules.
    revision: Hub revision.
    local_files_only: Never use the network for hub names.

  Returns:
    The model.

  Raises:
    ValueError: an unsupported `model_type`, naming it and the supported
      ones.
  """
  overrides = {"dtype": default_dtype() if dtype is None else dtype}
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  if gguf_io.is_gguf(path_or_name):
    config, params = gguf_io.load_gguf(path_or_name, **overrides)
  else:
    config, params = hf_io.load_checkpoint(
        path_or_name, revision=revision, local_files_only=local_files_only,
        **overrides)
  return _wrap(config, params, mesh, rules)


def init(
    config_or_size_name: family.Config | str,
    rng: jax.Array,
    *,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES,
    **config_overrides: Any,
) -> T5LM | DecoderLM:
  """A randomly initialised model.

  Args:
    config_or_size_name: A config, or a size name: a T5 one (`tiny`,
      `small`, ..., `config.SIZES`) or a decoder one (`qwen2-tiny`, ...,
      `decoder_config.DECODER_SIZES`). A size name computes in
      `default_dtype()` unless `dtype` is given.
    rng: PRNG key.
    mesh: Optional mesh to shard the parameters over.
    rules: Logical axis rules.
    **config_overrides: Config fields to change (`dtype`, `vocab_size`, ...).

  Returns:
    The model.

  Raises:
    ValueError: an unknown size name, naming the known ones.
  """
  if isinstance(config_or_size_name, str):
    name = config_or_size_name
    config_overrides.setdefault("dtype", default_dtype())
    if name in DECODER_SIZES:
      config = get_decoder_config(name, **config_overrides)
    elif name in SIZES:
      config = get_config(name, **config_overrides)
    else:
      raise ValueError(f"unknown model size {name!r}; expected one of "
                       f"{sorted(SIZES) + sorted(DECODER_SIZES)}")
  else:
    config = config_or_size_name.replace(**config_overrides)
  return _wrap(config, family.init_params(config, rng), mesh, rules)
