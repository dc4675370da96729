"""T5 model and HF import/export against random tiny transformers T5 models."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from ketchup_jax import models
from ketchup_jax.models import hf_io
from ketchup_jax.models import t5
from ketchup_jax.models.config import T5Config


def make_hf_model(
    directory: str,
    *,
    tied: bool,
    vocab_size: int = 131,
    d_model: int = 32,
    d_kv: int = 8,
    d_ff: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    num_decoder_layers: int = 2,
    seed: int = 0,
):
  """A random tiny `T5ForConditionalGeneration` saved by transformers.

  `tied=True` is T5 v1.0 (ReLU, tied + scaled output); `tied=False` is T5 v1.1
  (gated-GELU, separate `lm_head`). Norm scales and output projections are
  perturbed so that greedy decoding does not just copy its input token.

  Returns:
    The PyTorch model as reloaded from `directory` (eval mode).
  """
  cfg = transformers.T5Config(
      vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff,
      num_layers=num_layers, num_decoder_layers=num_decoder_layers,
      num_heads=num_heads, feed_forward_proj="relu" if tied else "gated-gelu",
      tie_word_embeddings=tied, decoder_start_token_id=0,
      relative_attention_num_buckets=8, relative_attention_max_distance=20)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith((".o.weight", ".wo.weight")):
        p.mul_(4.0)
  if not tied:
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.lm_head.weight.shape, generator=gen))
  model.save_pretrained(directory)
  return transformers.T5ForConditionalGeneration.from_pretrained(
      directory).eval()


def random_batch(seed: int, *, vocab: int, batch: int = 3, src: int = 11,
                 tgt: int = 9):
  """Encoder / decoder ids with right padding in some rows."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, (batch, src))
  mask = np.ones_like(ids)
  mask[1, src - 4:] = 0
  dec = rng.integers(2, vocab, (batch, tgt))
  dec[:, 0] = 0
  dmask = np.ones_like(dec)
  dmask[-1, tgt // 2:] = 0
  return ids, mask, dec, dmask


def torch_logits(model, ids, mask, dec, dmask) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids),
                 attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec),
                 decoder_attention_mask=torch.tensor(dmask)).logits.numpy()


# Shapes: (tied, vocab, d_model, d_kv, d_ff, heads, enc layers, dec layers,
# src len, tgt len). Source length 30 reaches the logarithmic buckets.
SHAPES = [
    (True, 101, 48, 16, 80, 3, 1, 3, 30, 7),
    (False, 257, 32, 8, 64, 4, 2, 2, 11, 9),
    (False, 199, 64, 16, 96, 4, 3, 1, 30, 25),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_logits_match_torch(tmp_path, shape):
  tied, vocab, d_model, d_kv, d_ff, heads, layers, dec_layers, src, tgt = shape
  ref = make_hf_model(str(tmp_path), tied=tied, vocab_size=vocab,
                      d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
                      num_layers=layers, num_decoder_layers=dec_layers)
  lm = models.load(str(tmp_path), dtype=jnp.float32)
  assert lm.config.tie_word_embeddings == tied
  assert lm.config.scale_decoder_outputs == tied
  assert lm.config.is_gated_act == (not tied)
  assert "lm_head" in lm.params if not tied else "lm_head" not in lm.params
  batch = random_batch(1, vocab=vocab, src=src, tgt=tgt)
  want = torch_logits(ref, *batch)
  got = np.asarray(lm.logits(*batch))
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_relative_position_buckets_match_torch():
  rel = np.arange(-300, 301)[None, :]
  fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 20), (16, 64)):
      want = fn(torch.tensor(rel), bidirectional=bidirectional,
                num_buckets=buckets, max_distance=distance).numpy()
      got = t5.relative_position_bucket(rel, bidirectional=bidirectional,
                                        num_buckets=buckets,
                                        max_distance=distance)
      np.testing.assert_array_equal(got, want)


def test_save_pretrained_round_trip_through_torch(tmp_path):
  for tied in (True, False):
    src, dst = tmp_path / f"src{tied}", tmp_path / f"dst{tied}"
    ref = make_hf_model(str(src), tied=tied, vocab_size=151)
    lm = models.load(str(src), dtype=jnp.float32)
    lm.save_pretrained(str(dst))
    back = transformers.T5ForConditionalGeneration.from_pretrained(
        str(dst)).eval()
    assert back.config.scale_decoder_outputs == tied
    assert (back.lm_head.weight.data_ptr() ==
            back.shared.weight.data_ptr()) == tied
    want_sd, got_sd = ref.state_dict(), back.state_dict()
    assert set(want_sd) == set(got_sd)
    for key, value in want_sd.items():
      np.testing.assert_array_equal(got_sd[key].numpy(), value.numpy(),
                                    err_msg=key)
    batch = random_batch(2, vocab=151)
    np.testing.assert_allclose(torch_logits(back, *batch),
                               torch_logits(ref, *batch), atol=1e-6, rtol=0)
    # And our reload of our export is the same model.
    again = models.load(str(dst), dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, again.params, lm.params)


