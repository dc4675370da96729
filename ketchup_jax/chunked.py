"""Per-position reductions over the vocabulary, a few positions at a time.

The RL step reads, per position, a handful of numbers from each model's
distribution (log pi of the taken token, the entropy, the teacher's Q of the
taken token and its state values); the word-level losses read one divergence
per position. None of them needs the whole float32 `[B, T, V]` logits at once.
`map_positions` computes them from the LM head's input (`hidden`, `[B, T, E]`)
and matrix (`Head`) chunk by chunk of positions: only one `[B, chunk, V]`
block of logits is alive, in the forward pass and, because each chunk is a
`jax.checkpoint`, in the backward pass too (it recomputes the chunk's logits
instead of keeping them). The numbers are those of the full-logits path.

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


def map_positions(fn: Callable[..., Any], arrays: tuple[Array, ...],
                  chunk: int) -> Any:
  """`fn(*arrays)`, computed on chunks of `chunk` positions.

  Args:
    fn: Maps arrays `[B, c, ...]` (the same c for all) to a pytree of arrays
      `[B, c, ...]`, position by position (no mixing across positions). It may
      close over anything (e.g. the LM `Head`); gradients flow to it.
    arrays: Inputs `[B, T, ...]` sharing B and T.
    chunk: Positions per chunk; 0 (or >= T) calls `fn` once on everything.

  Returns:
    `fn`'s pytree with every leaf `[B, T, ...]`. The last chunk is padded with
    zeros when `chunk` does not divide T; those positions are dropped.
  """
  chunk = check_chunk(chunk)
  length = arrays[0].shape[1]
  if chunk == 0 or chunk >= length:
    return fn(*arrays)
  n = -(-length // chunk)
  pad = n * chunk - length

  def split(x):  # [B, T, ...] -> [N, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 0, 1)

  def merge(y):  # [N, B, chunk, ...] -> [B, T, ...]
    y = jnp.swapaxes(y, 0, 1)
    return y.reshape(y.shape[0], n * chunk, *y.shape[3:])[:, :length]

  body = jax.checkpoint(lambda xs: fn(*xs))
  out = jax.lax.map(body, tuple(split(x) for x in arrays))
  return jax.tree.map(merge, out)


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
