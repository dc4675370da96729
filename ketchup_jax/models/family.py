"""The model-family seam: what training and sampling call, for any family.

A config's type picks the family: `T5Config` (encoder-decoder) or
`DecoderConfig` (Llama / Qwen2 / Qwen3, decoder-only). Callers pass prompts
and completions; each family lays them out its own way:

* T5: the encoder reads the prompt, the decoder reads `shift_right(targets)`.
* Decoder-only: the prompt is left-aligned (padding moved to the front), the
  targets appended, and the sequence runs once; the positions that predict
  the targets are kept.

Either way `score(...)[:, t]` is the distribution of `targets[:, t]`. Prompts
may be padded on either side; targets are right-padded, and `target_mask`
marks their real tokens (all ones is fine: a causal model's positions never
read later ones).

What the T5-only calls become:

    t5.forward(p, c, src, src_mask, t5.shift_right(tgt, c), tgt_mask)
        -> score(p, c, src, src_mask, tgt, tgt_mask)             # [B, T, V]
    t5.hidden_states(<same>), t5.output_head(p, c)
        -> score_hidden(p, c, src, src_mask, tgt, tgt_mask), output_head(p, c)
    t5.init_params / param_shapes / logical_axes / REMAT_POLICIES
        -> init_params / param_shapes / logical_axes / REMAT_POLICIES
    config.eos_token_id, config.pad_token_id -> eos_ids(c), pad_id(c)
    sampling.sample(...) is already family-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ketchup_jax import chunked
from ketchup_jax import partitioning
from ketchup_jax.models import decoder
from ketchup_jax.models import layers
from ketchup_jax.models import t5
from ketchup_jax.models.config import REMAT_POLICIES  # pylint: disable=unused-import
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.decoder_config import DecoderConfig

Config = T5Config | DecoderConfig
Params = Any
LogicalRules = partitioning.LogicalRules
_RULES = partitioning.DEFAULT_RULES


def _check(config: Any) -> bool:
  """True for a decoder config, False for T5; TypeError otherwise."""
  if isinstance(config, DecoderConfig):
    return True
  if isinstance(config, T5Config):
    return False
  raise TypeError(f"expected a T5Config or DecoderConfig, got "
                  f"{type(config).__name__}")


def is_encoder_decoder(config: Config) -> bool:
  """True for T5 (prompts go to an encoder), False for decoder-only."""
  return not _check(config)


def name(config: Config) -> str:
  """The HF `model_type`: `t5`, `llama`, `qwen2` or `qwen3`."""
  return config.model_type if _check(config) else "t5"


def eos_ids(config: Config) -> tuple[int, ...]:
  """Every id that ends a completion (Qwen has several; T5 one)."""
  return config.eos_token_id if _check(config) else (config.eos_token_id,)


def pad_id(config: Config) -> int:
  """The id written after EOS (for Qwen it is an EOS id: build completion
  masks from lengths, never from `!= pad`)."""
  return config.pad_token_id


def init_params(config: Config, rng: jax.Array) -> Params:
  """Random parameters as numpy arrays."""
  return (decoder if _check(config) else t5).init_params(config, rng)


def param_shapes(config: Config) -> Params:
  """`jax.ShapeDtypeStruct` tree of the parameters."""
  return (decoder if _check(config) else t5).param_shapes(config)


def logical_axes(config: Config) -> Any:
  """Tree of logical axis-name tuples, one per parameter."""
  return (decoder if _check(config) else t5).logical_axes(config)


def output_head(params: Params, config: Config) -> chunked.Head:
  """The LM head (for `chunked.project` of `score_hidden`)."""
  return (decoder if _check(config) else t5).output_head(params, config)


def left_align(ids: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Moves each row's padding to the front, keeping the tokens' order.

  Args:
    ids: int `[batch, length]`.
    mask: `[batch, length]`, 1 = real token, padded anywhere.

  Returns:
    `(ids, mask)` with every row's real tokens last.
  """
  order = jnp.argsort(mask > 0, axis=1, stable=True)  # pads first
  return (jnp.take_along_axis(ids, order, axis=1),
          jnp.take_along_axis(mask, order, axis=1))


def _decoder_sequence(prompt, prompt_mask, targets, target_mask):
  """`[left-aligned prompt, targets[:-1]]` and its mask, `[B, P + T - 1]`."""
  prompt, prompt_mask = left_align(jnp.asarray(prompt, jnp.int32),
                                   jnp.asarray(prompt_mask, jnp.int32))
  ids = jnp.concatenate([prompt, jnp.asarray(targets, jnp.int32)[:, :-1]], 1)
  mask = jnp.concatenate(
      [prompt_mask, jnp.asarray(target_mask, jnp.int32)[:, :-1]], 1)
  return ids, mask


def _check_pair(prompt, prompt_mask, targets, target_mask) -> None:
  for what, ids, mask in (("prompt", prompt, prompt_mask),
                          ("targets", targets, target_mask)):
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"{what} and its mask must both be [batch, length], "
                       f"got {ids.shape} and {mask.shape}")
  if prompt.shape[0] != targets.shape[0]:
    raise ValueError(f"prompt and targets must have the same batch, got "
                     f"{prompt.shape[0]} and {targets.shape[0]}")


