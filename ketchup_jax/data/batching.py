"""Tokenisation, truncation, bucketed padding and a resumable batch iterator.

A batch is a dict of numpy arrays (T5X feature names)::

    input_ids               [B, S] int32  source ids + EOS, 0-padded
    attention_mask          [B, S] int32  1 on real source tokens (a prefix mask)
    decoder_target_ids      [B, T] int32  target ids + EOS, 0-padded
    decoder_attention_mask  [B, T] int32  1 on real target tokens (a prefix mask)
    example_mask            [B]    int32  1 for real examples, 0 for filler rows

``S`` and ``T`` are bucketed: the smallest configured bucket that holds the longest row
in the batch (default buckets: powers of two from 8, then the maximum length), so a
jitted step compiles once per bucket pair rather than once per batch.

The order is a pure function of ``(seed, epoch)`` (:func:`hashing.permutation`), and
the iterator's position is one integer, the global step: an iterator started at
``start_step=s`` yields exactly the batches a fresh one yields after its first ``s``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from ketchup_jax.data import hashing
from ketchup_jax.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
  """Token ids of a split, each row ending in EOS and at most the max length.

  Attributes:
    sources: Per example, source ids + EOS, int32.
    targets: Per example, target ids + EOS, int32.
    max_source_len: Length cap the sources were truncated to (EOS included).
    max_target_len: Length cap the targets were truncated to (EOS included).
    pad_id: The tokenizer's pad id.
    stats: Counts: ``num_examples``, ``truncated_sources``, ``truncated_targets``,
      ``empty_sources``, ``empty_targets`` (text that encoded to no tokens).
  """
  sources: list[np.ndarray]
  targets: list[np.ndarray]
  max_source_len: int
  max_target_len: int
  pad_id: int
  stats: dict[str, int]

  def __len__(self) -> int:
    return len(self.sources)

  def rows(self, indices: Sequence[int]) -> tuple[list[np.ndarray],
                                                  list[np.ndarray]]:
    """The sources and targets of examples ``indices``, in that order."""
    return ([self.sources[i] for i in indices],
            [self.targets[i] for i in indices])


def _encode_capped(ids: list[int], *, max_len: int,
                   eos_id: int | None) -> tuple[np.ndarray, bool]:
  """The ids cut to ``max_len``, EOS last unless ``eos_id`` is None."""
  if eos_id is None:
    return np.asarray(ids[:max_len], dtype=np.int32), len(ids) > max_len
  truncated = len(ids) + 1 > max_len
  ids = ids[:max_len - 1] + [eos_id]
  return np.asarray(ids, dtype=np.int32), truncated


def _check_caps(max_source_len: int, max_target_len: int) -> None:
  for name, value in (("max_source_len", max_source_len),
                      ("max_target_len", max_target_len)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def _empty_stats() -> dict[str, int]:
  return {"num_examples": 0, "truncated_sources": 0, "truncated_targets": 0,
          "empty_sources": 0, "empty_targets": 0}


def tokenize(examples: Sequence[Mapping[str, str]], tokenizer: Tokenizer, *,
             max_source_len: int, max_target_len: int,
             prefix: str = "", source_eos: bool = True) -> TokenizedExamples:
  """Encodes ``prefix + source`` and ``target``, appends EOS, truncates to the caps.

  A sequence longer than its cap keeps its first ``cap − 1`` tokens and then EOS (the
  model always sees an end). Empty texts become just ``[EOS]`` and are counted.
  With ``source_eos=False`` (decoder-only models: the prompt runs on into the
  completion) sources get no EOS and keep their first ``max_source_len`` tokens.

  Args:
    examples: ``{"source", "target"}`` dicts.
    tokenizer: Any :class:`Tokenizer`.
    max_source_len: Source cap, EOS included (>= 1).
    max_target_len: Target cap, EOS included (>= 1).
    prefix: Prompt prefix prepended to every source.
    source_eos: Whether sources end with EOS (encoder-decoder models).

  Returns:
    The token ids and truncation/empty counts.
  """
  _check_caps(max_source_len, max_target_len)
  src_ids = tokenizer.encode_batch([prefix + ex["source"] for ex in examples])
  tgt_ids = tokenizer.encode_batch([ex["target"] for ex in examples])
  stats = dict(_empty_stats(), num_examples=len(examples))
  sources, targets = [], []
  for s, t in zip(src_ids, tgt_ids):
    stats["empty_sources"] += not s
    stats["empty_targets"] += not t
    s, s_cut = _encode_capped(s, max_len=max_source_len,
                              eos_id=tokenizer.eos_id if source_eos else None)
    t, t_cut = _encode_capped(t, max_len=max_target_len, eos_id=tokenizer.eos_id)
    stats["truncated_sources"] += s_cut
    stats["truncated_targets"] += t_cut
    sources.append(s)
    targets.append(t)
  return TokenizedExamples(sources, targets, max_source_len, max_target_len,
                           tokenizer.pad_id, stats)


class LazyTokenized:
  """A split whose examples are tokenised only when a batch needs them.

  Per-host input: with several processes, each :class:`BatchIterator` asks for
  its own rows of every global batch, so a process tokenises only the examples
  its devices are fed (about ``1/process_count`` of the split per epoch)
  instead of the whole split. The token ids are exactly :func:`tokenize`'s.
  Nothing is cached here; the iterator keeps one epoch's rows.

  Args:
    examples: ``{"source", "target"}`` dicts (the raw text of the split).
    tokenizer: Any :class:`Tokenizer`.
    max_source_len: Source cap, EOS included (>= 1).
    max_target_len: Target cap, EOS included (>= 1).
    prefix: Prompt prefix prepended to every source.
    source_eos: Whether sources end with EOS (as :func:`tokenize`).

  Attributes:
    stats: :class:`TokenizedExamples` counts, summed over every row tokenised
      so far by this process (``num_examples`` counts rows tokenised, with
      repeats across epochs).
  """

  def __init__(self, examples: Sequence[Mapping[str, str]], tokenizer: Tokenizer,
               *, max_source_len: int, max_target_len: int, prefix: str = "",
               source_eos: bool = True):
    _check_caps(max_source_len, max_target_len)
    self._examples = examples
    self._tokenizer = tokenizer
    self._prefix = prefix
    self._source_eos = source_eos
    self.max_source_len = max_source_len
    self.max_target_len = max_target_len
    self.pad_id = tokenizer.pad_id
    self.stats = _empty_stats()

  def __len__(self) -> int:
    return len(self._examples)

  def rows(self, indices: Sequence[int]) -> tuple[list[np.ndarray],
                                                  list[np.ndarray]]:
    """Tokenises examples ``indices`` (one batched tokenizer call)."""
    part = tokenize([self._examples[i] for i in indices], self._tokenizer,
                    max_source_len=self.max_source_len,
                    max_target_len=self.max_target_len, prefix=self._prefix,
                    source_eos=self._source_eos)
    for key, count in part.stats.items():
      self.stats[key] += count
    return part.sources, part.targets


def default_buckets(max_len: int, *, min_len: int = 8) -> tuple[int, ...]:
  """Powers of two from ``min_len`` below ``max_len``, then ``max_len`` itself."""
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  buckets = []
  b = min_len
  while b < max_len:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_len,)


def _check_buckets(buckets: Sequence[int], max_len: int, name: str) -> tuple[int, ...]:
  buckets = tuple(buckets)
  if (not buckets or any(not isinstance(b, int) or b < 1 for b in buckets)
      or list(buckets) != sorted(set(buckets)) or buckets[-1] < max_len):
    raise ValueError(f"{name} must be strictly increasing positive ints ending at >= "
                     f"the max length {max_len}, got {buckets!r}")
  return buckets


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= ``length``."""
  for b in buckets:
    if b >= length:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _pad_rows(rows: Sequence[np.ndarray], *, num_rows: int, length: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((num_rows, length), pad_id, dtype=np.int32)
  mask = np.zeros((num_rows, length), dtype=np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask


def collate(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
            pad_id: int, source_buckets: Sequence[int], target_buckets: Sequence[int],
            num_rows: int | None = None) -> Batch:
  """Pads a list of examples into one batch (see the module docstring for the keys).

  Args:
    sources: Source ids (EOS included) per example.
    targets: Target ids (EOS included) per example.
    pad_id: Pad id (also the decoder start id).
    source_buckets: Allowed source lengths ``S``.
    target_buckets: Allowed target lengths ``T``.
    num_rows: Batch rows ``B`` (>= number of examples; filler rows are all pad with
      ``example_mask`` 0). Defaults to the number of examples.

  Returns:
    The batch.
  """
  n = len(sources)
  num_rows = n if num_rows is None else num_rows
  if num_rows < n or len(targets) != n:
    raise ValueError(f"need len(targets) == len(sources) <= num_rows, got "
                     f"{len(sources)}, {len(targets)}, {num_rows}")
  s_len = bucket_length(max((len(r) for r in sources), default=1), source_buckets)
  t_len = bucket_length(max((len(r) for r in targets), default=1), target_buckets)
  input_ids, attention_mask = _pad_rows(sources, num_rows=num_rows, length=s_len,
                                        pad_id=pad_id)
  target_ids, target_mask = _pad_rows(targets, num_rows=num_rows, length=t_len,
                                      pad_id=pad_id)
  example_mask = np.zeros((num_rows,), dtype=np.int32)
  example_mask[:n] = 1
  return {
      "input_ids": input_ids,  # [B, S]
      "attention_mask": attention_mask,  # [B, S]
      "decoder_target_ids": target_ids,  # [B, T]
      "decoder_attention_mask": target_mask,  # [B, T]
      "example_mask": example_mask,  # [B]
  }


class BatchIterator:
  """Deterministic, resumable batches over :class:`TokenizedExamples`.

  Global step ``g`` is batch ``g % steps_per_epoch`` of epoch ``g // steps_per_epoch``;
  epoch ``e``'s order is ``permutation(n, seed, e)`` (or the data order when
  ``shuffle=False``). With several processes each yields its contiguous slice of
  every global batch (rows ``[p·B/P, (p+1)·B/P)``), so all processes agree on the
  global batch.

  Args:
    data: Tokenised examples.
    batch_size: Global batch size; must be a multiple of ``batch_multiple`` and of
      ``process_count``.
    batch_multiple: The number of data shards (devices on the data axes).
    shuffle: Shuffle each epoch by ``(seed, epoch)``.
    seed: Shuffle seed.
    drop_remainder: Drop the last partial batch of each epoch (training); otherwise
      it is filled with pad rows whose ``example_mask`` is 0 (evaluation).
    num_epochs: Stop after this many epochs; None repeats forever.
    start_step: Global step to start from (resume).
    source_buckets: Allowed source lengths; default :func:`default_buckets`.
    target_buckets: Allowed target lengths; default :func:`default_buckets`.
    process_index: This process's index.
    process_count: Number of processes.
    local_rows: ``(start, stop)``: yield these rows of every global batch instead
      of the ``process_index`` slice (the rows this process's devices hold, from
      :func:`ketchup_jax.distributed.batch_rows`).
    agree_lengths: For :class:`LazyTokenized` data when this iterator yields only
      part of each batch: maps this process's ``[steps, 2]`` int array of
      longest (source, target) rows per batch to the elementwise maximum over
      all processes (:func:`ketchup_jax.distributed.max_over_processes`), so
      every process pads to the same bucket without tokenising the others'
      rows. Called once per epoch, by every process at the same step.

  With :class:`LazyTokenized` data the iterator tokenises, at the first batch
  of each epoch, its own rows of the epoch's remaining batches (one tokenizer
  call) and keeps only those.
  """

  def __init__(self, data: TokenizedExamples | LazyTokenized, *, batch_size: int,
               batch_multiple: int = 1, shuffle: bool = True, seed: int = 0,
               drop_remainder: bool = True, num_epochs: int | None = None,
               start_step: int = 0, source_buckets: Sequence[int] | None = None,
               target_buckets: Sequence[int] | None = None, process_index: int = 0,
               process_count: int = 1, local_rows: tuple[int, int] | None = None,
               agree_lengths: Callable[[np.ndarray], np.ndarray] | None = None):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(batch_multiple, int) or batch_multiple < 1:
      raise ValueError(f"batch_multiple must be a positive int, got {batch_multiple!r}")
    if batch_size % batch_multiple:
      raise ValueError(f"batch_size must be divisible by batch_multiple (the number of "
                       f"data shards), got batch_size={batch_size}, "
                       f"batch_multiple={batch_multiple}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got "
                       f"{process_index}, {process_count}")
    if batch_size % process_count:
      raise ValueError(f"batch_size must be divisible by process_count, got "
                       f"batch_size={batch_size}, process_count={process_count}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
      raise ValueError(f"num_epochs must be None or a positive int, got {num_epochs!r}")
    n = len(data)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    if steps == 0:
      raise ValueError(f"no batches: {n} examples with batch_size={batch_size} and "
                       f"drop_remainder={drop_remainder}")
    if not isinstance(start_step, int) or start_step < 0:
      raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
    self._data = data
    self._batch_size = batch_size
    self._shuffle = shuffle
    self._seed = seed
    self._num_epochs = num_epochs
    self._steps_per_epoch = steps
    self._step = start_step
    self._source_buckets = _check_buckets(
        source_buckets or default_buckets(data.max_source_len), data.max_source_len,
        "source_buckets")
    self._target_buckets = _check_buckets(
        target_buckets or default_buckets(data.max_target_len), data.max_target_len,
        "target_buckets")
    local = batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    if local_rows is not None:
      start, stop = local_rows
      if not 0 <= start < stop <= batch_size:
        raise ValueError(f"local_rows must be (start, stop) with 0 <= start < stop <= "
                         f"batch_size={batch_size}, got {local_rows!r}")
      self._rows = slice(start, stop)
    self._order_epoch = -1
    self._order = np.arange(n)
    self._lazy = not isinstance(data, TokenizedExamples)
    partial = self._rows != slice(0, batch_size)
    if self._lazy and partial and agree_lengths is None:
      raise ValueError("LazyTokenized data fed in part (local_rows or "
                       "process_count > 1) needs agree_lengths, the maximum "
                       "over processes of each batch's longest rows")
    self._agree = agree_lengths
    self._plan_epoch = -1
    self._plan: tuple[int, list[tuple[list[np.ndarray], list[np.ndarray]]],
                      np.ndarray] | None = None

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch."""
    return self._steps_per_epoch

  @property
  def step(self) -> int:
    """Global step of the next batch; pass it as ``start_step`` to resume."""
    return self._step

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self._step // self._steps_per_epoch

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      n = len(self._data)
      self._order = (hashing.permutation(n, seed=self._seed, epoch=epoch)
                     if self._shuffle else np.arange(n))
      self._order_epoch = epoch
    return self._order

  def __iter__(self) -> Iterator[Batch]:
    return self

  def _lazy_plan(self, epoch: int, index: int
                 ) -> tuple[list[np.ndarray], list[np.ndarray], int, int]:
    """This process's rows of batch ``index`` and the batch's raw max lengths."""
    if self._plan_epoch != epoch or index < self._plan[0]:
      order = self._epoch_order(epoch)
      b = self._batch_size
      local = [order[i * b:(i + 1) * b][self._rows]
               for i in range(index, self._steps_per_epoch)]
      sources, targets = self._data.rows([int(i) for rows in local for i in rows])
      batches, pos = [], 0
      lengths = np.ones((len(local), 2), dtype=np.int32)
      for j, rows in enumerate(local):
        src, tgt = sources[pos:pos + len(rows)], targets[pos:pos + len(rows)]
        pos += len(rows)
        if src:
          lengths[j] = max(len(r) for r in src), max(len(r) for r in tgt)
        batches.append((src, tgt))
      if self._agree is not None:
        lengths = np.asarray(self._agree(lengths))
      self._plan, self._plan_epoch = (index, batches, lengths), epoch
    first, batches, lengths = self._plan
    src, tgt = batches[index - first]
    return src, tgt, int(lengths[index - first, 0]), int(lengths[index - first, 1])

  def __next__(self) -> Batch:
    epoch, index = divmod(self._step, self._steps_per_epoch)
    if self._num_epochs is not None and epoch >= self._num_epochs:
      raise StopIteration
    if self._lazy:
      sources, targets, s_max, t_max = self._lazy_plan(epoch, index)
    else:
      order = self._epoch_order(epoch)
      global_rows = order[index * self._batch_size:(index + 1) * self._batch_size]
      # The bucket is chosen from the global batch so every process pads alike.
      s_max = max(len(self._data.sources[i]) for i in global_rows)
      t_max = max(len(self._data.targets[i]) for i in global_rows)
      sources, targets = self._data.rows(global_rows[self._rows])
    self._step += 1
    return collate(sources, targets, pad_id=self._data.pad_id,
                   source_buckets=(bucket_length(s_max, self._source_buckets),),
                   target_buckets=(bucket_length(t_max, self._target_buckets),),
                   num_rows=self._rows.stop - self._rows.start)
