"""The training loop every stage uses: `train_stage`.

It runs a stage's jitted micro-step over the stage's batches with resume
from the latest checkpoint, progress bar, metrics, the non-finite guard,
validation with best-checkpoint selection (`validation`), and preemption
(`preemption`): a signal to any process stops all of them at the same step,
saved.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import optax
import tqdm

from ketchup_jax import data as data_lib
from ketchup_jax import distributed
from ketchup_jax import models
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.train import checkpoints
from ketchup_jax.train import evaluate
from ketchup_jax.train import preemption
from ketchup_jax.train import settings
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import teacher_slice
from ketchup_jax.train import validation
from ketchup_jax.train.context import Run

LOG_KEYS = ("loss", "return_mean", "return_var", "return_var_k1",
            "bias_mean", "entropy", "grad_norm", "finished_fraction",
            "tokens_per_s")


def _greedy(run: Run, lm: models.LM, max_len: int) -> Callable:
  sharding = run.batch_sharding()

  def generate(batch):
    ids = jax.device_put(
        {k: batch[k] for k in ("input_ids", "attention_mask")}, sharding)
    # Gathered to every process (process 0 writes the predictions).
    return distributed.to_host(lm.generate(
        ids["input_ids"], ids["attention_mask"], max_new_tokens=max_len))
  return generate


def decode_split(run: Run, lm: models.LM,
                 data: data_lib.TokenizedExamples, desc: str) -> list[str]:
  """Greedy outputs of `lm` on `data`, in order (eval and validation)."""
  cfg = run.cfg
  return evaluate.decode_split(
      _greedy(run, lm, cfg.eval.max_decode_len), data,
      batch_size=cfg.eval.batch_size, batch_multiple=run.batch_multiple,
      tokenizer=run.tokenizer, desc=desc,
      source_buckets=tuple(cfg.source_buckets) or None)


def _state_shardings(run: Run, params: Any,
                     tx: optax.GradientTransformation, seed: int,
                     select: str | None = None) -> Any:
  """Shardings of the stage's `TrainState` training `params` (with a
  selection if `select`)."""
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(
      functools.partial(state_lib.init_state, tx=tx, seed=seed), params)
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


def _validator(run: Run, stage: settings.StageId, lm: models.LM,
               spec: validation.StageValidation,
               view: Callable[[Any], Any]) -> validation.Validator:
  """Greedy decoding of the validation split, scored with its metric;
  `view(trained params)` is the model's parameters."""
  metric = run.validation_metric

  def score(params: Any) -> float:
    predictions = decode_split(run, dataclasses.replace(lm,
                                                        params=view(params)),
                               run.validation, f"validate {stage}")
    return evaluate.score((metric,), predictions,
                          run.validation_references)[metric]

  def log(update: int, values: dict[str, float]) -> None:
    run.writer.write(f"{stage}_val", update, values)
    run.writer.log_line(f"{stage}_val", update, run.cfg[stage.section].steps,
                        values, tuple(values))

  return validation.Validator(spec, score, log, metric)


