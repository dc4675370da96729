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


def test_t5_peft_adapter_logits(tmp_path):
  """A gated T5's adapters (self and cross attention q k v o, wi_0 wi_1 wo)
  as a PEFT directory on the HF T5: the logits of ours after `merge`."""
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=V, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1,
      num_decoder_layers=1, feed_forward_proj="gated-gelu",
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
  d = str(tmp_path / "t5")
  hf.save_pretrained(d)
  lm = models.load(d, dtype=jnp.float32)
  adapters = _adapters(lm)
  sites = lora_lib.to_peft(adapters, lm.config, LORA)
  # 1 encoder layer (4 + 3) + 1 decoder layer (4 + 4 + 3) kernels, A and B.
  assert len(sites) == 2 * 18
  lora_lib.save_peft(adapters, lm.config, LORA, tmp_path / "adapter")
  assert lora_lib.adapter_count(lm.config, LORA) == sum(
      x.size for x in jax.tree.leaves(adapters))
  ids, mask = _ids()
  targets = np.random.default_rng(4).integers(2, V, size=(2, 5))
  merged = lora_lib.merge(lm.params, jax.tree.map(jnp.asarray, adapters),
                          lm.config, LORA)
  ours = models.family.score(merged, lm.config, jnp.asarray(ids),
                             jnp.asarray(mask), jnp.asarray(targets),
                             jnp.ones_like(jnp.asarray(targets)))
  with torch.no_grad():
    base_logits = hf(input_ids=torch.tensor(ids),
                     labels=torch.tensor(targets)).logits.numpy()
    ref = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    want = ref(input_ids=torch.tensor(ids),
               labels=torch.tensor(targets)).logits.numpy()
  assert np.abs(want - base_logits).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)


def test_bad_lora_configs(base):
  _, lm = base
  for kw, match in ((dict(rank=0), r"rank must be a positive int, got 0"),
                    (dict(rank=2.5), r"rank must be a positive int"),
                    (dict(alpha=0.0), r"alpha must be a number > 0"),
                    (dict(targets=()), r"targets must be distinct")):
    with pytest.raises(ValueError, match=match):
      lora_lib.LoraConfig(**kw)
  with pytest.raises(ValueError, match=r"lora targets \['wi'\] are not "
                     r"kernels of this DecoderConfig model; it has \["):
    lora_lib.init_adapters(lm.params, lm.config,
                           lora_lib.LoraConfig(targets=("q", "wi")), seed=0)
  with pytest.raises(ValueError, match=r"base_dtype must be one of "
                     r"\('float32', 'bfloat16'\), got 'float16'"):
    lora_lib.LoraStudent(LORA, base_dtype="float16")


def test_bfloat16_base_is_applied_in_float32(base):
  """A bfloat16 base: stored in bf16, merged in float32 as bf16(W) + s a b
  (the update is not rounded to bf16)."""
  _, lm = base
  student = lora_lib.LoraStudent(LORA, base_dtype="bfloat16",
                                 dtype="float32")
  frozen = student.frozen(lm.params)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {
      jnp.dtype(jnp.bfloat16)}
  adapters = _adapters(lm)
  merged = student.apply(jax.tree.map(jnp.asarray, adapters), frozen,
                         lm.config)
  w = np.asarray(frozen["layers_1"]["attention"]["o"]).astype(np.float32)
  pair = adapters["layers_1"]["attention"]["o"]
  want = w + LORA.scale * (pair["a"].astype(np.float64) @ pair["b"]
                           ).reshape(w.shape)
  got = merged["layers_1"]["attention"]["o"]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(  # an untargeted leaf: bf16, cast exactly
      np.asarray(merged["embed"]["embedding"]),
      np.asarray(frozen["embed"]["embedding"]).astype(np.float32))
