"""LoRA students in training (`config.student.lora`): a step changes the
adapters only, by Adam's update of the gradient of the merged model; the
merged export is the adapters' model in transformers; the PEFT adapter
directory a stage exports loads onto its HF base with our logits; a LoRA
pipeline (word-level KD, RL with validation, eval) runs; and a LoRA stage
killed with SIGKILL resumes to the uninterrupted run's adapters."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# pylint: disable=g-import-not-at-top,wrong-import-position
import conftest
from configs import smoke_decoder
from ketchup_jax import losses
from ketchup_jax import models
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.train import settings
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from test_kill_resume import _kill_when
from test_kill_resume import _latest_step
from test_pipeline import REPO
from test_pipeline import _run_on_one_device

from test_lora import LORA  # rank 4, alpha 8
from test_lora import V
from test_lora import base  # pylint: disable=unused-import (a fixture)


def _drawn(lm, seed=2):
  """Adapters with both halves drawn (a fresh `b` is zero: `a` gets no
  gradient)."""
  fresh = lora_lib.init_adapters(lm.params, lm.config, LORA, seed=1)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
      fresh)


def _batch():
  rng = np.random.default_rng(0)
  return {"input_ids": jnp.asarray(rng.integers(2, V, (2, 6)), jnp.int32),
          "attention_mask": jnp.asarray([[1] * 6, [1] * 4 + [0] * 2],
                                        jnp.int32),
          "decoder_target_ids": jnp.asarray(rng.integers(2, V, (2, 5)),
                                            jnp.int32),
          "decoder_attention_mask": jnp.asarray([[1] * 5, [1] * 3 + [0] * 2],
                                                jnp.int32),
          "example_mask": jnp.ones((2,), jnp.int32)}


def test_a_step_updates_the_adapters_only(base):
  """`supervised_step` on a LoRA student: the optimizer state holds
  adapter-shaped moments only, the base is untouched, and the update is
  Adam's first step on the gradient of the merged model's loss
  (-lr g / (|g| + eps), no clipping or decay), computed here by its own
  `jax.grad` of the cross-entropy."""
  _, lm = base
  student = lora_lib.LoraStudent(LORA)
  mods = steps.StepModels(student=lm.config, lora=student)
  optim = state_lib.OptimConfig(steps=4, learning_rate=1e-2,
                                schedule="constant", max_grad_norm=0.0)
  adapters = jax.tree.map(jnp.asarray, _drawn(lm))
  tx = state_lib.make_optimizer(optim)
  state = state_lib.init_state(adapters, tx, seed=0)
  shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
  moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state)
                   if x.ndim)
  assert moments == sorted(shapes * 2)  # Adam's mu and nu, nothing else
  frozen = jax.tree.map(jnp.asarray, lm.params)
  before = jax.tree.map(np.array, frozen)
  batch = _batch()

  @jax.jit
  def step(state, frozen, batch):
    state, metrics = steps.supervised_step(state.replace(frozen=frozen),
                                           batch, models=mods, optim=optim)
    return state.replace(frozen=None), metrics

  new, metrics = step(state, frozen, batch)
  assert int(new.skipped) == 0 and np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)

  def loss(a):
    merged = lora_lib.merge(lm.params, a, lm.config, LORA)
    logits = models.family.score(
        merged, lm.config, batch["input_ids"], batch["attention_mask"],
        batch["decoder_target_ids"], batch["decoder_attention_mask"])
    total, count = losses.cross_entropy_loss(
        logits, batch["decoder_target_ids"], batch["decoder_attention_mask"])
    return total / count

  grads = jax.grad(loss)(adapters)
  moved = 0
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    g = np.asarray(g, np.float64)
    old = np.asarray(_get(adapters, path))
    got = np.asarray(_get(new.params, path)) - old
    want = -1e-2 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
    moved += int(np.sum(np.abs(got) > 5e-3))
  assert moved > 0.9 * sum(x.size for x in jax.tree.leaves(adapters))


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_merged_export_has_the_adapters_logits(base, tmp_path):
  """The LoRA path (`StepModels.student_params`) scores as the merged
  model saved to HF and run by transformers."""
  _, lm = base
  mods = steps.StepModels(student=lm.config,
                          lora=lora_lib.LoraStudent(LORA))
  adapters = jax.tree.map(jnp.asarray, _drawn(lm))
  params = mods.student_params(adapters, lm.params)
  ids = _batch()["input_ids"]
  mask = jnp.ones_like(ids)
  ours = models.decoder.forward(params, lm.config, ids, mask)
  models.DecoderLM(lm.config, params).save_pretrained(tmp_path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  with torch.no_grad():
    want = hf(torch.tensor(np.asarray(ids))).logits.numpy()
  with torch.no_grad():
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        base[0], attn_implementation="eager").eval()(
            torch.tensor(np.asarray(ids))).logits.numpy()
  assert np.abs(want - plain).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5, rtol=0)


def test_lora_on_bad_configs_is_one_clear_error():
  cases = {
      (("rank", -1),): r"config\.student\.lora\.rank must be a positive "
                       r"int, got -1 \(student\.lora\.rank 0 = no LoRA\)",
      (("rank", 4), ("alpha", -2.0)): r"student\.lora\.alpha must be a "
                                      r"number > 0, got -2\.0",
      (("rank", 4), ("targets", ("q", "gate"))): r"student\.lora\.targets "
                                                 r"must be distinct names",
      (("rank", 4), ("base_dtype", "float16")): r"student\.lora\.base_dtype "
                                                r"must be one of",
  }
  for changes, match in cases.items():
    cfg = smoke_decoder.get_config()
    for key, value in changes:
      cfg.student.lora[key] = value
    with pytest.raises(ValueError, match=match):
      settings.check_config(cfg)
  cfg = smoke_decoder.get_config()
  cfg.student.lora.rank = 4
  cfg.teacher_mesh.devices = 1
  with pytest.raises(ValueError, match=r"student\.lora\.rank > 0 with "
                     r"config\.teacher_mesh\.devices > 0 is not supported"):
    settings.check_config(cfg)


def _lora_config(**overrides):
  cfg = smoke_decoder.get_config()
  cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.tensor = 1
  cfg.student.lora.rank = 4
  cfg.student.lora.alpha = 8.0
  cfg.student.lora.base_dtype = "bfloat16"
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """predistill (word-level KL) -> rl (validated each update, the best
  exported) -> eval, with a rank-4 student on a bfloat16 base."""
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  cfg = _lora_config(**{"stages": "predistill,rl,eval",
                        "predistill.method": "kl", "rl.eval_every": 1,
                        "rl.select": "best", "validation.max_examples": 16})
  return workdir, _run_on_one_device(cfg, workdir)


def test_lora_pipeline_runs_and_evaluates(lora_run):
  workdir, results = lora_run
  assert list(results["models"]) == ["student (kl)", "KETCHUP (K=2)"]
  rows = results["models"].values()
  for row in rows:
    assert set(row["metrics"]) == {"chrf", "exact_match"}
  assert len({r["checksum"] for r in rows}) == 2  # rl moved the student
  rl = results["models"]["KETCHUP (K=2)"]
  assert rl["selection"]["selected_step"] in (1, 2, 3)
  stage = json.loads(pathlib.Path(workdir, "stages", "rl_k2.json")
                     .read_text())
  assert stage["checksum"] == rl["checksum"]
  assert stage["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(
      lora_lib.KERNELS), "base_dtype": "bfloat16", "base": "stage:predistill",
                           "adapter_dir": "models/rl_k2/adapter"}
  for name in ("predistill", "rl_k2"):
    adapter = pathlib.Path(workdir, "models", name, "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
         "down_proj"])
  # The checkpoint holds the adapters and their optimizer state only.
  directory = pathlib.Path(workdir, "checkpoints", "rl_k2")
  manager = ocp.CheckpointManager(directory)
  saved = manager.restore(manager.latest_step())
  manager.close()
  adapter_shapes = sorted(
      x.shape for x in jax.tree.leaves(saved["params"]))
  assert {len(s) for s in adapter_shapes} == {2}
  assert all(4 in s for s in adapter_shapes)
  assert saved.get("frozen") is None
  if isinstance(saved["selection"], dict):
    assert sorted(x.shape for x in jax.tree.leaves(
        saved["selection"]["params"])) == adapter_shapes


def test_peft_dir_on_the_hf_base_gives_our_logits(lora_run):
  """rl's adapter directory on its base (predistill's merged export, as
  rl stored it: rounded to bfloat16) in PEFT = rl's merged export in
  transformers = ours."""
  workdir, _ = lora_run
  models_dir = pathlib.Path(workdir, "models")
  config = json.loads((models_dir / "rl_k2" / "adapter" /
                       "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == os.path.abspath(
      models_dir / "predistill")
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(
      models_dir / "predistill", attn_implementation="eager").eval()
  hf_base = hf_base.to(torch.bfloat16).to(torch.float32)  # rl's base_dtype
  ours = models.load(str(models_dir / "rl_k2"), dtype=jnp.float32)
  ids = np.random.default_rng(0).integers(
      3, ours.config.vocab_size, size=(2, 9))
  with torch.no_grad():
    plain = hf_base(torch.tensor(ids)).logits.numpy()
  # (PEFT puts the adapters into `hf_base` itself.)
  ref = peft.PeftModel.from_pretrained(hf_base,
                                       str(models_dir / "rl_k2" / "adapter"))
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      models_dir / "rl_k2", attn_implementation="eager").eval()
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
    via_merged = merged(torch.tensor(ids)).logits.numpy()
  got = models.decoder.forward(ours.params, ours.config, jnp.asarray(ids),
                               jnp.ones(ids.shape, jnp.int32))
  state = safetensors.numpy.load_file(
      str(models_dir / "rl_k2" / "adapter" / "adapter_model.safetensors"))
  assert max(np.abs(v).max() for k, v in state.items()
             if "lora_B" in k) > 0  # rl trained its adapters' b
  print(f"\nrl's adapters move the logits by up to "
        f"{np.abs(want - plain).max():.2e}")
  assert np.abs(want - plain).max() > 1e-4  # they change the logits
  np.testing.assert_allclose(via_merged, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_t5_lora_pipeline_and_its_peft_dir(tmp_path):
  """configs/smoke.py (T5 teacher and student) with a rank-4 student on a
  bfloat16 base: seqkd -> rl runs, and rl's adapter directory on
  predistill's (bfloat16-rounded) export in PEFT gives the logits of rl's
  merged export."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  cfg = smoke.get_config()
  cfg.mesh.data = 1
  cfg.stages = "predistill,rl"  # (the decoder run above evaluates)
  cfg.student.lora.rank = 4
  cfg.student.lora.base_dtype = "bfloat16"
  _run_on_one_device(cfg, str(tmp_path))
  models_dir = tmp_path / "models"
  config = json.loads((models_dir / "rl_k2" / "adapter" /
                       "adapter_config.json").read_text())
  assert config["task_type"] == "SEQ_2_SEQ_LM"
  assert config["target_modules"] == ["k", "o", "q", "v", "wi_0", "wi_1",
                                      "wo"]
  hf_base = transformers.T5ForConditionalGeneration.from_pretrained(
      models_dir / "predistill").eval().to(torch.bfloat16).to(torch.float32)
  merged = transformers.T5ForConditionalGeneration.from_pretrained(
      models_dir / "rl_k2").eval()
  rng = np.random.default_rng(0)
  vocab = merged.config.vocab_size
  kw = dict(input_ids=torch.tensor(rng.integers(2, vocab, (2, 7))),
            decoder_input_ids=torch.tensor(rng.integers(2, vocab, (2, 5))))
  with torch.no_grad():
    plain = hf_base(**kw).logits.numpy()
    ref = peft.PeftModel.from_pretrained(
        hf_base, str(models_dir / "rl_k2" / "adapter"))
    want = ref(**kw).logits.numpy()
    via_merged = merged(**kw).logits.numpy()
  assert np.abs(want - plain).max() > 1e-4  # rl's adapters change them
  np.testing.assert_allclose(via_merged, want, atol=1e-5, rtol=0)


