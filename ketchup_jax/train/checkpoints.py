"""Orbax checkpoints of a stage's `TrainState` under `DIR/checkpoints/<stage>`.

Saves are atomic (Orbax writes a temporary directory and renames it when
complete), so an interrupted save (a kill, a full disk) never becomes the
latest step. A checkpoint
that exists but cannot be read (files missing or truncated) is moved aside to
`DIR/checkpoints/<stage>.corrupt/<step>` with a warning naming it, and the
newest readable one is restored instead. Restores place every array with the
sharding of the abstract state they are given.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from ketchup_jax import distributed
from ketchup_jax import fileio


class StageCheckpoints:
  """Checkpoint manager of one stage.

  Args:
    directory: `DIR/checkpoints/<stage>`.
    max_to_keep: Checkpoints kept (the newest).
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self._max_to_keep = max_to_keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    """Saves `state` at `step` (blocking until it is on disk).

    Raises:
      fileio.DiskFullError: the disk filled up; the step was not committed,
        so the previous checkpoint is still the latest.
    """
    with fileio.naming_full_disk(os.path.join(self.directory, str(step))):
      self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
      self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default latest) into the shapes/shardings given.

    Args:
      abstract_state: A pytree of `jax.ShapeDtypeStruct` with shardings (or
        concrete arrays, whose shardings are used).
      step: Which step; the latest if None.
    """
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    logging.info("restoring %s step %d", self.directory, step)
    return self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract))

  def restore_latest_good(self, abstract_state: Any) -> Any | None:
    """Restores the newest readable checkpoint; None if there is none.

    Unreadable checkpoints are moved aside (never deleted) with a warning.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except
        aside = os.path.join(self.directory + ".corrupt",
                             f"{step}-{int(time.time())}")
        logging.warning(
            "checkpoint %s is unreadable (%s: %s); moved to %s, trying the "
            "previous one", os.path.join(self.directory, str(step)),
            type(e).__name__, str(e).splitlines()[0][:200], aside)
        if jax.process_index() == 0:
          os.makedirs(os.path.dirname(aside), exist_ok=True)
          shutil.move(os.path.join(self.directory, str(step)), aside)
        # Every process reopens the manager after the move, not before it.
        distributed.barrier(f"moved aside {self.directory} {step}")
        self._manager.close()
        self._manager = self._open()
    return None

  def close(self) -> None:
    self._manager.close()
