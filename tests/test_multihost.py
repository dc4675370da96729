"""Real multi-process JAX on loopback: 1, 2 and 4 CPU processes agree.

Three RL steps of configs/smoke.py (stage `rl` only, teacher and student from
their seeded scratch init) run four ways, all on the same 8-way data-parallel
mesh with the same global batches (each process feeds only its rows):

* `plain`: one process with 8 fake CPU devices, no `jax.distributed`;
* 1, 2 and 4 processes (x 8, 4, 2 devices) started by `launch/local.py`:
  `jax.distributed` on 127.0.0.1 and gloo collectives; the 2-process run lays
  the data axis out as 4 within x 2 across processes (`mesh.dcn_data=2`), the
  others use the default mesh.

The 1-, 2- and 4-process runs are bit-identical: same losses, same parameter
checksum. Against `plain` the losses agree to 1e-5 and the parameters to
1e-6, not bit for bit, because XLA's in-process CPU all-reduce adds the 8
gradient shards in another order than gloo's (float32 rounding, ~2e-7).

The four jobs run concurrently (compilation dominates and each process
compiles the whole program). `launch/local.py` kills every process it started
on failure or on its own timeout; this test ends the launchers with SIGTERM
(which they turn into the same clean-up) if they outlive theirs.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import conftest

from ketchup_jax import distributed
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.data import batching
from ketchup_jax.train import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
# RL validates after every update and exports the best one: every process
# decodes the validation split, and they must select the same update.
ARGS = ["-m", "ketchup_jax.main", "--config=configs/smoke.py",
        "--config.stages=rl", "--config.rl.eval_every=1",
        "--config.rl.select=best", "--config.validation.max_examples=16"]
# The 2-process run: the data axis as 4 within each process x 2 across them
# (the hybrid ICI/DCN mesh); the others: the default mesh, config unchanged.
EXTRA = {1: [], 2: ["--config.mesh.dcn_data=2"], 4: []}
LAUNCH_TIMEOUT_S = 420


def _start(cmd, env, log):
  with open(log, "wb") as out:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=conftest.xla_flags(8))
  for name in ("KETCHUP_COORDINATOR_ADDRESS", "KETCHUP_NUM_PROCESSES",
               "KETCHUP_PROCESS_ID"):
    env.pop(name, None)
  procs = {"plain": _start(
      [sys.executable, *ARGS, f"--workdir={root / 'pplain'}"], env,
      root / "pplain.log")}
  for n in (1, 2, 4):
    procs[n] = _start(
        [sys.executable, "launch/local.py", f"--processes={n}",
         f"--devices_per_process={8 // n}", f"--timeout={LAUNCH_TIMEOUT_S}",
         f"--log_dir={root / f'logs{n}'}", "--", *ARGS,
         f"--workdir={root / f'p{n}'}", *EXTRA[n]], env, root / f"p{n}.log")
  deadline = time.monotonic() + LAUNCH_TIMEOUT_S + 30
  try:
    while any(p.poll() is None for p in procs.values()):
      if time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs.values():
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)  # launchers clean up on SIGTERM
        try:
          p.wait(timeout=30)
        except subprocess.TimeoutExpired:
          os.killpg(p.pid, signal.SIGKILL)
          p.wait()
  for n, p in procs.items():
    logs = [root / f"p{n}.log"] + sorted((root / f"logs{n}").glob("*.log"))
    assert p.returncode == 0, f"{n}-process run exited {p.returncode}:\n" + (
        "\n".join(f.read_text(errors="replace")[-2000:] for f in logs
                  if f.exists()))
  return root


def _rl_records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["stage"] == "rl_k2"]


def _params(workdir):
  return safetensors.numpy.load_file(
      str(workdir / "models" / "rl_k2" / "model.safetensors"))


def _validation(workdir):
  """(step, chrF) of every validation record, and the selected update."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  scores = [(r["step"], r["chrf"]) for r in map(json.loads, lines)
            if r["stage"] == "rl_k2_val"]
  info = json.loads((workdir / "stages" / "rl_k2.json").read_text())
  assert [step for step, _ in scores] == [0, 1, 2, 3]
  return scores, info["selected_step"]


