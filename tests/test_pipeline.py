"""The pipeline end to end on configs/smoke.py, resume, and bad input."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import conftest

from configs import smoke
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.train import pipeline
from ketchup_jax.train import rollouts
from ketchup_jax.train import sources
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  cfg = smoke.get_config()
  cfg.mesh.data = 1  # one device, whatever the test session fakes
  cfg.mesh.fsdp = 1
  cfg.mesh.tensor = 1
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  # The pipeline builds its mesh from all devices; pin it to one.
  results = _run_on_one_device(smoke_config(), workdir)
  return workdir, results


def _run_on_one_device(cfg, workdir):
  original = partitioning.make_mesh

  def one_device_mesh(**kw):
    return original(devices=jax.devices()[:1], **kw)

  partitioning.make_mesh = one_device_mesh
  try:
    return pipeline.run(cfg, workdir)
  finally:
    partitioning.make_mesh = original


def test_smoke_run_leaves_results_metrics_models_and_plots(smoke_run):
  workdir, results = smoke_run
  on_disk = json.loads(pathlib.Path(workdir, "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert list(results["models"]) == ["teacher", "student (seqkd)",
                                     "KETCHUP (K=2)"]
  for row in results["models"].values():
    assert set(row["metrics"]) == {"chrf", "exact_match"}
    assert all(0.0 <= v <= 100.0 for v in row["metrics"].values())
    assert len(row["checksum"]) == 64
  # Three different models were trained.
  assert len({r["checksum"] for r in results["models"].values()}) == 3
  md = pathlib.Path(workdir, "results.md").read_text()
  assert "| KETCHUP (K=2) |" in md and "| teacher |" in md

  records = [json.loads(line) for line in
             pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  stages = {r["stage"] for r in records}
  assert stages == {"teacher_sft", "predistill", "rl_k2"}
  rl = [r for r in records if r["stage"] == "rl_k2"]
  assert [r["step"] for r in rl] == [1, 2, 3]
  for key in ("loss", "return_var", "return_var_k1", "bias_mean", "entropy",
              "grad_norm", "finished_fraction", "tokens_per_s"):
    assert key in rl[0], key
  # The diagnostic per K: K=1 has no bias, and with value=max none is < 0.
  diag = results["return_diagnostics"]
  assert abs(diag["1"]["bias_mean"]) < 1e-4
  assert all(d["bias_mean"] >= -1e-4 for d in diag.values())
  assert diag["1"]["return_var"] == pytest.approx(diag["1"]["return_var_k1"])
  for png in ("return_var.png", "bias.png"):
    assert pathlib.Path(workdir, "plots", png).stat().st_size > 1000
  assert os.listdir(pathlib.Path(workdir, "tensorboard"))
  predictions = pathlib.Path(workdir, "predictions", "rl_k2.jsonl")
  assert len(predictions.read_text().splitlines()) == 16


def test_exported_student_loads_back_with_the_same_checksum(smoke_run):
  workdir, results = smoke_run
  lm = models.load(os.path.join(workdir, "models", "rl_k2"),
                   dtype=jnp.float32)
  assert sources.params_checksum(lm.params) == (
      results["models"]["KETCHUP (K=2)"]["checksum"])


def test_rerun_skips_finished_stages_and_reproduces_results(smoke_run,
                                                             tmp_path):
  workdir, results = smoke_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  before = (copy / "metrics.jsonl").read_text()
  again = _run_on_one_device(smoke_config(), str(copy))
  # No training step ran again: the metrics log did not grow.
  assert (copy / "metrics.jsonl").read_text() == before
  assert again["models"] == {
      k: dict(v, decode_seconds=again["models"][k]["decode_seconds"])
      for k, v in results["models"].items()}


def test_killed_rl_stage_resumes_to_the_same_checksum(smoke_run, tmp_path):
  workdir, results = smoke_run
  copy = tmp_path / "killed"
  shutil.copytree(workdir, copy)
  for gone in ("stages/rl_k2.json", "checkpoints/rl_k2", "models/rl_k2",
               "results.json"):
    path = copy / gone
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  cmd = [sys.executable, "-m", "ketchup_jax.main",
         "--config=configs/smoke.py", f"--workdir={copy}",
         "--config.mesh.data=1"]
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Kill -9 once the step-2 checkpoint of the RL stage is complete.
  deadline = time.time() + 240
  while not (copy / "checkpoints/rl_k2/2/commit_success.txt").exists():
    assert proc.poll() is None, "run ended before it could be killed"
    assert time.time() < deadline, "no checkpoint within 240 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (copy / "stages/rl_k2.json").exists()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = json.loads((copy / "results.json").read_text())
  assert (resumed["models"]["KETCHUP (K=2)"]["checksum"] ==
          results["models"]["KETCHUP (K=2)"]["checksum"])


# --------------------------------------------------------------------------
# Sharding: the RL step on a (2, 2, 2) mesh equals one device.
# --------------------------------------------------------------------------


def _three_rl_steps(mesh):
  config = models.get_config("tiny", vocab_size=64, dtype=jnp.float32,
                             num_layers=1, num_decoder_layers=1)
  teacher_params = models.init_params(config, jax.random.PRNGKey(1))
  student_params = models.init_params(config, jax.random.PRNGKey(2))
  teacher = models.place_params(teacher_params, config, mesh)
  student = models.place_params(student_params, config, mesh)
  # Adam turns reduction-order noise in near-zero gradients into +-lr steps;
  # a small learning rate keeps that far below the 1e-5 loss tolerance.
  optim = state_lib.OptimConfig(steps=3, learning_rate=1e-4)
  rl = rollouts.RLConfig(k=2, max_decode_len=8, unfinished="terminal",
                      baseline="batch_mean")
  mods = steps.StepModels(student=config, teacher=config, mesh=mesh)
  tx = state_lib.make_optimizer(optim)
  state = state_lib.init_state(student, tx, seed=0)
  rng = np.random.default_rng(0)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  step = jax.jit(lambda s, t, b: rollouts.rl_step(s, t, b, models=mods,
                                               optim=optim, rl=rl))
  losses = []
  for _ in range(3):
    batch = {"input_ids": rng.integers(2, 64, (8, 6)).astype(np.int32),
             "attention_mask": np.ones((8, 6), np.int32),
             "example_mask": np.ones((8,), np.int32)}
    state, metrics = step(state, teacher, jax.device_put(batch,
                                                         batch_sharding))
    losses.append(float(metrics["loss"]))
  return losses, sources.params_checksum(state.params)


def test_rl_step_on_2x2x2_mesh_matches_one_device():
  assert jax.device_count() == 8
  one = partitioning.make_mesh(devices=jax.devices()[:1])
  eight = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  losses_one, _ = _three_rl_steps(one)
  losses_eight, _ = _three_rl_steps(eight)
  assert all(np.isfinite(losses_one))
  np.testing.assert_allclose(losses_eight, losses_one, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Bad input: one clear message, nothing in DIR touched.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"task.name": "xsumm"}, r"unknown task 'xsumm'; known tasks:"),
    ({"max_source_len": 0}, r"config.max_source_len must be an int >= 1, got 0"),
    ({"rl.k": 0}, r"rl.ks / rl.k must hold ints >= 1"),
    ({"rl.value": "softer"}, r"rl.value must be one of .*'softer'"),
    ({"stages": "rl,train"}, r"config.stages must be a comma-separated list"),
    ({"predistill.method": "mse"}, r"predistill.method must be one of"),
    ({"mesh.data": 3}, r"must multiply to the device count 8"),
    ({"rl.batch_size": 6},
     r"rl.batch_size=6 must be a multiple of the data shards"),
    ({"task.name": "jsonl",
      "task.options": {"paths": "/nonexistent/{split}.jsonl"}},
     r"/nonexistent/train.jsonl"),
    ({"rl.select": "worst"},
     r"config.rl.select must be one of \('last', 'best'\), got 'worst'"),
    ({"rl.eval_every": -1}, r"config.rl.eval_every must be an int >= 0 .*-1"),
    ({"predistill.select": "best"},
     r"config.predistill.select='best' needs config.predistill.eval_every "
     r"> 0"),
    ({"rl.eval_every": 4, "validation.metric": "bleu"},
     r"config.validation.metric must be one of the task's metrics "
     r"\('chrf', 'exact_match'\), got 'bleu'"),
    ({"validation.split": "test"},
     r"config.validation.split must not be 'train' or 'test'"),
    ({"rl.eps": 0.0}, r"config.rl: eps \(Adam's epsilon\) must be > 0, got 0"),
])
def test_bad_config_raises_before_writing(tmp_path, overrides, message):
  cfg = smoke_config()
  cfg.unlock()
  cfg.mesh.data = -1
  node_overrides = dict(overrides)
  for key, value in node_overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = (ml_collections.ConfigDict(value) if isinstance(value, dict)
                  else value)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    pipeline.run(cfg, str(workdir))
  assert sorted(os.listdir(workdir)) == ["keep.txt"]
  assert (workdir / "keep.txt").read_text() == "precious"


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "ketchup_jax.main", "--config=configs/smoke.py",
       f"--workdir={workdir}", "--config.task.name=nope"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert errors == [errors[0]] and "unknown task 'nope'" in errors[0]
  assert not workdir.exists()


def test_unknown_config_key_is_refused(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ketchup_jax.main", "--config=configs/smoke.py",
       f"--workdir={tmp_path / 'run'}", "--config.rl.kk=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "kk" in out.stderr
  assert not (tmp_path / "run").exists()
