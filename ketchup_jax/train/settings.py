"""The run configuration, checked once, before anything is written.

`check_config` reads every field of a pipeline config and raises one
`ValueError` naming the first bad one and its right form. The typed specs it
builds are what the rest of the package reads: `state.OptimConfig` (per
stage), `rollouts.RLConfig` (per K), `steps.GKDConfig`,
`validation.StageValidation`, and `StageId`, the typed name of a stage.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ketchup_jax import chunked
from ketchup_jax.models import family
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from ketchup_jax.train import teacher_slice
from ketchup_jax.train import validation

STAGES = ("teacher_sft", "predistill", "rl", "eval")
PREDISTILL_METHODS = ("seqkd", "kl", "rkl", "js", "tvd", "gkd")
TRAINING_STAGES = validation.TRAINING_STAGES


@dataclasses.dataclass(frozen=True)
class StageId:
  """One stage of a run: its kind (an entry of `STAGES`) and, for rl, K.

  `name` is what the run directory uses (`models/<name>/`, `stages/<name>.json`,
  the `stage` of metrics.jsonl records): `rl_k4` for the RL stage with K = 4.
  """
  kind: str
  k: int = 0

  def __post_init__(self):
    if self.kind not in STAGES:
      raise ValueError(f"a stage is one of {STAGES}, got {self.kind!r}")
    if (self.kind == "rl") != (self.k >= 1):
      raise ValueError(f"K >= 1 is given for the rl stage only, got "
                       f"{self.kind!r} with k={self.k!r}")

  @property
  def name(self) -> str:
    return f"rl_k{self.k}" if self.kind == "rl" else self.kind

  @property
  def section(self) -> str:
    """The config section holding its settings (`config.rl` for every K)."""
    return self.kind

  @property
  def trains(self) -> bool:
    return self.kind in TRAINING_STAGES

  def __str__(self) -> str:
    return self.name


def parse_stages(stages: str) -> tuple[str, ...]:
  """`config.stages` ("teacher_sft,predistill,rl,eval") as a tuple."""
  names = tuple(s.strip() for s in stages.split(",") if s.strip())
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise ValueError(f"config.stages must be a comma-separated list from "
                     f"{STAGES}, got {stages!r}")
  return names


def rl_ks(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The K of every RL stage: `config.rl.ks`, or `(config.rl.k,)`."""
  ks = tuple(cfg.rl.ks) or (cfg.rl.k,)
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"config.rl.ks / rl.k must hold ints >= 1, got {ks!r}")
  return ks


def stage_ids(cfg: ml_collections.ConfigDict) -> list[StageId]:
  """The stages `config.stages` runs, in order (one per K for rl)."""
  out = []
  for kind in parse_stages(cfg.stages):
    if kind == "rl":
      out.extend(StageId("rl", k) for k in rl_ks(cfg))
    else:
      out.append(StageId(kind))
  return out


def _int_at_least(cfg: ml_collections.ConfigDict, where: str, name: str,
                  low: int) -> None:
  value = cfg[name]
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"config.{where}{name} must be an int >= {low}, got "
                     f"{value!r}")


def _check_teacher_mesh(cfg: ml_collections.ConfigDict) -> None:
  """`config.teacher_mesh`, and the stages an own-slice teacher cannot serve."""
  sub = cfg.get("teacher_mesh")
  n = (None if sub is None else sub.get("devices")) or 0
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"config.teacher_mesh.devices must be an int >= 0 (0 = "
                     f"the teacher on the student's mesh), got {n!r}")
  if not n:
    return
  axes = teacher_slice.MESH_AXES
  sizes = [cfg.teacher_mesh.get(a, 1) for a in axes]
  for name, size in zip(axes, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or not (
        size >= 1 or size == -1):
      raise ValueError(f"config.teacher_mesh.{name} must be an int >= 1 or "
                       f"-1 (the devices left over), got {size!r}")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.teacher_mesh: at most one of data/fsdp/tensor "
                     f"may be -1, got {dict(zip(axes, sizes))}")
  stages = parse_stages(cfg.stages)
  if "predistill" in stages and cfg.predistill.method != "seqkd":
    raise ValueError(
        f"config.predistill.method={cfg.predistill.method!r} needs the "
        f"teacher's [B, T, V] logits next to the student's; it is not "
        f"supported with the teacher on its own devices "
        f"(config.teacher_mesh.devices={n}); use method 'seqkd' or "
        f"teacher_mesh.devices=0")
  if "rl" in stages and cfg.rl.get("diag_every", 0):
    raise ValueError(
        f"config.rl.diag_every={cfg.rl.diag_every} (gradient diagnostics "
        f"during RL) is not supported with the teacher on its own devices "
        f"(config.teacher_mesh.devices={n}); set rl.diag_every=0 or "
        f"teacher_mesh.devices=0")


