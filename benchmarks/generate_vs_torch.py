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
the two are timed alternately (a shared machine's slow phases then hit both),
and the best and median of the repeats are reported.

Usage:
  .venv/bin/python benchmarks/generate_vs_torch.py [--batch 32]
      [--new_tokens 64] [--src_len 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from ketchup_jax import models


def _interleaved_times(fns: dict[str, Callable[[], Any]],
                       repeats: int) -> tuple[dict[str, list[float]],
                                              dict[str, Any]]:
  """Warms each function up once, then times them alternately `repeats` times.

  Alternating keeps slow phases of a shared machine from landing on one side.
  """
  outputs = {name: fn() for name, fn in fns.items()}  # Warm-up / compile.
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      outputs[name] = fn()
      times[name].append(time.perf_counter() - start)
  return times, outputs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--src_len", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
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

  times, outs = _interleaved_times({"jax": run_jax, "torch": run_torch},
                                    args.repeats)
  out_jax = np.asarray(outs["jax"])
  out_torch = outs["torch"].numpy()[:, 1:]  # Drop the decoder start token.
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
      "jax_seconds_each_run": [round(t, 3) for t in times["jax"]],
      "torch_seconds_each_run": [round(t, 3) for t in times["torch"]],
      "jax_tokens_per_s_best": round(tokens / min(times["jax"]), 1),
      "torch_tokens_per_s_best": round(tokens / min(times["torch"]), 1),
      "jax_tokens_per_s_median": round(tokens / np.median(times["jax"]), 1),
      "torch_tokens_per_s_median": round(
          tokens / np.median(times["torch"]), 1),
      "greedy_tokens_equal_fraction": float(np.mean(out_jax == out_torch)),
  }, indent=2))


if __name__ == "__main__":
  main()
