"""Preemption: SIGTERM / SIGINT stop a run at a step boundary, saved.

`StopRequest` catches the signal; the training loop (`loop.train_stage`)
checkpoints at the next step boundary and raises `Preempted`, which the
pipeline turns into a message and exit status 0: rerunning the same command
resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class Preempted(Exception):
  """Raised at a step boundary after SIGTERM/SIGINT, once the state is saved."""

  def __init__(self, stage: str, step: int, total: int, signal_name: str):
    super().__init__(f"{signal_name}: stopped stage {stage} at step "
                     f"{step}/{total}, checkpoint saved")
    self.stage, self.step, self.total = stage, step, total
    self.signal_name = signal_name


class StopRequest:
  """SIGTERM / SIGINT handling: stop at the next step boundary, saved.

  The first signal asks the training loop to checkpoint and stop; if that
  has not happened within `grace_s` seconds the process exits (status 1)
  without writing. A second signal exits at once. Orbax writes checkpoints
  to a temporary directory and renames it when complete, so neither exit
  leaves a half-written checkpoint as the latest.
  """

  def __init__(self, grace_s: float):
    self.grace_s = grace_s
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      print(f"{name} again: exiting now without saving", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signal_name = name
    print(f"{name}: saving a checkpoint at the next step boundary (within "
          f"{self.grace_s:g} s)...", file=sys.stderr, flush=True)
    timer = threading.Timer(self.grace_s, self._expire, args=(name,))
    timer.daemon = True
    timer.start()

  def _expire(self, name: str) -> None:
    print(f"{name}: no step boundary within {self.grace_s:g} s; exiting "
          f"without saving", file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
