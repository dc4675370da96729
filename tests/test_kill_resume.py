"""Kill -9 at random moments (and mid-checkpoint) resumes to the same parameters.

The test copies a finished reference run, removes the outputs of one stage
(`predistill` or `rl`), and runs that stage of `configs/smoke.py` (12 steps,
a checkpoint every 3) in a subprocess on one device. It kills the process
with SIGKILL several times -- at a random moment, at a random step, and as
soon as an Orbax temporary checkpoint directory appears (a kill during a
checkpoint write) -- rerunning the same command after each kill, then lets a
last rerun finish. The stage's parameter checksum must equal that of the
uninterrupted reference run with the same seed. The rl sequence starts with
two SIGTERMs (the second must exit at once, leaving no half-written
checkpoint as the latest). Both stages run concurrently (two cores).

The kill moments come from a seeded `random.Random`, so a failure replays.
"""

import concurrent.futures
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import conftest

from ketchup_jax.train import checkpoints
from test_pipeline import REPO, _run_on_one_device, smoke_config

STEPS = 12
EVERY = 3
# rl validates every 2 updates and exports the best: the selection (best
# parameters, score, step) must survive the kills too.
OVERRIDES = {"teacher_sft.steps": 3, "predistill.steps": STEPS,
             "rl.steps": STEPS, "checkpoint_every": EVERY,
             "rl.eval_every": 2, "rl.select": "best",
             "validation.max_examples": 16}
# stage name in the run directory -> value of --config.stages that runs it.
STAGES = {"predistill": "teacher_sft,predistill",
          "rl_k2": "teacher_sft,predistill,rl"}
ENV = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
TMP_MARK = ".orbax-checkpoint-tmp"