def _check_validation(cfg: ml_collections.ConfigDict) -> None:
  """Each stage's `eval_every` / `select`, and `config.validation`."""
  for stage in TRAINING_STAGES:
    validation.StageValidation.from_config(stage, cfg[stage])
  val = cfg.get("validation", ml_collections.ConfigDict())
  n = val.get("max_examples", 512)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"config.validation.max_examples must be an int >= 1, "
                     f"got {n!r}")
  split = val.get("split", "validation")
  if split in ("train", "test"):
    raise ValueError(f"config.validation.split must not be 'train' or 'test' "
                     f"(selection on them leaks), got {split!r}")


def _check_lora(cfg: ml_collections.ConfigDict) -> None:
  """config.student.lora: a rank >= 0 (0 = off), alpha > 0, known targets,
  a float32 / bfloat16 base; not with the teacher on its own mesh."""
  try:
    student_lora = lora_lib.LoraStudent.from_config(
        cfg.student.get("lora"), cfg.student.param_dtype)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if student_lora is not None and cfg.get(
      "teacher_mesh", ml_collections.ConfigDict()).get("devices", 0):
    raise ValueError("config.student.lora.rank > 0 with "
                     "config.teacher_mesh.devices > 0 is not supported yet "
                     "(the split steps do not carry the frozen base); set "
                     "teacher_mesh.devices=0 or student.lora.rank=0")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  parse_stages(cfg.stages)
  rl_ks(cfg)
  _check_teacher_mesh(cfg)
  _check_validation(cfg)
  for name in ("max_source_len", "max_target_len", "checkpoint_every",
               "log_every", "max_nonfinite_steps"):
    _int_at_least(cfg, "", name, 1)
  if not cfg.preemption_grace_s > 0:
    raise ValueError(f"config.preemption_grace_s must be > 0, got "
                     f"{cfg.preemption_grace_s!r}")
  if cfg.predistill.method not in PREDISTILL_METHODS:
    raise ValueError(f"config.predistill.method must be one of "
                     f"{PREDISTILL_METHODS}, got {cfg.predistill.method!r}")
  for stage in TRAINING_STAGES:
    sub = cfg[stage]
    _int_at_least(sub, f"{stage}.", "batch_size", 1)
    try:
      state_lib.OptimConfig.from_config(sub)
    except ValueError as e:
      raise ValueError(f"config.{stage}: {e}") from None
  for k in rl_ks(cfg):
    rollouts.RLConfig.from_config(cfg.rl, k=k)
  if "gkd" in cfg:
    steps.GKDConfig.from_config(cfg.gkd)
  every, minibatches = cfg.rl.get("diag_every", 0), cfg.rl.get(
      "diag_minibatches", 8)
  if not isinstance(every, int) or every < 0 or not isinstance(
      minibatches, int) or minibatches < 2:
    raise ValueError(f"config.rl.diag_every must be an int >= 0 and "
                     f"config.rl.diag_minibatches an int >= 2, got "
                     f"{every!r} and {minibatches!r}")
  for name in ("max_decode_len", "batch_size", "diag_batches"):
    _int_at_least(cfg.eval, "eval.", name, 1)
  _int_at_least(cfg.predistill, "predistill.", "max_decode_len", 1)
  for role in ("teacher", "student"):
    remat = cfg[role].get("remat", "none")
    if remat not in family.REMAT_POLICIES:
      raise ValueError(f"config.{role}.remat must be one of "
                       f"{family.REMAT_POLICIES}, got {remat!r}")
  _check_lora(cfg)
  try:
    chunked.check_chunk(cfg.get("logits_chunk", 0))
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
