"""Autoregressive sampling: one `lax.while_loop` over a preallocated KV cache.

Family-agnostic (`ketchup_jax.models.family`): for T5 the encoder runs once
and the cross-attention keys / values are computed once; for a decoder-only
model the left-aligned prompt is prefilled into a cache of prompt + new
tokens. Then each loop iteration runs one position for the whole batch.
Rows stop independently at any EOS id (later tokens are pad, log-prob 0;
use `lengths`, not `!= pad`, to mask completions), and the
loop exits as soon as every row is done. `temperature`, `top_k` and `top_p`
are traced scalars, so changing them does not recompile; only the shapes and
`max_new_tokens` are static.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ketchup_jax import partitioning
from ketchup_jax.models import family


class SampleOutput(NamedTuple):
  """Result of `sample`.

  Attributes:
    tokens: int32 `[batch, max_new_tokens]`, the generated ids (EOS included),
      `pad_token_id` after EOS. Neither the prompt nor T5's decoder start
      token is included.
    logprobs: float32 `[batch, max_new_tokens]`, log-probability of each token
      under the distribution it was drawn from (after temperature, top-k and
      top-p; for greedy decoding, the model's softmax at temperature 1); 0
      after EOS.
    lengths: int32 `[batch]`, number of generated tokens including EOS.
    done: bool `[batch]`, True where the row produced EOS.
  """
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  done: jax.Array


class _LoopState(NamedTuple):
  step: jax.Array          # [] int32
  last: jax.Array          # [batch] int32, decoder input at `step`
  tokens: jax.Array        # [batch, max_new_tokens]
  logprobs: jax.Array      # [batch, max_new_tokens]
  lengths: jax.Array       # [batch]
  done: jax.Array          # [batch]
  cache: Any              # the family's decoding cache
  rng: jax.Array


def filter_logits(logits: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """Sets logits outside the top-k / nucleus (top-p) set to -inf.

  Args:
    logits: float32 `[batch, vocab]` (already divided by the temperature).
    top_k: int scalar; 0 keeps all tokens. Ties with the k-th value are kept.
    top_p: float scalar in (0, 1]; keeps the smallest prefix of the sorted
      distribution whose mass reaches `top_p` (at least one token).

  Returns:
    Filtered logits `[batch, vocab]`.
  """
  vocab = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  ranks = jnp.arange(vocab)[None, :]
  sorted_desc = jnp.where(ranks < k, sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # Exclusive cumsum.
  keep = (mass_before < top_p) & (ranks < k)
  keep = keep.at[:, 0].set(True)
  # Smallest kept value per row is the threshold.
  threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1,
                      keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


_BLOCK = 128  # Vocabulary block of the two-level inverse-CDF sampler.


def _last_positive(x: jax.Array) -> jax.Array:
  """Index of the last entry > 0 along the last axis (0 if none)."""
  idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(x > 0, idx, 0), axis=-1)


def categorical(rng: jax.Array, logp: jax.Array) -> jax.Array:
  """One draw per row from `softmax(logp)` by inverse CDF, `[batch]` int32.

  Exact sampling (up to float32 rounding of the CDF) with one uniform number
  per row, where `jax.random.categorical`'s Gumbel-max needs one per
  vocabulary entry (a threefry hash each, which dominated a decoding step on
  CPU). Two levels keep the prefix sums short: the row is cut into blocks of
  `_BLOCK` entries, a block is drawn from the block masses, then an entry
  within it. Entries of probability 0 (filtered by top-k / top-p) are never
  drawn.

  Args:
    rng: PRNG key.
    logp: float32 `[batch, vocab]` log-probabilities (normalised or not).

  Returns:
    int32 `[batch]` token ids.
  """
  batch, vocab = logp.shape
  blocks = -(-vocab // _BLOCK)
  probs = jnp.exp(logp - jnp.max(logp, axis=-1, keepdims=True))
  probs = jnp.pad(probs, ((0, 0), (0, blocks * _BLOCK - vocab)))
  probs = probs.reshape(batch, blocks, _BLOCK)
  mass = jnp.sum(probs, axis=-1)  # [batch, blocks]
  cdf = jnp.cumsum(mass, axis=-1)
  u = jax.random.uniform(rng, (batch, 1), jnp.float32) * cdf[:, -1:]
  block = jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32),
                      _last_positive(mass))  # [batch]
  before = jnp.take_along_axis(cdf - mass, block[:, None], axis=-1)
  inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]
  inner_cdf = jnp.cumsum(inner, axis=-1)  # [batch, _BLOCK]
  entry = jnp.minimum(jnp.sum(inner_cdf <= u - before, axis=-1,
                              dtype=jnp.int32), _last_positive(inner))
  return block * _BLOCK + entry


def _choose(logits: jax.Array, rng: jax.Array, temperature: jax.Array,
            top_k: jax.Array, top_p: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row; returns `(tokens [batch], logprobs [batch])`."""

  def greedy(_):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

  def sampled(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0),
                          lambda x: filter_logits(x, top_k, top_p),
                          lambda x: x, scaled)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    token = categorical(rng, logp)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

  return jax.lax.cond(temperature > 0, sampled, greedy, None)


