"""The stages of a run: teacher SFT, pre-distillation, RL per K, eval.

Each training stage loads its models (`Run.load_model`), builds its jitted
step (`steps`, `rollouts`, or the own-mesh pieces of `teacher_slice`), runs
`loop.train_stage`, exports the selected parameters to `DIR/models/<stage>/`
and marks itself done in `DIR/stages/<stage>.json` (a rerun skips it).
`stage_eval` decodes every available model on the eval split and returns
the results `reporting` renders.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from ketchup_jax import diagnostics
from ketchup_jax import distributed
from ketchup_jax import fileio
from ketchup_jax import models
from ketchup_jax import returns
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.train import evaluate
from ketchup_jax.train import loop
from ketchup_jax.train import rollouts
from ketchup_jax.train import settings
from ketchup_jax.train import sources
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from ketchup_jax.train import teacher_slice
from ketchup_jax.train.context import Run

# A LoRA student stage's PEFT adapter directory, under its exported model.
ADAPTER_DIR = "adapter"

# What `stages/<stage>.json` records of a stage's validation selection, and
# the eval results repeat per model.
_SELECTION_KEYS = ("select", "eval_every", "val_metric", "selected_step",
                   "selected_val_score", "start_val_score", "val_seconds")


def _export(run: Run, stage: settings.StageId, lm: models.LM,
            adapters: Any = None, base: str = "") -> None:
  """`lm` (merged, for a LoRA student) to `DIR/models/<stage>/`; LoRA
  `adapters` also as a PEFT directory `DIR/models/<stage>/adapter/` for the
  base `base` (its `init_from`) started from."""
  # Every process takes part (the parameters are gathered across hosts);
  # process 0 writes.
  path = run.path("models", stage.name)
  lm.save_pretrained(path)
  if adapters is not None and run.is_main:
    parsed = sources.Source.parse(base)
    base_model = (os.path.abspath(run.path("models", parsed.name))
                  if parsed.kind == "stage" else base)
    lora_lib.save_peft(adapters, lm.config, run.student_lora().lora,
                       os.path.join(path, ADAPTER_DIR), base_model=base_model)
  distributed.barrier(f"export {stage}")  # the files exist for every process


def _finish(run: Run, stage: settings.StageId, lm: models.LM,
            info: dict[str, Any], adapters: Any = None,
            base: str = "") -> None:
  """Exports `lm` and marks the stage done with its checksum and `info`."""
  _export(run, stage, lm, adapters, base)
  record = {"checksum": sources.params_checksum(lm.params), **info}
  if adapters is not None:
    lora = run.student_lora()
    record["lora"] = {"rank": lora.lora.rank, "alpha": lora.lora.alpha,
                      "targets": list(lora.lora.targets),
                      "base_dtype": lora.base_dtype, "base": base,
                      "adapter_dir": os.path.join("models", stage.name,
                                                  ADAPTER_DIR)}
  if run.is_main:
    fileio.atomic_write(run.path("stages", f"{stage}.json"),
                        json.dumps(record, indent=1))
  # Every process sees the marker before deciding what runs next.
  distributed.barrier(f"stage {stage} done")


def stage_selection(run: Run, source: str) -> dict[str, Any]:
  """The validation selection recorded for a `stage:` source ({} if none)."""
  parsed = sources.Source.parse(source)
  if parsed.kind != "stage":
    return {}
  path = run.path("stages", f"{parsed.name}.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    info = json.load(f)
  return {k: info[k] for k in _SELECTION_KEYS if k in info}


def stage_teacher_sft(run: Run) -> None:
  cfg, stage = run.cfg, settings.StageId("teacher_sft")
  teacher = run.load_model("teacher", cfg.teacher.init_from, cfg.teacher,
                           cfg.seed)
  optim = state_lib.OptimConfig.from_config(cfg.teacher_sft)
  step_fn = functools.partial(steps.supervised_step,
                              models=run.step_models(teacher, None),
                              optim=optim)
  teacher, info, _ = loop.train_stage(
      run, stage, teacher, step_fn, optim,
      batch_size=cfg.teacher_sft.batch_size, seed=cfg.seed)
  _finish(run, stage, teacher, info)


def _load_student(run: Run, init_from: str, seed: int) -> models.LM:
  """The student a stage trains; a LoRA student's base is loaded in its
  `base_dtype` (the whole student is then never held in float32)."""
  model_cfg, lora = run.cfg.student, run.student_lora()
  if lora is not None and lora.base_dtype != model_cfg.param_dtype:
    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.param_dtype = lora.base_dtype
  return run.load_model("student", init_from, model_cfg, seed)


def stage_predistill(run: Run) -> None:
  cfg, stage = run.cfg, settings.StageId("predistill")
  teacher = run.load_model("teacher", run.teacher_source(), cfg.teacher,
                           cfg.seed, mesh=run.teacher_mesh)
  student = _load_student(run, cfg.student.init_from, cfg.seed + 1)
  sources.check_loaded_kinds(teacher, student)
  optim = state_lib.OptimConfig.from_config(cfg.predistill)
  lora = run.student_lora()
  mods = run.step_models(student, teacher, lora=lora)
  if run.teacher_mesh is not None:  # seqkd (check_config refuses the rest)
    step_fn = teacher_slice.SeqKDStep(
        models=mods, teacher_mesh=run.teacher_mesh, optim=optim,
        max_decode_len=cfg.predistill.max_decode_len)
  elif cfg.predistill.method == "seqkd":
    step_fn = functools.partial(
        steps.seqkd_step, models=mods, optim=optim,
        max_decode_len=cfg.predistill.max_decode_len)
  elif cfg.predistill.method == "gkd":
    step_fn = functools.partial(steps.gkd_step, models=mods, optim=optim,
                                gkd=steps.GKDConfig.from_config(cfg.gkd))
  else:
    step_fn = functools.partial(steps.word_kd_step, models=mods, optim=optim,
                                divergence=cfg.predistill.method)
  student, info, adapters = loop.train_stage(
      run, stage, student, step_fn, optim,
      batch_size=cfg.predistill.batch_size, seed=cfg.seed + 1,
      teacher=teacher, lora=lora)
  _finish(run, stage, student, info, adapters, cfg.student.init_from)


def stage_rl(run: Run, stage: settings.StageId) -> None:
  cfg = run.cfg
  teacher = run.load_model("teacher", run.teacher_source(), cfg.teacher,
                           cfg.seed, mesh=run.teacher_mesh)
  student = _load_student(run, run.student_start(), cfg.seed + 1)
  sources.check_loaded_kinds(teacher, student)
  optim = state_lib.OptimConfig.from_config(cfg.rl)
  rl = rollouts.RLConfig.from_config(cfg.rl, k=stage.k)
  lora = run.student_lora()
  mods = run.step_models(student, teacher, lora=lora)
  if run.teacher_mesh is not None:
    step_fn = teacher_slice.RLStep(models=mods, teacher_mesh=run.teacher_mesh,
                                   optim=optim, rl=rl)
  else:
    step_fn = functools.partial(rollouts.rl_step, models=mods, optim=optim,
                                rl=rl)
  hook = None
  if cfg.rl.get("diag_every", 0):
    hook = diagnostics.training_hook(
        run, stage.name, teacher, student, k=stage.k,
        every=cfg.rl.diag_every, minibatches=cfg.rl.diag_minibatches)
  # Every K starts from the same student with the same seed: paired runs.
  student, info, adapters = loop.train_stage(
      run, stage, student, step_fn, optim, batch_size=cfg.rl.batch_size,
      seed=cfg.seed + 2, teacher=teacher, hook=hook, lora=lora)
  _finish(run, stage, student, info, adapters, run.student_start())


def eval_models(run: Run) -> list[tuple[str, str]]:
  """(row label, init_from) of every model this run can evaluate."""
  rows = []
  if run.stage_done("teacher_sft") or sources.Source.parse(
      run.cfg.teacher.init_from).kind != "scratch":
    rows.append(("teacher", run.teacher_source()))
  if run.stage_done("predistill"):
    rows.append((f"student ({run.cfg.predistill.method})",
                 sources.stage_source("predistill")))
  for k in settings.rl_ks(run.cfg):
    stage = settings.StageId("rl", k)
    if run.stage_done(stage):
      label = "LLMR (K=1)" if k == 1 else f"KETCHUP (K={k})"
      if run.cfg.rl.get("reward", "llmr") != "llmr":
        label = f"{run.cfg.rl.reward} (K={k})"
      rows.append((label, sources.stage_source(stage.name)))
  return rows


def return_diagnostics_by_k(run: Run, student: models.LM,
                            teacher: models.LM
                            ) -> dict[int, dict[str, float]]:
  """Return variance and bias for each K from shared rollouts (SPEC §5).

  The rollouts and the teacher's Q-values are those of the RL step
  (`rollouts.score_rollout` with `config.rl`'s settings), on the eval split.
  """
  cfg = run.cfg
  rl = rollouts.RLConfig.from_config(cfg.rl, k=1)
  mods = run.step_models(student, teacher)

  @jax.jit
  def rollout_and_score(student_params, teacher_params, batch, rng):
    scored = rollouts.score_rollout(student_params, teacher_params, batch,
                                    rng, models=mods, rl=rl)
    mask = scored.loss_mask  # as in training: unfinished rows dropped or not
    keep = mask != 0
    return (jnp.where(keep, scored.scores.q_taken, 0.0),
            jnp.where(keep, scored.scores.values, 0.0), mask)

  data = run.batches(run.eval, batch_size=cfg.rl.batch_size,
                     seed=cfg.seed + 3, drop_remainder=False)
  qs, vs, masks = [], [], []
  rng = jax.random.PRNGKey(cfg.seed + 3)
  for _ in range(cfg.eval.diag_batches):
    rng, key = jax.random.split(rng)
    batch = jax.device_put(next(data), run.batch_sharding())
    q, v, m = rollout_and_score(student.params, teacher.params, batch, key)
    qs.append(q), vs.append(v), masks.append(m)
  # Gathered to every process: the diagnostic is small and computed on host.
  q, v, m = (distributed.to_host(jnp.concatenate(x)) for x in (qs, vs, masks))
  return {k: {name: float(x) for name, x in
              returns.return_diagnostics(q, v, m, k).items()}
          for k in cfg.eval.diag_ks}


def eval_predictions(run: Run, lm: models.LM, label: str) -> list[str]:
  """Greedy outputs of `lm` on the eval split, in order (what eval scores)."""
  return loop.decode_split(run, lm, run.eval, f"eval {label}")


def stage_eval(run: Run) -> dict[str, Any]:
  cfg = run.cfg
  results: dict[str, Any] = {"task": run.task.name, "split": cfg.eval.split,
                             "num_examples": len(run.eval_references),
                             "metric_names": list(run.task.metric_names),
                             "models": {}}
  teacher = None
  for label, source in eval_models(run):
    lm = run.load_model(label, source,
                        cfg.teacher if label == "teacher" else cfg.student,
                        cfg.seed)
    if label == "teacher":
      teacher = lm
    start = time.perf_counter()
    predictions = eval_predictions(run, lm, label)
    scores = evaluate.score(run.task.metric_names, predictions,
                            run.eval_references)
    results["models"][label] = {
        "source": source, "metrics": scores,
        "checksum": sources.params_checksum(lm.params),
        "decode_seconds": time.perf_counter() - start}
    selection = stage_selection(run, source)
    if selection:
      results["models"][label]["selection"] = selection
    logging.info("eval %s: %s", label, scores)
    if run.is_main:
      parsed = sources.Source.parse(source)
      _write_predictions(run, parsed.name if parsed.kind == "stage" else
                         "teacher", predictions)
  if teacher is not None and run.stage_done("predistill"):
    student = run.load_model("student", sources.stage_source("predistill"),
                             cfg.student, cfg.seed)
    results["return_diagnostics"] = {
        str(k): d for k, d in
        return_diagnostics_by_k(run, student, teacher).items()}
  return results


def _write_predictions(run: Run, name: str, predictions: list[str]) -> None:
  os.makedirs(run.path("predictions"), exist_ok=True)
  fileio.atomic_write(run.path("predictions", f"{name}.jsonl"), "".join(
      json.dumps({"prediction": pred, "reference": ref},
                 ensure_ascii=False) + "\n"
      for pred, ref in zip(predictions, run.eval_references)))
