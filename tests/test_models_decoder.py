"""Decoder-only models (Llama 3, Qwen2, Qwen3) against tiny random transformers
models: logits, greedy generation, HF export / import, the family seam."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
import safetensors.numpy

from ketchup_jax import chunked
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.models import api
from ketchup_jax.models import decoder
from ketchup_jax.models import family
from ketchup_jax.models import hf_io

B, L, N, V = 3, 7, 6, 96  # batch, prompt length, new tokens, vocab
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4,
               attn_implementation="eager")
# Llama 3 scaling with original_max_position_embeddings=16: with head_dim 8
# it rescales the frequencies 0.1, 0.01, 0.001 (wavelength > 16) and blends
# 1.0 (wavelength 6.3), so positions 0..12 already see it.
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
           "rope_theta": 10000.0}
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=1, head_dim=16,
                   tie_word_embeddings=False)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_key_value_heads=2, rope_parameters=_LLAMA3,
                   tie_word_embeddings=False)),
}


def _batch():
  """A left-padded int batch `[B, L]` and its mask (rows of 7, 4, 2 tokens)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, V, size=(B, L)).astype(np.int64)
  mask = np.zeros((B, L), np.int64)
  for row, n in enumerate((7, 4, 2)):
    mask[row, L - n:] = 1
  return np.where(mask > 0, ids, 0), mask


def _hf_positions(mask):
  """Positions as HF `generate` computes them for left padding."""
  pos = np.cumsum(mask, axis=1) - 1
  return np.where(mask > 0, pos, 1)