def _checksum(workdir):
  return json.loads((workdir / "stages" / "rl_k2.json").read_text())[
      "checksum"]


@pytest.mark.parametrize("n", [2, 4])
def test_2_and_4_processes_are_bit_identical_to_1(runs, n):
  one, many = _rl_records(runs / "p1"), _rl_records(runs / f"p{n}")
  # Process 0 alone wrote the metrics: three records, not 3 x n.
  assert [r["step"] for r in many] == [1, 2, 3]
  assert all(r["grad_norm"] > 0 for r in many)  # the parameters moved
  assert [r["loss"] for r in many] == [r["loss"] for r in one]
  assert _checksum(runs / f"p{n}") == _checksum(runs / "p1")
  assert _validation(runs / f"p{n}") == _validation(runs / "p1")


def test_distributed_run_equals_plain_single_process(runs):
  plain, one = _rl_records(runs / "pplain"), _rl_records(runs / "p1")
  losses = [r["loss"] for r in plain]
  assert len(losses) == 3 and all(np.isfinite(losses))
  np.testing.assert_allclose([r["loss"] for r in one], losses, rtol=1e-5,
                             atol=1e-5)
  a, b = _params(runs / "pplain"), _params(runs / "p1")
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst < 1e-6, worst


@pytest.mark.parametrize("n", [2, 4])
def test_every_process_checkpoints_and_process_0_writes(runs, n):
  workdir = runs / f"p{n}"
  # Orbax's multi-process save completed (all processes took part).
  for step in (2, 3):
    assert (workdir / "checkpoints" / "rl_k2" / str(step) /
            "commit_success.txt").exists()
  # The checksum recorded by the run (parameters gathered across processes)
  # is the checksum of the exported file.
  lm = models.load(str(workdir / "models" / "rl_k2"), dtype=jnp.float32)
  assert _checksum(workdir) == sources.params_checksum(lm.params)
  assert len(os.listdir(workdir / "tensorboard")) == 1
  logs = sorted((runs / f"logs{n}").glob("process_*.log"))
  assert len(logs) == n
  for i, log in enumerate(logs):
    text = log.read_text(errors="replace")
    assert f"process {i}/{n} on " in text
    # Only process 0 prints the per-step log lines.
    assert ("[rl_k2] step 3/3" in text) == (i == 0)
    # Per-host input: each process tokenised only its 8 / n rows of each
    # batch of 8 (smoke.py's rl.batch_size) of the epoch (planned whole).
    assert "each process tokenises its own rows of every batch" in text
    found = re.search(r"\[rl_k2\] per-host input: process (\d+) tokenised "
                      r"(\d+) rows of the (\d+)-example train split", text)
    assert found, text[-2000:]
    proc, rows, size = map(int, found.groups())
    assert proc == i and rows == size // 8 * (8 // n), (rows, size)


