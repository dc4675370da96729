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
import conftest
from ketchup_jax import models
from ketchup_jax.models import decoder
from ketchup_jax.models import lora as lora_lib

V = 96
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A random 2-block HF Llama (untied, GQA) saved, and our load of it."""
  d = str(tmp_path_factory.mktemp("base"))
  conftest.save_random_llama(d, layers=2, vocab=V)
  return d, models.load(d, dtype=jnp.float32)


def _adapters(lm):
  """Adapters with both halves drawn (a fresh `b` is zero: no signal)."""
  fresh = lora_lib.init_adapters(lm.params, lm.config, LORA, seed=1)
  rng = np.random.default_rng(2)
  return jax.tree.map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
      fresh)


def _ids():
  rng = np.random.default_rng(0)
  return rng.integers(2, V, size=(2, 7)), np.ones((2, 7), np.int64)


def test_fresh_adapters_change_nothing(base):
  _, lm = base
  fresh = lora_lib.init_adapters(lm.params, lm.config, LORA, seed=1)
  merged = lora_lib.merge(lm.params, fresh, lm.config, LORA)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lm.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert lora_lib.adapter_count(lm.config, LORA) == sum(
      x.size for x in jax.tree.leaves(fresh)) == 2 * 4 * (  # layers * rank
          2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 48))  # q o, k v, mlp
  with pytest.raises(ValueError, match=r"targets must be distinct names"):
    lora_lib.LoraConfig(targets=("q", "embed"))


def test_peft_adapter_logits_and_gradients(base, tmp_path):
  """The PEFT directory on the HF base gives our logits after `merge`, and
  d loss / d adapters (base frozen) equals torch autograd on PEFT's lora_A /
  lora_B, for a fixed linear function of the logits."""
  d, lm = base
  adapters = _adapters(lm)
  lora_lib.save_peft(adapters, lm.config, LORA, tmp_path, base_model=d)
  ids, mask = _ids()
  weights = np.random.default_rng(3).standard_normal(
      (2, 7, V)).astype(np.float32)

  @jax.jit
  def loss(a):
    merged = lora_lib.merge(lm.params, a, lm.config, LORA)
    logits = decoder.forward(merged, lm.config, jnp.asarray(ids),
                             jnp.asarray(mask))
    return jnp.sum(logits * weights), logits

  (_, ours), grads = jax.value_and_grad(loss, has_aux=True)(
      jax.tree.map(jnp.asarray, adapters))

  hf = transformers.AutoModelForCausalLM.from_pretrained(
      d, attn_implementation="eager").eval()
  with torch.no_grad():
    base_logits = hf(torch.tensor(ids)).logits.numpy()
  ref = peft.PeftModel.from_pretrained(hf, str(tmp_path),
                                       is_trainable=True).eval()
  trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
  assert trainable and all("lora_" in n for n in trainable)
  logits = ref(torch.tensor(ids)).logits
  (logits * torch.from_numpy(weights)).sum().backward()
  want = logits.detach().numpy()
  assert np.abs(want - base_logits).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)

  want_grads = {n.replace(".default", ""): p.grad.numpy()
                for n, p in trainable.items()}
  got = lora_lib.to_peft(grads, lm.config, LORA)
  assert sorted(got) == sorted(want_grads)
  for name, g in got.items():
    np.testing.assert_allclose(g, want_grads[name], atol=1e-3, rtol=1e-4,
                               err_msg=name)
