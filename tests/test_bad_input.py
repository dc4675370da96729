"""Bad input, tried for real: malformed JSONL, unwritable workdirs, bad flags.

Each failure must give a clear message naming the bad thing and a non-zero
exit, and leave what is already in the workdir byte-for-byte as it was (no
new files when the failure is found before training). Data files go through
the real `jsonl` task and the real pipeline; flags go through
`python -m ketchup_jax.main`.
"""

import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

import conftest

from ketchup_jax import partitioning
from ketchup_jax.data import numbers
from ketchup_jax.train import context
from test_pipeline import REPO, smoke_config
from test_pipeline import _run_on_one_device

PRECIOUS = b"precious \x00\xff bytes\n"


def _good_lines(n=24):
  return [('{"source": "%s", "target": "%s"}' % (
      numbers.english(i), numbers.dutch(i))).encode() for i in range(n)]


def _data_dir(tmp_path, train: bytes):
  """train.jsonl as given, a good test.jsonl."""
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.jsonl").write_bytes(train)
  (data / "test.jsonl").write_bytes(b"\n".join(_good_lines(16)) + b"\n")
  return data


def _jsonl_config(data, **overrides):
  cfg = smoke_config(**overrides)
  cfg.task.name = "jsonl"
  # The smoke task's options (max_number) are not the jsonl task's.
  cfg.task.options = ml_collections.ConfigDict(
      {"paths": str(data / "{split}.jsonl")})
  return cfg


def _setup_on_one_device(cfg, workdir):
  original = partitioning.make_mesh
  partitioning.make_mesh = lambda **kw: original(
      devices=jax.devices()[:1], **kw)
  try:
    return context.setup(cfg, workdir)
  finally:
    partitioning.make_mesh = original


def _workdir(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.bin").write_bytes(PRECIOUS)
  return workdir


def _assert_untouched(workdir):
  assert sorted(os.listdir(workdir)) == ["keep.bin"]
  assert (workdir / "keep.bin").read_bytes() == PRECIOUS


def _with_line_3(bad: bytes) -> bytes:
  good = _good_lines()
  return b"\n".join(good[:2] + [bad] + good[2:]) + b"\n"


BAD_TRAIN_FILES = [
    pytest.param(_with_line_3(b'{"source": "one"}'),
                 r"train\.jsonl:3: field 'target' must be a string, got None",
                 id="missing_field"),
    pytest.param(_with_line_3(b'{"source": 7, "target": "zeven"}'),
                 r"train\.jsonl:3: field 'source' must be a string, got 7",
                 id="wrong_field_type"),
    pytest.param(_with_line_3(b'{"source": "one", "target": '),
                 r"train\.jsonl:3: not valid JSON", id="invalid_json"),
    pytest.param(_with_line_3(b'["one", "een"]'),
                 r"train\.jsonl:3: expected a JSON object", id="not_an_object"),
    pytest.param(_with_line_3(b'{"source": "one \xff\xfe", "target": "een"}'),
                 r"train\.jsonl:3", id="non_utf8"),
    pytest.param(b"\n\n   \n\n", r"train\.jsonl: no examples",
                 id="only_empty_lines"),
]


@pytest.mark.parametrize("train, message", BAD_TRAIN_FILES)
def test_malformed_jsonl_fails_clearly_before_writing(tmp_path, train,
                                                       message):
  data = _data_dir(tmp_path, train)
  workdir = _workdir(tmp_path)
  cfg = _jsonl_config(data, stages="teacher_sft")
  try:
    _run_on_one_device(cfg, str(workdir))
  except ValueError as e:  # what main.py turns into `error: ...`, exit 2
    error = str(e)
  else:
    error = None
  assert error is not None, "no error"
  assert re.search(message, error), error
  assert str(data / "train.jsonl") in error, error
  _assert_untouched(workdir)


def test_empty_lines_between_records_are_skipped(tmp_path):
  good = _good_lines()
  train = b"\n" + b"\n\n  \n".join(good) + b"\n\r\n\n"
  data = _data_dir(tmp_path, train)
  run = _setup_on_one_device(_jsonl_config(data), str(tmp_path / "unused"))
  assert run.train.stats["num_examples"] == len(good)
  assert not (tmp_path / "unused").exists()  # setup writes nothing


def test_one_megabyte_line_is_truncated_and_counted(tmp_path):
  words = [numbers.english(i) for i in range(100)]
  source = " ".join(words[i % 100] for i in range(200_000))[:1 << 20]
  line = ('{"source": "%s", "target": "een"}' % source).encode()
  assert len(line) > 1 << 20
  data = _data_dir(tmp_path, _with_line_3(line))
  cfg = _jsonl_config(data, stages="teacher_sft")
  run = _setup_on_one_device(cfg, str(tmp_path / "unused"))
  stats = run.train.stats
  assert stats["num_examples"] == 25
  assert stats["truncated_sources"] == 1 and stats["truncated_targets"] == 0
  assert max(len(s) for s in run.train.sources) == cfg.max_source_len
  assert not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------
# Unwritable workdirs.
# --------------------------------------------------------------------------


def test_workdir_under_a_regular_file_fails_and_leaves_it_alone(tmp_path):
  data = _data_dir(tmp_path, b"\n".join(_good_lines()) + b"\n")
  parent = tmp_path / "not_a_dir"
  parent.write_bytes(PRECIOUS)
  workdir = parent / "run"
  with pytest.raises(OSError, match=r"Not a directory: .*not_a_dir/run"):
    _run_on_one_device(_jsonl_config(data, stages="teacher_sft"), str(workdir))
  assert parent.read_bytes() == PRECIOUS


@pytest.mark.skipif(os.geteuid() == 0, reason=(
    "running as root: permission bits do not stop root's writes; "
    "test_workdir_under_a_regular_file_fails_and_leaves_it_alone and the "
    "command-line case cover an unwritable workdir"))
def test_read_only_workdir_fails_and_leaves_it_alone(tmp_path):
  data = _data_dir(tmp_path, b"\n".join(_good_lines()) + b"\n")
  workdir = _workdir(tmp_path)
  workdir.chmod(0o500)
  try:
    with pytest.raises(PermissionError, match=str(workdir)):
      _run_on_one_device(_jsonl_config(data, stages="teacher_sft"), str(workdir))
  finally:
    workdir.chmod(0o700)
  _assert_untouched(workdir)


# --------------------------------------------------------------------------
# The command line: flags and files, one `error:` line or a flags error.
# --------------------------------------------------------------------------


def _main(*args, config="configs/smoke.py"):
  return subprocess.run(
      [sys.executable, "-m", "ketchup_jax.main", f"--config={config}",
       *args], cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ,
               XLA_FLAGS=conftest.xla_flags(1)))


