"""Deterministic hashing and pseudo-random streams, stable across machines and versions.

Python's ``hash()`` is salted per process and numpy's ``Generator`` streams carry no
cross-version guarantee, so everything that decides a split, an order or a generated
example goes through the functions here: SplitMix64 (Steele et al. 2014) on explicit
unsigned 64-bit integers, and BLAKE2b for strings.
"""
from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
  """The SplitMix64 finaliser of ``x + golden`` (one 64-bit draw), on Python ints."""
  z = (x + _GOLDEN) & _MASK64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


def splitmix64_np(x: np.ndarray) -> np.ndarray:
  """Vectorised :func:`splitmix64` on a uint64 array (wrap-around arithmetic)."""
  z = np.asarray(x, dtype=np.uint64) + np.uint64(_GOLDEN)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def string_hash64(text: str) -> int:
  """A 64-bit unsigned hash of ``text`` (BLAKE2b of its UTF-8 bytes)."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def unit_interval(key: str, *, seed: int) -> float:
  """Maps ``(key, seed)`` to a deterministic float in [0, 1)."""
  return splitmix64(string_hash64(f"{seed}\x00{key}")) / float(1 << 64)


def permutation(n: int, *, seed: int, epoch: int = 0) -> np.ndarray:
  """A deterministic permutation of ``range(n)`` for ``(seed, epoch)``.

  Sorts the indices by a SplitMix64 hash of ``(seed, epoch, index)``; stable sort breaks
  the (astronomically rare) ties, so the result is the same on every machine.

  Args:
    n: Number of items.
    seed: Shuffle seed.
    epoch: Epoch number; every epoch gets its own order.

  Returns:
    [n] int64 permutation.
  """
  base = splitmix64(splitmix64(seed & _MASK64) ^ (epoch & _MASK64))
  keys = splitmix64_np(np.arange(n, dtype=np.uint64) ^ np.uint64(base))
  return np.argsort(keys, kind="stable").astype(np.int64)


class Stream:
  """A counter-based pseudo-random stream keyed by ``(seed, key)``.

  Draw ``i`` is ``splitmix64(base + i)``; the stream depends only on the seed, the key
  string and the number of draws taken, never on the Python or numpy version.
  """

  def __init__(self, *, seed: int, key: str):
    self._base = splitmix64(string_hash64(f"{seed}\x00{key}"))
    self._count = 0

  def next_u64(self) -> int:
    """The next raw 64-bit draw."""
    self._count += 1
    return splitmix64((self._base + self._count) & _MASK64)

  def randint(self, low: int, high: int) -> int:
    """A draw from ``[low, high]`` inclusive (modulo reduction; bias < 2**-50)."""
    if high < low:
      raise ValueError(f"randint needs low <= high, got low={low}, high={high}")
    return low + self.next_u64() % (high - low + 1)

  def choice(self, items):
    """One element of the non-empty sequence ``items``."""
    return items[self.randint(0, len(items) - 1)]
