"""The teacher on its own devices (`config.teacher_mesh.devices` > 0).

By default the frozen teacher lives on the student's mesh, FSDP-sharded like
the student, and one jitted `rollouts.rl_step` does rollout, teacher pass and
update. With `teacher_mesh.devices = N`, the last N devices form a second
mesh that holds only the teacher; the
student, its optimizer state and the data stay on the others. One RL step is
then three jitted pieces, built from the same functions as `rollouts.rl_step`:

1. `rollouts.student_rollout` on the student mesh;
2. the sources and the [B, T] rollout arrays are put on the teacher mesh's
   batch sharding (`jax.device_put`), `rollouts.teacher_scores` runs there;
3. its [B, T] / [B] Q-values and values come back, and
   `rollouts.combine_scores` + `rollouts.rl_update` run on the student mesh.

Only [B, S] / [B, T] / [B] arrays cross between the meshes, never the
[B, T, V] logits. The random numbers are those of `rollouts.rl_step`, so the
losses agree with the same-mesh step up to float rounding. SeqKD
pre-distillation is split the same way (the teacher's greedy outputs cross);
word-level distillation (kl/rkl/js/tvd, which needs [B, T, V] teacher logits
next to the student's) and the RL gradient diagnostics are refused, and so
is a run of several processes (for now: see `make_teacher_mesh`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from ketchup_jax import partitioning
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps

MESH_AXES = ("data", "fsdp", "tensor")


def split_devices(n_teacher: int,
                  devices: Sequence[jax.Device] | None = None
                  ) -> tuple[list[jax.Device], list[jax.Device]]:
  """(student devices, teacher devices): the teacher takes the last N.

  Devices are ordered by (process, id). With several processes the teacher
  must take whole processes, so that no host feeds both meshes (the rule
  for when `make_teacher_mesh` accepts several processes; it refuses them
  for now).

  Raises:
    ValueError: if N leaves the student no device, exceeds the devices, or
      splits a process's devices.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  total = len(devices)
  if n_teacher >= total:
    raise ValueError(
        f"config.teacher_mesh.devices={n_teacher} must be smaller than the "
        f"device count {total}: the student needs at least one device")
  processes = sorted({d.process_index for d in devices})
  if len(processes) > 1:
    per_process = total // len(processes)
    if n_teacher % per_process:
      raise ValueError(
          f"config.teacher_mesh.devices={n_teacher} must be a multiple of "
          f"the {per_process} devices of one process ({len(processes)} "
          f"processes): the teacher takes whole processes")
  return devices[:total - n_teacher], devices[total - n_teacher:]


