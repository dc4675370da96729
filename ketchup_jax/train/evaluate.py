"""Greedy decoding of a split and the task's metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm

from ketchup_jax import metrics as metrics_lib
from ketchup_jax.data import batching
from ketchup_jax.data import tokenizers

Batch = dict[str, np.ndarray]


def decode_split(
    generate: Callable[[Batch], Any],
    data: batching.TokenizedExamples,
    *,
    batch_size: int,
    batch_multiple: int,
    tokenizer: tokenizers.Tokenizer,
    desc: str = "decode",
    source_buckets: tuple[int, ...] | None = None,
    show_progress: bool = True,
) -> list[str]:
  """Decodes every example of `data` in order with `generate`.

  Args:
    generate: Batch -> token ids [B, T] (greedy decoding of one model).
    data: The tokenised split.
    batch_size: Rows per batch (the last batch is padded with filler rows).
    batch_multiple: Data shards; `batch_size` must be a multiple.
    tokenizer: Turns ids back into text.
    desc: Progress bar label.
    source_buckets: Source lengths to pad to (defaults from the data).
    show_progress: Draw a progress bar (process 0 only).

  Returns:
    One decoded string per example, in data order.
  """
  it = batching.BatchIterator(
      data, batch_size=batch_size, batch_multiple=batch_multiple,
      shuffle=False, drop_remainder=False, num_epochs=1,
      source_buckets=source_buckets)
  texts: list[str] = []
  bar = tqdm.tqdm(total=len(data), desc=desc, unit="ex", leave=False,
                  disable=not show_progress or jax.process_index() != 0)
  for batch in it:
    ids = np.asarray(jax.device_get(generate(batch)))
    real = int(batch["example_mask"].sum())
    texts.extend(tokenizer.decode_batch(ids[:real].tolist()))
    bar.update(real)
  bar.close()
  return texts


def score(metric_names: tuple[str, ...], predictions: list[str],
          references: list[str]) -> dict[str, float]:
  """The task's metrics (0-100) on aligned predictions and references."""
  return metrics_lib.compute(metric_names, predictions, references)
