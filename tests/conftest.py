"""Test-session set-up: 8 fake CPU devices so sharding tests see a real mesh.

The flag must be in the environment before jax initialises its backend, which is
why it is set here, at import time of the first conftest.
"""
import os
import tempfile

# The tests check numbers, not speed, and most of their time is XLA
# compiling: without LLVM optimisation it compiles about a third faster here
# (e.g. the tiny RL step 14.2 s -> 9.3 s). Subprocesses get the same flags
# through `xla_flags`.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


for _flag in ("--xla_force_host_platform_device_count=8", FAST_COMPILE):
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session: the pipeline tests run
# the same stages several times (and in subprocesses, which inherit this).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="ketchup-jax-cache-"))


def save_random_llama(directory: str, *, layers: int, vocab: int):
  """A random HF Llama (untied, GQA 4 / 2 heads, width 32) with every weight
  drawn (norm scales near 1, the rest N(0, 0.15^2)), saved to `directory`;
  returns the torch model."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=48,
      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
      eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
      attn_implementation="eager")).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      p.copy_((1 + 0.2 * torch.randn_like(p)) if "norm" in key else
              0.15 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model