def _resolve(sizes: dict[str, int], n: int) -> tuple[int, int, int]:
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if n % known:
      raise ValueError(
          f"config.teacher_mesh {sizes}: the sizes other than -1 multiply to "
          f"{known}, which must divide teacher_mesh.devices={n}")
    sizes = {a: (n // known if s == -1 else s) for a, s in sizes.items()}
  if math.prod(sizes.values()) != n:
    raise ValueError(
        f"config.teacher_mesh data x fsdp x tensor = "
        f"{' x '.join(str(sizes[a]) for a in MESH_AXES)} must multiply to "
        f"teacher_mesh.devices={n}")
  return tuple(sizes[a] for a in MESH_AXES)


def make_teacher_mesh(cfg: ml_collections.ConfigDict,
                      devices: Sequence[jax.Device] | None = None
                      ) -> tuple[list[jax.Device] | None, Mesh | None]:
  """(student devices, teacher mesh), or (None, None) for the shared mesh.

  `cfg` has passed `settings.check_config`.
  """
  n = cfg.get("teacher_mesh", {}).get("devices") or 0
  if not n:
    return None, None
  if jax.process_count() > 1:
    # Each process feeds the rows of the batch its devices hold
    # (`distributed.batch_rows`); a process holding only teacher devices
    # would feed none, which the data path does not handle yet.
    raise ValueError(
        f"config.teacher_mesh.devices={n} with {jax.process_count()} "
        f"processes is not supported yet (a process holding only teacher "
        f"devices feeds no batch rows); set teacher_mesh.devices=0")
  student, teacher = split_devices(n, devices)
  data, fsdp, tensor = _resolve(
      {a: cfg.teacher_mesh.get(a, 1) for a in MESH_AXES}, n)
  return student, partitioning.make_mesh(data=data, fsdp=fsdp, tensor=tensor,
                                         devices=teacher)


def check_batch_sizes(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Batches of the stages that use the teacher must split over its mesh."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  for stage in ("predistill", "rl"):
    if cfg[stage].batch_size % rows:
      raise ValueError(
          f"config.{stage}.batch_size={cfg[stage].batch_size} must be a "
          f"multiple of the teacher mesh's data shards (teacher_mesh data x "
          f"fsdp = {rows})")


class SplitStep:
  """A step whose pieces run on two meshes.

  `loop.train_stage` calls `compile(state shardings, batch sharding,
  replicated sharding)` instead of wrapping the step in one `jax.jit`; the
  result is called like a jitted step: `(state, teacher_params, batch) ->
  (state, metrics)`, the state donated.
  """

  def compile(self, state_shardings: Any, batch: NamedSharding,
              replicated: NamedSharding) -> Callable:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class RLStep(SplitStep):
  """`rollouts.rl_step` with the teacher pass on `teacher_mesh`.

  `models.mesh` is the student's mesh; the teacher's parameters must already
  be placed on `teacher_mesh`.
  """
  models: steps.StepModels
  teacher_mesh: Mesh
  optim: state_lib.OptimConfig
  rl: rollouts.RLConfig

  def rollout(self, state: state_lib.TrainState,
              batch: steps.Batch) -> rollouts.Rollout:
    """Piece 1 (student mesh): the same sample key as `rollouts.rl_step`."""
    _, sample_rng = jax.random.split(state.rng)
    return rollouts.student_rollout(state.params, batch, sample_rng,
                                    models=self.models, rl=self.rl)

  def score(self, teacher_params: Any,
            sent: dict[str, jax.Array]) -> rollouts.TeacherScores:
    """Piece 2 (teacher mesh): Q-values and values of the rollout."""
    models = dataclasses.replace(self.models, mesh=self.teacher_mesh)
    return rollouts.teacher_scores(
        teacher_params, sent, sent["actions"], sent["mask"], sent["finished"],
        models=models, rl=self.rl)

  def update(self, state: state_lib.TrainState, batch: steps.Batch,
             rollout: rollouts.Rollout, scores: rollouts.TeacherScores
             ) -> tuple[state_lib.TrainState, steps.Metrics]:
    """Piece 3 (student mesh): returns, loss and the update."""
    rng, _ = jax.random.split(state.rng)
    scored = rollouts.combine_scores(rollout, scores, rl=self.rl)
    return rollouts.rl_update(state, batch, scored, rng, models=self.models,
                              optim=self.optim, rl=self.rl)

  def to_teacher(self, batch: steps.Batch,
                 rollout: rollouts.Rollout) -> dict[str, jax.Array]:
    """What crosses to the teacher: sources [B, S], rollout [B, T] / [B]."""
    sent = {"input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "actions": rollout.actions, "mask": rollout.mask,
            "finished": rollout.finished}
    return jax.device_put(sent, partitioning.batch_sharding(self.teacher_mesh))

  def to_student(self, scores: rollouts.TeacherScores
                 ) -> rollouts.TeacherScores:
    """What crosses back: [B, T] Q-values / values and [B] bootstrap values."""
    return jax.device_put(scores, partitioning.batch_sharding(self.models.mesh))

  def compile(self, state_shardings: Any, batch: NamedSharding,
              replicated: NamedSharding) -> Callable:
    rollout = jax.jit(self.rollout, in_shardings=(state_shardings, batch))
    score = jax.jit(self.score)
    update = jax.jit(self.update, donate_argnums=0,
                     out_shardings=(state_shardings, replicated))

    def step(state, teacher_params, batch_arrays):
      out = rollout(state, batch_arrays)
      scores = score(teacher_params, self.to_teacher(batch_arrays, out))
      return update(state, batch_arrays, out, self.to_student(scores))
    return step


@dataclasses.dataclass(frozen=True)
class SeqKDStep(SplitStep):
  """`steps.seqkd_step` with the teacher's greedy decoding on its mesh."""
  models: steps.StepModels
  teacher_mesh: Mesh
  optim: state_lib.OptimConfig
  max_decode_len: int

  def targets(self, teacher_params: Any, rng: jax.Array,
              sources: steps.Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng, _ = jax.random.split(rng)  # the key `steps.seqkd_step` samples with
    models = dataclasses.replace(self.models, mesh=self.teacher_mesh)
    return steps.seqkd_targets(teacher_params, sources, rng, models=models,
                               max_decode_len=self.max_decode_len)

  def compile(self, state_shardings: Any, batch: NamedSharding,
              replicated: NamedSharding) -> Callable:
    targets = jax.jit(self.targets)
    update = jax.jit(
        lambda state, b, t, m, d: steps.seqkd_update(
            state, b, t, m, d, models=self.models, optim=self.optim),
        donate_argnums=0, out_shardings=(state_shardings, replicated))
    on_teacher = partitioning.batch_sharding(self.teacher_mesh)

    def step(state, teacher_params, batch_arrays):
      sources = jax.device_put(
          {k: batch_arrays[k] for k in ("input_ids", "attention_mask")},
          on_teacher)
      rng = jax.device_put(state.rng, NamedSharding(self.teacher_mesh, P()))
      out = targets(teacher_params, rng, sources)
      out = jax.device_put(out, batch)
      return update(state, batch_arrays, *out)
    return step
