"""What a run leaves behind: `metrics.jsonl`, TensorBoard events, log lines.

Only process 0 writes; the other processes get a writer that does nothing, so
callers never branch on the process index.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

from ketchup_jax import fileio


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Appends one JSON object per logged step and mirrors it to TensorBoard.

  Args:
    workdir: The run directory; writes `metrics.jsonl` and `tensorboard/`.
    enabled: False on processes other than 0.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    """Records `metrics` (scalars) of `stage` at `step`."""
    if not self.enabled:
      return
    values = {name: _scalar(v) for name, v in metrics.items()}
    record = {"stage": stage, "step": int(step), "time": time.time(),
              **{k: (v if math.isfinite(v) else str(v))
                 for k, v in values.items()}}
    # Whole lines only, also when the disk is full.
    fileio.append_line(self._jsonl, json.dumps(record))
    for name, value in values.items():
      self._tb.add_scalar(f"{stage}/{name}", value, int(step))
    self._tb.flush()

  def rewind(self, stage: str, step: int) -> int:
    """Drops `stage`'s records (and its `_diag` / `_val` ones) after `step`.

    A stage resumed from its checkpoint at `step` redoes the later steps, so
    their records from the interrupted run go: every (stage, step) stays in
    `metrics.jsonl` once. A stage restarted from step 0 scores its starting
    point again, so its step-0 validation record goes too. A line cut short by a kill is dropped as well.

    Returns:
      The number of lines dropped.
    """
    if not self.enabled or not os.path.exists(self._jsonl):
      return 0
    with open(self._jsonl, encoding="utf-8") as f:
      lines = f.read().splitlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      name, at = record.get("stage"), record.get("step", 0)
      if name in (stage, f"{stage}_diag", f"{stage}_val") and at > step:
        continue
      if name == f"{stage}_val" and step == 0:  # the start is scored again
        continue
      kept.append(line)
    if len(kept) != len(lines):
      fileio.atomic_write(self._jsonl, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)

  def log_line(self, stage: str, step: int, total: int,
               metrics: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """One human-readable line with the chosen metrics."""
    if not self.enabled:
      return
    shown = " ".join(f"{k}={_scalar(metrics[k]):.4g}" for k in keys
                     if k in metrics)
    # Through tqdm, so the line lands above the progress bar, not inside it.
    tqdm.tqdm.write(f"[{stage}] step {step}/{total} {shown}", file=sys.stderr)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