def score(params: Params, config: Config, prompt: jax.Array,
          prompt_mask: jax.Array, targets: jax.Array, target_mask: jax.Array,
          *, mesh: Mesh | None = None, rules: LogicalRules = _RULES
          ) -> jax.Array:
  """Teacher-forced float32 logits `[B, T, V]`: `[:, t]` predicts
  `targets[:, t]`.

  Args:
    params: The parameter pytree.
    config: Model config (static under jit); its type picks the family.
    prompt: int `[B, P]` prompt ids, padded on either side.
    prompt_mask: `[B, P]`, 1 = real token.
    targets: int `[B, T]` completion ids, right-padded.
    target_mask: `[B, T]`, 1 = real token.
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.
  """
  _check_pair(prompt, prompt_mask, targets, target_mask)
  if not _check(config):
    return t5.forward(params, config, prompt, prompt_mask,
                      t5.shift_right(targets, config), target_mask,
                      mesh=mesh, rules=rules)
  # Only the T predicting positions go through the LM head: no [B, P, V]
  # logits for the prompt.
  hidden = score_hidden(params, config, prompt, prompt_mask, targets,
                        target_mask, mesh=mesh, rules=rules)
  logits = chunked.project(hidden, output_head(params, config))
  return partitioning.with_logical_constraint(
      logits, (layers.BATCH, layers.LENGTH, layers.VOCAB), mesh=mesh,
      rules=rules)


def score_hidden(params: Params, config: Config, prompt: jax.Array,
                 prompt_mask: jax.Array, targets: jax.Array,
                 target_mask: jax.Array, *, mesh: Mesh | None = None,
                 rules: LogicalRules = _RULES) -> jax.Array:
  """The LM head's input `[B, T, E]` at the positions `score` returns:
  `score` is `chunked.project(score_hidden(...), output_head(...))`."""
  _check_pair(prompt, prompt_mask, targets, target_mask)
  if not _check(config):
    return t5.hidden_states(params, config, prompt, prompt_mask,
                            t5.shift_right(targets, config), target_mask,
                            mesh=mesh, rules=rules)
  ids, mask = _decoder_sequence(prompt, prompt_mask, targets, target_mask)
  hidden = decoder.hidden_states(params, config, ids, mask, mesh=mesh,
                                 rules=rules)
  return hidden[:, prompt.shape[1] - 1:]


def start_decoding(params: Params, config: Config, input_ids: jax.Array,
                   attention_mask: jax.Array, *, max_new_tokens: int,
                   mesh: Mesh | None = None, rules: LogicalRules = _RULES
                   ) -> tuple[Any, jax.Array]:
  """The cache and first decoder inputs `[B]` for `decode_step`.

  T5: the encoder runs once, and the first input is the decoder start id.
  Decoder-only: the left-aligned prompt but its last column goes into a
  cache of prompt + `max_new_tokens` slots, and the first input is the
  prompt's last token (so every step of the loop is one `decode_step`).
  Every row needs at least one real prompt token.
  """
  if not _check(config):
    encoded = t5.encode(params, config, input_ids, attention_mask,
                        mesh=mesh, rules=rules)
    cache = t5.init_decode_cache(params, config, encoded, attention_mask,
                                 max_len=max_new_tokens, mesh=mesh,
                                 rules=rules)
    first = jnp.full((input_ids.shape[0],), config.decoder_start_token_id,
                     jnp.int32)
    return cache, first
  ids, mask = left_align(jnp.asarray(input_ids, jnp.int32),
                         jnp.asarray(attention_mask, jnp.int32))
  batch, length = ids.shape
  cache = decoder.init_cache(config, batch, length + max_new_tokens,
                             mesh=mesh, rules=rules)
  if length > 1:
    _, cache = decoder.prefill(params, config, ids[:, :-1], mask[:, :-1],
                               cache, mesh=mesh, rules=rules)
  return cache, ids[:, -1]


def decode_step(params: Params, config: Config, tokens: jax.Array,
                cache: Any, *, mesh: Mesh | None = None,
                rules: LogicalRules = _RULES) -> tuple[jax.Array, Any]:
  """One position: float32 logits `[B, V]` of the next token, and the cache."""
  return (decoder if _check(config) else t5).decode_step(
      params, config, tokens, cache, mesh=mesh, rules=rules)


def num_layers(config: Config) -> int:
  """Blocks a `keep_layers` index may name: the decoder-only depth, or for T5
  the depth both stacks have."""
  if _check(config):
    return config.num_hidden_layers
  return min(config.num_layers, config.num_decoder_layers)


def keep_layers(params: Params, config: Config, keep: Sequence[int]
                ) -> tuple[Params, Config]:
  """The model with only the blocks `keep`, renumbered `0 .. n-1` in order.

  Layer dropping, the usual start of a smaller student: the embedding, the
  final norm, the LM head (and T5's relative-position biases, which belong
  to each stack, not to a block) are kept as they are, and so is every kept
  block's every weight. For T5 the same indices are kept in the encoder and
  the decoder stack.

  Args:
    params: The parameter tree (any leaves; not copied).
    config: Its config.
    keep: Strictly increasing block indices in `[0, num_layers(config))`.

  Returns:
    `(params, config)` of the smaller model.

  Raises:
    ValueError: empty, unordered, repeated or out-of-range `keep`, naming
      them and the depth.
  """
  depth = num_layers(config)
  keep = tuple(int(i) for i in keep)
  if not keep or any(b <= a for a, b in zip(keep, keep[1:])) or (
      keep[0] < 0 or keep[-1] >= depth):
    raise ValueError(
        f"layers {list(keep)}: expected strictly increasing block indices "
        f"in [0, {depth}) of this {depth}-layer {name(config)} model, at least "
        f"one")

  def stack(tree: Any) -> dict[str, Any]:
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    out.update({f"layers_{j}": tree[f"layers_{i}"]
                for j, i in enumerate(keep)})
    return out

  if _check(config):
    return stack(params), config.replace(num_hidden_layers=len(keep))
  kept = dict(params, encoder=stack(params["encoder"]),
              decoder=stack(params["decoder"]))
  return kept, config.replace(num_layers=len(keep),
                              num_decoder_layers=len(keep))
