"""Greedy decoding throughput: ketchup_jax T5 `generate` vs transformers (torch).

Builds one random T5-small-shaped model in PyTorch (d_model 512, 6 + 6 layers,
8 heads, d_ff 2048, vocab 32128; T5 v1.0 layout), saves it with
`save_pretrained`, loads the same directory with `ketchup_jax.models.load`, and
times greedy generation of exactly `--new_tokens` tokens for `--batch` rows on
both, in one process, in float32.

Both sides are forced to produce the same number of tokens: transformers with
`min_new_tokens = max_new_tokens` (EOS is masked until the last step), ours
with `eos_token_id = -1` in the config (no row ever stops). Each side is run
once to warm up (JAX compilation, PyTorch allocator), then `--repeats` times;
the best time is reported.

Usage:
  .venv/bin/python benchmarks/generate_vs_torch.py [--batch 32]
      [--new_tokens 64] [--src_len 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from ketchup_jax import models


def _best_time(fn, repeats: int) -> tuple[float, object]:
  out = fn()  # Warm-up (compilation for JAX).
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--src_len", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
      num_decoder_layers=6, num_heads=8, feed_forward_proj="relu",
      decoder_start_token_id=0)
  ref = transformers.T5ForConditionalGeneration(cfg).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(2, cfg.vocab_size, (args.batch, args.src_len))
  mask = np.ones_like(ids)

  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    lm = models.load(d, dtype=jnp.float32)
  lm = models.T5LM(config=lm.config.replace(eos_token_id=-1),
                   params=lm.params)

  def run_jax():
    return jax.block_until_ready(
        lm.generate(ids, mask, max_new_tokens=args.new_tokens))

  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)

  def run_torch():
    with torch.inference_mode():
      return ref.generate(input_ids=t_ids, attention_mask=t_mask,
                          do_sample=False, num_beams=1,
                          max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens)

  t_jax, out_jax = _best_time(run_jax, args.repeats)
  t_torch, out_torch = _best_time(run_torch, args.repeats)
  out_jax = np.asarray(out_jax)
  out_torch = out_torch.numpy()[:, 1:]  # Drop the decoder start token.
  if out_jax.shape != out_torch.shape:
    raise RuntimeError(f"token counts differ: jax {out_jax.shape}, torch"
                       f" {out_torch.shape}")
  tokens = args.batch * args.new_tokens
  print(json.dumps({
      "device_jax": str(jax.devices()[0]),
      "torch_threads": torch.get_num_threads(),
      "cpu_count": os.cpu_count(),
      "batch": args.batch,
      "new_tokens": args.new_tokens,
      "src_len": args.src_len,
      "jax_seconds": round(t_jax, 3),
      "torch_seconds": round(t_torch, 3),
      "jax_tokens_per_s": round(tokens / t_jax, 1),
      "torch_tokens_per_s": round(tokens / t_torch, 1),
      "speedup_jax_over_torch": round(t_torch / t_jax, 2),
      "greedy_tokens_equal_fraction": float(np.mean(out_jax == out_torch)),
  }, indent=2))


if __name__ == "__main__":
  main()
