"""Tests of tokenisation, bucketing and the resumable batch iterator."""
import itertools

import numpy as np
import pytest

from ketchup_jax.data import batching, tokenizers

TOK = tokenizers.ByteTokenizer()


def _examples(n):
  return [{"source": "s" * (1 + i % 13), "target": "t" * (i % 7)} for i in range(n)]


def _data(n=50, **kw):
  kw = {"max_source_len": 16, "max_target_len": 8, **kw}
  return batching.tokenize(_examples(n), TOK, **kw)


def test_tokenize_appends_eos_truncates_and_counts():
  examples = [{"source": "abc", "target": ""}, {"source": "x" * 20, "target": "yz"},
              {"source": "", "target": "w" * 9}]
  data = batching.tokenize(examples, TOK, max_source_len=8, max_target_len=4,
                           prefix="p:")
  assert data.sources[0].tolist() == TOK.encode("p:abc") + [1]
  assert data.targets[0].tolist() == [1]  # empty target: just EOS
  assert data.sources[1].tolist() == TOK.encode("p:xxxxx") + [1]  # 7 tokens + EOS
  assert data.targets[2].tolist() == TOK.encode("www") + [1]
  assert all(s.dtype == np.int32 for s in data.sources)
  assert data.stats == {"num_examples": 3, "truncated_sources": 1,
                        "truncated_targets": 1, "empty_sources": 0,
                        "empty_targets": 1}
  with pytest.raises(ValueError, match="max_target_len must be a positive int, got 0"):
    batching.tokenize(examples, TOK, max_source_len=8, max_target_len=0)


def test_buckets():
  assert batching.default_buckets(100) == (8, 16, 32, 64, 100)
  assert batching.default_buckets(64) == (8, 16, 32, 64)
  assert batching.default_buckets(5) == (5,)
  assert batching.bucket_length(9, (8, 16, 32)) == 16
  assert batching.bucket_length(16, (8, 16, 32)) == 16
  with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
    batching.bucket_length(33, (8, 16, 32))


def test_collate_layout_and_prefix_masks():
  batch = batching.collate([np.array([5, 6, 1]), np.array([7, 1])],
                           [np.array([9, 8, 1]), np.array([1])], pad_id=0,
                           source_buckets=(4, 8), target_buckets=(2, 4), num_rows=4)
  np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 1, 0], [7, 1, 0, 0],
                                                     [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0], [1, 1, 0, 0],
                                                          [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["decoder_target_ids"][:2], [[9, 8, 1, 0],
                                                                  [1, 0, 0, 0]])
  # No decoder inputs: the model family builds its own (T5 shifts right).
  assert "decoder_input_ids" not in batch
  np.testing.assert_array_equal(batch["decoder_attention_mask"][:2], [[1, 1, 1, 0],
                                                                      [1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["example_mask"], [1, 1, 0, 0])
  assert all(v.dtype == np.int32 for v in batch.values())


def test_batches_are_bucketed_prefix_masked_and_cover_each_epoch_once():
  data = _data(50)
  it = batching.BatchIterator(data, batch_size=8, seed=3, num_epochs=2)
  assert it.steps_per_epoch == 6
  batches = list(it)
  assert len(batches) == 12 and it.step == 12
  for b in batches:
    assert b["input_ids"].shape[0] == 8
    assert b["input_ids"].shape[1] in (8, 16) and b["decoder_target_ids"].shape[1] == 8
    for key, mask in (("input_ids", "attention_mask"),
                      ("decoder_target_ids", "decoder_attention_mask")):
      lengths = b[mask].sum(axis=1)
      # Prefix masks: ones then zeros; EOS at the last real position.
      expected = (np.arange(b[mask].shape[1]) < lengths[:, None]).astype(np.int32)
      np.testing.assert_array_equal(b[mask], expected)
      assert (b[key][np.arange(8), lengths - 1] == 1).all()
      assert (b[key][b[mask] == 0] == 0).all()
  sources = lambda bs: [TOK.decode(r) for b in bs for r in b["input_ids"]]
  first, second = sources(batches[:6]), sources(batches[6:])
  assert first != second  # a fresh order each epoch
  assert len(first) == 48  # 50 // 8 batches, remainder dropped


def test_order_is_deterministic_and_seeded():
  data = _data(40)
  take = lambda seed: [b["input_ids"] for b in
                       batching.BatchIterator(data, batch_size=4, seed=seed,
                                              num_epochs=1)]
  a, b, c = take(0), take(0), take(1)
  assert all((x == y).all() for x, y in zip(a, b))
  assert any(x.shape != y.shape or (x != y).any() for x, y in zip(a, c))


@pytest.mark.parametrize("start", [0, 1, 5, 6, 13])
def test_resume_from_any_step_matches_an_uninterrupted_run(start):
  data = _data(30)
  full = list(batching.BatchIterator(data, batch_size=5, seed=7, num_epochs=3))
  resumed = list(batching.BatchIterator(data, batch_size=5, seed=7, num_epochs=3,
                                        start_step=start))
  assert len(resumed) == len(full) - start
  for x, y in zip(full[start:], resumed):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_infinite_iteration_and_step_position():
  it = batching.BatchIterator(_data(10), batch_size=4, seed=0)
  for _ in range(7):
    next(it)
  assert (it.step, it.epoch, it.steps_per_epoch) == (7, 3, 2)


def test_eval_keeps_the_remainder_with_filler_rows():
  data = _data(10)
  batches = list(batching.BatchIterator(data, batch_size=4, shuffle=False,
                                        drop_remainder=False, num_epochs=1))
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]["example_mask"], [1, 1, 0, 0])
  assert (batches[-1]["attention_mask"][2:] == 0).all()
  decoded = [TOK.decode(r) for b in batches for r, m in
             zip(b["input_ids"], b["example_mask"]) if m]
  assert decoded == [ex["source"] for ex in _examples(10)]


