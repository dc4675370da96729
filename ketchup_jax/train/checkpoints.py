"""Orbax checkpoints of a stage's `TrainState` under `DIR/checkpoints/<stage>`.

Saves are atomic (Orbax writes a temporary directory and renames it when
complete), so an interrupted save never becomes the latest step. Restores
place every array with the sharding of the abstract state they are given.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class StageCheckpoints:
  """Checkpoint manager of one stage.

  Args:
    directory: `DIR/checkpoints/<stage>`.
    max_to_keep: Checkpoints kept (the newest).
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               max_to_keep: int = 2):
    self.directory = os.fspath(directory)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(self.directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    """Saves `state` at `step` (blocking until it is on disk)."""
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

  def close(self) -> None:
    self._manager.close()