def check_options(*, max_new_tokens: int, temperature: float | jax.Array,
                  top_k: int | jax.Array, top_p: float | jax.Array) -> None:
  """Raises ValueError for out-of-range options (traced values are skipped)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  for name, value, ok, form in (
      ("temperature", temperature, lambda v: v >= 0, ">= 0"),
      ("top_k", top_k, lambda v: v >= 0, ">= 0"),
      ("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]")):
    if isinstance(value, (int, float)) and not ok(value):
      raise ValueError(f"{name} must be {form}, got {value}")


def sample(
    params: family.Params,
    config: family.Config,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float | jax.Array = 0.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES,
    vocab: int | None = None,
) -> SampleOutput:
  """Samples continuations with a KV cache in one `lax.while_loop`.

  Pure in `params` (a pytree), so it can run inside the caller's `jax.jit`
  with `config`, `max_new_tokens`, `mesh` and `rules` static.

  Args:
    params: The parameter pytree.
    config: Model hyperparameters; its type picks the family.
    input_ids: Prompt ids `[batch, src_len]` (a decoder-only model's may be
      padded on either side; they are left-aligned first).
    attention_mask: Prompt mask `[batch, src_len]`.
    rng: PRNG key; needed only when `temperature > 0` (key 0 if None).
    max_new_tokens: Number of new tokens (static).
    temperature: 0 = greedy (argmax); > 0 divides the logits.
    top_k: Keep the k most likely tokens; 0 = no limit.
    top_p: Nucleus mass in (0, 1]; 1 = no limit.
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.
    vocab: Choose among the first `vocab` ids only (static; None = all the
      model's rows): a teacher and student whose embeddings have different
      row counts share the first `vocab`.

  Returns:
    A `SampleOutput`.

  Raises:
    ValueError: if `max_new_tokens < 1` or concrete sampling options are out of
      range.
  """
  check_options(max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p)
  if rng is None:
    rng = jax.random.key(0)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  batch = input_ids.shape[0]
  kw = dict(mesh=mesh, rules=rules)

  cache, first = family.start_decoding(
      params, config, input_ids, attention_mask,
      max_new_tokens=max_new_tokens, **kw)
  pad = jnp.int32(family.pad_id(config))
  eos = jnp.asarray(family.eos_ids(config), jnp.int32).reshape(-1)
  state = _LoopState(
      step=jnp.zeros((), jnp.int32),
      last=first,
      tokens=jnp.full((batch, max_new_tokens), pad, jnp.int32),
      logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
      lengths=jnp.zeros((batch,), jnp.int32),
      done=jnp.zeros((batch,), bool),
      cache=cache,
      rng=rng,
  )

  def cond(s: _LoopState) -> jax.Array:
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: _LoopState) -> _LoopState:
    logits, cache = family.decode_step(params, config, s.last, s.cache, **kw)
    if vocab is not None:
      logits = logits[:, :vocab]  # [batch, vocab]
    rng, key = jax.random.split(s.rng)
    token, logp = _choose(logits, key, temperature, top_k, top_p)
    token = jnp.where(s.done, pad, token)  # [batch]
    logp = jnp.where(s.done, 0.0, logp)
    tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None],
                                          (0, s.step))
    logprobs = jax.lax.dynamic_update_slice(s.logprobs, logp[:, None],
                                            (0, s.step))
    return _LoopState(
        step=s.step + 1,
        last=token,
        tokens=tokens,
        logprobs=logprobs,
        lengths=s.lengths + (~s.done).astype(jnp.int32),
        done=s.done | jnp.any(token[:, None] == eos[None, :], axis=-1),
        cache=cache,
        rng=rng,
    )

  state = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=state.tokens, logprobs=state.logprobs,
                      lengths=state.lengths, done=state.done)
