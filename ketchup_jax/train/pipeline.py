"""The distillation pipeline: teacher SFT -> pre-distillation -> KETCHUP RL -> eval.

`run(config, workdir)` is what `python -m ketchup_jax.main` calls. Layout of
the run directory `DIR`:

    config.json               the configuration used
    tokenizer.json            the word-level vocabulary (tokenizer.kind=word)
    checkpoints/<stage>/      Orbax train states (resume)
    models/<stage>/           each stage's final model, HF format
    stages/<stage>.json       marks a finished stage (skipped on rerun)
    metrics.jsonl             one JSON object per logged step
    tensorboard/              TensorBoard events
    predictions/<model>.jsonl greedy outputs on the eval split
    results.json, results.md  metrics and parameter checksums per model
    plots/                    return variance and bias against K
    run.lock                  held while a run writes here (`runlock`)

Everything is checked before anything is written: a bad config, task, file,
vocabulary, mesh or damaged model or tokenizer raises `ValueError` and leaves
`DIR` untouched; a second run on a `DIR` in use is refused (`runlock`). A
full disk stops the run with `fileio.DiskFullError` and loses nothing:
checkpoints, exports and results are replaced whole, `metrics.jsonl` grows by
whole lines.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import tqdm

from ketchup_jax import chunked
from ketchup_jax import data as data_lib
from ketchup_jax import distributed
from ketchup_jax import fileio
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax import returns
from ketchup_jax import runlock
from ketchup_jax.models import t5
from ketchup_jax.train import checkpoints
from ketchup_jax.train import evaluate
from ketchup_jax.train import inputs
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from ketchup_jax.train import teacher_slice
from ketchup_jax.train import validation
from ketchup_jax.train import writer as writer_lib

STAGES = ("teacher_sft", "predistill", "rl", "eval")
PREDISTILL_METHODS = ("seqkd", "kl", "rkl", "js", "tvd", "gkd")
_LOG_KEYS = ("loss", "return_mean", "return_var", "return_var_k1",
             "bias_mean", "entropy", "grad_norm", "finished_fraction",
             "tokens_per_s")


# --------------------------------------------------------------------------
# Configuration checks
# --------------------------------------------------------------------------


def parse_stages(stages: str) -> tuple[str, ...]:
  names = tuple(s.strip() for s in stages.split(",") if s.strip())
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise ValueError(f"config.stages must be a comma-separated list from "
                     f"{STAGES}, got {stages!r}")
  return names


def rl_ks(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  ks = tuple(cfg.rl.ks) or (cfg.rl.k,)
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"config.rl.ks / rl.k must hold ints >= 1, got {ks!r}")
  return ks


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  parse_stages(cfg.stages)
  rl_ks(cfg)
  teacher_slice.check_config(cfg)
  validation.check_config(cfg)
  for name in ("max_source_len", "max_target_len"):
    if not isinstance(cfg[name], int) or cfg[name] < 1:
      raise ValueError(f"config.{name} must be an int >= 1, got {cfg[name]!r}")
  for name in ("checkpoint_every", "log_every", "max_nonfinite_steps"):
    if not isinstance(cfg[name], int) or cfg[name] < 1:
      raise ValueError(f"config.{name} must be an int >= 1, got {cfg[name]!r}")
  if not cfg.preemption_grace_s > 0:
    raise ValueError(f"config.preemption_grace_s must be > 0, got "
                     f"{cfg.preemption_grace_s!r}")
  if cfg.predistill.method not in PREDISTILL_METHODS:
    raise ValueError(f"config.predistill.method must be one of "
                     f"{PREDISTILL_METHODS}, got {cfg.predistill.method!r}")
  for stage in ("teacher_sft", "predistill", "rl"):
    sub = cfg[stage]
    if not isinstance(sub.batch_size, int) or sub.batch_size < 1:
      raise ValueError(f"config.{stage}.batch_size must be an int >= 1, got "
                       f"{sub.batch_size!r}")
    try:
      state_lib.OptimConfig.from_config(sub)
    except ValueError as e:
      raise ValueError(f"config.{stage}: {e}") from None
  for k in rl_ks(cfg):
    steps.RLConfig.from_config(cfg.rl, k=k)
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
    if not isinstance(cfg.eval[name], int) or cfg.eval[name] < 1:
      raise ValueError(f"config.eval.{name} must be an int >= 1, got "
                       f"{cfg.eval[name]!r}")
  if not isinstance(cfg.predistill.max_decode_len, int) or (
      cfg.predistill.max_decode_len < 1):
    raise ValueError(f"config.predistill.max_decode_len must be an int >= 1, "
                     f"got {cfg.predistill.max_decode_len!r}")
  for role in ("teacher", "student"):
    remat = cfg[role].get("remat", "none")
    if remat not in t5.REMAT_POLICIES:
      raise ValueError(f"config.{role}.remat must be one of "
                       f"{t5.REMAT_POLICIES}, got {remat!r}")
  try:
    chunked.check_chunk(cfg.get("logits_chunk", 0))
  except ValueError as e:
    raise ValueError(f"config.{e}") from None


# --------------------------------------------------------------------------
# Set-up shared by the stages
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """What every stage of one run shares."""
  cfg: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  task: data_lib.Task
  tokenizer: data_lib.Tokenizer
  train: data_lib.TokenizedExamples | data_lib.LazyTokenized
  eval: data_lib.TokenizedExamples
  eval_references: list[str]
  # The validation split (None when no stage validates), its references and
  # the metric selection maximises.
  validation: data_lib.TokenizedExamples | None = None
  validation_references: list[str] = dataclasses.field(default_factory=list)
  validation_metric: str = ""
  writer: writer_lib.MetricWriter | None = None
  stop: StopRequest | None = None
  # The teacher's own mesh (config.teacher_mesh.devices > 0), else None.
  teacher_mesh: jax.sharding.Mesh | None = None

  @property
  def batch_multiple(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def batches(self, data: data_lib.TokenizedExamples, *, batch_size: int,
              **kwargs: Any) -> data_lib.BatchIterator:
    """Batches laid out for the mesh, padded to the configured buckets."""
    return data_lib.BatchIterator(
        data, batch_size=batch_size, batch_multiple=self.batch_multiple,
        source_buckets=tuple(self.cfg.source_buckets) or None,
        target_buckets=tuple(self.cfg.target_buckets) or None,
        agree_lengths=distributed.max_over_processes, **kwargs)

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def batch_sharding(self) -> NamedSharding:
    return partitioning.batch_sharding(self.mesh)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def _make_tokenizer(cfg: ml_collections.ConfigDict, task: data_lib.Task,
                    workdir: str) -> data_lib.Tokenizer:
  kind = cfg.tokenizer.kind
  size = cfg.tokenizer.vocab_size or None
  if kind == "word" and not cfg.tokenizer.path:
    saved = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(saved):
      return data_lib.get_tokenizer("word", path=saved)
    return data_lib.get_tokenizer("word", texts=task.texts("train"),
                                  vocab_size=size)
  if kind not in ("byte", "word", "hf"):
    raise ValueError(f"config.tokenizer.kind must be 'byte', 'word' or 'hf', "
                     f"got {kind!r}")
  return data_lib.get_tokenizer(kind, path=cfg.tokenizer.path or None,
                                vocab_size=size)


def _limit(examples: list[dict[str, str]], n: int) -> list[dict[str, str]]:
  return examples[:n] if n else examples


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates the config and builds the mesh, task, tokenizer and data.

  Writes nothing.
  """
  check_config(cfg)
  inputs.check_models(cfg, workdir)
  student_devices, teacher_mesh = teacher_slice.make_teacher_mesh(cfg)
  mesh = partitioning.make_mesh(
      data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor,
      **{f"dcn_{a}": cfg.mesh.get(f"dcn_{a}", 1)
         for a in ("data", "fsdp", "tensor")},
      **({} if student_devices is None else {"devices": student_devices}))
  logging.info("%s", distributed.mesh_layout(mesh))
  if teacher_mesh is not None:
    logging.info("teacher's own mesh: %s", distributed.mesh_layout(
        teacher_mesh))
    teacher_slice.check_batch_sizes(cfg, teacher_mesh)
  task = data_lib.get_task(cfg.task.name, **cfg.task.options.to_dict())
  tokenizer = _make_tokenizer(cfg, task, workdir)
  caps = dict(tokenizer=tokenizer, max_source_len=cfg.max_source_len,
              max_target_len=cfg.max_target_len, prefix=task.prefix)
  train_examples = task.examples("train")
  if not train_examples:
    raise ValueError(f"task {task.name!r} has no examples in split 'train'")
  val_examples, val_metric = [], ""
  if validation.needed(cfg):
    val_metric = validation.metric_name(cfg, task.metric_names)
    val_cfg = cfg.get("validation", ml_collections.ConfigDict())
    val_split = val_cfg.get("split", "validation")
    max_val = val_cfg.get("max_examples", 512)
    if val_split in task.splits and task.examples(val_split):
      val_examples = validation.subset(task.examples(val_split), max_val)
      logging.info("validation: %d examples of split %r, metric %s",
                   len(val_examples), val_split, val_metric)
    else:  # e.g. a jsonl task with train and test files only
      train_examples, val_examples = validation.carve_out(train_examples,
                                                          max_val)
      logging.info("validation: task %r has no %r split; %d train examples "
                   "carved out (lowest source hash), metric %s", task.name,
                   val_split, len(val_examples), val_metric)
  if jax.process_count() > 1:
    # Per-host input: each process tokenises only the rows it feeds (its
    # slice of every global batch), when the batch is drawn.
    train = data_lib.LazyTokenized(train_examples, **caps)
    logging.info("data train: %d examples, each process tokenises its own "
                 "rows of every batch", len(train))
  else:
    train = data_lib.tokenize(train_examples, **caps)
    logging.info("data train: %s", train.stats)
  eval_examples = _limit(task.examples(cfg.eval.split), cfg.eval.max_examples)
  if not eval_examples:
    raise ValueError(f"task {task.name!r} has no examples in split "
                     f"{cfg.eval.split!r}")
  # Every process decodes whole eval batches (eval output is gathered).
  evaluation = data_lib.tokenize(eval_examples, **caps)
  logging.info("data %s: %s", cfg.eval.split, evaluation.stats)
  val_data = data_lib.tokenize(val_examples, **caps) if val_examples else None
  for stage in ("teacher_sft", "predistill", "rl"):
    if cfg[stage].batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
      raise ValueError(
          f"config.{stage}.batch_size={cfg[stage].batch_size} must be a "
          f"multiple of the data shards (mesh data x fsdp = "
          f"{mesh.shape['data'] * mesh.shape['fsdp']})")
  check_same_vocab(cfg.teacher.init_from, declared_vocab(cfg.teacher, tokenizer),
                   cfg.student.init_from, declared_vocab(cfg.student, tokenizer))
  return Run(cfg=cfg, workdir=workdir, mesh=mesh, task=task,
             tokenizer=tokenizer, train=train, eval=evaluation,
             eval_references=[ex["target"] for ex in eval_examples],
             validation=val_data,
             validation_references=[ex["target"] for ex in val_examples],
             validation_metric=val_metric, teacher_mesh=teacher_mesh)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def declared_vocab(model_cfg: ml_collections.ConfigDict,
                   tokenizer: data_lib.Tokenizer) -> int | None:
  """The vocabulary size a model will have, read without loading it.

  None where it cannot be known before loading (a hub name, a stage output).
  """
  init_from = model_cfg.init_from
  if init_from.startswith("scratch:"):
    return model_cfg.overrides.get(
        "vocab_size", _round_up(tokenizer.vocab_size, 8))
  config_json = os.path.join(init_from, "config.json")
  if os.path.isfile(config_json):
    with open(config_json, encoding="utf-8") as f:
      return json.load(f).get("vocab_size")
  return None