STEPS, EVERY = 6, 2
ENV = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))


def _command(workdir):
  return [sys.executable, "-m", "ketchup_jax.main",
          "--config=configs/smoke_decoder.py", f"--workdir={workdir}",
          "--config.mesh.data=1", "--config.stages=predistill",
          "--config.student.lora.rank=4",
          "--config.student.lora.base_dtype=bfloat16",
          f"--config.predistill.steps={STEPS}",
          f"--config.checkpoint_every={EVERY}"]


def _finished(workdir):
  done = subprocess.run(_command(workdir), cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, done.stderr


def _killed_then_finished(workdir):
  """SIGKILLs the LoRA predistill once a checkpoint is saved, then reruns
  it to the end."""
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=ENV,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  killed = _kill_when(proc, lambda: (_latest_step(workdir, "predistill")
                                     or 0) >= EVERY)
  assert killed, "the stage finished before the kill"
  resumed_from = _latest_step(workdir, "predistill")
  assert EVERY <= resumed_from < STEPS
  assert not (workdir / "stages" / "predistill.json").exists()
  workdir, log = _finished(workdir)
  # The rerun restored the adapters and their Adam moments (a rerun from
  # step 0 would reach the same numbers too).
  directory = workdir / "checkpoints" / "predistill"
  assert f"restoring {directory} step {resumed_from}" in log, log[-3000:]
  return workdir, resumed_from


def test_sigkill_of_a_lora_stage_resumes_bit_exactly(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reference = pool.submit(_finished, tmp_path / "reference")
    interrupted = pool.submit(_killed_then_finished, tmp_path / "killed")
    (reference, _), (killed, resumed_from) = (reference.result(),
                                              interrupted.result())
  print(f"\nresumed from step {resumed_from} of {STEPS}")

  def read(workdir, name):
    return (workdir / "models" / "predistill" / name).read_bytes()

  record = lambda w: json.loads(
      (w / "stages" / "predistill.json").read_text())["checksum"]
  assert record(killed) == record(reference)
  assert read(killed, "adapter/adapter_model.safetensors") == read(
      reference, "adapter/adapter_model.safetensors")
  assert read(killed, "model.safetensors") == read(reference,
                                                    "model.safetensors")