def train_stage(run: Run, stage: settings.StageId, lm: models.LM,
                step_fn: Callable,
                optim: state_lib.OptimConfig, *, batch_size: int, seed: int,
                teacher: models.LM | None = None,
                hook: Callable[[int, Any], None] | None = None,
                lora: lora_lib.LoraStudent | None = None
                ) -> tuple[models.LM, dict[str, Any], Any]:
  """Runs `step_fn` for the stage's micro-steps, with checkpoints and logs.

  `lora` set: `lm` is the frozen base (stored in `lora.base_dtype`); fresh
  adapters (`models.lora.init_adapters` from `seed`) are what trains, the state's
  `params` and optimizer state; the base is passed to every step as its own
  argument (not donated, not checkpointed: a resumed stage reloads it from
  its source) and `step_fn` sees it as `state.frozen`.

  `hook(step, state)`, if given, is called at the start and after every step
  (it decides itself when to act; the RL stage's gradient diagnostics).

  With the stage's `eval_every > 0` the validation split is decoded after
  every that many optimizer updates (`ketchup_jax.train.validation`), and
  `select` decides which parameters are returned.

  Resumes from the stage's latest checkpoint (parameters, optimizer state,
  step, RNG, the validation record; the data position is the step).

  Returns:
    The student (or teacher, for teacher_sft) with the selected parameters
    (a LoRA student's merged, in `lora.dtype`), the selection's summary for
    `stages/<stage>.json` ({} without validation), and the selected adapters
    (None without `lora`).
  """
  cfg = run.cfg
  spec = validation.StageValidation.from_config(stage.section,
                                                cfg[stage.section])
  select = spec.select if spec.enabled else None
  tx = state_lib.make_optimizer(optim)
  if lora is None:
    frozen, trained, view = None, lm.params, lambda params: params
  else:
    frozen = lora.frozen(lm.params)
    trained = jax.device_put(
        lora_lib.init_adapters(lm.params, lm.config, lora.lora, seed),
        run.replicated())  # small: every device holds them whole
    apply, base_config = jax.jit(lora.apply, static_argnums=2), lm.config
    view = lambda params: apply(params, frozen, base_config)
    lm = dataclasses.replace(lm, params=None, config=lm.config.replace(
        param_dtype=jnp.dtype(lora.dtype)))
  shardings = _state_shardings(run, trained, tx, seed, select)

  def init_fn(params):
    state = state_lib.init_state(params, tx=tx, seed=seed)
    if select is not None:
      state = state.replace(
          selection=validation.initial_selection(params, select))
    return state

  init = jax.jit(init_fn, out_shardings=shardings)
  state = init(trained)
  validator = _validator(run, stage, lm, spec, view) if select else None
  ckpt = checkpoints.StageCheckpoints(run.path("checkpoints", stage.name))
  restored = ckpt.restore_latest_good(state)
  if restored is not None:
    state = restored
  start = int(state.step)
  total = optim.micro_steps
  dropped = run.writer.rewind(stage.name, start)
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
  # Arguments after the state: a LoRA base, the teacher's parameters.
  fixed = ((frozen,) if lora is not None else ()) + (
      (teacher.params,) if with_teacher else ())
  if isinstance(step_fn, teacher_slice.SplitStep):  # the teacher's own mesh
    if lora is not None:  # settings.check_config refuses it
      raise ValueError("LoRA with the teacher on its own mesh")
    jitted = step_fn.compile(shardings, batch_sharding, run.replicated())
  else:
    if lora is None:
      inner = step_fn
    else:
      def inner(state, base, *args):  # the base: an undonated argument
        state, metrics = step_fn(state.replace(frozen=base), *args)
        return state.replace(frozen=None), metrics
    jitted = jax.jit(
        inner, donate_argnums=0,
        in_shardings=(shardings,) + tuple(
            jax.tree.map(lambda x: x.sharding, p) for p in fixed) + (
                batch_sharding,),
        out_shardings=(shardings, run.replicated()))
  bar = tqdm.tqdm(total=total, initial=start, desc=stage.name, unit="step",
                  disable=not run.is_main, dynamic_ncols=True)
  tick, tick_step = time.perf_counter(), start
  previous_streak = None
  if hook is not None and lora is not None:
    inner_hook = hook
    hook = lambda step, state: inner_hook(  # the merged student
        step, state.replace(params=view(state.params)))
  if hook is not None and start == 0:
    hook(0, state)
  if validator is not None and start == 0:
    state = validator.start(state)
    state = state.replace(selection=jax.device_put(state.selection,
                                                   shardings.selection))
  for step in range(start, total):
    batch = distributed.put_batch(next(data), batch_sharding, batch_size)
    state, metrics = jitted(state, *fixed, batch)
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
      run.writer.write(stage.name, done, metrics)
      run.writer.log_line(stage.name, done, total, metrics, LOG_KEYS)
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
      raise preemption.Preempted(stage.name, done, total,
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
  selected = validation.selected_params(state, spec)
  if lora is None:
    return dataclasses.replace(lm, params=selected), info, None
  return dataclasses.replace(lm, params=view(selected)), info, selected


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


def _check_nonfinite(run: Run, stage: settings.StageId, step: int,
                     streak_and_loss: tuple[jax.Array, jax.Array]) -> None:
  streak, last_loss = (float(x) for x in jax.device_get(streak_and_loss))
  limit = run.cfg.max_nonfinite_steps
  if streak >= limit:
    raise FloatingPointError(
        f"stage {stage}: {int(streak)} consecutive steps with a non-finite "
        f"loss or gradient (updates skipped), the last at step {step}; last "
        f"finite loss {last_loss:.6g}. Lower the learning rate or check the "
        f"data; the last checkpoint holds finite parameters.")