def load_model(run: Run, role: str, init_from: str,
               model_cfg: ml_collections.ConfigDict, seed: int, *,
               mesh: jax.sharding.Mesh | None = None) -> models.T5LM:
  """Builds or loads a model from an `init_from` spec (see configs/default).

  On `mesh` (the teacher's own mesh), else on `run.mesh`.
  """
  mesh = run.mesh if mesh is None else mesh
  kw = dict(dtype=jnp.dtype(model_cfg.dtype),
            param_dtype=jnp.dtype(model_cfg.param_dtype))
  if init_from.startswith("scratch:"):
    overrides = dict(model_cfg.overrides.to_dict())
    overrides.setdefault("vocab_size",
                         _round_up(run.tokenizer.vocab_size, 8))
    lm = models.init(init_from[len("scratch:"):], jax.random.PRNGKey(seed),
                     mesh=mesh, **overrides, **kw)
  elif init_from.startswith("stage:"):
    path = run.path("models", init_from[len("stage:"):])
    if not os.path.isdir(path):
      raise ValueError(f"{role}.init_from={init_from!r}: no model at {path}; "
                       f"run that stage first")
    lm = models.load(path, mesh=mesh, **kw)
  else:
    lm = models.load(init_from, mesh=mesh, **kw)
  if lm.config.vocab_size < run.tokenizer.vocab_size:
    raise ValueError(
        f"{role} vocabulary has {lm.config.vocab_size} entries but the "
        f"tokenizer produces ids up to {run.tokenizer.vocab_size - 1}")
  remat = model_cfg.get("remat", "none")
  if remat != lm.config.remat:  # a compute choice: the parameters are alike
    lm = dataclasses.replace(lm, config=lm.config.replace(remat=remat))
  return lm