def test_init_from_scratch_exports_to_torch(tmp_path):
  for size in ("tiny",):
    lm = models.init(size, jax.random.key(3), dtype=jnp.float32,
                     vocab_size=97)
    lm.save_pretrained(str(tmp_path / size))
    ref = transformers.T5ForConditionalGeneration.from_pretrained(
        str(tmp_path / size)).eval()
    batch = random_batch(4, vocab=97)
    np.testing.assert_allclose(np.asarray(lm.logits(*batch)),
                               torch_logits(ref, *batch), atol=1e-4, rtol=0)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
  ref = make_hf_model(str(tmp_path / "single"), tied=False, vocab_size=113)
  ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="30KB")
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
  (bin_dir / "config.json").write_text(
      (tmp_path / "single" / "config.json").read_text())
  copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  bf16 = models.load(str(tmp_path / "bf16"), dtype=jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(bf16.params["shared"]["embedding"]),
      ref.shared.weight.detach().to(torch.bfloat16).float().numpy())
  batch = random_batch(5, vocab=113)
  want = torch_logits(ref, *batch)
  for name in ("single", "sharded", "bin"):
    lm = models.load(str(tmp_path / name), dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(lm.logits(*batch)), want,
                               atol=1e-4, rtol=0, err_msg=name)


def test_missing_unexpected_and_bad_shape_keys_are_named():
  config = models.get_config("t5-tiny", vocab_size=50)
  good = hf_io.params_to_hf(
      jax.tree.map(np.asarray, t5.init_params(config, jax.random.key(0))),
      config)
  state = dict(good)
  del state["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  state["encoder.block.9.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32))
  state["some.other.weight"] = np.zeros(3)
  with pytest.raises(ValueError) as err:
    hf_io.hf_to_params(state, config)
  msg = str(err.value)
  assert "decoder/layers_1/mlp/wo" in msg
  assert "encoder.block.9.layer.0.SelfAttention.q.weight" in msg
  assert "some.other.weight" in msg
  state = dict(good)
  state["encoder.final_layer_norm.weight"] = np.ones(33, np.float32)
  with pytest.raises(ValueError, match=r"encoder.final_layer_norm.weight: got"
                     r" \(33,\).*expected \(32,\)"):
    hf_io.hf_to_params(state, config)


def test_hub_name_offline_fails_clearly():
  with pytest.raises(FileNotFoundError, match="could not be fetched"):
    models.load("no-such-org-ketchup/no-such-t5", local_files_only=True)


def test_config_from_hf_json_and_sizes(tmp_path):
  # An old-style FLAN-T5 config (no scale_decoder_outputs key).
  flan = {"model_type": "t5", "d_model": 512, "d_ff": 1024, "d_kv": 64,
          "num_heads": 6, "num_layers": 8, "num_decoder_layers": 8,
          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
          "vocab_size": 32128}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(flan))
  cfg = T5Config.from_json_file(path)
  assert cfg == models.get_config("small")
  assert cfg.dense_act_fn == "gelu_new" and not cfg.scale_decoder_outputs
  assert T5Config.from_hf_dict({"model_type": "t5"}) == models.get_config(
      "t5-small")
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown T5 size 'huge'"):
    models.get_config("huge")
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config.from_hf_dict({"feed_forward_proj": "gelu-gated-x"})
  # Parameter counts equal transformers' for real model shapes.
  for size, tied in (("small", False), ("t5-small", True), ("xl", False)):
    ours = models.get_config(size)
    with torch.device("meta"):
      ref = transformers.T5ForConditionalGeneration(transformers.T5Config(
          **{k: v for k, v in ours.to_hf_dict().items()
             if k not in ("architectures", "dtype")}))
    if not tied:
      ref.lm_head.weight = torch.nn.Parameter(
          torch.empty(ref.lm_head.weight.shape, device="meta"))
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(x.size for x in jax.tree.leaves(t5.param_shapes(ours)))
    assert n_ours == n_ref, size


def test_bf16_compute_keeps_f32_params(tmp_path):
  ref = make_hf_model(str(tmp_path), tied=False, vocab_size=131)
  lm = models.load(str(tmp_path), dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lm.params))
  batch = random_batch(6, vocab=131)
  got = np.asarray(lm.logits(*batch))
  want = torch_logits(ref, *batch)
  assert got.dtype == np.float32
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 0.05 * scale
  assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.9


def test_logical_axes_cover_every_parameter():
  config = models.get_config("tiny")
  axes = t5.logical_axes(config)
  shapes = t5.param_shapes(config)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_axes) == len(flat_shapes)
  allowed = {"embed", "mlp", "heads", "kv", "vocab", "relpos_buckets"}
  for a, s in zip(flat_axes, flat_shapes):
    assert len(a) == len(s.shape) and set(a) <= allowed
  assert axes["shared"]["embedding"] == ("vocab", "embed")
  assert axes["lm_head"]["kernel"] == ("embed", "vocab")
  assert axes["encoder"]["layers_0"]["self_attention"]["q"] == (
      "embed", "heads", "kv")
  assert axes["decoder"]["relpos_bias"]["embedding"] == (
      "relpos_buckets", "heads")


def test_shift_right_follows_hf():
  config = models.get_config("tiny")
  labels = np.array([[5, 6, 1, 0], [7, 1, 0, 0]])
  # pylint: disable-next=protected-access
  want = transformers.T5ForConditionalGeneration._shift_right(
      transformers.T5ForConditionalGeneration(transformers.T5Config(
          vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=2,
          decoder_start_token_id=0)), torch.tensor(labels)).numpy()
  np.testing.assert_array_equal(np.asarray(t5.shift_right(labels, config)),
                                want)
  np.testing.assert_array_equal(want, [[0, 5, 6, 1], [0, 7, 1, 0]])
