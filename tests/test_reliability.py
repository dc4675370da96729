"""Preemption, corrupt checkpoints, the non-finite guard and determinism."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest

from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from test_pipeline import REPO, _run_on_one_device, smoke_config


def sft_only(**overrides):
  return smoke_config(stages="teacher_sft", **{"teacher_sft.steps": 4,
                                                "checkpoint_every": 2,
                                                **overrides})


def stage_checksum(workdir, stage="teacher_sft"):
  return json.loads(
      pathlib.Path(workdir, "stages", f"{stage}.json").read_text())["checksum"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 4-step teacher_sft run."""
  workdir = tmp_path_factory.mktemp("reference")
  _run_on_one_device(sft_only(), str(workdir))
  return workdir


def test_same_config_and_seed_give_bitwise_identical_parameters(reference,
                                                               tmp_path):
  _run_on_one_device(sft_only(), str(tmp_path / "b"))
  _run_on_one_device(sft_only(seed=1), str(tmp_path / "c"))
  assert stage_checksum(reference) == stage_checksum(tmp_path / "b")
  assert stage_checksum(reference) != stage_checksum(tmp_path / "c")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path,
                                                          damage, caplog):
  work = tmp_path / "work"
  _run_on_one_device(sft_only(), str(work))
  # Un-finish the stage, then damage the newest checkpoint (step 4).
  (work / "stages" / "teacher_sft.json").unlink()
  latest = work / "checkpoints" / "teacher_sft" / "4"
  files = sorted(p for p in latest.rglob("*") if p.is_file()
                 and p.stat().st_size > 1000)
  assert files
  for f in files:
    if damage == "truncate":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    else:
      f.unlink()
  with caplog.at_level(logging.WARNING):
    _run_on_one_device(sft_only(), str(work))
  warned = [r.getMessage() for r in caplog.records
            if "is unreadable" in r.getMessage()]
  assert len(warned) == 1 and str(latest) in warned[0]
  # The damaged checkpoint is kept aside, not deleted.
  aside = list((work / "checkpoints" / "teacher_sft.corrupt").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("4-")
  # Restored from step 2, retrained steps 3-4: the same parameters.
  assert stage_checksum(work) == stage_checksum(reference)


def test_apply_gradients_skips_nonfinite_updates():
  params = {"w": jnp.arange(3.0)}
  optim = state_lib.OptimConfig(steps=10, learning_rate=0.1)
  tx = state_lib.make_optimizer(optim)
  state = state_lib.init_state(params, tx, seed=0)
  good = {"w": jnp.ones(3)}
  state, info = state_lib.apply_gradients(state, tx, good, jnp.float32(2.5),
                                          jax.random.PRNGKey(1))
  assert float(info["skipped"]) == 0.0
  before = state
  bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
  state, info = state_lib.apply_gradients(state, tx, bad, jnp.float32(1.0),
                                          jax.random.PRNGKey(2))
  assert float(info["skipped"]) == 1.0
  for new, old in zip(jax.tree.leaves((state.params, state.opt_state)),
                      jax.tree.leaves((before.params, before.opt_state))):
    np.testing.assert_array_equal(new, old)
  assert int(state.step) == 2 and int(state.skipped) == 1
  assert int(state.nonfinite_streak) == 1
  assert float(state.last_finite_loss) == 2.5
  state, _ = state_lib.apply_gradients(state, tx, good, jnp.float32(jnp.inf),
                                       jax.random.PRNGKey(3))
  assert int(state.nonfinite_streak) == 2
  state, _ = state_lib.apply_gradients(state, tx, good, jnp.float32(0.5),
                                       jax.random.PRNGKey(4))
  assert int(state.nonfinite_streak) == 0 and int(state.skipped) == 2


def test_in_place_clip_and_guarded_update_equal_plain_optax(monkeypatch):
  # Leaves over CLIP_BLOCK_ELEMENTS are clipped by blocks of rows, in place:
  # [7, 3] with 6-element blocks is 3 blocks of 2 rows and a rest of 1. The
  # numbers must be optax's bit for bit (both jitted), clipped (norm > 1) or
  # not, and the guarded step on finite gradients is the unguarded one.
  monkeypatch.setattr(state_lib, "CLIP_BLOCK_ELEMENTS", 6)
  rng = np.random.default_rng(0)
  params = {"big": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
            "small": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  ours = state_lib.make_optimizer(state_lib.OptimConfig(
      steps=10, learning_rate=0.1, schedule="constant", max_grad_norm=1.0))
  for scale in (0.01, 10.0):  # under and over the clipping norm
    grads = jax.tree.map(lambda p: p * scale + 0.5, params)
    want, _ = jax.jit(state_lib.clip_by_global_norm(1.0).update)(grads, ())
    clipped, _ = jax.jit(optax.clip_by_global_norm(1.0).update)(grads, ())
    for g, w in zip(jax.tree.leaves(want), jax.tree.leaves(clipped)):
      np.testing.assert_array_equal(g, w)
    state = state_lib.init_state(params, ours, seed=0)
    state, _ = jax.jit(state_lib.apply_gradients, static_argnums=1)(
        state, ours, grads, jnp.float32(1.0), jax.random.PRNGKey(1))
    ref = jax.jit(lambda p, g: (lambda u, o: (optax.apply_updates(p, u), o))(
        *ours.update(g, ours.init(p), p)))(params, grads)
    # Within an ulp: XLA:CPU vectorises the cond's fusions differently.
    for got, ref in zip((state.params, state.opt_state), ref):
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_consecutive_nonfinite_steps_stop_the_run_without_a_bad_checkpoint(
    tmp_path, monkeypatch):
  real_step = steps.supervised_step

  def poisoned_step(state, batch, **kw):
    # Two good steps, then every loss is NaN.
    new_state, metrics = real_step(state, batch, **kw)

    def poison():
      nan = jnp.float32(jnp.nan)
      bad_state, info = state_lib.apply_gradients(
          state, state_lib.make_optimizer(kw["optim"]),
          jax.tree.map(jnp.zeros_like, state.params), nan, new_state.rng)
      return bad_state, {**metrics, **info, "loss": nan}

    return jax.lax.cond(state.step >= 2, poison,
                        lambda: (new_state, metrics))

  monkeypatch.setattr(steps, "supervised_step", poisoned_step)
  cfg = sft_only(**{"teacher_sft.steps": 20, "checkpoint_every": 1,
                    "max_nonfinite_steps": 3})
  with pytest.raises(FloatingPointError,
                     match=r"3 consecutive steps .* the last at step 5; last "
                     r"finite loss [0-9.]+"):
    _run_on_one_device(cfg, str(tmp_path))
  steps_saved = sorted(int(p.name) for p in
                       (tmp_path / "checkpoints" / "teacher_sft").iterdir()
                       if p.name.isdigit())
  assert steps_saved and max(steps_saved) <= 5
  assert not (tmp_path / "stages" / "teacher_sft.json").exists()


def test_sigterm_saves_at_the_next_step_and_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "ketchup_jax.main",
         "--config=configs/smoke.py", f"--workdir={workdir}",
         "--config.stages=teacher_sft", "--config.teacher_sft.steps=400",
         "--config.checkpoint_every=1000", "--config.mesh.data=1"]
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  stopped = [l for l in out.splitlines() if l.startswith("SIGTERM: stopped")]
  assert len(stopped) == 1, out[-2000:]
  step = int(stopped[0].split(" at step ")[1].split("/")[0])
  assert 3 <= step < 400
  saved = [int(p.name) for p in (workdir / "checkpoints" /
                                 "teacher_sft").iterdir() if p.name.isdigit()]
  assert saved == [step]
  assert not (workdir / "stages" / "teacher_sft.json").exists()
  # Rerun: resumes after `step` and finishes; no step is logged twice.
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  assert logged == sorted(set(logged)) and logged[-1] == 400
  assert (workdir / "stages" / "teacher_sft.json").exists()
