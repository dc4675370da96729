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
import json
from typing import Any

from absl import logging
import jax
import ml_collections

from ketchup_jax import distributed
from ketchup_jax import fileio
from ketchup_jax import reporting
from ketchup_jax import runlock
from ketchup_jax.train import context
from ketchup_jax.train import preemption
from ketchup_jax.train import settings
from ketchup_jax.train import stages
from ketchup_jax.train import writer as writer_lib
from ketchup_jax.train.context import Run


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Runs the configured stages in `workdir`; returns the eval results."""
  # Before anything touches a JAX backend: connect to the other processes.
  distributed.initialize(cfg.get("distributed"))
  logging.info("%s", distributed.layout())
  logging.info("JAX %s, %d process(es), this is %d; %d devices: %s",
               jax.__version__, jax.process_count(), jax.process_index(),
               jax.device_count(), jax.devices()[0].device_kind)
  the_run = context.setup(cfg, workdir)
  # Every process has read DIR (tokenizer.json, ...) before process 0 writes.
  distributed.barrier("set up")
  # One run at a time in DIR, taken before anything is written there.
  with runlock.hold(workdir):
    return _run_locked(the_run)


def _run_locked(the_run: Run) -> dict[str, Any] | None:
  context.prepare_workdir(the_run)
  the_run = dataclasses.replace(
      the_run, writer=writer_lib.MetricWriter(the_run.workdir),
      stop=preemption.StopRequest(the_run.cfg.preemption_grace_s))
  results = None
  try:
    with the_run.stop:
      results = _run_stages(the_run)
  except preemption.Preempted as e:
    print(f"{e.signal_name}: stopped stage {e.stage} at step {e.step}/"
          f"{e.total} with a checkpoint saved; rerun the same command to "
          f"resume.", flush=True)
  finally:
    the_run.writer.close()
  return results


def _run_stages(the_run: Run) -> dict[str, Any] | None:
  results = None
  for stage in settings.stage_ids(the_run.cfg):
    if stage.kind != "eval" and the_run.stage_done(stage):
      logging.info("stage %s: already finished, skipped", stage)
      continue
    logging.info("stage %s", stage)
    if stage.kind == "teacher_sft":
      stages.stage_teacher_sft(the_run)
    elif stage.kind == "predistill":
      stages.stage_predistill(the_run)
    elif stage.kind == "rl":
      stages.stage_rl(the_run, stage)
    else:
      results = stages.stage_eval(the_run)
      write_results(the_run, results)
      if the_run.is_main:
        print(reporting.results_table(results))
      distributed.barrier("results written")
  return results


def write_results(run: Run, results: dict[str, Any]) -> None:
  """results.json, results.md and plots/ (process 0)."""
  if not run.is_main:
    return
  for name, text in (("results.json", json.dumps(results, indent=1)),
                     ("results.md", reporting.results_table(results))):
    fileio.atomic_write(run.path(name), text)
  reporting.plot_diagnostics(results, run.path("plots"))