def check_same_vocab(teacher: str, teacher_vocab: int | None, student: str,
                     student_vocab: int | None) -> None:
  """Refuses a teacher and student of different vocabulary sizes."""
  if None not in (teacher_vocab, student_vocab) and (
      teacher_vocab != student_vocab):
    raise ValueError(
        f"teacher and student vocabularies differ: teacher ({teacher}) has "
        f"{teacher_vocab} entries, student ({student}) {student_vocab}; they "
        f"must share one tokenizer")


def _check_loaded_vocab(teacher: models.T5LM, student: models.T5LM) -> None:
  check_same_vocab("loaded", teacher.config.vocab_size, "loaded",
                   student.config.vocab_size)


def params_checksum(params: Any) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = distributed.to_host(leaf)  # gathered across processes
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _export(run: Run, name: str, lm: models.T5LM) -> None:
  # Every process takes part (the parameters are gathered across hosts);
  # process 0 writes.
  lm.save_pretrained(run.path("models", name))
  distributed.barrier(f"export {name}")  # the files exist for every process


# --------------------------------------------------------------------------
# The training loop every stage uses
# --------------------------------------------------------------------------


def _state_shardings(run: Run, lm: models.T5LM,
                     tx: optax.GradientTransformation, seed: int,
                     select: str | None = None) -> Any:
  """Shardings of the stage's `TrainState` (with a selection if `select`)."""
  param_shardings = jax.tree.map(lambda x: x.sharding, lm.params)
  abstract = jax.eval_shape(
      functools.partial(state_lib.init_state, tx=tx, seed=seed), lm.params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: run.replicated())
  return state_lib.TrainState(
      step=run.replicated(), params=param_shardings, opt_state=opt_shardings,
      rng=run.replicated(), skipped=run.replicated(),
      nonfinite_streak=run.replicated(), last_finite_loss=run.replicated(),
      selection=None if select is None else validation.Selection(
          params=param_shardings if select == "best" else None,
          **{name: run.replicated() for name in (
              "score", "step", "start_score", "last_score", "seconds")}))


