"""LoRA adapters on a tiny random Llama against PEFT: the PEFT adapter
directory loads onto the HF base with logits equal to ours after `merge`,
and the gradients of the adapters equal PEFT's `lora_A` / `lora_B` grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# pylint: disable=g-import-not-at-top,wrong-import-position
from ketchup_jax import models
from ketchup_jax.models import decoder
from ketchup_jax.models import lora as lora_lib

V = 96
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A random 2-block HF Llama (untied, GQA) saved, and our load of it."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, eos_token_id=1,
      pad_token_id=0, tie_word_embeddings=False,
      attn_implementation="eager")).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      p.copy_((1 + 0.2 * torch.randn_like(p)) if "norm" in key else
              0.15 * torch.randn_like(p))
  d = str(tmp_path_factory.mktemp("base"))
  model.save_pretrained(d)
  return d, models.load(d, dtype=jnp.float32)


def _adapters(lm):
  """Adapters with both halves drawn (a fresh `b` is zero: no signal)."""
  fresh = lora_lib.init_adapters(lm.params, lm.config, LORA,
                                 jax.random.key(1))
  rng = np.random.default_rng(2)
  return jax.tree.map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
      fresh)


def _ids():
  rng = np.random.default_rng(0)
  return rng.integers(2, V, size=(2, 7)), np.ones((2, 7), np.int64)


def _peft_model(d, adapter_dir, **kw):
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      d, attn_implementation="eager").eval()
  return peft.PeftModel.from_pretrained(hf, adapter_dir, **kw).eval()


def test_fresh_adapters_change_nothing(base):
  _, lm = base
  fresh = lora_lib.init_adapters(lm.params, lm.config, LORA,
                                 jax.random.key(1))
  merged = lora_lib.merge(lm.params, fresh, lm.config, LORA)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lm.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert lora_lib.adapter_count(lm.config, LORA) == sum(
      x.size for x in jax.tree.leaves(fresh))
  with pytest.raises(ValueError, match=r"targets must be distinct names"):
    lora_lib.LoraConfig(targets=("q", "embed"))


def test_peft_adapter_and_merge_give_equal_logits(base, tmp_path):
  d, lm = base
  adapters = _adapters(lm)
  lora_lib.save_peft(adapters, lm.config, LORA, tmp_path / "adapter",
                     base_model=d)
  merged = lora_lib.merge(lm.params, adapters, lm.config, LORA)
  ids, mask = _ids()
  ours = np.asarray(decoder.forward(merged, lm.config, jnp.asarray(ids),
                                    jnp.asarray(mask)))
  with torch.no_grad():
    want = _peft_model(d, str(tmp_path / "adapter"))(
        torch.tensor(ids)).logits.numpy()
    base_logits = transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager")(torch.tensor(ids)).logits.numpy()
  assert np.abs(want - base_logits).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
  # The merged model exports as an ordinary HF checkpoint.
  models.DecoderLM(config=lm.config, params=merged).save_pretrained(
      tmp_path / "merged")
  with torch.no_grad():
    got = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager")(
            torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_adapter_gradients_equal_peft(base, tmp_path):
  """d loss / d adapters (base frozen) against torch autograd on PEFT's
  lora_A / lora_B, for a fixed linear function of the logits."""
  d, lm = base
  adapters = _adapters(lm)
  lora_lib.save_peft(adapters, lm.config, LORA, tmp_path, base_model=d)
  ids, mask = _ids()
  weights = np.random.default_rng(3).standard_normal(
      (2, 7, V)).astype(np.float32)

  def loss(a):
    merged = lora_lib.merge(lm.params, a, lm.config, LORA)
    logits = decoder.forward(merged, lm.config, jnp.asarray(ids),
                             jnp.asarray(mask))
    return jnp.sum(logits * weights)

  grads = jax.grad(loss)(jax.tree.map(jnp.asarray, adapters))
  ref = _peft_model(d, str(tmp_path), is_trainable=True)
  trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
  assert trainable and all("lora_" in n for n in trainable)
  (ref(torch.tensor(ids)).logits * torch.from_numpy(weights)).sum().backward()
  want = {n.replace(".default", ""): p.grad.numpy()
          for n, p in trainable.items()}
  got = lora_lib.to_peft(grads, lm.config, LORA)
  assert sorted(got) == sorted(want)
  for name, g in got.items():
    np.testing.assert_allclose(g, want[name], atol=1e-3, rtol=1e-4,
                               err_msg=name)
