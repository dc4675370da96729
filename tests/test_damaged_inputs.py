"""Damaged models and tokenizers are named before the run directory is touched.

Each case damages one file of a real exported model (or tokenizer) directory,
gives it to the pipeline, and expects one line naming the file, what is wrong
and what was expected, with the workdir exactly as it was.
"""

import json
import os
import re
import subprocess
import sys

import jax
import pytest
import safetensors.numpy

import conftest

from ketchup_jax import models
from test_pipeline import REPO, _run_on_one_device, smoke_config
from test_tokenizers import _tiny_hf_tokenizer

PRECIOUS = b"precious \x00\xff bytes\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny T5 of the smoke shapes, exported as an HF directory."""
  path = tmp_path_factory.mktemp("model") / "teacher"
  cfg = smoke_config()
  lm = models.init("tiny", jax.random.PRNGKey(0), vocab_size=256,
                   **cfg.teacher.overrides.to_dict())
  lm.save_pretrained(path)
  return path


def _copy(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _sharded(src, dst):
  """The same model as two safetensors shards and an index."""
  dst.mkdir()
  (dst / "config.json").write_bytes((src / "config.json").read_bytes())
  state = safetensors.numpy.load_file(str(src / "model.safetensors"))
  names = sorted(state)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in keys}, str(dst / shard))
  (dst / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
  return dst, shards


def _cut(path, fraction=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])


SHARDED = ("index not JSON", "index without weight_map",
           "index names a missing shard", "shard lacks a listed tensor",
           "truncated shard")


def _damage(kind, d, shards=None):
  """Damages the model directory `d`; returns a regex the error must match."""
  safe = d / "model.safetensors"
  if kind == "truncated safetensors":
    _cut(safe)
    return (rf"{re.escape(str(safe))}: truncated: tensor '[^']+' \(F32 "
            rf"\[\d+(, \d+)*\]\) needs bytes up to \d+ of the data, the file "
            rf"has \d+ bytes of data")
  if kind == "safetensors header cut":
    _cut(safe, 0.001)
    return rf"{re.escape(str(safe))}: truncated or not safetensors: the header"
  if kind == "safetensors header not JSON":
    data = bytearray(safe.read_bytes())
    data[9:19] = b"\xff" * 10
    safe.write_bytes(bytes(data))
    return rf"{re.escape(str(safe))}: the header is not valid JSON"
  if kind == "safetensors offsets inconsistent":
    data = safe.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["data_offsets"][1] -= 4  # one float32 short
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    raw = raw.ljust(n)  # JSON whitespace: the header keeps its length
    safe.write_bytes(data[:8] + raw + data[8 + n:])
    return rf"tensor '{re.escape(key)}' .* needs \d+ bytes, its data_offsets"
  config = d / "config.json"
  if kind == "config.json not JSON":
    _cut(config)
    return (rf"{re.escape(str(config))}: not valid JSON .*; expected the "
            rf"model's HF config.json")
  if kind == "config.json not T5":  # a llama config over T5 weights
    config.write_text(json.dumps({"model_type": "llama"}))
    return (rf"{re.escape(str(config.parent))}: the safetensors headers do "
            rf"not match the llama config .*unexpected HF keys")
  index = d / "model.safetensors.index.json"
  first, second = (d / s for s in shards)
  if kind == "index not JSON":
    _cut(index)
    return rf"{re.escape(str(index))}: not valid JSON"
  if kind == "index without weight_map":
    index.write_text(json.dumps({"metadata": {}}))
    return rf"{re.escape(str(index))}: no \"weight_map\""
  if kind == "index names a missing shard":
    second.unlink()
    return (rf"{re.escape(str(index))}: lists shard files that are not in "
            rf".*\['{second.name}'\]")
  if kind == "shard lacks a listed tensor":
    key = shards[first.name][0]
    state = safetensors.numpy.load_file(str(first))
    del state[key]
    safetensors.numpy.save_file(state, str(first))
    return (rf"{re.escape(str(first))}: lacks tensors that "
            rf"model.safetensors.index.json places in it: \['{re.escape(key)}'")
  if kind == "truncated shard":
    _cut(second)
    return rf"{re.escape(str(second))}: truncated: tensor"
  raise AssertionError(kind)


MODEL_DAMAGE = ["truncated safetensors", "safetensors header cut",
                "safetensors header not JSON",
                "safetensors offsets inconsistent", "config.json not JSON",
                "config.json not T5", *SHARDED]


