"""Argument checks shared by the pure estimators (`returns`, `losses`, ...).

A leaf module: it imports nothing of ours, so the estimators stay "arrays in,
arrays out". Every check runs at trace time on shapes and dtypes; checks on
values (is the mask a prefix mask?) run only when the value is concrete, that
is, when the caller has not wrapped the estimator in its own `jax.jit`.
"""

from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_choice(name: str, value: Any, allowed: Collection[str]) -> None:
  """Raises if `value` is not one of `allowed`."""
  if value not in allowed:
    raise ValueError(
        f"{name} must be one of {sorted(allowed)}, got {value!r}")


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  """Raises if `x` does not have `rank` dimensions (`layout` names them)."""
  if len(_shape(x)) != rank:
    raise ValueError(
        f"{name} must have shape {layout} (rank {rank}), got shape "
        f"{_shape(x)}")


def check_float(name: str, x: Any) -> None:
  """Raises if `x` is not a floating-point array (e.g. integer logits)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(
        f"{name} must be a floating-point array (float32, bfloat16, ...), got "
        f"dtype {jnp.result_type(x)}")


def check_int(name: str, x: Any) -> None:
  """Raises if `x` is not an integer array (token ids)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(
        f"{name} must be an integer array of token ids, got dtype "
        f"{jnp.result_type(x)}")


def check_same_shape(names_and_arrays: dict[str, Any]) -> None:
  """Raises unless every array has the same shape, naming each shape."""
  shapes = {name: _shape(x) for name, x in names_and_arrays.items()}
  if len(set(shapes.values())) > 1:
    listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    raise ValueError(f"shapes must match, got {listed}")


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def check_positive_int(name: str, value: Any) -> None:
  """Raises unless `value` is a Python int >= 1 (it sets static shapes)."""
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(f"{name} must be a Python int >= 1, got {value!r}")


def check_prefix_mask(name: str, mask: Any) -> None:
  """Raises if a concrete `mask` [B, T] is not a 0/1 prefix mask.

  A prefix mask is 1 from position 0 up to and including the last real token
  and 0 after it. Under an outer `jax.jit` the mask is abstract and this check
  is skipped; the estimators then read the terminal as the last 1 in the row.
  """
  if isinstance(mask, jax.core.Tracer):
    return
  m = np.asarray(mask)
  if not np.all((m == 0) | (m == 1)):
    bad = m[(m != 0) & (m != 1)].ravel()[0].item()
    raise ValueError(f"{name} must hold only 0 and 1, found {bad!r}")
  m = m.astype(bool)
  holes = m[:, 1:] & ~m[:, :-1]  # a 1 that follows a 0
  if holes.any():
    row, col = np.argwhere(holes)[0]
    raise ValueError(
        f"{name} must be a prefix mask (1 up to the last real token, then 0); "
        f"row {row} has a 0 at position {col} followed by a 1 at {col + 1}: "
        f"{m[row].astype(int).tolist()}")


def check_token_ids(name: str, ids: Any, mask: Any, vocab_size: int) -> None:
  """Raises if concrete token `ids` [B, T] at real positions are outside [0, V).

  Real positions are those where `mask` [B, T] is non-zero; like
  `check_prefix_mask`, a value check, skipped under an outer `jax.jit`.
  """
  if isinstance(ids, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
    return
  ids_np, real = np.asarray(ids), np.asarray(mask) != 0
  bad = real & ((ids_np < 0) | (ids_np >= vocab_size))
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(
        f"{name} must be token ids in [0, {vocab_size}) at real positions, "
        f"got {ids_np[row, col]} at row {row}, position {col}")
