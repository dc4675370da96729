"""Per-position reductions over the vocabulary, a few positions at a time.

The RL step reads, per position, a handful of numbers from each model's
distribution (log pi of the taken token, the entropy, the teacher's Q of the
taken token and its state values); the word-level losses read one divergence
per position. None of them needs the whole float32 `[B, T, V]` logits at once.
`map_logits` computes them from the LM head's input (`hidden`, `[B, T, E]`)
and matrix (`Head`) chunk by chunk of positions: only one `[B, chunk, V]`
block of logits is alive, in the forward pass and in the backward pass too,
a custom VJP that recomputes each chunk's logits instead of keeping them and
adds the chunk's head gradient into one accumulator in place, `VOCAB_BLOCK`
rows at a time (autodiff of a `jax.checkpoint`-ed `lax.map` kept the carry,
its update and a [V, E]-sized product at once). The numbers are those of the
full-logits path.

    logits[:, t0:t1] = project(hidden[:, t0:t1], head)       # [B, chunk, V]

The head keeps the parameter's own layout (a tied embedding is `[V, E]`, an
LM head kernel `[E, V]`): a transposed copy made outside the loop over chunks
would be one more `[E, V]` array (XLA folds the transpose into the matmul only
inside it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ketchup_jax import checks

Array = jax.Array


def check_chunk(chunk: Any) -> int:
  """`chunk` as an int >= 0 (0 = off), or a ValueError naming it."""
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ValueError(
        f"logits_chunk must be an int >= 0 (0 = whole sequence), got "
        f"{chunk!r}")
  return chunk


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kernel"],
                   meta_fields=["vocab_first"])
@dataclasses.dataclass(frozen=True)
class Head:
  """An LM head's matrix, a pytree (gradients flow to `kernel`).

  Attributes:
    kernel: `[E, V]`, or `[V, E]` when `vocab_first` (a tied embedding).
    vocab_first: The layout (static).
  """
  kernel: Array
  vocab_first: bool = False

  @property
  def embed_dim(self) -> int:
    return self.kernel.shape[1 if self.vocab_first else 0]

  @property
  def vocab_size(self) -> int:
    return self.kernel.shape[0 if self.vocab_first else 1]


def project(hidden: Array, head: Head) -> Array:
  """float32 logits `[B, T, V]` from hidden `[B, T, E]` and an LM `Head`.

  The same contraction as the models' LM heads (inputs in the compute dtype,
  float32 accumulation).
  """
  spec = "ble,ve->blv" if head.vocab_first else "ble,ev->blv"
  return jnp.einsum(spec, hidden, head.kernel.astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


# Vocabulary entries per block of the head gradient's accumulation (below).
VOCAB_BLOCK = 8192


def _split(x: Array, n: int, chunk: int) -> Array:
  """[B, T, ...] -> [N, B, chunk, ...], zero-padded to N * chunk positions."""
  pad = n * chunk - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 0, 1)


def _merge(y: Array, length: int) -> Array:
  """[N, B, chunk, ...] -> [B, length, ...] (padding dropped)."""
  y = jnp.swapaxes(y, 0, 1)
  return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :length]


def _forward(fn, chunk, hidden, head, arrays, consts):
  """`fn(project(hidden, head), *arrays, consts)` by chunks of positions."""
  length = hidden.shape[1]
  if chunk == 0 or chunk >= length:
    return fn(project(hidden, head), *arrays, consts)
  n = -(-length // chunk)
  body = lambda xs: fn(project(xs[0], head), *xs[1:], consts)
  out = jax.lax.map(body, tuple(_split(x, n, chunk)
                                for x in (hidden, *arrays)))
  return jax.tree.map(lambda y: _merge(y, length), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _map_logits(fn, chunk, hidden, head, arrays, consts):
  return _forward(fn, chunk, hidden, head, arrays, consts)


def _map_logits_fwd(fn, chunk, hidden, head, arrays, consts):
  out = _forward(fn, chunk, hidden, head, arrays, consts)
  return out, (hidden, head, arrays, consts)


def _map_logits_bwd(fn, chunk, residuals, cotangent):
  """d(hidden) and d(head) chunk by chunk, recomputing each chunk's logits.

  One loop over chunks of positions; its carry is d(kernel) (the head's
  shape) and d(hidden) `[N, B, chunk, E]`, both updated in place
  (dynamic-update-slice of a loop carry). d(kernel) accumulates
  `VOCAB_BLOCK` rows at a time, so the loop holds no second kernel-sized
  array. Every product is `jax.vjp` of `project`, so the dtypes are those of
  autodiff.
  """
  hidden, head, arrays, consts = residuals
  length = hidden.shape[1]
  n = -(-length // chunk) if 0 < chunk < length else 1
  split = ((lambda x: _split(x, n, chunk)) if n > 1 else
           (lambda x: x[None]))
  hs = split(hidden)  # [N, B, c, E]
  xs = tuple(split(x) for x in arrays)
  cts = jax.tree.map(split, cotangent)
  kernel, vocab = head.kernel, head.vocab_size
  axis = 0 if head.vocab_first else 1  # the kernel's vocabulary axis
  block = min(VOCAB_BLOCK, vocab)
  full = vocab // block  # blocks in the loop; the rest after it

  def add_block(d_kernel, h, d_logits, v0, size):
    """d_kernel[v0:v0+size] += d(kernel block) of this chunk."""
    k = jax.lax.dynamic_slice_in_dim(kernel, v0, size, axis)
    _, block_vjp = jax.vjp(lambda k_: project(h, Head(k_, head.vocab_first)),
                           k)
    d_k, = block_vjp(jax.lax.dynamic_slice_in_dim(d_logits, v0, size, 2))
    old = jax.lax.dynamic_slice_in_dim(d_kernel, v0, size, axis)
    return jax.lax.dynamic_update_slice_in_dim(d_kernel, old + d_k, v0, axis)

  def body(i, carry):
    d_kernel, d_hidden = carry
    h = hs[i]  # [B, c, E]
    logits, project_vjp = jax.vjp(lambda h_: project(h_, head), h)
    _, fn_vjp = jax.vjp(
        lambda z: fn(z, *(x[i] for x in xs), consts), logits)
    d_logits, = fn_vjp(jax.tree.map(lambda c: c[i], cts))  # [B, c, V]
    d_h, = project_vjp(d_logits)
    d_hidden = jax.lax.dynamic_update_index_in_dim(d_hidden, d_h, i, 0)
    # One [block, E] product at a time (a loop, so that XLA does not
    # schedule all of them before their adds).
    d_kernel = jax.lax.fori_loop(
        0, full, lambda j, d: add_block(d, h, d_logits, j * block, block),
        d_kernel)
    if full * block < vocab:
      d_kernel = add_block(d_kernel, h, d_logits, full * block,
                           vocab - full * block)
    return d_kernel, d_hidden

  init = (jnp.zeros_like(kernel), jnp.zeros_like(hs))
  d_kernel, d_hidden = jax.lax.fori_loop(0, n, body, init)
  d_hidden = _merge(d_hidden, length) if n > 1 else d_hidden[0]
  return (d_hidden, Head(d_kernel, head.vocab_first), None, None)


_map_logits.defvjp(_map_logits_fwd, _map_logits_bwd)


def map_logits(fn: Callable[..., Any], hidden: Array, head: Head,
               arrays: tuple[Array, ...] = (), chunk: int = 0,
               consts: Any = None) -> Any:
  """`fn(project(hidden, head), *arrays, consts)` on chunks of positions.

  Args:
    fn: Maps float32 logits `[B, c, V]`, the chunk's `arrays` `[B, c, ...]`
      and `consts` to a pytree of arrays `[B, c, ...]`, position by position
      (no mixing across positions). A static Python callable: pass what it
      reads as `arrays` or `consts`, not by closure over traced values.
    hidden: `[B, T, E]` the LM head's input; differentiable.
    head: The LM `Head`; differentiable (`kernel`).
    arrays: Per-position inputs `[B, T, ...]` (ids, a teacher's hidden
      states); no gradient flows to them (`stop_gradient`).
    chunk: Positions per chunk; 0 (or >= T) calls `fn` once on everything.
    consts: A pytree `fn` reads whole (a teacher's `Head`); no gradient.

  Returns:
    `fn`'s pytree, every leaf `[B, T, ...]`. Only one `[B, chunk, V]` block
    of logits exists at a time, forward and backward: the backward pass
    (a custom VJP) recomputes each chunk's logits and accumulates the head's
    gradient in place. When `chunk` does not divide T the last chunk is
    padded with zeros and those positions are dropped.
  """
  chunk = check_chunk(chunk)
  arrays, consts = jax.lax.stop_gradient((tuple(arrays), consts))
  return _map_logits(fn, chunk, hidden, head, arrays, consts)


def check_head(hidden_name: str, hidden: Any, head_name: str,
               head: Any) -> None:
  """Raises unless `hidden` [B, T, E] and `head` (a `Head` of E) fit."""
  checks.check_rank(hidden_name, hidden, 3, "[B, T, E]")
  if not isinstance(head, Head):
    raise ValueError(f"{head_name} must be a chunked.Head, got "
                     f"{type(head).__name__}")
  layout = "[V, E]" if head.vocab_first else "[E, V]"
  checks.check_rank(f"{head_name}.kernel", head.kernel, 2, layout)
  checks.check_float(hidden_name, hidden)
  checks.check_float(f"{head_name}.kernel", head.kernel)
  if jnp.shape(hidden)[-1] != head.embed_dim:
    raise ValueError(
        f"{hidden_name} [B, T, E] and {head_name}.kernel {layout} must share "
        f"E, got {jnp.shape(hidden)} and {jnp.shape(head.kernel)}")