def _workdir(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.bin").write_bytes(PRECIOUS)
  return workdir


def _assert_untouched(workdir):
  assert sorted(os.listdir(workdir)) == ["keep.bin"]
  assert (workdir / "keep.bin").read_bytes() == PRECIOUS


@pytest.mark.parametrize("kind", MODEL_DAMAGE)
def test_damaged_teacher_is_named_before_the_workdir_is_touched(
    model_dir, tmp_path, kind):
  if kind in SHARDED:
    damaged, shards = _sharded(model_dir, tmp_path / "sharded")
  else:
    damaged, shards = _copy(model_dir, tmp_path / "teacher"), None
  pattern = _damage(kind, damaged, shards)
  workdir = _workdir(tmp_path)
  cfg = smoke_config(**{"teacher.init_from": str(damaged)})
  with pytest.raises(ValueError, match=pattern) as e:
    _run_on_one_device(cfg, str(workdir))
  message = str(e.value)
  assert message.startswith(f"config.teacher.init_from={str(damaged)!r}: ")
  assert "\n" not in message
  _assert_untouched(workdir)


def test_missing_teacher_directory_is_named_before_the_workdir_is_touched(
    tmp_path):
  missing = tmp_path / "no_such_model"
  workdir = _workdir(tmp_path)
  with pytest.raises(ValueError, match=(
      rf"config.teacher.init_from='{re.escape(str(missing))}': "
      rf"'{re.escape(str(missing))}' is not a checkpoint directory")):
    _run_on_one_device(smoke_config(**{"teacher.init_from": str(missing)}),
                       str(workdir))
  _assert_untouched(workdir)


def test_the_undamaged_model_passes_the_same_checks(model_dir, tmp_path):
  sharded, _ = _sharded(model_dir, tmp_path / "sharded")
  for d in (model_dir, sharded):
    models.hf_io.check_checkpoint(str(d))
    lm = models.load(d)
    assert lm.config.vocab_size == 256


def test_damaged_model_of_a_finished_stage_is_named(model_dir, tmp_path):
  workdir = tmp_path / "run"
  _copy(model_dir, (workdir / "models").mkdir(parents=True) or
        workdir / "models" / "teacher_sft")
  (workdir / "stages").mkdir()
  (workdir / "stages" / "teacher_sft.json").write_text('{"checksum": "x"}')
  _cut(workdir / "models" / "teacher_sft" / "model.safetensors")
  before = sorted(str(p) for p in workdir.rglob("*"))
  with pytest.raises(ValueError, match=r"the finished stage teacher_sft's "
                     r"model: .*teacher_sft/model.safetensors: truncated"):
    _run_on_one_device(smoke_config(), str(workdir))
  assert sorted(str(p) for p in workdir.rglob("*")) == before


@pytest.mark.parametrize("damage, pattern", [
    ("tokenizer.json cut", r"tokenizer.json: not valid JSON .*expected the "
     r"JSON file tokenizer.json of an HF tokenizer directory"),
    ("tokenizer_config.json not an object",
     r"tokenizer_config.json: a JSON list, expected an object"),
    ("no tokenizer file", r"holds neither tokenizer.json nor spiece.model"),
    ("tokenizer.json wrong content",
     r"not a loadable tokenizer directory \(.*\); expected an HF tokenizer "
     r"directory"),
])
def test_damaged_tokenizer_directory_is_named(tmp_path, damage, pattern):
  tok = _tiny_hf_tokenizer(tmp_path)
  if damage == "tokenizer.json cut":
    _cut(tok / "tokenizer.json")
  elif damage == "tokenizer_config.json not an object":
    (tok / "tokenizer_config.json").write_text("[1, 2]")
  elif damage == "no tokenizer file":
    (tok / "tokenizer.json").unlink()
  else:
    (tok / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
  workdir = _workdir(tmp_path)
  cfg = smoke_config(**{"tokenizer.kind": "hf", "tokenizer.path": str(tok),
                        "tokenizer.vocab_size": 0})
  with pytest.raises(ValueError, match=pattern) as e:
    _run_on_one_device(cfg, str(workdir))
  assert str(tok) in str(e.value) and "\n" not in str(e.value)
  _assert_untouched(workdir)


def test_damaged_word_vocabulary_is_named(tmp_path):
  vocab = tmp_path / "vocab.json"
  vocab.write_text('{"type": "word", "vocab": ["a", "b"')
  workdir = _workdir(tmp_path)
  cfg = smoke_config(**{"tokenizer.path": str(vocab)})
  with pytest.raises(ValueError, match=rf"{re.escape(str(vocab))}: not valid "
                     r"JSON .*expected a WordTokenizer vocabulary"):
    _run_on_one_device(cfg, str(workdir))
  _assert_untouched(workdir)


def test_command_line_truncated_teacher_is_one_line_and_no_workdir(
    model_dir, tmp_path):
  damaged = _copy(model_dir, tmp_path / "teacher")
  _cut(damaged / "model.safetensors")
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "ketchup_jax.main", "--config=configs/smoke.py",
       f"--workdir={workdir}", "--config.mesh.data=1",
       f"--config.teacher.init_from={damaged}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO),
               XLA_FLAGS=conftest.xla_flags(1)))
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out.stderr[-2000:]
  assert f"{damaged}/model.safetensors: truncated: tensor" in errors[0]
  assert not workdir.exists()