def test_processes_get_slices_of_the_same_global_batch():
  data = _data(24)
  glob = next(batching.BatchIterator(data, batch_size=8, seed=1))
  parts = [next(batching.BatchIterator(data, batch_size=8, seed=1, process_index=p,
                                       process_count=2)) for p in range(2)]
  for k in glob:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob[k])


def test_custom_buckets_and_validation_errors():
  data = _data(16)
  b = next(batching.BatchIterator(data, batch_size=4, source_buckets=(16,),
                                  target_buckets=(4, 8)))
  assert b["input_ids"].shape[1] == 16
  with pytest.raises(ValueError, match="batch_size must be divisible by batch_multiple "
                     r"\(the number of data shards\), got batch_size=6, "
                     "batch_multiple=4"):
    batching.BatchIterator(data, batch_size=6, batch_multiple=4)
  with pytest.raises(ValueError, match="source_buckets must be strictly increasing"):
    batching.BatchIterator(data, batch_size=4, source_buckets=(4, 8))
  with pytest.raises(ValueError, match="no batches: 16 examples with batch_size=32"):
    batching.BatchIterator(data, batch_size=32)
  with pytest.raises(ValueError, match="batch_size must be divisible by process_count"):
    batching.BatchIterator(data, batch_size=4, process_count=3)


class _CountingTokenizer(tokenizers.ByteTokenizer):
  """A byte tokenizer that records every text it encodes."""

  def __init__(self):
    super().__init__()
    self.seen: list[str] = []

  def encode_batch(self, texts):
    self.seen.extend(texts)
    return super().encode_batch(texts)


def test_lazy_rows_equal_eager_tokenisation_and_count_stats():
  examples = _examples(20) + [{"source": "x" * 40, "target": ""}]
  eager = batching.tokenize(examples, TOK, max_source_len=16, max_target_len=8,
                            prefix="p:")
  lazy = batching.LazyTokenized(examples, TOK, max_source_len=16,
                                max_target_len=8, prefix="p:")
  assert len(lazy) == 21 and lazy.pad_id == TOK.pad_id
  src, tgt = lazy.rows([20, 3, 3])
  for got, want in zip(src + tgt, [eager.sources[i] for i in (20, 3, 3)] +
                       [eager.targets[i] for i in (20, 3, 3)]):
    np.testing.assert_array_equal(got, want)
  assert lazy.stats == {"num_examples": 3, "truncated_sources": 1,
                        "truncated_targets": 0, "empty_sources": 0,
                        "empty_targets": 1}
  with pytest.raises(ValueError, match="max_source_len must be a positive int"):
    batching.LazyTokenized(examples, TOK, max_source_len=0, max_target_len=8)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_per_host_lazy_batches_equal_the_global_batch(processes):
  """P simulated processes, each tokenising only its rows, in lockstep threads.

  The length agreement is a real rendezvous (a barrier), like the collective:
  every process's rows, padded to the agreed bucket, stacked in process order,
  are the single-process batch of the eagerly tokenised split, step by step,
  over two epochs and after a resume in the middle of one.
  """
  import threading  # pylint: disable=g-import-not-at-top
  n, b, steps, start = 50, 8, 14, 3  # 6 steps per epoch: steps 3..16
  examples = _examples(n)
  kw = dict(batch_size=b, seed=5, start_step=start)
  want = list(itertools.islice(batching.BatchIterator(_data(n), **kw), steps))
  barrier = threading.Barrier(processes)
  shared: list = [None] * processes
  got: list = [None] * processes
  toks = [_CountingTokenizer() for _ in range(processes)]

  def run(p):
    def agree(local):
      shared[p] = local
      barrier.wait()
      out = np.max(np.stack(shared), axis=0)
      barrier.wait()
      return out
    lazy = batching.LazyTokenized(examples, toks[p], max_source_len=16,
                                  max_target_len=8)
    it = batching.BatchIterator(lazy, process_index=p, process_count=processes,
                                agree_lengths=agree, **kw)
    got[p] = list(itertools.islice(it, steps))

  threads = [threading.Thread(target=run, args=(p,)) for p in range(processes)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  for step in range(steps):
    for key, value in want[step].items():
      np.testing.assert_array_equal(
          np.concatenate([got[p][step][key] for p in range(processes)]), value,
          err_msg=f"step {step} {key}")
  # Each process tokenised only its own rows, b / P of each batch (sources
  # and targets): steps 3..16 touch the 3 remaining batches of epoch 0 and
  # all 6 of epochs 1 and 2 (an epoch is planned whole at its first batch).
  for tok in toks:
    assert len(tok.seen) == 2 * (3 + 6 + 6) * b // processes


def test_lazy_data_fed_in_part_needs_a_length_agreement():
  lazy = batching.LazyTokenized(_examples(16), TOK, max_source_len=16,
                                max_target_len=8)
  with pytest.raises(ValueError, match="needs agree_lengths"):
    batching.BatchIterator(lazy, batch_size=8, process_index=1, process_count=2)
  # The whole batch on one process: no agreement needed.
  batch = next(batching.BatchIterator(lazy, batch_size=8))
  assert batch["input_ids"].shape[0] == 8
