"""T5's relative position bias: bucketed key-query distances, one learned
bias per bucket and head, added to the attention scores."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ketchup_jax.models import layers


def relative_position_bucket(
    relative_position: np.ndarray,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> np.ndarray:
  """T5's relative position buckets (Mesh TensorFlow), computed on the host.

  Half of the buckets (per direction) are exact small distances; the rest
  grow logarithmically up to `max_distance`, beyond which all positions share
  the last bucket. The log is evaluated in float32 as PyTorch does, so bucket
  boundaries agree with transformers exactly.

  Args:
    relative_position: int array, `key_position - query_position`.
    bidirectional: Encoder (True) or causal decoder (False; positive
      distances, i.e. future keys, fall in bucket 0).
    num_buckets: Total number of buckets.
    max_distance: Distance from which on the last bucket is used.

  Returns:
    int32 array of buckets in `[0, num_buckets)`, same shape as the input.
  """
  n = np.asarray(relative_position, dtype=np.int64)
  buckets = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    buckets += (n > 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = -np.minimum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore"):
    scaled = (np.log(n.astype(np.float32) / np.float32(max_exact)) /
              np.float32(math.log(max_distance / max_exact)) *
              np.float32(num_buckets - max_exact))
  scaled = np.where(is_small, 0.0, scaled)  # Drop log(0) before the cast.
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return (buckets + np.where(is_small, n, large)).astype(np.int32)


class RelativePositionBias(layers.Base):
  """Learned per-head bias of the bucketed relative position, one per stack."""
  bidirectional: bool = True

  def setup(self):
    cfg = self.config
    self.embedding = self._param(
        "embedding", (cfg.relative_attention_num_buckets, cfg.num_heads),
        ("relpos_buckets", "heads"))

  def _buckets(self, relative: np.ndarray) -> np.ndarray:
    cfg = self.config
    return relative_position_bucket(
        relative, bidirectional=self.bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)

  def __call__(self, q_len: int, k_len: int) -> jax.Array:
    """Bias `[1, heads, q_len, k_len]` (float32) for queries at 0..q_len-1."""
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    values = jnp.take(self.embedding.astype(jnp.float32),
                      self._buckets(relative), axis=0)  # [q, k, heads]
    return jnp.transpose(values, (2, 0, 1))[None]

  def at(self, index: jax.Array, k_len: int) -> jax.Array:
    """Bias `[1, heads, 1, k_len]` for one query at (traced) `index`."""
    table = self._buckets(np.arange(-k_len, k_len + 1))  # Static lookup.
    buckets = jnp.take(jnp.asarray(table), jnp.arange(k_len) - index + k_len)
    values = jnp.take(self.embedding.astype(jnp.float32), buckets, axis=0)
    return jnp.transpose(values, (1, 0))[None, :, None, :]