def _validator(run: Run, stage: str, lm: models.T5LM,
               spec: validation.StageValidation) -> validation.Validator:
  """Greedy decoding of the validation split, scored with its metric."""
  metric = run.validation_metric

  def score(params: Any) -> float:
    predictions = decode_split(run, dataclasses.replace(lm, params=params),
                               run.validation, f"validate {stage}")
    return evaluate.score((metric,), predictions,
                          run.validation_references)[metric]

  def log(update: int, values: dict[str, float]) -> None:
    run.writer.write(f"{stage}_val", update, values)
    run.writer.log_line(f"{stage}_val", update, run.cfg[_config_section(
        stage)].steps, values, tuple(values))

  return validation.Validator(spec, score, log, metric)


def _config_section(stage: str) -> str:
  return "rl" if stage.startswith("rl_k") else stage


def train_stage(run: Run, stage: str, lm: models.T5LM, step_fn: Callable,
                optim: state_lib.OptimConfig, *, batch_size: int, seed: int,
                teacher: models.T5LM | None = None,
                hook: Callable[[int, Any], None] | None = None
                ) -> tuple[models.T5LM, dict[str, Any]]:
  """Runs `step_fn` for the stage's micro-steps, with checkpoints and logs.

  `hook(step, state)`, if given, is called at the start and after every step
  (it decides itself when to act; the RL stage's gradient diagnostics).

  With the stage's `eval_every > 0` the validation split is decoded after
  every that many optimizer updates (`ketchup_jax.train.validation`), and
  `select` decides which parameters are returned.

  Resumes from the stage's latest checkpoint (parameters, optimizer state,
  step, RNG, the validation record; the data position is the step).

  Returns:
    The student (or teacher, for teacher_sft) with the selected parameters,
    and the selection's summary for `stages/<stage>.json` ({} without
    validation).
  """
  cfg = run.cfg
  spec = validation.StageValidation.from_config(stage,
                                                cfg[_config_section(stage)])
  select = spec.select if spec.enabled else None
  tx = state_lib.make_optimizer(optim)
  shardings = _state_shardings(run, lm, tx, seed, select)

  def init_fn(params):
    state = state_lib.init_state(params, tx=tx, seed=seed)
    if select is not None:
      state = state.replace(
          selection=validation.initial_selection(params, select))
    return state

  init = jax.jit(init_fn, out_shardings=shardings)
  state = init(lm.params)
  validator = _validator(run, stage, lm, spec) if select else None
  ckpt = checkpoints.StageCheckpoints(run.path("checkpoints", stage))
  restored = ckpt.restore_latest_good(state)
  if restored is not None:
    state = restored
  start = int(state.step)
  total = optim.micro_steps
  dropped = run.writer.rewind(stage, start)
  if dropped:
    logging.info("[%s] resuming at step %d: dropped %d metrics.jsonl records "
                 "of the steps being redone", stage, start, dropped)
  batch_sharding = run.batch_sharding()
  # Each process reads only its rows of every global batch; the global batch
  # order is the same whatever the number of processes.
  data = run.batches(run.train, batch_size=batch_size, seed=seed,
                     start_step=start,
                     local_rows=distributed.batch_rows(batch_sharding,
                                                       batch_size))
  with_teacher = teacher is not None
  if isinstance(step_fn, teacher_slice.SplitStep):  # the teacher's own mesh
    jitted = step_fn.compile(shardings, batch_sharding, run.replicated())
  else:
    jitted = jax.jit(
        step_fn, donate_argnums=0,
        in_shardings=(shardings,) + ((jax.tree.map(
            lambda x: x.sharding, teacher.params),) if with_teacher else ()) + (
                batch_sharding,),
        out_shardings=(shardings, run.replicated()))
  bar = tqdm.tqdm(total=total, initial=start, desc=stage, unit="step",
                  disable=not run.is_main, dynamic_ncols=True)
  tick, tick_step = time.perf_counter(), start
  previous_streak = None
  if hook is not None and start == 0:
    hook(0, state)
  if validator is not None and start == 0:
    state = validator.start(state)
    state = state.replace(selection=jax.device_put(state.selection,
                                                   shardings.selection))
  for step in range(start, total):
    batch = distributed.put_batch(next(data), batch_sharding, batch_size)
    args = (state, teacher.params, batch) if with_teacher else (state, batch)
    state, metrics = jitted(*args)
    done = step + 1
    # Read the previous step's streak while this one runs (no pipeline stall).
    if previous_streak is not None:
      _check_nonfinite(run, stage, done - 1, previous_streak)
    # From the metrics: the state itself is donated to the next step.
    previous_streak = (metrics["nonfinite_streak"],
                       metrics["last_finite_loss"])
    bar.update(1)
    if done % cfg.log_every == 0 or done == total:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      tokens = float(metrics.get("tokens", 0.0))
      metrics["tokens_per_s"] = tokens * (done - tick_step) / max(
          now - tick, 1e-9)
      tick, tick_step = now, done
      run.writer.write(stage, done, metrics)
      run.writer.log_line(stage, done, total, metrics, _LOG_KEYS)
      bar.set_postfix(loss=f"{float(metrics['loss']):.4g}")
    if hook is not None:
      hook(done, state)
    if validator is not None and done % optim.grad_accum == 0 and spec.due(
        done // optim.grad_accum, optim.steps):
      state = validator.after_update(state, done // optim.grad_accum)
      state = state.replace(selection=jax.device_put(state.selection,
                                                     shardings.selection))
    if done % cfg.checkpoint_every == 0 and done < total:
      _save(ckpt, done, state)
    # A signal to any process stops all of them at the same step. With
    # several processes they agree (a collective, which waits for the step)
    # only where the loop waits anyway: at logging and checkpoint steps.
    agree = jax.process_count() == 1 or done % cfg.log_every == 0 or (
        done % cfg.checkpoint_every == 0)
    if agree and distributed.any_process(run.stop.requested) and (
        done < total):
      if ckpt.latest_step() != done:  # not just saved by the line above
        _save(ckpt, done, state)
      bar.close()
      ckpt.close()
      raise Preempted(stage, done, total,
                      run.stop.signal_name or "signal to another process")
  bar.close()
  if isinstance(run.train, data_lib.LazyTokenized):
    logging.info("[%s] per-host input: process %d tokenised %d rows of the "
                 "%d-example train split so far (%s)", stage,
                 jax.process_index(), run.train.stats["num_examples"],
                 len(run.train), run.train.stats)
  if previous_streak is not None:  # None: resumed at the final step
    _check_nonfinite(run, stage, total, previous_streak)
  if ckpt.latest_step() != total:
    _save(ckpt, total, state, force=True)
  ckpt.close()
  info = validation.summary(state, spec, run.validation_metric, optim.steps)
  if info:
    logging.info("[%s] selection: %s", stage, info)
  return (dataclasses.replace(lm, params=validation.selected_params(
      state, spec)), info)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def _save(ckpt: checkpoints.StageCheckpoints, step: int,
          state: state_lib.TrainState, *, force: bool = False) -> None:
  """Saves, refusing to write parameters that are not all finite."""
  if not bool(_all_finite(state.params)):
    raise FloatingPointError(
        f"refusing to checkpoint {ckpt.directory} at step {step}: the "
        f"parameters are not all finite")
  ckpt.save(step, state, force=force)


def _check_nonfinite(run: Run, stage: str, step: int,
                     streak_and_loss: tuple[jax.Array, jax.Array]) -> None:
  streak, last_loss = (float(x) for x in jax.device_get(streak_and_loss))
  limit = run.cfg.max_nonfinite_steps
  if streak >= limit:
    raise FloatingPointError(
        f"stage {stage}: {int(streak)} consecutive steps with a non-finite "
        f"loss or gradient (updates skipped), the last at step {step}; last "
        f"finite loss {last_loss:.6g}. Lower the learning rate or check the "
        f"data; the last checkpoint holds finite parameters.")


# --------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


def _stage_done(run: Run, name: str) -> bool:
  return os.path.exists(run.path("stages", f"{name}.json"))


def _mark_done(run: Run, name: str, info: dict[str, Any]) -> None:
  if run.is_main:
    fileio.atomic_write(run.path("stages", f"{name}.json"),
                        json.dumps(info, indent=1))
  # Every process sees the marker before deciding what runs next.
  distributed.barrier(f"stage {name} done")


def _stage_selection(run: Run, source: str) -> dict[str, Any]:
  """The validation selection recorded for a `stage:` source ({} if none)."""
  if not source.startswith("stage:"):
    return {}
  path = run.path("stages", f"{source[len('stage:'):]}.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    info = json.load(f)
  return {k: info[k] for k in ("select", "eval_every", "val_metric",
                               "selected_step", "selected_val_score",
                               "start_val_score", "val_seconds") if k in info}


def _teacher_source(run: Run) -> str:
  stages = parse_stages(run.cfg.stages)
  if "teacher_sft" in stages or _stage_done(run, "teacher_sft"):
    return "stage:teacher_sft"
  return run.cfg.teacher.init_from


def _student_start(run: Run) -> str:
  stages = parse_stages(run.cfg.stages)
  if "predistill" in stages or _stage_done(run, "predistill"):
    return "stage:predistill"
  return run.cfg.student.init_from


def _models(run: Run, student: models.T5LM,
            teacher: models.T5LM | None) -> steps.Models:
  return steps.Models(student=student.config,
                      teacher=None if teacher is None else teacher.config,
                      mesh=run.mesh,
                      logits_chunk=run.cfg.get("logits_chunk", 0))


def stage_teacher_sft(run: Run) -> None:
  cfg = run.cfg
  teacher = load_model(run, "teacher", cfg.teacher.init_from, cfg.teacher,
                       cfg.seed)
  optim = state_lib.OptimConfig.from_config(cfg.teacher_sft)
  step_fn = functools.partial(steps.supervised_step,
                              models=_models(run, teacher, None), optim=optim)
  teacher, info = train_stage(run, "teacher_sft", teacher, step_fn, optim,
                              batch_size=cfg.teacher_sft.batch_size,
                              seed=cfg.seed)
  _export(run, "teacher_sft", teacher)
  _mark_done(run, "teacher_sft",
             {"checksum": params_checksum(teacher.params), **info})


def stage_predistill(run: Run) -> None:
  cfg = run.cfg
  teacher = load_model(run, "teacher", _teacher_source(run), cfg.teacher,
                       cfg.seed, mesh=run.teacher_mesh)
  student = load_model(run, "student", cfg.student.init_from, cfg.student,
                       cfg.seed + 1)
  _check_loaded_vocab(teacher, student)
  optim = state_lib.OptimConfig.from_config(cfg.predistill)
  mods = _models(run, student, teacher)
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
  student, info = train_stage(run, "predistill", student, step_fn, optim,
                              batch_size=cfg.predistill.batch_size,
                              seed=cfg.seed + 1, teacher=teacher)
  _export(run, "predistill", student)
  _mark_done(run, "predistill",
             {"checksum": params_checksum(student.params), **info})


def stage_rl(run: Run, k: int) -> None:
  cfg = run.cfg
  name = f"rl_k{k}"
  teacher = load_model(run, "teacher", _teacher_source(run), cfg.teacher,
                       cfg.seed, mesh=run.teacher_mesh)
  student = load_model(run, "student", _student_start(run), cfg.student,
                       cfg.seed + 1)
  _check_loaded_vocab(teacher, student)
  optim = state_lib.OptimConfig.from_config(cfg.rl)
  rl = steps.RLConfig.from_config(cfg.rl, k=k)
  step_fn = functools.partial(steps.rl_step,
                              models=_models(run, student, teacher),
                              optim=optim, rl=rl)
  if run.teacher_mesh is not None:
    step_fn = teacher_slice.RLStep(models=_models(run, student, teacher),
                                   teacher_mesh=run.teacher_mesh, optim=optim,
                                   rl=rl)
  hook = None
  if cfg.rl.get("diag_every", 0):
    from ketchup_jax import diagnostics  # pylint: disable=g-import-not-at-top
    hook = diagnostics.training_hook(
        run, name, teacher, student, k=k, every=cfg.rl.diag_every,
        minibatches=cfg.rl.diag_minibatches)
  # Every K starts from the same student with the same seed: paired runs.
  student, info = train_stage(run, name, student, step_fn, optim,
                              batch_size=cfg.rl.batch_size,
                              seed=cfg.seed + 2, teacher=teacher, hook=hook)
  _export(run, name, student)
  _mark_done(run, name, {"checksum": params_checksum(student.params), **info})


def _greedy(run: Run, lm: models.T5LM, max_len: int) -> Callable:
  sharding = run.batch_sharding()

  def generate(batch):
    ids = jax.device_put(
        {k: batch[k] for k in ("input_ids", "attention_mask")}, sharding)
    # Gathered to every process (process 0 writes the predictions).
    return distributed.to_host(lm.generate(
        ids["input_ids"], ids["attention_mask"], max_new_tokens=max_len))
  return generate


def _eval_models(run: Run) -> list[tuple[str, str]]:
  """(row label, init_from) of every model this run can evaluate."""
  rows = []
  if _stage_done(run, "teacher_sft") or not run.cfg.teacher.init_from.startswith(
      "scratch:"):
    rows.append(("teacher", _teacher_source(run)))
  if _stage_done(run, "predistill"):
    rows.append((f"student ({run.cfg.predistill.method})", "stage:predistill"))
  for k in rl_ks(run.cfg):
    if _stage_done(run, f"rl_k{k}"):
      label = "LLMR (K=1)" if k == 1 else f"KETCHUP (K={k})"
      if run.cfg.rl.get("reward", "llmr") != "llmr":
        label = f"{run.cfg.rl.reward} (K={k})"
      rows.append((label, f"stage:rl_k{k}"))
  return rows


def return_diagnostics_by_k(run: Run, student: models.T5LM,
                            teacher: models.T5LM) -> dict[int, dict[str, float]]:
  """Return variance and bias for each K from shared rollouts (SPEC §5)."""
  cfg = run.cfg
  rl = steps.RLConfig.from_config(cfg.rl, k=1)
  mods = _models(run, student, teacher)

  @jax.jit
  def rollout_and_score(student_params, teacher_params, batch, rng):
    out = mods.sample(student_params, mods.student, batch, rng,
                      max_new_tokens=rl.max_decode_len,
                      temperature=rl.temperature, top_k=rl.top_k,
                      top_p=rl.top_p)
    mask = steps.length_mask(out.lengths, rl.max_decode_len)
    keep = batch["example_mask"] > 0
    if rl.unfinished == "drop":  # as in training: unfinished rows excluded
      keep = keep & out.done
    mask = mask * keep[:, None]
    logits = mods.forward(
        teacher_params, mods.teacher, batch["input_ids"],
        batch["attention_mask"],
        t5.shift_right(out.tokens, mods.teacher),
        jnp.ones_like(out.tokens))
    q, v = returns.teacher_q_values(logits, out.tokens, mask,
                                    center=rl.center_logits, value=rl.value)
    return q, v, mask

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


def decode_split(run: Run, lm: models.T5LM,
                 data: data_lib.TokenizedExamples, desc: str) -> list[str]:
  """Greedy outputs of `lm` on `data`, in order (eval and validation)."""
  cfg = run.cfg
  return evaluate.decode_split(
      _greedy(run, lm, cfg.eval.max_decode_len), data,
      batch_size=cfg.eval.batch_size, batch_multiple=run.batch_multiple,
      tokenizer=run.tokenizer, desc=desc,
      source_buckets=tuple(cfg.source_buckets) or None)


def eval_predictions(run: Run, lm: models.T5LM, label: str) -> list[str]:
  """Greedy outputs of `lm` on the eval split, in order (what eval scores)."""
  return decode_split(run, lm, run.eval, f"eval {label}")


def stage_eval(run: Run) -> dict[str, Any]:
  cfg = run.cfg
  results: dict[str, Any] = {"task": run.task.name, "split": cfg.eval.split,
                             "num_examples": len(run.eval_references),
                             "metric_names": list(run.task.metric_names),
                             "models": {}}
  teacher = None
  for label, source in _eval_models(run):
    lm = load_model(run, label, source,
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
        "checksum": params_checksum(lm.params),
        "decode_seconds": time.perf_counter() - start}
    selection = _stage_selection(run, source)
    if selection:
      results["models"][label]["selection"] = selection
    logging.info("eval %s: %s", label, scores)
    if run.is_main:
      _write_predictions(run, source.replace("stage:", "") if
                         source.startswith("stage:") else "teacher",
                         predictions)
  if teacher is not None and _stage_done(run, "predistill"):
    student = load_model(run, "student", "stage:predistill", cfg.student,
                         cfg.seed)
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


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def _rl_verdict(results: dict[str, Any]) -> list[str]:
  """One line: the best RL row on the first metric against its start."""
  first = results["metric_names"][0]
  models = results["models"]
  start = [label for label, row in models.items()
           if row["source"] == "stage:predistill"]
  rl = {label: row["metrics"][first] for label, row in models.items()
        if row["source"].startswith("stage:rl_k")}
  if not start or not rl:
    return []
  base = models[start[0]]["metrics"][first]
  best = max(rl, key=rl.get)
  below = [label for label, value in rl.items() if value < base]
  return ["", f"Best RL row on {first}: **{best}**, {rl[best]:.2f} against "
          f"{base:.2f} for its start, {start[0]} "
          f"({rl[best] - base:+.2f}); "
          + (f"below the start: {', '.join(below)}." if below else
             "every RL row is at or above the start.")]


def results_table(results: dict[str, Any]) -> str:
  """The eval results as a Markdown table (model x metric)."""
  names = results["metric_names"]
  lines = [f"Task `{results['task']}`, split `{results['split']}` "
           f"({results['num_examples']} examples).", "",
           "| model | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
  for label, row in results["models"].items():
    lines.append(f"| {label} | " + " | ".join(
        f"{row['metrics'][n]:.2f}" for n in names) + " |")
  lines += _rl_verdict(results)
  selected = {label: row["selection"] for label, row in
              results["models"].items() if row.get("selection")}
  if selected:
    lines += ["", f"Models are scored on `{results['split']}`. Stages that "
              "validated chose their exported parameters on the validation "
              "split (never on the reported split); the starting point "
              "never competes:", "",
              "| model | select | every | selected update | val metric | "
              "val at start | val selected | validation s |",
              "|---|---|---:|---:|---|---:|---:|---:|"]
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    for label, sel in selected.items():
      lines.append(
          f"| {label} | {sel['select']} | {sel['eval_every']} | "
          f"{sel['selected_step']} | {sel['val_metric']} | "
          f"{fmt(sel.get('start_val_score'))} | "
          f"{fmt(sel.get('selected_val_score'))} | "
          f"{sel['val_seconds']:.1f} |")
  diag = results.get("return_diagnostics")
  if diag:
    lines += ["", "Return variance and bias of the pre-distilled student's "
              "rollouts, per K (one teacher pass, SPEC §5):", "",
              "| K | Var[Ĝ] | Var[G] (K=1) | mean Ĝ−G | max Ĝ−G |",
              "|---:|---:|---:|---:|---:|"]
    for k, d in diag.items():
      lines.append(f"| {k} | {d['return_var']:.3f} | {d['return_var_k1']:.3f}"
                   f" | {d['bias_mean']:.3f} | {d['bias_max']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_diagnostics(results: dict[str, Any], directory: str) -> list[str]:
  """PNG plots of return variance and bias against K."""
  diag = results.get("return_diagnostics")
  if not diag:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  ks = [int(k) for k in diag]
  written = []
  for key, title, fname in (
      ("return_var", "Batch variance of the K-step return", "return_var.png"),
      ("bias_mean", "Mean bias Ĝ − G of the K-step return", "bias.png")):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [diag[str(k)][key] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, fname)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


def _write_results(run: Run, results: dict[str, Any]) -> None:
  if not run.is_main:
    return
  for name, text in (("results.json", json.dumps(results, indent=1)),
                     ("results.md", results_table(results))):
    fileio.atomic_write(run.path(name), text)
  plot_diagnostics(results, run.path("plots"))


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _prepare_workdir(run: Run) -> None:
  """Creates DIR and records the config; refuses a DIR that is a file."""
  if os.path.exists(run.workdir) and not os.path.isdir(run.workdir):
    raise ValueError(f"--workdir {run.workdir!r} exists and is not a directory")
  if not run.is_main:
    distributed.barrier("workdir ready")
    return
  for sub in ("stages", "models", "checkpoints"):
    os.makedirs(run.path(sub), exist_ok=True)
  config_path = run.path("config.json")
  new = run.cfg.to_json_best_effort(indent=1, sort_keys=True)
  if os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      if f.read() != new:
        logging.warning("%s differs from this run's config; finished stages "
                        "are kept and the file is updated", config_path)
  fileio.atomic_write(config_path, new)
  if isinstance(run.tokenizer, data_lib.WordTokenizer) and not (
      run.cfg.tokenizer.path):
    saved = run.path("tokenizer.json")
    if not os.path.exists(saved):
      run.tokenizer.save(saved)
  distributed.barrier("workdir ready")


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Runs the configured stages in `workdir`; returns the eval results."""
  # Before anything touches a JAX backend: connect to the other processes.
  distributed.initialize(cfg.get("distributed"))
  logging.info("%s", distributed.layout())
  logging.info("JAX %s, %d process(es), this is %d; %d devices: %s",
               jax.__version__, jax.process_count(), jax.process_index(),
               jax.device_count(), jax.devices()[0].device_kind)
  the_run = setup(cfg, workdir)
  # Every process has read DIR (tokenizer.json, ...) before process 0 writes.
  distributed.barrier("set up")
  # One run at a time in DIR, taken before anything is written there.
  with runlock.hold(workdir):
    return _run_locked(the_run)


def _run_locked(the_run: Run) -> dict[str, Any] | None:
  cfg, workdir = the_run.cfg, the_run.workdir
  _prepare_workdir(the_run)
  the_run.writer = writer_lib.MetricWriter(workdir)
  the_run.stop = StopRequest(cfg.preemption_grace_s)
  results = None
  try:
    with the_run.stop:
      results = _run_stages(the_run)
  except Preempted as e:
    print(f"{e.signal_name}: stopped stage {e.stage} at step {e.step}/"
          f"{e.total} with a checkpoint saved; rerun the same command to "
          f"resume.", flush=True)
  finally:
    the_run.writer.close()
  return results


def _run_stages(the_run: Run) -> dict[str, Any] | None:
  cfg = the_run.cfg
  results = None
  for stage in parse_stages(cfg.stages):
    names = [f"rl_k{k}" for k in rl_ks(cfg)] if stage == "rl" else [stage]
    for name in names:
      if name != "eval" and _stage_done(the_run, name):
        logging.info("stage %s: already finished, skipped", name)
        continue
      logging.info("stage %s", name)
      if name == "teacher_sft":
        stage_teacher_sft(the_run)
      elif name == "predistill":
        stage_predistill(the_run)
      elif name.startswith("rl_k"):
        stage_rl(the_run, int(name[len("rl_k"):]))
      else:
        results = stage_eval(the_run)
        _write_results(the_run, results)
        if the_run.is_main:
          print(results_table(results))
        distributed.barrier("results written")
  return results
