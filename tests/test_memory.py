"""The memory estimate's inputs against real models, and remat's numerics."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ketchup_jax import memory
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.models import config as config_lib
from ketchup_jax.models import t5

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _hf_count(cfg):
  """Parameters of PyTorch `T5ForConditionalGeneration`, built on no memory.

  Counted as HF checkpoints store them: the encoder's and decoder's token
  embeddings are the shared one, and a tied LM head is that one too.
  """
  hf = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
      d_ff=cfg.d_ff, num_layers=cfg.num_layers,
      num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
      feed_forward_proj=cfg.feed_forward_proj,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets)
  hf.tie_word_embeddings = cfg.tie_word_embeddings
  with torch.device("meta"):
    model = transformers.T5ForConditionalGeneration(hf)
  skip = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  if cfg.tie_word_embeddings:
    skip.add("lm_head.weight")
  return sum(p.numel() for n, p in model.named_parameters(
      remove_duplicate=False) if n not in skip)


@pytest.mark.parametrize("name", ["xl", "base", "large", "t5-base",
                                  "t5-large", "tiny", "t5-tiny"])
def test_param_count_equals_transformers_and_our_shapes(name):
  cfg = config_lib.get_config(name)
  count = memory.param_count(cfg)
  assert count == _hf_count(cfg)
  assert count == sum(int(np.prod(x.shape)) for x in
                      jax.tree.leaves(t5.param_shapes(cfg)))


@pytest.mark.parametrize("mesh_shape, vocab", [((2, 2, 2), 130),
                                               ((1, 8, 1), 131),
                                               ((1, 4, 2), 128)])
def test_per_device_elements_equal_placed_shards(mesh_shape, vocab):
  data, fsdp, tensor = mesh_shape
  mesh = partitioning.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
  lm = models.init("tiny", jax.random.key(0), mesh=mesh, vocab_size=vocab)
  device = jax.devices()[0]
  on_device = sum(
      next(s.data.size for s in x.addressable_shards if s.device == device)
      for x in jax.tree.leaves(lm.params))
  largest = max(x.size for x in jax.tree.leaves(lm.params))
  assert memory.sharded_param_elements(
      lm.config, data=data, fsdp=fsdp, tensor=tensor) == (on_device, largest)


def test_rl_step_bytes_parts_and_remat_order():
  teacher = config_lib.get_config("xl")
  student = config_lib.get_config("t5-base")
  kw = dict(devices=8, global_batch=16, source_len=512, target_len=128)
  parts = {r: memory.rl_step_bytes(teacher, student, remat=r, **kw)
           for r in ("none", "minimal", "full")}
  none = parts["none"]
  # Pure FSDP over 8 devices: bf16 teacher and 16-byte student state, each
  # an eighth of the whole (every large weight divides by 8).
  assert none["teacher params"] == pytest.approx(
      memory.param_count(teacher) * 2 / 8, rel=1e-3)
  assert none["student params+grads+adam"] == pytest.approx(
      memory.param_count(student) * 16 / 8, rel=1e-3)
  assert none["total"] == sum(v for k, v in none.items() if k != "total")
  assert (parts["full"]["activations"] < parts["minimal"]["activations"]
          < none["activations"])
  with pytest.raises(ValueError, match="global_batch=12 must be a multiple "
                     "of the device count 8"):
    memory.rl_step_bytes(teacher, student, remat="none",
                         **dict(kw, global_batch=12))


def test_chunked_logits_term():
  student = config_lib.get_config("t5-base")
  kw = dict(batch=2, source_len=64, target_len=100)
  whole = memory.activation_bytes(student, **kw)
  # Three float32 [b, positions, V] buffers: 100 positions whole, 32 chunked;
  # a chunk of at least T is the whole sequence.
  assert whole - memory.activation_bytes(student, logits_chunk=32, **kw) == (
      3 * 4 * 2 * (100 - 32) * 32128)
  assert memory.activation_bytes(student, logits_chunk=500, **kw) == whole
  assert memory.main(["--logits_chunk=-1"]) == 2


def test_table_command_prints_every_machine(capsys):
  assert memory.main(["--batch=16"]) == 0
  t5_part, decoder_part = capsys.readouterr().out.split("Decoder-only pairs")
  for acc in memory.ACCELERATORS:
    assert t5_part.count(acc.name) == 2  # t5-base and t5-large rows
  for acc in memory.ACCELERATORS[1:]:  # v5e-16 and 8x H100
    assert decoder_part.count(acc.name) == 2  # the Qwen and Llama pairs
  assert memory.main(["--batch=12"]) == 2


def test_remat_gives_the_same_loss_and_gradients():
  cfg = models.get_config("tiny", dtype=jnp.float32, num_layers=1,
                          num_decoder_layers=1)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 128, (3, 7))
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  dec = rng.integers(2, 128, (3, 5))
  targets = rng.integers(2, 128, (3, 5))

  def loss(p, c):
    logits = t5.forward(p, c, ids, mask, dec)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  matmuls = lambda c: grad_fn.lower(params, c).as_text().count("dot_general")
  want = grad_fn(params, cfg)
  for policy in ("full", "minimal"):
    remat_cfg = cfg.replace(remat=policy)
    got = grad_fn(params, remat_cfg)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Remat really recomputes: the backward pass has more matmuls.
    assert matmuls(remat_cfg) > matmuls(cfg), policy
  with pytest.raises(ValueError, match="remat must be one of"):
    cfg.replace(remat="some")


def test_readme_table_is_the_generated_one():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
            ).read_text()
  assert memory.table() in readme


@pytest.mark.parametrize("name", ["qwen1.5-0.5b", "qwen1.5-4b", "qwen2.5-0.5b",
                                  "qwen2.5-1.5b", "llama-3-8b",
                                  "llama-3.2-1b", "qwen2-tiny", "qwen3-tiny"])
def test_decoder_param_count_equals_transformers_and_our_shapes(name):
  cfg = models.get_decoder_config(name)
  kind = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
          "llama": transformers.LlamaConfig}[cfg.model_type]
  hf = kind(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf)
  want = sum(p.numel() for p in model.parameters())  # a tied head once
  assert memory.param_count(cfg) == want
  assert memory.param_count(cfg) == sum(
      math.prod(x.shape) for x in jax.tree.leaves(
          models.family.param_shapes(cfg)))


def test_readme_decoder_table_is_the_generated_one():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
            ).read_text()
  assert memory.decoder_table() in readme


@pytest.mark.parametrize("name", ["qwen1.5-0.5b", "t5-large"])
def test_lora_adapter_count_equals_peft(name):
  """The LoRA table's adapter numbers: PEFT's trainable parameters on the
  HF model (built on no memory), rank 16 on every attention / MLP kernel."""
  peft = pytest.importorskip("peft")
  from ketchup_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  if name.startswith("t5"):
    cfg = config_lib.get_config(name)
    hf = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
        d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
        feed_forward_proj=cfg.feed_forward_proj)
    targets = ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]
  else:
    cfg = models.get_decoder_config(name)
    hf = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        tie_word_embeddings=cfg.tie_word_embeddings)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj"]
  with torch.device("meta"):
    model = peft.get_peft_model(
        transformers.AutoModelForSeq2SeqLM.from_config(hf) if name.startswith(
            "t5") else transformers.AutoModelForCausalLM.from_config(hf),
        peft.LoraConfig(r=16, target_modules=targets))
  want = sum(p.numel() for p in model.parameters() if p.requires_grad)
  assert lora_lib.adapter_count(cfg, lora_lib.LoraConfig(rank=16)) == want
  parts = memory.lora_state_bytes(cfg, rank=16, devices=8, base_bytes=2)
  assert parts["adapters+grads+adam"] == 16 * want
  local, _ = memory.sharded_param_elements(cfg, fsdp=8)
  assert parts["base"] == 2 * local
  assert parts["merged in the step"] == 4 * local  # every leaf in float32


def test_readme_lora_table_is_the_generated_one():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
            ).read_text()
  assert memory.lora_table() in readme