def _make(name, seed):
  """A random HF model: all weights, biases and norm scales drawn."""
  config_cls, model_cls, extra = FAMILIES[name]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**_COMMON, **extra)).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def _hf_greedy(model, ids, mask):
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=N, do_sample=False)
  return out[:, L:].numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (HF model, directory). EOS ids are two tokens the greedy
  continuations produce, so rows stop at different steps; pad = an EOS id
  (as in Qwen)."""
  ids, mask = _batch()
  out = {}
  for seed, name in enumerate(FAMILIES):
    model = _make(name, seed)
    free = _hf_greedy(model, ids, mask)
    eos = [int(free[0, 2]), int(free[1, 4])]
    if eos[0] == eos[1]:
      eos = eos[:1]
    for cfg in (model.config, model.generation_config):
      cfg.eos_token_id, cfg.pad_token_id = eos, eos[-1]
    d = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(d)
    out[name] = (model, d)
  return out


@pytest.fixture(scope="module")
def loaded(saved):
  return {name: models.load(d, dtype=jnp.float32)
          for name, (_, d) in saved.items()}


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids),
                 attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(_hf_positions(mask))
                 ).logits.numpy()


def _assert_close_on(mask, got, want, atol=1e-5):
  real = mask > 0
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=atol,
                             rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_on_left_padded_batch(saved, loaded, name):
  model, _ = saved[name]
  lm = loaded[name]
  assert isinstance(lm, models.DecoderLM)
  ids, mask = _batch()
  want = _hf_logits(model, ids, mask)
  _assert_close_on(mask, lm.logits(ids, mask), want)
  config = lm.config
  assert config.model_type == name
  if name == "qwen2":
    assert config.tie_word_embeddings and config.qkv_bias
    assert "lm_head" not in lm.params
  if name == "qwen3":
    assert config.qk_norm and config.head_dim == 16
    assert config.num_key_value_heads == 1
  if name == "llama":
    # The test can fail: the same weights with unscaled RoPE are far off.
    assert config.rope_type == "llama3"
    plain = jax.jit(decoder.forward, static_argnums=1)(
        lm.params, config.replace(rope_type="default"), jnp.asarray(ids),
        jnp.asarray(mask))
    real = mask > 0
    assert np.max(np.abs(np.asarray(plain)[real] - want[real])) > 1e-3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generate_matches_transformers(saved, loaded, name):
  model, _ = saved[name]
  lm = loaded[name]
  ids, mask = _batch()
  want = _hf_greedy(model, ids, mask)  # [B, <= N], pad after EOS
  out = lm.sample(ids, mask, max_new_tokens=N, temperature=0.0,
                  rng=jax.random.key(0))
  tokens = np.asarray(out.tokens)
  eos = lm.config.eos_token_id
  assert len(eos) >= 1 and lm.config.pad_token_id in eos
  np.testing.assert_array_equal(tokens[:, :want.shape[1]], want)
  assert np.all(tokens[:, want.shape[1]:] == lm.config.pad_token_id)
  for row in range(B):
    hits = [t for t in range(N) if tokens[row, t] in eos]
    length = hits[0] + 1 if hits else N
    assert int(out.lengths[row]) == length
    assert bool(out.done[row]) == bool(hits)
  assert np.asarray(out.done).any()  # EOS was exercised
  # Sampling settings are traced: no recompilation.
  before = api._sample_jit._cache_size()  # pylint: disable=protected-access
  drawn = lm.sample(ids, mask, max_new_tokens=N, temperature=0.7, top_k=3,
                    top_p=0.9, rng=jax.random.key(1))
  assert api._sample_jit._cache_size() == before  # pylint: disable=protected-access
  assert np.all(np.asarray(drawn.logprobs) <= 0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_transformers_with_equal_logits(loaded, tmp_path,
                                                        name):
  lm = loaded[name]
  lm.save_pretrained(tmp_path)
  keys = set(safetensors.numpy.load_file(
      str(tmp_path / "model.safetensors")))
  assert ("lm_head.weight" in keys) == (not lm.config.tie_word_embeddings)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  ids, mask = _batch()
  _assert_close_on(mask, lm.logits(ids, mask), _hf_logits(hf, ids, mask))
  again = models.load(str(tmp_path), dtype=jnp.float32)
  assert again.config == lm.config
  jax.tree.map(np.testing.assert_array_equal, again.params, lm.params)


def test_sharded_index_and_tied_head_are_read_once(saved, loaded, tmp_path):
  model, _ = saved["qwen3"]
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  names = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in names
  assert sum(n.endswith(".safetensors") for n in names) > 1
  again = models.load(str(tmp_path / "sharded"), dtype=jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, again.params,
               loaded["qwen3"].params)
  # A tied checkpoint that also holds an lm_head.weight: HF ignores it (the
  # head is the embedding), and so do we; it is not read.
  src = saved["qwen2"][1]
  d = tmp_path / "tied_with_head"
  d.mkdir()
  state = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  state["lm_head.weight"] = np.full((V, 32), np.nan, np.float32)
  safetensors.numpy.save_file(state, str(d / "model.safetensors"))
  for f in ("config.json", "generation_config.json"):
    (d / f).write_text(open(os.path.join(src, f)).read())
  tied = models.load(str(d), dtype=jnp.float32)
  assert "lm_head" not in tied.params
  jax.tree.map(np.testing.assert_array_equal, tied.params,
               loaded["qwen2"].params)


def test_unsupported_model_type_is_one_clear_error(saved, tmp_path):
  src = saved["llama"][1]
  hf = json.loads(open(os.path.join(src, "config.json")).read())
  hf["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=(
      r"config.json: model_type 'gpt2' is not supported; expected one of "
      r"\['t5', 'mt5', 'llama', 'qwen2', 'qwen3'\]")):
    models.load(str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown model size 'qwen9-tiny'"):
    models.init("qwen9-tiny", jax.random.key(0))
  # Qwen2 weights (q/k/v biases) under a Llama config: the headers alone
  # show it, before any tensor is read.
  src = saved["qwen2"][1]
  d = tmp_path / "mislabelled"
  d.mkdir()
  hf = json.loads(open(os.path.join(src, "config.json")).read())
  (d / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
  os.symlink(os.path.join(src, "model.safetensors"), d / "model.safetensors")
  with pytest.raises(ValueError, match=(
      r"the safetensors headers do not match the llama config .*unexpected "
      r"HF keys \['model.layers.0.self_attn.k_proj.bias'")):
    hf_io.check_checkpoint(str(d), model_types=hf_io.SUPPORTED)


def test_prompt_longer_than_the_cache_is_one_clear_error(loaded):
  lm = loaded["qwen2"]
  ids, mask = _batch()
  cache = decoder.init_cache(lm.config, B, L - 1)
  with pytest.raises(ValueError, match=(
      r"a prompt of 7 tokens does not fit the KV cache of 6 positions")):
    decoder.prefill(lm.params, lm.config, jnp.asarray(ids),
                    jnp.asarray(mask), cache)


def test_family_score_is_the_slice_of_full_sequence_logits(loaded):
  lm = loaded["qwen3"]
  prompt, prompt_mask = _batch()
  rng = np.random.default_rng(1)
  t = 4
  targets = rng.integers(3, V, size=(B, t))
  target_mask = (np.arange(t)[None] < np.array([[4], [2], [3]])).astype(
      np.int64)
  full = np.asarray(lm.logits(np.concatenate([prompt, targets], 1),
                              np.concatenate([prompt_mask, target_mask], 1)))
  want = full[:, L - 1:L - 1 + t]  # position L-1+j predicts targets[:, j]
  score = jax.jit(family.score, static_argnums=1)
  # The same prompts right-padded: the seam left-aligns them.
  right = np.zeros_like(prompt)
  right_mask = np.zeros_like(prompt_mask)
  for row in range(B):
    real = prompt[row][prompt_mask[row] > 0]
    right[row, :len(real)], right_mask[row, :len(real)] = real, 1
  for p, pm in ((prompt, prompt_mask), (right, right_mask)):
    got = score(lm.params, lm.config, *map(jnp.asarray,
                                           (p, pm, targets, target_mask)))
    assert got.shape == (B, t, V)
    _assert_close_on(target_mask, got, want)
  hidden = jax.jit(family.score_hidden, static_argnums=1)(
      lm.params, lm.config, *map(jnp.asarray,
                                 (prompt, prompt_mask, targets, target_mask)))
  projected = chunked.project(hidden, family.output_head(lm.params,
                                                         lm.config))
  _assert_close_on(target_mask, projected, want)
  assert not family.is_encoder_decoder(lm.config)
  assert family.eos_ids(lm.config) == lm.config.eos_token_id


def test_default_dtype_follows_the_platform(saved):
  assert jax.default_backend() == "cpu"
  lm = models.load(saved["qwen2"][1])
  assert lm.config.dtype == jnp.float32 == models.default_dtype()
  assert models.load(saved["qwen2"][1],
                     dtype=jnp.bfloat16).config.dtype == jnp.bfloat16
  assert models.init("tiny", jax.random.key(0)).config.dtype == jnp.float32
  assert hf_io.SUPPORTED == ("t5", "mt5", "llama", "qwen2", "qwen3")


def test_sharded_and_rematerialised_equal_one_device(loaded):
  """A (2, 2, 2) mesh and remat="full" (which wraps every layer, cached or
  not; its gradients are tested with T5's through the same `layers.remat`
  in test_memory.py) give the single-device logits and greedy tokens."""
  lm = loaded["qwen3"]
  ids, mask = _batch()
  mask[2, -1] = 0  # a right-padded row too: the sampler left-aligns it
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  config = lm.config.replace(remat="full")
  sharded = models.DecoderLM(
      config=config, mesh=mesh,
      params=models.place_params(lm.params, config, mesh))
  k = sharded.params["layers_0"]["attention"]["k"]
  assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
  _assert_close_on(mask, sharded.logits(ids, mask),
                   np.asarray(lm.logits(ids, mask)))
  np.testing.assert_array_equal(
      sharded.generate(ids, mask, max_new_tokens=N),
      lm.generate(ids, mask, max_new_tokens=N))


def test_real_checkpoint_configs_and_rope_frequencies():
  """transformers 4 style config.json files (`rope_theta`, `rope_scaling`)
  of real shapes: Llama 3.1's llama3 RoPE frequencies at head_dim 128 equal
  transformers' own; Qwen2.5's EOS list comes from generation_config.json."""
  llama = {"model_type": "llama", "hidden_size": 4096,
           "num_attention_heads": 32, "num_key_value_heads": 8,
           "rope_theta": 500000.0, "eos_token_id": 128001,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192,
                            "rope_type": "llama3"}}
  ours = models.DecoderConfig.from_hf_dict(llama)
  hf_config = transformers.LlamaConfig(**llama)
  want, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](
      hf_config)
  np.testing.assert_allclose(ours.inv_freq(), want.numpy(), rtol=1e-6)
  assert ours.head_dim == 128 and ours.eos_token_id == (128001,)
  qwen = {"model_type": "qwen2", "hidden_size": 896,
          "num_attention_heads": 14, "num_key_value_heads": 2,
          "rope_theta": 1000000.0, "rope_scaling": None,
          "use_sliding_window": False, "sliding_window": 32768,
          "tie_word_embeddings": True, "eos_token_id": 151645}
  ours = models.DecoderConfig.from_hf_dict(
      qwen, {"eos_token_id": [151645, 151643], "pad_token_id": 151643})
  assert ours.eos_token_id == (151645, 151643)
  assert ours.pad_token_id == 151643 and ours.qkv_bias and not ours.o_bias
  assert ours.head_dim == 64 and ours.rope_type == "default"
  with pytest.raises(ValueError, match="sliding-window attention"):
    models.DecoderConfig.from_hf_dict({**qwen, "use_sliding_window": True})
