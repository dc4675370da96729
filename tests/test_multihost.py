"""Real multi-process JAX on loopback: 2 and 4 CPU processes equal one process.

Three RL steps of configs/smoke.py (stage `rl` only, teacher and student from
their seeded scratch init) run as

* one process with 8 fake CPU devices (no `jax.distributed`): the reference;
* 2 processes x 4 devices and 4 processes x 2 devices, started by
  `launch/local.py` with `jax.distributed` on 127.0.0.1 and gloo collectives.

All three use the same 8-way data-parallel mesh and the same global batches
(each process feeds only its rows). The losses must agree to 1e-5 and the
final parameters to 1e-6: the checksums are *not* bit-identical, because
gloo's all-reduce adds the 8 gradient shards in another order than the
in-process CPU all-reduce (float32 rounding, ~2e-7 on the parameters).

The three jobs run concurrently (compilation dominates and each process
compiles the whole program). `launch/local.py` kills every process it started
on failure or on its own timeout; this test ends the launchers with SIGTERM
(which they turn into the same clean-up) if they outlive theirs.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ketchup_jax import models
from ketchup_jax.train import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["-m", "ketchup_jax.main", "--config=configs/smoke.py",
        "--config.stages=rl"]
LAUNCH_TIMEOUT_S = 420


def _start(cmd, env, log):
  with open(log, "wb") as out:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  for name in ("KETCHUP_COORDINATOR_ADDRESS", "KETCHUP_NUM_PROCESSES",
               "KETCHUP_PROCESS_ID"):
    env.pop(name, None)
  procs = {1: _start([sys.executable, *ARGS, f"--workdir={root / 'p1'}"],
                     env, root / "p1.log")}
  for n in (2, 4):
    procs[n] = _start(
        [sys.executable, "launch/local.py", f"--processes={n}",
         f"--devices_per_process={8 // n}", f"--timeout={LAUNCH_TIMEOUT_S}",
         f"--log_dir={root / f'logs{n}'}", "--", *ARGS,
         f"--workdir={root / f'p{n}'}"], env, root / f"p{n}.log")
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
  codes = {n: p.returncode for n, p in procs.items()}
  for n, code in codes.items():
    assert code == 0, (f"{n}-process run exited {code}:\n" +
                       (root / f"p{n}.log").read_text()[-2000:] + "\n" + "\n".join(
                           f.read_text()[-2000:] for f in
                           sorted((root / f"logs{n}").glob("*.log"))
                           if n > 1))
  return root


def _rl_records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["stage"] == "rl_k2"]


def _params(workdir):
  return safetensors.numpy.load_file(
      str(workdir / "models" / "rl_k2" / "model.safetensors"))


@pytest.mark.parametrize("n", [2, 4])
def test_losses_and_parameters_equal_one_process(runs, n):
  one, many = _rl_records(runs / "p1"), _rl_records(runs / f"p{n}")
  # Process 0 alone wrote the metrics: three records, not 3 x n.
  assert [r["step"] for r in many] == [1, 2, 3]
  losses_one = [r["loss"] for r in one]
  assert all(np.isfinite(losses_one))
  np.testing.assert_allclose([r["loss"] for r in many], losses_one,
                             rtol=1e-5, atol=1e-5)
  a, b = _params(runs / "p1"), _params(runs / f"p{n}")
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst < 1e-6, worst
  # The parameters moved: the comparison is not between two initial states.
  steps = [r["grad_norm"] for r in many]
  assert all(g > 0 for g in steps)


@pytest.mark.parametrize("n", [2, 4])
def test_every_process_checkpoints_and_process_0_writes(runs, n):
  workdir = runs / f"p{n}"
  # Orbax's multi-process save completed (all processes took part).
  for step in (2, 3):
    assert (workdir / "checkpoints" / "rl_k2" / str(step) /
            "commit_success.txt").exists()
  # The checksum recorded by the run (parameters gathered across processes)
  # is the checksum of the exported file.
  recorded = json.loads((workdir / "stages" / "rl_k2.json").read_text())
  lm = models.load(str(workdir / "models" / "rl_k2"), dtype=jnp.float32)
  assert recorded["checksum"] == pipeline.params_checksum(lm.params)
  assert len(os.listdir(workdir / "tensorboard")) == 1
  logs = sorted((runs / f"logs{n}").glob("process_*.log"))
  assert len(logs) == n
  for i, log in enumerate(logs):
    text = log.read_text(errors="replace")
    assert f"process {i}/{n} on " in text
    # Only process 0 prints the per-step log lines.
    assert ("[rl_k2] step 3/3" in text) == (i == 0)
