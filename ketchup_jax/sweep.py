"""Sweep runner: the paper's comparison (SPEC §4) on any task, one command.

    python -m ketchup_jax.sweep --config=configs/experiments/k_sweep.py \
        --workdir=runs/k_sweep [--config.seeds=0,1]

A sweep config (see configs/experiments/) holds a pipeline config (`base`)
and lists the methods, the KETCHUP K values, the seeds and the diagnostics.
Layout of the sweep directory `W`:

    W/teacher/                 teacher SFT, once per sweep (seed teacher_seed;
                               only evaluated if base.stages lacks teacher_sft,
                               e.g. a FLAN-T5 teacher as in the paper;
                               config.reuse_from=W2 takes W2's teacher and
                               pre-distilled students instead)
    W/seed<s>/predistill/      the pre-distilled student of seed s
    W/seed<s>/<run>/           one method from that student (llmr, ketchup_k4,
                               kl, ..., scratch_ketchup_k4)
    W/<run dir>/eval.json      greedy test metrics: marks the run finished
    W/seed<s>/predistill/diagnostics/predistill.json   per-K diagnostics
    W/results.json, W/results.md, W/plots/*.png

Fairness ("same budget"): every method of a seed starts from the same
pre-distilled student and makes the same number of optimizer updates
(`base.rl.steps`) on batches of the same size (`base.rl.batch_size`), with the
same learning-rate schedule, and the same data order (RL runs use data seed
`seed + 2`; the word-level and SeqKD continuations are run with `seed + 1` so
their stage seed is also `seed + 2`). LLMR and KETCHUP sample their own
rollouts; SeqKD continues on the teacher's greedy outputs, KL/JS/TVD on the
gold targets teacher-forced (the library's `word_kd_step`), GKD on a
λ-mix of its own samples (of the RL runs' length `base.rl.max_decode_len`)
and the gold targets (`gkd_step`). The SPEC §6 objectives are RL runs too:
"soft" is LLMR/KETCHUP with `rl.value = "soft"` (K = 1 and each K of `ks`),
"reverse_kl" the reverse-KL reward at each discount of `reverse_kl_gammas`,
and
"reverse_kl_kstep" its K-step chain variant at each K of `ks` with
`kstep_gamma`. The
"no pre-distillation" variant starts RL from the random initialisation the
pre-distillation of the same seed started from.

Finished runs (their eval.json) and diagnostics are reused, so an interrupted
sweep resumes by rerunning the same command; the tables and plots are always
rebuilt from the files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from ketchup_jax import cli
from ketchup_jax import data as data_lib
from ketchup_jax import diagnostics
from ketchup_jax import distributed
from ketchup_jax import fileio
from ketchup_jax import losses
from ketchup_jax import reporting
from ketchup_jax import returns
from ketchup_jax import runlock
from ketchup_jax.train import context
from ketchup_jax.train import evaluate
from ketchup_jax.train import pipeline
from ketchup_jax.train import settings
from ketchup_jax.train import sources
from ketchup_jax.train import stages

METHODS = ("seqkd", "kl", "rkl", "js", "tvd", "gkd", "llmr", "ketchup",
           "soft", "reverse_kl", "reverse_kl_kstep")
WORD_METHODS = ("seqkd", "kl", "rkl", "js", "tvd", "gkd")
_METHOD_LABELS = {"seqkd": "SeqKD", "kl": "KL", "rkl": "RKL", "js": "JS",
                  "tvd": "TVD"}


# --------------------------------------------------------------------------
# The runs of a sweep
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One pipeline run of the sweep.

  Attributes:
    name: Directory name under W/seed<s>/ (or "teacher").
    label: Row label of the results table.
    seed: The sweep seed (None for the teacher).
    kind: "teacher", "predistill", "rl" or "continue".
    k: K of an RL run.
    method: Word-level method of a "continue" run.
    baseline: rl.baseline of an RL run.
    from_scratch: RL from the random init instead of the pre-distilled
      student.
    variant: Name of an entry of the sweep's `variants` (overrides of
      `base` applied to this RL run), or "".
    reward: rl.reward of an RL run.
    value: rl.value of an RL run ("" = the base config's).
    gamma: rl.gamma of an RL run (None = the base config's).
  """
  name: str
  label: str
  seed: int | None
  kind: str
  k: int = 0
  method: str = ""
  baseline: str = "none"
  from_scratch: bool = False
  variant: str = ""
  reward: str = "llmr"
  value: str = ""
  gamma: float | None = None

  def directory(self, workdir: str, reuse_from: str = "") -> str:
    if self.kind == "teacher":
      return os.path.join(reuse_from or workdir, "teacher")
    if self.kind == "predistill":
      return os.path.join(reuse_from or workdir, f"seed{self.seed}",
                          self.name)
    return os.path.join(workdir, f"seed{self.seed}", self.name)


