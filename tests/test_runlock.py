"""The run-directory lock: a second run refused, a kill -9 taken over, one run's
processes sharing it, every exit releasing it, the sweep's directories too."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

from absl import logging
import pytest

import conftest

from configs.experiments import smoke_sweep
from ketchup_jax import runlock
from ketchup_jax import sweep
from ketchup_jax.train import pipeline
from test_pipeline import REPO, _run_on_one_device, smoke_config

PRECIOUS = b"precious \x00\xff bytes\n"
# A process that holds DIR's lock (as a run does) until it is killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from ketchup_jax import runlock
    runlock.RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _env(devices=1):
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS=conftest.xla_flags(devices))


@pytest.fixture
def holder(tmp_path):
  """(workdir, Popen) of a live process holding `tmp_path/run`'s lock."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.bin").write_bytes(PRECIOUS)
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def _listing(workdir):
  return {p.name: p.read_bytes() for p in workdir.iterdir()}


def test_second_run_on_a_held_workdir_is_refused_and_writes_nothing(holder):
  workdir, proc = holder
  before = _listing(workdir)
  lock = json.loads(before["run.lock"])
  assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname()
  out = subprocess.run(
      [sys.executable, "-m", "ketchup_jax.main", "--config=configs/smoke.py",
       f"--workdir={workdir}", "--config.mesh.data=1"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out.stderr[-2000:]
  assert str(workdir) in errors[0]
  assert f"pid {proc.pid} on host {socket.gethostname()}" in errors[0]
  assert _listing(workdir) == before  # nothing written, the lock untouched
  assert proc.poll() is None


def test_stale_lock_after_kill_9_is_taken_over_with_a_warning(holder, caplog):
  workdir, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (workdir / "run.lock").exists()  # nobody removed it
  lock = runlock.RunLock(workdir)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  warned = [r.getMessage() for r in caplog.records
            if "did not end cleanly" in r.getMessage()]
  assert len(warned) == 1 and f"pid {proc.pid} " in warned[0]
  assert json.loads((workdir / "run.lock").read_text())["pid"] == os.getpid()
  # Held now: another process is refused, naming this one.
  again = subprocess.run([sys.executable, "-c", HOLDER, str(workdir)],
                         cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
  assert again.returncode != 0
  assert f"pid {os.getpid()} on host" in again.stderr
  lock.release()
  assert sorted(os.listdir(workdir)) == ["keep.bin"]


def test_lock_is_released_when_a_run_fails(tmp_path, monkeypatch):
  workdir = tmp_path / "run"

  def crash(run):
    assert json.loads(pathlib.Path(run.workdir, "run.lock").read_text())[
        "pid"] == os.getpid()
    raise RuntimeError("crash inside the run")

  monkeypatch.setattr(pipeline, "_run_stages", crash)
  with pytest.raises(RuntimeError, match="crash inside the run"):
    _run_on_one_device(smoke_config(), str(workdir))
  assert not (workdir / "run.lock").exists()
  # Free: it can be taken at once.
  with runlock.hold(workdir):
    assert (workdir / "run.lock").exists()
  assert not (workdir / "run.lock").exists()


# Two jax.distributed processes on 127.0.0.1, as tests/test_multihost.py.
_TWO_PROCESSES = textwrap.dedent("""
    import json, os, sys
    from ketchup_jax import distributed, runlock
    workdir, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.initialize({"coordinator_address": f"127.0.0.1:{port}",
                            "num_processes": 2, "process_id": pid})
    try:
      with runlock.hold(workdir):
        holder = json.load(open(os.path.join(workdir, "run.lock")))["pid"]
        print("held by", "me" if holder == os.getpid() else "peer", flush=True)
        distributed.barrier("both inside")
    except runlock.RunLockError as e:
      print("refused:", e, flush=True)
""")


def _two_processes(workdir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESSES, str(workdir), str(i), str(port)],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in (0, 1)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    outs.append(out.strip().splitlines()[-1])  # after gloo's own lines
  return outs


def test_processes_of_one_run_share_the_lock_and_a_refusal(tmp_path, holder):
  # Free directory: process 0 takes it, process 1 runs alongside.
  free = tmp_path / "free"
  assert _two_processes(free) == ["held by me", "held by peer"]
  assert not (free / "run.lock").exists()
  # Held by another run: both processes are refused, not only process 0.
  workdir, proc = holder
  refused = _two_processes(workdir)
  assert refused[0].startswith("refused:") and f"pid {proc.pid}" in refused[0]
  assert refused[1].startswith("refused: process 0 could not lock")


def test_sweep_refuses_held_directories(tmp_path, holder):
  workdir, proc = holder
  c = smoke_sweep.get_config()
  # The sweep's own directory.
  with pytest.raises(runlock.RunLockError, match=f"pid {proc.pid}"):
    sweep.run_sweep(c, str(workdir), log=lambda *a, **k: None)
  assert not (workdir / "sweep_config.json").exists()
  # One run's directory inside a sweep (the teacher's here).
  other = tmp_path / "sweep"
  spec = sweep.plan(c)[0]
  teacher_dir = pathlib.Path(spec.directory(str(other), c.reuse_from))
  proc.kill()
  proc.wait()
  second = subprocess.Popen([sys.executable, "-c", HOLDER, str(teacher_dir)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            text=True)
  try:
    assert second.stdout.readline().strip() == "held"
    with pytest.raises(runlock.RunLockError, match=f"pid {second.pid}"):
      sweep.execute(c, spec, str(other))
    assert sorted(os.listdir(teacher_dir)) == ["run.lock"]
  finally:
    second.kill()
    second.wait()


def test_lock_of_another_host_is_refused_while_its_heartbeat_is_fresh(
    tmp_path, monkeypatch, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock_file = workdir / "run.lock"
  # What a run on another host leaves where flock does not reach across
  # hosts: its record, touched by its heartbeat.
  lock_file.write_text(json.dumps({"pid": 4242, "host": "elsewhere",
                                   "started": "2026-01-01T00:00:00+00:00"}))
  with pytest.raises(runlock.RunLockError,
                     match=r"pid 4242 on host elsewhere, .*, alive 0 s ago"):
    runlock.RunLock(workdir).acquire()
  quiet = time.time() - runlock.STALE_AFTER_S - 5
  os.utime(lock_file, (quiet, quiet))
  monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
  lock = runlock.RunLock(workdir)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert any("pid 4242 on host elsewhere" in r.getMessage()
             for r in caplog.records)
  # Held: the heartbeat keeps the file's mtime fresh.
  first = lock_file.stat().st_mtime
  time.sleep(0.3)
  assert lock_file.stat().st_mtime > first
  lock.release()
  assert not lock_file.exists()