# --------------------------------------------------------------------------
# The pieces, in this (single) process.
# --------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
  for name in ("KETCHUP_COORDINATOR_ADDRESS", "KETCHUP_NUM_PROCESSES",
               "KETCHUP_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
               "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_resolve_modes_environment_and_errors(clean_env):
  resolve = distributed.resolve
  assert resolve(None) is None
  assert resolve({"initialize": "auto"}) is None
  explicit = dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                  process_id=1)
  assert resolve(dict(explicit, initialize="auto")) == explicit
  assert resolve(dict(explicit, initialize="never")) is None
  assert resolve({"initialize": "cluster"}) == {}
  clean_env.setenv("KETCHUP_COORDINATOR_ADDRESS", "127.0.0.1:999")
  clean_env.setenv("KETCHUP_NUM_PROCESSES", "4")
  clean_env.setenv("KETCHUP_PROCESS_ID", "3")
  assert resolve({}) == dict(coordinator_address="127.0.0.1:999",
                             num_processes=4, process_id=3)
  clean_env.delenv("KETCHUP_PROCESS_ID")
  with pytest.raises(ValueError, match=r"process_id not set"):
    resolve({"initialize": "explicit"})
  clean_env.setenv("KETCHUP_PROCESS_ID", "4")
  with pytest.raises(ValueError, match=r"process_id must be < "
                     r"num_processes=4, got 4"):
    resolve({})
  with pytest.raises(ValueError, match=r"initialize must be one of .*'sometimes'"):
    resolve({"initialize": "sometimes"})
  with pytest.raises(ValueError, match=r"'HOST:PORT' .* got '127.0.0.1'"):
    resolve({"coordinator_address": "127.0.0.1"})
  clean_env.setenv("KETCHUP_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match=r"KETCHUP_NUM_PROCESSES must be a "
                     r"non-negative int, got 'two'"):
    resolve({})


def test_slurm_and_tpu_pods_are_detected(clean_env):
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.resolve({}) is None
  clean_env.setenv("SLURM_NTASKS", "16")
  assert distributed.resolve({}) == {}
  clean_env.delenv("SLURM_JOB_ID")
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
  assert distributed.resolve({}) == {}


def test_dcn_mesh_errors_in_one_process():
  with pytest.raises(ValueError, match=r"dcn_data \* dcn_fsdp \* dcn_tensor "
                     r"= 2 must equal the number of processes \(1\)"):
    partitioning.make_mesh(dcn_data=2)
  with pytest.raises(ValueError, match=r"= 3 must divide the device count 8"):
    partitioning.make_mesh(dcn_data=3)
  with pytest.raises(ValueError, match=r"mesh.dcn_fsdp must be an int >= 1, "
                     r"got 0"):
    partitioning.make_mesh(dcn_fsdp=0)


def test_local_rows_of_every_global_batch_make_the_global_batch():
  data = batching.TokenizedExamples(
      sources=[np.arange(1, 2 + i % 5, dtype=np.int32) for i in range(40)],
      targets=[np.arange(1, 2 + i % 3, dtype=np.int32) for i in range(40)],
      max_source_len=8, max_target_len=8, pad_id=0, stats={})
  whole = batching.BatchIterator(data, batch_size=8, seed=3)
  parts = [batching.BatchIterator(data, batch_size=8, seed=3,
                                  local_rows=rows)
           for rows in ((0, 2), (2, 6), (6, 8))]
  for _ in range(7):  # into the second epoch
    want = next(whole)
    got = [next(p) for p in parts]
    for key, value in want.items():
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]),
                                    value)
  with pytest.raises(ValueError, match=r"local_rows must be .* got \(6, 9\)"):
    batching.BatchIterator(data, batch_size=8, local_rows=(6, 9))


def test_batch_rows_and_put_batch_in_one_process():
  mesh = partitioning.make_mesh(data=4, fsdp=2)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  assert distributed.batch_rows(sharding, 16) == (0, 16)
  batch = {"x": np.arange(32).reshape(16, 2)}
  out = distributed.put_batch(batch, sharding, 16)
  assert out["x"].sharding == sharding
  np.testing.assert_array_equal(distributed.to_host(out["x"]), batch["x"])


@pytest.mark.parametrize("flag, message", [
    ("--config.distributed.initialize=bogus",
     "config.distributed.initialize must be one of ('auto', 'explicit', "
     "'cluster', 'never'), got 'bogus'"),
    ("--config.mesh.dcn_data=2",
     "mesh dcn_data * dcn_fsdp * dcn_tensor = 2 must equal the number of "
     "processes (1)"),
])
def test_bad_distributed_settings_are_one_error_line(tmp_path, flag, message):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "ketchup_jax.main", "--config=configs/smoke.py",
       f"--workdir={workdir}", flag], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: {message}"]
  assert not workdir.exists()