def _rl_label(k: int, baseline: str = "none", scratch: bool = False) -> str:
  label = "LLMR (K=1)" if k == 1 else f"KETCHUP (K={k})"
  if baseline != "none":
    label += f", baseline {baseline}"
  if scratch:
    label += ", no pre-distillation"
  return label


def variant_overrides(c: ml_collections.ConfigDict,
                      name: str) -> dict[str, Any]:
  """The dotted `base` fields a variant sets, e.g. {"rl.temperature": 0.0}."""
  flat: dict[str, Any] = {}

  def walk(node: Any, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  walk(c.variants[name], "")
  return flat


def _set_dotted(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def check_sweep_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  bad = [m for m in c.methods if m not in METHODS]
  if bad or not c.methods:
    raise ValueError(f"config.methods must be a non-empty list from "
                     f"{METHODS}, got {tuple(c.methods)!r}")
  seeds = tuple(c.seeds)
  if not seeds or any(isinstance(s, bool) or not isinstance(s, int)
                      or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds must be distinct ints >= 0, got {seeds!r}")
  for name in ("ks", "baseline_ks", "scratch_ks"):
    ks = tuple(c[name])
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1
           for k in ks):
      raise ValueError(f"config.{name} must hold ints >= 1, got {ks!r}")
  for m in ("ketchup", "reverse_kl_kstep"):
    if m in c.methods and not tuple(c.ks):
      raise ValueError(f"config.ks must list the K values when methods "
                       f"include {m!r}, got ()")
  gammas = tuple(c.reverse_kl_gammas)
  if "reverse_kl" in c.methods and not gammas:
    raise ValueError("config.reverse_kl_gammas must list the discounts of "
                     "the reverse_kl runs, got ()")
  for name, values in (("reverse_kl_gammas", gammas),
                       ("kstep_gamma", (c.kstep_gamma,))):
    for value in values:
      try:
        returns.check_gamma(value)
      except ValueError as e:
        raise ValueError(f"config.{name}: {e}") from None
  if "reverse_kl_kstep" in c.methods and not c.kstep_gamma > 0:
    raise ValueError(f"config.kstep_gamma must be > 0 for the K-step reverse "
                     f"KL (gamma = 0 is the immediate reward at every K), got "
                     f"{c.kstep_gamma!r}")
  for b in c.baselines:
    if b not in losses.BASELINES or b == "none":
      raise ValueError(f"config.baselines must hold values from "
                       f"{losses.BASELINES[1:]}, got {tuple(c.baselines)!r}")
  variant_ks = tuple(c.get("variant_ks", ()))
  if any(isinstance(k, bool) or not isinstance(k, int) or k < 1
         for k in variant_ks):
    raise ValueError(f"config.variant_ks must hold ints >= 1, got "
                     f"{variant_ks!r}")
  for name in c.get("variants", {}):
    if not name.replace("_", "").replace("-", "").isalnum():
      raise ValueError(f"config.variants: a name must be letters, digits, "
                       f"'_' or '-' (it names a directory), got {name!r}")
    for key, value in variant_overrides(c, name).items():
      node = c.base
      for part in key.split("."):
        if part not in node:
          raise ValueError(f"config.variants.{name}: {key!r} is not a field "
                           f"of config.base")
        node = node[part]
      trial = copy.deepcopy(c.base)
      trial.unlock()
      _set_dotted(trial, key, value)
      try:
        settings.check_config(trial)
      except ValueError as e:
        raise ValueError(f"config.variants.{name}: {e}") from None
  if c.get("variants", {}) and not variant_ks:
    raise ValueError("config.variant_ks must list the K values of the "
                     "variants' RL runs, got ()")
  d = c.diagnostics
  if d.minibatches and d.minibatches < 2:
    raise ValueError(f"config.diagnostics.minibatches must be 0 (off) or "
                     f">= 2, got {d.minibatches!r}")
  settings.check_config(c.base)


def plan(c: ml_collections.ConfigDict) -> list[RunSpec]:
  """Every run of the sweep, in the order they are run."""
  specs = [RunSpec("teacher", "teacher", None, "teacher")]
  for s in c.seeds:
    specs.append(RunSpec("predistill",
                         f"pre-distilled ({c.base.predistill.method})", s,
                         "predistill"))
    for m in c.methods:
      if m == "gkd":
        g = c.base.gkd
        specs.append(RunSpec("gkd", f"GKD (λ={g.lmbda:g}, β={g.beta:g})", s,
                             "continue", method=m))
      elif m in WORD_METHODS:
        specs.append(RunSpec(m, _METHOD_LABELS[m], s, "continue", method=m))
      elif m == "llmr":
        specs.append(RunSpec("llmr", _rl_label(1), s, "rl", k=1))
      elif m == "soft":
        specs.extend(RunSpec(f"soft_k{k}", _rl_label(k) + ", soft value", s,
                             "rl", k=k, value="soft")
                     for k in dict.fromkeys((1, *c.ks)))
      elif m == "reverse_kl":
        specs.extend(RunSpec(
            f"reverse_kl_g{g:g}", f"reverse KL (γ={g:g})", s, "rl", k=1,
            reward="reverse_kl", gamma=float(g))
                     for g in c.reverse_kl_gammas)
      elif m == "reverse_kl_kstep":
        g = c.kstep_gamma
        specs.extend(RunSpec(
            f"reverse_kl_k{k}_g{g:g}", f"K-step reverse KL (K={k}, γ={g:g})",
            s, "rl", k=k, reward="reverse_kl_kstep", gamma=float(g))
                     for k in c.ks)
      else:
        specs.extend(RunSpec(f"ketchup_k{k}", _rl_label(k), s, "rl", k=k)
                     for k in c.ks)
    for b in c.baselines:
      specs.extend(RunSpec(f"k{k}_{b}", _rl_label(k, b), s, "rl", k=k,
                           baseline=b) for k in c.baseline_ks)
    specs.extend(RunSpec(f"scratch_k{k}", _rl_label(k, scratch=True), s, "rl",
                         k=k, from_scratch=True) for k in c.scratch_ks)
    for name in c.get("variants", {}):
      specs.extend(RunSpec(f"{name}_k{k}", f"{name} (K={k})", s, "rl", k=k,
                           variant=name) for k in c.variant_ks)
  return specs


def run_config(c: ml_collections.ConfigDict, spec: RunSpec,
               workdir: str) -> ml_collections.ConfigDict:
  """The pipeline config of one run."""
  cfg = copy.deepcopy(c.base)
  cfg.unlock()
  teacher_dir = os.path.abspath(os.path.join(c.reuse_from or workdir,
                                             "teacher"))
  if spec.kind == "teacher":
    cfg.seed = c.teacher_seed
    # A given teacher (e.g. FLAN-T5 from a directory, as in the paper) is
    # only evaluated.
    cfg.stages = "teacher_sft" if trains_teacher(c) else "eval"
    return cfg
  if cfg.tokenizer.kind == "word" and not cfg.tokenizer.path:
    cfg.tokenizer.path = os.path.join(teacher_dir, "tokenizer.json")
  if trains_teacher(c):
    cfg.teacher.init_from = os.path.join(teacher_dir, "models", "teacher_sft")
  cfg.seed = spec.seed
  predistilled = os.path.abspath(os.path.join(
      c.reuse_from or workdir, f"seed{spec.seed}", "predistill", "models",
      "predistill"))
  if spec.kind == "predistill":
    cfg.stages = "predistill"
  elif spec.kind == "continue":
    # Same budget and data order as the RL runs (module docstring).
    cfg.stages = "predistill"
    cfg.seed = spec.seed + 1
    cfg.student.init_from = predistilled
    cfg.predistill.method = spec.method
    for field in ("steps", "batch_size", "learning_rate", "schedule",
                  "warmup_steps", "weight_decay", "max_grad_norm",
                  "grad_accum", "eval_every", "select"):
      cfg.predistill[field] = cfg.rl[field]
    if spec.method == "gkd":  # samples as long as the RL runs' rollouts
      cfg.gkd.max_decode_len = cfg.rl.max_decode_len
  else:
    cfg.stages = "rl"
    cfg.rl.ks = (spec.k,)
    cfg.rl.k = spec.k
    cfg.rl.baseline = spec.baseline
    cfg.rl.reward = spec.reward
    if spec.value:
      cfg.rl.value = spec.value
    if spec.gamma is not None:
      cfg.rl.gamma = spec.gamma
    if not spec.from_scratch:
      cfg.student.init_from = predistilled
    if spec.variant:
      for key, value in variant_overrides(c, spec.variant).items():
        _set_dotted(cfg, key, value)
  return cfg


def trains_teacher(c: ml_collections.ConfigDict) -> bool:
  """Whether the sweep trains its teacher (base.stages has teacher_sft)."""
  return "teacher_sft" in [s.strip() for s in c.base.stages.split(",")]


def exported_model(spec: RunSpec) -> str:
  return {"teacher": "teacher_sft", "predistill": "predistill",
          "continue": "predistill"}.get(spec.kind, f"rl_k{spec.k}")


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def evaluate_model(run: context.Run, name: str, model_cfg: Any,
                   source: str = "") -> dict[str, float]:
  """Greedy decoding of `models/<name>` (or `source`) on the eval split."""
  lm = run.load_model(name, source or sources.stage_source(name), model_cfg,
                      run.cfg.seed)
  return evaluate.score(run.task.metric_names,
                        stages.eval_predictions(run, lm, name),
                        run.eval_references)


def _write_json(path: str, obj: Any) -> None:
  fileio.atomic_write(path, json.dumps(obj, indent=1))


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


_SHARED_FIELDS = ("seed", "task", "tokenizer", "max_source_len",
                  "max_target_len", "teacher", "teacher_sft", "student",
                  "predistill")


def _check_reusable(cfg: ml_collections.ConfigDict, directory: str) -> None:
  """Refuses to reuse a run whose teacher / pre-distillation settings differ."""
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    stored = json.load(f)
  mine = json.loads(cfg.to_json_best_effort())

  def results_part(value: Any) -> Any:
    # Rematerialisation changes memory and time, never the numbers.
    if isinstance(value, dict):
      return {k: v for k, v in value.items() if k != "remat"}
    return value

  for field in _SHARED_FIELDS:
    if results_part(stored.get(field)) != results_part(mine.get(field)):
      raise ValueError(
          f"config.reuse_from: the run {directory} was made with a different "
          f"config.base.{field} ({stored.get(field)!r}, this sweep has "
          f"{mine.get(field)!r}); reuse needs the same teacher and "
          f"pre-distillation settings")


def execute(c: ml_collections.ConfigDict, spec: RunSpec,
            workdir: str) -> tuple[dict[str, Any], bool]:
  """Runs one spec unless its eval.json exists; returns (record, ran)."""
  directory = spec.directory(workdir, c.reuse_from)
  done = os.path.join(directory, "eval.json")
  cfg = run_config(c, spec, workdir)
  if spec.kind in ("teacher", "predistill") and c.reuse_from:
    if not os.path.exists(done):
      raise ValueError(f"config.reuse_from={c.reuse_from!r}: no finished "
                       f"{spec.name} at {directory} (no eval.json); run that "
                       f"sweep first, or leave reuse_from empty")
    _check_reusable(cfg, directory)
  if os.path.exists(done):
    return _read_json(done), False
  # The run's directory is this sweep's alone until its eval.json is written.
  with runlock.hold(directory):
    return _execute_locked(c, spec, cfg, directory, done)


def _execute_locked(c: ml_collections.ConfigDict, spec: RunSpec,
                    cfg: ml_collections.ConfigDict, directory: str,
                    done: str) -> tuple[dict[str, Any], bool]:
  start = time.perf_counter()
  if spec.kind == "teacher" and not trains_teacher(c):
    run = context.setup(cfg, directory)
    context.prepare_workdir(run)
    metrics = evaluate_model(run, "teacher", cfg.teacher,
                             source=cfg.teacher.init_from)
    record = {"label": spec.label, "seed": None, "kind": spec.kind, "k": 0,
              "metrics": metrics, "train_seconds": 0.0,
              "seconds": time.perf_counter() - start}
    _write_json(done, record)
    return record, True
  pipeline.run(cfg, directory)
  stage = exported_model(spec)
  if not os.path.exists(os.path.join(directory, "stages", f"{stage}.json")):
    raise RuntimeError(f"run {directory} stopped before finishing (preempted?);"
                       f" rerun the sweep to resume it")
  train_s = time.perf_counter() - start
  run = context.setup(cfg, directory)
  model_cfg = cfg.teacher if spec.kind == "teacher" else cfg.student
  metrics = evaluate_model(run, exported_model(spec), model_cfg)
  record = {"label": spec.label, "seed": spec.seed, "kind": spec.kind,
            "k": spec.k, "metrics": metrics, "train_seconds": train_s,
            "seconds": time.perf_counter() - start}
  info = _read_json(os.path.join(directory, "stages", f"{stage}.json"))
  if "selected_step" in info:  # the stage validated (train/validation.py)
    record["selection"] = {k: info[k] for k in (
        "select", "selected_step", "selected_val_score", "start_val_score",
        "val_seconds") if k in info}
  _write_json(done, record)
  return record, True


def diagnose(c: ml_collections.ConfigDict, seed: int,
             workdir: str) -> tuple[dict[str, Any] | None, bool]:
  """Per-K diagnostics of seed's pre-distilled student (cached)."""
  d = c.diagnostics
  if not d.minibatches:
    return None, False
  directory = os.path.join(c.reuse_from or workdir, f"seed{seed}",
                           "predistill")
  path = os.path.join(directory, "diagnostics", "predistill.json")
  options = diagnostics.Options(ks=tuple(d.ks), minibatches=d.minibatches,
                                projections=d.projections, seed=seed)
  if os.path.exists(path):
    cached = _read_json(path)
    if (cached["options"] == json.loads(json.dumps(dataclasses.asdict(
        options))) and cached["split"] == d.split):
      return cached, False
  return diagnostics.diagnose_workdir(
      directory, student="predistill", options=options, split=d.split,
      batch_size=d.batch_size), True


def read_training_diagnostics(directory: str) -> list[dict[str, float]]:
  """The `rl_k<K>_diag` records of a run's metrics.jsonl (training hook)."""
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("stage", "").endswith("_diag"):
        out.append(rec)
  # A resumed run may log a step twice; keep the last.
  return sorted({r["step"]: r for r in out}.values(), key=lambda r: r["step"])


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def run_sweep(c: ml_collections.ConfigDict, workdir: str, *,
              log=print) -> dict[str, Any]:
  """Runs (or reuses) every run, then writes results.json/.md and plots."""
  check_sweep_config(c)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir!r} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  # Before the lock touches a JAX backend: connect to the other processes
  # (as pipeline.run does; a second call does nothing).
  distributed.initialize(c.base.get("distributed"))
  # One sweep at a time in DIR (each run's directory is locked as well).
  with runlock.hold(workdir):
    return _run_sweep_locked(c, workdir, log)


def _run_sweep_locked(c: ml_collections.ConfigDict, workdir: str,
                      log) -> dict[str, Any]:
  fileio.atomic_write(os.path.join(workdir, "sweep_config.json"),
                      c.to_json_best_effort(indent=1, sort_keys=True))
  specs = plan(c)
  started = time.perf_counter()
  records, diags, ran = [], {}, []
  for i, spec in enumerate(specs):
    where = "teacher" if spec.seed is None else f"seed {spec.seed} {spec.name}"
    log(f"[sweep {i + 1}/{len(specs)}] {where}: "
        f"{time.perf_counter() - started:.0f} s elapsed", flush=True)
    record, did = execute(c, spec, workdir)
    records.append(record)
    if did:
      ran.append(spec.directory(workdir, c.reuse_from))
    log(f"[sweep {i + 1}/{len(specs)}] {where}: "
        f"{'done' if did else 'reused'} "
        f"{json.dumps(record['metrics'])}", flush=True)
    if spec.kind == "predistill":
      diag, did = diagnose(c, spec.seed, workdir)
      if diag is not None:
        diags[spec.seed] = diag
        if did:
          ran.append(spec.directory(workdir) + "/diagnostics")
        log(f"[sweep] seed {spec.seed} diagnostics "
            f"{'done' if did else 'reused'}", flush=True)
  training: dict[str, dict[int, list[dict[str, float]]]] = {}
  for spec in specs:
    if spec.kind == "rl":
      curve = read_training_diagnostics(spec.directory(workdir))
      if curve:
        training.setdefault(spec.label, {})[spec.seed] = curve
  task = data_lib.get_task(c.base.task.name, **c.base.task.options.to_dict())
  results = reporting.aggregate(records, diags, training, task=task.name,
                                metric_names=task.metric_names)
  results["ran"] = ran
  results["seconds"] = time.perf_counter() - started
  _write_json(os.path.join(workdir, "results.json"), results)
  table = reporting.sweep_markdown(results, title=c.title)
  fileio.atomic_write(os.path.join(workdir, "results.md"), table)
  reporting.sweep_plots(results, os.path.join(workdir, "plots"),
                        c.metric or None)
  log(table, flush=True)
  return results


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.",
                               flag_values=FLAGS)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Sweep config (configs/experiments/*.py).",
    flag_values=FLAGS, lock_config=True)

parse_flags = cli.app_flags_parser(
    FLAGS, prog="python -m ketchup_jax.sweep", doc=__doc__,
    required=("config", "workdir"),
    fields_hint="the sweep fields are in configs/experiments/common.py, the "
    "pipeline's (under base.) in configs/default.py")


def main(argv: Sequence[str]) -> None:
  del argv  # `parse_flags` refuses positional arguments
  import jax  # pylint: disable=g-import-not-at-top
  cli.quiet_orbax()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # The runs of a sweep compile the same steps again and again.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(_WORKDIR.value),
                                   ".jax_cache"))
  try:
    run_sweep(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(cli.error(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
