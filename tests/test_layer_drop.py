"""Students made from the teacher by layer dropping (`init_from=...#layers=`):
the kept blocks are the teacher's, and the export is an HF checkpoint whose
logits equal ours and those of the teacher's transformers model with the same
blocks removed."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
import conftest
from ketchup_jax import models
from ketchup_jax.train import sources

V = 96
_MODEL_CFG = ml_collections.ConfigDict(dict(
    dtype="float32", param_dtype="float32", overrides={}, remat="none"))


def _load(init_from, role="student"):
  return sources.load_model(init_from, _MODEL_CFG, 0, role=role, mesh=None,
                            tokenizer_vocab=V, tokenizer_eos=1,
                            models_dir="/nonexistent")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A random 4-block HF Llama (all weights drawn) and its directory."""
  d = str(tmp_path_factory.mktemp("teacher"))
  model = conftest.save_random_llama(d, layers=4, vocab=V)
  return model, d


def _ids():
  rng = np.random.default_rng(0)
  return rng.integers(2, V, size=(2, 7)), np.ones((2, 7), np.int64)


def test_dropped_student_exports_with_equal_logits(teacher, tmp_path):
  hf_teacher, d = teacher
  full = models.load(d, dtype="float32")
  student = _load(f"{d}#layers=0,2")
  assert student.config.num_hidden_layers == 2
  assert str(sources.Source.parse(f"{d}#layers=0,2")) == f"{d}#layers=0,2"
  for ours, theirs in ((0, 0), (1, 2)):
    for a, b in zip(jax.tree.leaves(student.params[f"layers_{ours}"]),
                    jax.tree.leaves(full.params[f"layers_{theirs}"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("embed", "final_norm", "lm_head"):
    for a, b in zip(jax.tree.leaves(student.params[key]),
                    jax.tree.leaves(full.params[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  ids, mask = _ids()
  ours = np.asarray(student.logits(ids, mask))
  student.save_pretrained(tmp_path)
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  assert exported.config.num_hidden_layers == 2
  # The reference: the teacher's own transformers model, blocks 1 and 3 cut.
  hf_teacher.model.layers = torch.nn.ModuleList(
      [hf_teacher.model.layers[i] for i in (0, 2)])
  hf_teacher.config.num_hidden_layers = 2
  with torch.no_grad():
    got = exported(torch.tensor(ids)).logits.numpy()
    cut = hf_teacher(torch.tensor(ids), use_cache=False).logits.numpy()
  np.testing.assert_allclose(got, cut, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours, cut, atol=1e-5, rtol=0)


def test_slices_and_bad_layer_specs(teacher):
  _, d = teacher
  assert sources.Source.parse(f"{d}#layers=::2").layer_indices(4, "x") == (
      0, 2)
  assert sources.Source.parse(f"{d}#layers=1:").layer_indices(4, "x") == (
      1, 2, 3)
  assert sources.Source.parse(d).layers is None
  for bad, match in (
      (f"{d}#layers=a,b", "is not #layers=<i,j,...>"),
      (f"{d}#layers=", "is not #layers=<i,j,...>"),
      (f"{d}#layers=::0", "is not #layers=<i,j,...>"),
      (f"{d}#depth=2", "after '#' expected #layers="),
      ("scratch:llama-tiny#layers=0", "a scratch: model's depth is set"),
  ):
    with pytest.raises(ValueError, match=match):
      sources.Source.parse(bad)
  for bad, shown in (("2,1", r"\[2, 1\]"), ("0,4", r"\[0, 4\]"),
                     ("1,1", r"\[1, 1\]"), ("9:", r"\[\]")):
    with pytest.raises(ValueError, match=(
        rf"student.init_from='.*#layers={bad}': layers {shown}: expected "
        r"strictly increasing block indices in \[0, 4\) of this 4-layer "
        r"llama model")):
      _load(f"{d}#layers={bad}")


def test_t5_keeps_the_same_blocks_of_both_stacks(tmp_path):
  t5 = models.init("tiny", jax.random.key(0), dtype="float32")
  params, config = models.family.keep_layers(t5.params, t5.config, [1])
  assert (config.num_layers, config.num_decoder_layers) == (1, 1)
  for stack in ("encoder", "decoder"):
    for a, b in zip(jax.tree.leaves(params[stack]["layers_0"]),
                    jax.tree.leaves(t5.params[stack]["layers_1"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lm = models.T5LM(config=config, params=params)
  lm.save_pretrained(tmp_path)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  ids, mask = _ids()
  ids = ids % config.vocab_size
  dec = np.concatenate([np.zeros((2, 1), np.int64), ids[:, :4]], 1)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              decoder_input_ids=torch.tensor(dec)).logits.numpy()
  np.testing.assert_allclose(np.asarray(lm.logits(ids, mask, dec)), want,
                             atol=1e-4, rtol=0)
