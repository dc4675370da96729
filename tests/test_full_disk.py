"""A full disk loses nothing: ENOSPC injected at each write site, then a rerun.

The write sites: an Orbax checkpoint save (its metadata writes, after the
arrays are on disk), the HF export (`model.safetensors`), a `metrics.jsonl`
line and `results.json`. Each injected failure writes half of what it was
given before raising `OSError(errno.ENOSPC)`, as a filling disk does. Each
case checks what is left, then reruns with space back and must reach the
checksum of an uninterrupted run.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import safetensors.numpy
from orbax.checkpoint._src.path import async_path

import conftest

from ketchup_jax import fileio
from ketchup_jax.train import checkpoints
from test_pipeline import REPO, _run_on_one_device, smoke_config

STEPS = 4  # a checkpoint every 2: saves at steps 2 and 4


def _config(stages="teacher_sft,eval"):
  return smoke_config(stages=stages, **{"teacher_sft.steps": STEPS,
                                        "checkpoint_every": 2})


def _full(message="No space left on device"):
  return OSError(errno.ENOSPC, message)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted teacher_sft (4 steps) + eval run: (workdir, checksum)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  results = _run_on_one_device(_config(), str(workdir))
  checksum = json.loads((workdir / "stages" / "teacher_sft.json").read_text())[
      "checksum"]
  assert results["models"]["teacher"]["checksum"] == checksum
  return workdir, checksum


def _fail_writes_to(monkeypatch, name, when=lambda data: True):
  """fileio.write_to fails half-way for files called `name` (once `when`)."""
  real = fileio.write_to
  hits = []

  def write_to(f, data):
    if os.path.basename(f.name).startswith(name) and when(data):
      hits.append(f.name)
      real(f, data[:len(data) // 2])
      raise _full()
    real(f, data)

  monkeypatch.setattr(fileio, "write_to", write_to)
  return hits


def _assert_disk_full_names(error, path):
  message = str(error.value)
  assert "no space left on device writing" in message, message
  assert str(path) in message and " free on its filesystem" in message
  assert "\n" not in message


def _leftovers(workdir):
  return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                if ".tmp-" in p.name)


def _resume_matches(workdir, checksum, stages="teacher_sft,eval"):
  """Reruns with space back; the parameters equal the uninterrupted run's."""
  _run_on_one_device(_config(stages), str(workdir))
  marker = json.loads((workdir / "stages" / "teacher_sft.json").read_text())
  assert marker["checksum"] == checksum
  steps = [json.loads(l)["step"] for l in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))  # each step once, whole lines
  assert _leftovers(workdir) == []
  assert not (workdir / "run.lock").exists()


def test_full_disk_at_a_checkpoint_save_keeps_the_previous_one(
    reference, tmp_path, monkeypatch):
  _, checksum = reference
  work = tmp_path / "run"
  real = async_path.write_text

  async def write_text(path, text):
    if f"{os.sep}{STEPS}.orbax-checkpoint-tmp" in str(path):
      raise _full()
    return await real(path, text)

  monkeypatch.setattr(async_path, "write_text", write_text)
  with pytest.raises(fileio.DiskFullError) as e:
    _run_on_one_device(_config("teacher_sft"), str(work))
  _assert_disk_full_names(e, work / "checkpoints" / "teacher_sft" / str(STEPS))
  monkeypatch.undo()
  ckpt = checkpoints.StageCheckpoints(work / "checkpoints" / "teacher_sft")
  assert ckpt.latest_step() == 2  # the half-written step 4 is not the latest
  ckpt.close()
  assert not (work / "stages" / "teacher_sft.json").exists()
  assert list(work.rglob(f"{STEPS}.orbax-checkpoint-tmp*"))  # the half step
  _resume_matches(work, checksum, "teacher_sft")
  assert not list(work.rglob("*.orbax-checkpoint-tmp*"))


def test_full_disk_during_the_export_leaves_no_half_model(
    reference, tmp_path, monkeypatch):
  _, checksum = reference
  work = tmp_path / "run"
  real = safetensors.numpy.save_file

  def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:  # what got onto the disk: half
      f.truncate(os.path.getsize(filename) // 2)
    raise _full()

  monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
  with pytest.raises(fileio.DiskFullError) as e:
    _run_on_one_device(_config("teacher_sft"), str(work))
  _assert_disk_full_names(e, work / "models" / "teacher_sft" /
                          "model.safetensors")
  monkeypatch.undo()
  # No half model.safetensors, no temporary, no config without weights.
  assert os.listdir(work / "models" / "teacher_sft") == []
  assert not (work / "stages" / "teacher_sft.json").exists()
  _resume_matches(work, checksum, "teacher_sft")


def test_full_disk_at_a_metrics_line_keeps_whole_lines(
    reference, tmp_path, monkeypatch):
  _, checksum = reference
  work = tmp_path / "run"
  hits = _fail_writes_to(monkeypatch, "metrics.jsonl",
                         lambda data: b'"step": 3,' in data)
  with pytest.raises(fileio.DiskFullError) as e:
    _run_on_one_device(_config("teacher_sft"), str(work))
  assert len(hits) == 1
  _assert_disk_full_names(e, work / "metrics.jsonl")
  monkeypatch.undo()
  text = (work / "metrics.jsonl").read_text()
  assert text.endswith("\n")
  assert [json.loads(l)["step"] for l in text.splitlines()] == [1, 2]
  _resume_matches(work, checksum, "teacher_sft")


def test_full_disk_at_results_json_leaves_no_half_file(
    reference, tmp_path, monkeypatch):
  ref_dir, checksum = reference
  work = tmp_path / "run"
  shutil.copytree(ref_dir, work)
  before = (work / "results.json").read_bytes()
  hits = _fail_writes_to(monkeypatch, "results.json")
  with pytest.raises(fileio.DiskFullError) as e:
    _run_on_one_device(_config(), str(work))
  assert len(hits) == 1
  _assert_disk_full_names(e, work / "results.json")
  monkeypatch.undo()
  assert (work / "results.json").read_bytes() == before  # the old one, whole
  assert _leftovers(work) == []
  (work / "results.json").unlink()
  _resume_matches(work, checksum)
  resumed = json.loads((work / "results.json").read_text())
  assert resumed["models"]["teacher"]["checksum"] == checksum


# The command line: a full disk is one `error:` line and exit 2.
_MAIN_WITH_A_FULL_DISK = textwrap.dedent("""
    import errno, sys
    from absl import app
    from ketchup_jax import fileio, main

    def write_to(f, data):
      raise OSError(errno.ENOSPC, "No space left on device")

    fileio.write_to = write_to
    app.run(main.main, flags_parser=main.parse_flags)
""")


def test_command_line_full_disk_is_one_error_line(tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-c", _MAIN_WITH_A_FULL_DISK,
       "--config=configs/smoke.py", f"--workdir={workdir}",
       "--config.mesh.data=1", "--config.stages=teacher_sft"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO),
               XLA_FLAGS=conftest.xla_flags(1)))
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out.stderr[-2000:]
  # The first file the run writes.
  assert f"no space left on device writing {workdir}/config.json (" in (
      errors[0])
  assert " free on its filesystem" in errors[0]
  assert not (workdir / "config.json").exists()
  assert not (workdir / "run.lock").exists()
