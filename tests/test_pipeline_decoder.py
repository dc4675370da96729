"""The whole pipeline on decoder-only models: HF Qwen2 directories made by
transformers, an HF tokenizer whose pad is its EOS (as Qwen's), and a
JSON-lines task. predistill -> rl (with validation) -> eval, then the
exported student loads in `transformers.AutoModelForCausalLM` with the
logits our model computes."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import paper_qwen
from ketchup_jax import data
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.train import context
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from test_paper_configs import shrink
from test_pipeline import _run_on_one_device

EOS = 0  # "<|endoftext|>": pad and EOS at once, as in Qwen's tokenizers


def _write_tokenizer(directory, texts):
  # pylint: disable=g-import-not-at-top
  from tokenizers import models as tok_models
  from tokenizers import pre_tokenizers
  from tokenizers import Tokenizer
  from tokenizers import trainers
  # pylint: enable=g-import-not-at-top
  raw = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  raw.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(
      special_tokens=["<|endoftext|>", "<unk>"], show_progress=False))
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=raw, eos_token="<|endoftext|>",
      pad_token="<|endoftext|>", unk_token="<unk>")
  hf.save_pretrained(directory)
  return len(hf)


def _write_qwen2(directory, vocab, hidden, layers, seed):
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
      tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=EOS,
      bos_token_id=None)
  transformers.Qwen2ForCausalLM(config).eval().save_pretrained(directory)


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
  """configs/paper_qwen.py (the authors' recipe) on tiny HF Qwen2 dirs and a
  JSON-lines task, shrunk like the T5 paper configs' test."""
  root = tmp_path_factory.mktemp("decoder")
  numbers = data.get_task("numbers_en_nl", max_number=199)
  paths = {}
  for split, n in (("train", 120), ("validation", 8), ("test", 8)):
    paths[split] = os.fspath(root / f"{split}.jsonl")
    with open(paths[split], "w", encoding="utf-8") as f:
      for ex in numbers.examples(split)[:n]:
        f.write(json.dumps(ex, ensure_ascii=False) + "\n")
  vocab = _write_tokenizer(root / "tok", numbers.texts("train") + [
      "translate English to Dutch:"])
  rows = -(-vocab // 8) * 8
  _write_qwen2(root / "teacher", rows, 32, 2, seed=0)
  _write_qwen2(root / "student", rows, 16, 1, seed=1)
  for task, k in (("xsum", 2), ("europarl_en_nl", 2), ("gsm8k", 16)):
    c = paper_qwen.get_config(task)
    assert c.rl.k == k and c.student.init_from.endswith("qwen1.5-0.5b")
    assert not c.tokenizer.chat_template  # SPEC §4: prefix + question
  c = paper_qwen.get_config("europarl_en_nl")
  shrink("europarl_en_nl_k4", c, {
      "teacher": os.fspath(root / "teacher"),
      "student": os.fspath(root / "student"),
      "tokenizer": os.fspath(root / "tok"), "europarl": ""})
  c.task.name = "jsonl"
  c.task.options = {"paths": paths, "prefix": "translate English to Dutch: ",
                    "metrics": ("chrf", "exact_match")}
  for role in ("teacher", "student"):
    c[role].dtype = "float32"  # bf16 is slow on this CPU; same recipe
  # A random student seldom says EOS within 12 tokens, and the recipe drops
  # unfinished rollouts: score them as ended, so that RL has a gradient.
  c.rl.unfinished = "terminal"
  workdir = os.fspath(root / "run")
  return root, workdir, _run_on_one_device(c, workdir), c


def test_decoder_pipeline_runs_the_paper_recipe_through_every_stage(
    decoder_run):
  _, workdir, results, cfg = decoder_run
  assert cfg.stages == "predistill,rl,eval" and cfg.predistill.method == "kl"
  assert list(results["models"]) == ["teacher", "student (kl)",
                                     "KETCHUP (K=2)"]
  rl = results["models"]["KETCHUP (K=2)"]
  assert set(rl["metrics"]) == {"chrf", "exact_match"}
  assert rl["selection"]["selected_step"] == 2  # validated after update 2
  checksums = {r["checksum"] for r in results["models"].values()}
  assert len(checksums) == 3  # the student moved in each stage
  stage = json.load(open(os.path.join(workdir, "stages", "rl_k2.json")))
  assert stage["checksum"] == rl["checksum"]


def test_decoder_prompts_have_no_eos_and_targets_end_with_it(decoder_run,
                                                            monkeypatch):
  _, workdir, _, cfg = decoder_run
  make_mesh = partitioning.make_mesh
  monkeypatch.setattr(partitioning, "make_mesh", lambda **kw: make_mesh(
      devices=jax.devices()[:1], **kw))  # the config's 1 x 1 x 1 mesh
  run = context.setup(cfg, workdir)  # the run's data, as its stages read it
  source, target = run.eval.sources[0], run.eval.targets[0]
  assert EOS not in source.tolist()  # the prompt runs on into the completion
  assert target[-1] == EOS and EOS not in target[:-1].tolist()
  hf_tok = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer.path)
  assert source.tolist() == hf_tok(
      "translate English to Dutch: " + run.task.examples("test")[0]["source"],
      add_special_tokens=False)["input_ids"][:cfg.max_source_len]


def test_exported_decoder_student_loads_in_transformers(decoder_run):
  _, workdir, _, _ = decoder_run
  path = os.path.join(workdir, "models", "rl_k2")
  ours = models.load(path, dtype=jax.numpy.float32)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(2, ours.config.vocab_size, (2, 7)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(ids),
                  attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(ours.logits(ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=1e-5)


_STUDENT = models.get_decoder_config("qwen2-tiny", dtype=jax.numpy.float32)
_TEACHER = _STUDENT.replace(hidden_size=64, intermediate_size=128)


def _decoder_rl_step(mesh, *, extra_student_rows=0, logits_chunk=0):
  """One KETCHUP step of a Qwen2-shaped student and teacher on `mesh`:
  `(start params, updated params, metrics)` on the host. `extra_student_rows`
  appends rows of large random values to the student's (tied) embedding."""
  rl = rollouts.RLConfig(k=2, max_decode_len=6, temperature=1.0,
                         unfinished="terminal", baseline="batch_mean")
  # A large Adam eps: the first step is lr * g / (|g| + eps), not
  # lr * sign(g), so reduction-order noise in tiny gradients stays tiny.
  optim = state_lib.OptimConfig(steps=1, learning_rate=1e-3, eps=1e-3)
  rng = np.random.default_rng(0)
  lengths = np.array([5, 3, 4, 2, 5, 1, 4, 3])
  mask = (np.arange(5)[None] < lengths[:, None]).astype(np.int32)
  batch = {"input_ids": rng.integers(2, 128, (8, 5)).astype(np.int32) * mask,
           "attention_mask": mask,
           "example_mask": np.array([1] * 7 + [0], np.int32)}
  student_cfg = _STUDENT.replace(
      vocab_size=_STUDENT.vocab_size + extra_student_rows)
  student = models.init(_STUDENT, jax.random.PRNGKey(0), mesh=mesh)
  params = student.params
  if extra_student_rows:
    table = params["embed"]["embedding"]  # [V, E]
    extra = 10.0 * rng.standard_normal((extra_student_rows, table.shape[1]))
    params = {**params, "embed": {"embedding": jax.numpy.concatenate(
        [table, extra.astype(table.dtype)])}}
  teacher = models.init(_TEACHER, jax.random.PRNGKey(1), mesh=mesh)
  mods = steps.StepModels(student=student_cfg, teacher=_TEACHER, mesh=mesh,
                          logits_chunk=logits_chunk)
  state = state_lib.init_state(params, tx=state_lib.make_optimizer(optim),
                               seed=3)
  b = batch if mesh is None else jax.device_put(
      batch, partitioning.batch_sharding(mesh))
  fn = jax.jit(functools.partial(rollouts.rl_step, models=mods, optim=optim,
                                 rl=rl))
  new_state, metrics = fn(state, teacher.params, b)
  return jax.device_get((params, new_state.params, metrics))


def test_decoder_rl_step_on_a_2x2x2_mesh_equals_one_device():
  """The same loss, rollout and updated parameters sharded over data x fsdp
  x tensor."""
  start, want_params, want = _decoder_rl_step(None)
  _, got_params, got = _decoder_rl_step(
      partitioning.make_mesh(data=2, fsdp=2, tensor=2))
  assert float(want["rollout_length"]) > 1.0  # a real rollout
  for key in ("loss", "rollout_length", "return_var", "grad_norm"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)  # reduction order only
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(want_params), jax.tree.leaves(start)))
  assert moved > 1e-4  # the step moved the student well past the bound
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_student_with_more_embedding_rows_acts_on_the_shared_ids_only():
  """Qwen2.5 students and teachers pad their embeddings to different row
  counts. A student with 24 extra rows of large values (which would win
  every argmax and most samples) takes the step of the student without them,
  position-chunked: its rollout, log-probabilities and update see the
  teacher's rows only, and the extra rows do not move."""
  _, want_params, want = _decoder_rl_step(None)
  start, got_params, got = _decoder_rl_step(None, extra_student_rows=24,
                                            logits_chunk=4)
  for key in ("loss", "rollout_length", "return_var", "grad_norm"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  rows = _STUDENT.vocab_size
  table = got_params["embed"]["embedding"]
  np.testing.assert_array_equal(table[rows:],
                                start["embed"]["embedding"][rows:])
  got_params["embed"]["embedding"] = table[:rows]
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tokenizers_that_differ_are_refused_naming_both(decoder_run,
                                                        tmp_path, monkeypatch):
  """Row counts may differ (above); the tokens may not: a student directory
  shipping a tokenizer with one more token than the run's."""
  root, _, _, cfg = decoder_run
  hf_tok = transformers.AutoTokenizer.from_pretrained(root / "tok")
  n = len(hf_tok)
  hf_tok.add_tokens(["<extra>"])
  student = tmp_path / "student"
  shutil.copytree(root / "student", student)
  hf_tok.save_pretrained(student)
  cfg = cfg.copy_and_resolve_references()
  cfg.student.init_from = os.fspath(student)
  make_mesh = partitioning.make_mesh
  monkeypatch.setattr(partitioning, "make_mesh", lambda **kw: make_mesh(
      devices=jax.devices()[:1], **kw))
  with pytest.raises(ValueError, match=(
      rf"the run's tokenizer \(config.tokenizer.path\) and the student's "
      rf"tokenizer \({student}\) differ: {n} and {n + 1} tokens; id {n} is "
      rf"None in the first and '<extra>' in the second; the teacher and "
      rf"student must share one tokenizer")):
    context.setup(cfg, os.fspath(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # nothing written


def test_chat_template_makes_the_prompt_the_user_turn(decoder_run, tmp_path,
                                                      monkeypatch):
  root, _, _, cfg = decoder_run
  hf_tok = transformers.AutoTokenizer.from_pretrained(root / "tok")
  hf_tok.chat_template = ("{% for m in messages %}user {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}"
                          "assistant{% endif %}")
  hf_tok.save_pretrained(tmp_path / "chat_tok")
  cfg = cfg.copy_and_resolve_references()
  cfg.tokenizer.path = os.fspath(tmp_path / "chat_tok")
  cfg.tokenizer.chat_template = True
  make_mesh = partitioning.make_mesh
  monkeypatch.setattr(partitioning, "make_mesh", lambda **kw: make_mesh(
      devices=jax.devices()[:1], **kw))
  run = context.setup(cfg, os.fspath(tmp_path / "run"))
  source = run.task.examples("test")[0]["source"]
  want = hf_tok(f"user translate English to Dutch: {source} assistant",
                add_special_tokens=False)["input_ids"][:cfg.max_source_len]
  assert run.eval.sources[0].tolist() == want
  cfg.tokenizer.kind, cfg.tokenizer.path = "byte", ""  # no chat template
  with pytest.raises(ValueError, match="chat_template=True needs an HF"):
    context.setup(cfg, os.fspath(tmp_path / "run2"))