@pytest.mark.parametrize("flag, names", [
    ("--config.rl.kk=3", ["unknown config field", "kk"]),
    ("--config.rl.k=abc", ["rl.k", "abc"]),
    ("--config.max_source_len=1.5", ["max_source_len", "1.5"]),
    ("--config.rl.reward=rkl", ["rl.reward", "rkl", "reverse_kl"]),
    ("--config.gkd.beta=2.0", ["gkd.beta", "2.0", "[0, 1]"]),
])
def test_bad_config_flag_is_refused_before_writing(tmp_path, flag, names):
  workdir = _workdir(tmp_path)
  out = _main(f"--workdir={workdir}", flag)
  assert out.returncode != 0
  flag_errors = [l for l in out.stderr.splitlines()
                 if all(n in l for n in names)]
  assert flag_errors, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  _assert_untouched(workdir)


def test_command_line_bad_jsonl_and_unwritable_workdir_exit_2(tmp_path):
  data = _data_dir(tmp_path, _with_line_3(b'{"source": "one", "target": '))
  config = tmp_path / "jsonl_smoke.py"
  config.write_text(
      "import ml_collections\n"
      "from configs import smoke\n\n\n"
      "def get_config():\n"
      "  c = smoke.get_config()\n"
      "  c.task.name = 'jsonl'\n"
      "  c.task.options = ml_collections.ConfigDict(\n"
      f"      {{'paths': {str(data / '{split}.jsonl')!r}}})\n"
      "  return c\n")
  workdir = _workdir(tmp_path)
  out = _main(f"--workdir={workdir}", "--config.mesh.data=1",
              config=str(config))
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert out.returncode == 2, out.stderr[-2000:]
  assert errors == [f"error: {data / 'train.jsonl'}:3: not valid JSON "
                    f"(Expecting value)"], out.stderr[-2000:]
  _assert_untouched(workdir)

  # Good data, but the workdir's parent is a regular file.
  (data / "train.jsonl").write_bytes(b"\n".join(_good_lines()) + b"\n")
  parent = tmp_path / "not_a_dir"
  parent.write_bytes(PRECIOUS)
  out = _main(f"--workdir={parent / 'run'}", "--config.mesh.data=1",
              "--config.stages=teacher_sft", config=str(config))
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(errors) == 1 and "Not a directory" in errors[0], errors
  assert str(parent / "run") in errors[0]
  assert parent.read_bytes() == PRECIOUS