def _command(workdir, stages):
  return [sys.executable, "-m", "ketchup_jax.main",
          "--config=configs/smoke.py", f"--workdir={workdir}",
          "--config.mesh.data=1", f"--config.stages={stages}"] + [
              f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _checksum(workdir, stage):
  return json.loads(pathlib.Path(workdir, "stages",
                                 f"{stage}.json").read_text())["checksum"]


def _selection(workdir, stage):
  info = json.loads(pathlib.Path(workdir, "stages",
                                 f"{stage}.json").read_text())
  return {k: info.get(k) for k in ("selected_step", "selected_val_score",
                                   "start_val_score")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted teacher_sft -> predistill (12) -> rl (12) run.

  Run with the same command as the interrupted runs (a subprocess on one
  device), not in-process: the in-process session fakes 8 devices, which
  gives different persistent-cache keys, so every interrupted run's first
  start would compile again (measured: +5.5 s for teacher_sft alone).
  """
  workdir = tmp_path_factory.mktemp("kill_reference")
  done = subprocess.run(_command(workdir, STAGES["rl_k2"]), cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _unfinish(reference, workdir, stage):
  """A copy of the reference run with `stage` (and what follows) not run."""
  shutil.copytree(reference, workdir)
  gone = ["stages/rl_k2.json", "checkpoints/rl_k2", "models/rl_k2"]
  if stage == "predistill":
    gone += ["stages/predistill.json", "checkpoints/predistill",
             "models/predistill"]
  for name in gone:
    path = workdir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  (workdir / "metrics.jsonl").write_text("".join(
      line + "\n" for line in
      (workdir / "metrics.jsonl").read_text().splitlines()
      if json.loads(line)["stage"] not in (stage, f"{stage}_val")))


def _steps_logged(workdir, stage):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = []
  for line in path.read_text().splitlines():
    if f'"{stage}"' in line:
      try:
        steps.append(json.loads(line)["step"])
      except json.JSONDecodeError:
        pass  # a line being written
  return max(steps, default=0)


def _tmp_dirs(workdir, stage):
  directory = workdir / "checkpoints" / stage
  try:
    return [n for n in os.listdir(directory) if TMP_MARK in n]
  except FileNotFoundError:
    return []


def _latest_step(workdir, stage):
  directory = workdir / "checkpoints" / stage
  if not directory.exists():
    return None
  ckpt = checkpoints.StageCheckpoints(directory)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _kill_when(proc, ready, timeout=240.0):
  """SIGKILLs `proc` as soon as `ready()`; False if it finished first."""
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      return False
    assert time.time() < deadline, "the kill moment never came"
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return True


def _popen(cmd, **kw):
  return subprocess.Popen(cmd, cwd=REPO, env=ENV, **kw)


def _double_sigterm(workdir, stage, cmd):
  """Two SIGTERMs, the second once the first is handled: exits at once."""
  proc = _popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
  err_lines = []
  first_handled = threading.Event()

  def read_stderr():
    for line in proc.stderr:
      err_lines.append(line)
      if "saving a checkpoint at the next step boundary" in line:
        first_handled.set()

  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  # Once training has started (a step is logged).
  deadline = time.time() + 240
  while _steps_logged(workdir, stage) < 1:
    assert proc.poll() is None, "".join(err_lines)[-3000:]
    assert time.time() < deadline
    time.sleep(0.002)
  proc.send_signal(signal.SIGTERM)
  assert first_handled.wait(60), "".join(err_lines)[-3000:]
  proc.send_signal(signal.SIGTERM)
  out = proc.stdout.read()
  proc.wait(timeout=60)
  reader.join(10)
  err = "".join(err_lines)
  if proc.returncode == 0:
    # Allowed: the first signal's save and exit beat the second signal.
    assert f"SIGTERM: stopped stage {stage}" in out, err[-3000:]
  else:
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM again: exiting now without saving" in err
    assert "stopped stage" not in out
  assert not (workdir / "stages" / f"{stage}.json").exists()
  # The latest step is a complete checkpoint, not a temporary directory
  # (the next run restores it and must reach the reference checksum).
  latest = _latest_step(workdir, stage)
  if latest is not None:
    assert (workdir / "checkpoints" / stage / str(latest) /
            "_CHECKPOINT_METADATA").exists()
  return {"exit": proc.returncode, "latest_step": latest,
          "tmp_dirs_left": len(_tmp_dirs(workdir, stage))}


def _kill_sequence(reference, workdir, stage, *, double_sigterm):
  """Interrupts `stage` several times, then finishes it; returns counts."""
  _unfinish(reference, workdir, stage)
  cmd = _command(workdir, STAGES[stage])
  rng = random.Random(f"kill-{stage}")
  popen = lambda: _popen(cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  counts = {"sigkills": 0, "during_checkpoint_write": 0, "runs": 0}

  if double_sigterm:
    counts["double_sigterm"] = _double_sigterm(workdir, stage, cmd)
    counts["runs"] += 1
  # 1. At a random wall-clock moment after the start (import, compile,
  #    restore or training: wherever it lands), but before the last step
  #    (see test_kill_after_the_final_checkpoint_before_the_stage_is_marked).
  proc = popen()
  start, delay = time.time(), rng.uniform(0.5, 8.0)
  counts["sigkills"] += _kill_when(
      proc, lambda: (time.time() - start > delay or
                     _steps_logged(workdir, stage) >= STEPS - 1))
  counts["runs"] += 1
  # 2. At a random step after the one it resumes from.
  proc = popen()
  kill_at = rng.randint((_latest_step(workdir, stage) or 0) + 1, STEPS - 1)
  counts["sigkills"] += _kill_when(
      proc, lambda: _steps_logged(workdir, stage) >= kill_at)
  counts["runs"] += 1
  # 3. During a checkpoint write: as soon as Orbax's temporary directory
  #    appears. Retried if the write won the race, while an intermediate
  #    checkpoint is left to interrupt.
  if (_latest_step(workdir, stage) or 0) >= STEPS - EVERY:
    # The kills above landed late (a slow or loaded machine): no
    # intermediate checkpoint is left to interrupt, so the stage starts over.
    shutil.rmtree(workdir / "checkpoints" / stage)
  while (_latest_step(workdir, stage) or 0) < STEPS - EVERY:
    proc = popen()
    killed = _kill_when(proc, lambda: bool(_tmp_dirs(workdir, stage)))
    counts["runs"] += 1
    counts["sigkills"] += killed
    if killed and _tmp_dirs(workdir, stage):
      counts["during_checkpoint_write"] += 1
      # The half-written step is not what Orbax calls the latest.
      half = {int(re.match(r"(\d+)", n).group(1))
              for n in _tmp_dirs(workdir, stage)}
      assert _latest_step(workdir, stage) not in half
      break
  assert counts["during_checkpoint_write"] >= 1, counts
  assert not (workdir / "stages" / f"{stage}.json").exists()

  done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=300)
  counts["runs"] += 1
  assert done.returncode == 0, done.stderr[-3000:]
  assert _checksum(workdir, stage) == _checksum(reference, stage)
  assert _selection(workdir, stage) == _selection(reference, stage)
  # Steps retrained after a kill replace their records from before it: each
  # step is logged once, in order, and every line is whole JSON.
  logged = [json.loads(line)["step"] for line in
            (workdir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["stage"] == stage]
  assert logged == list(range(1, STEPS + 1)), logged
  if stage == "rl_k2":  # validated at the start and every 2 updates, once
    validated = [json.loads(line)["step"] for line in
                 (workdir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["stage"] == f"{stage}_val"]
    assert validated == list(range(0, STEPS + 1, 2)), validated
  return counts


def test_sigkill_and_double_sigterm_resume_to_the_reference_checksum(
    reference, tmp_path):
  """predistill and rl, concurrently (two cores, two subprocesses)."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    jobs = {stage: pool.submit(_kill_sequence, reference, tmp_path / stage,
                               stage, double_sigterm=stage == "rl_k2")
            for stage in STAGES}
    counts = {stage: job.result() for stage, job in jobs.items()}
  print(f"\nkill counts: {counts}")
  # The second-signal case (item 1) ran as the first interruption of rl.
  assert counts["rl_k2"]["double_sigterm"]["exit"] in (0, 128 + 15)


def test_kill_after_the_final_checkpoint_before_the_stage_is_marked(
    reference, tmp_path):
  # The state a SIGKILL leaves while the stage exports its model: the final
  # checkpoint is complete, stages/predistill.json is not written yet.
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for name in ("stages/predistill.json", "stages/rl_k2.json"):
    (workdir / name).unlink()
  for name in ("models/predistill", "checkpoints/rl_k2", "models/rl_k2"):
    shutil.rmtree(workdir / name)
  assert _latest_step(workdir, "predistill") == STEPS
  cfg = smoke_config(stages="teacher_sft,predistill", **OVERRIDES)
  _run_on_one_device(cfg, str(workdir))
  assert _checksum(workdir, "predistill") == _checksum(reference, "predistill")
