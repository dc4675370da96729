"""Rollout throughput: ketchup_jax `T5LM.generate` vs transformers `generate`.

One random-weight T5 checkpoint per shape is written by transformers
(`save_pretrained`) and loaded by both sides from that directory: T5-small
(d_model 512, 6+6 layers) and T5-base (768, 12+12) shapes, T5 v1.0 layout,
float32. For batch {8, 32} x new tokens {64, 128} x {greedy, sampled}
(temperature 1, no top-k / top-p) both sides generate exactly the same number
of tokens: transformers with `min_new_tokens = max_new_tokens`, ours with the
config's `eos_token_id = -1` (no row stops), and the output shapes are
checked. Greedy outputs are compared token for token.

Per configuration: a warm-up of each side (ours: compilation + one run;
PyTorch: a 4-token generate), then `--repeats` alternating timed runs
(default 2, so that the full default grid fits in `make bench` on a 2-core
CPU; see benchmarks/NOTES.md); tokens/s from the median. Prints a table
and writes benchmarks/results/rollout.json.

    python -m benchmarks.rollout [--device=cpu|gpu|tpu] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile

from benchmarks import common


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--src_len", type=int, default=32)
  parser.add_argument("--shapes", default="t5-small,t5-base")
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--new_tokens", default="64,128")
  args = parser.parse_args(argv)
  if args.quick:
    args.shapes, args.batches, args.new_tokens = "tiny-small", "2", "8"
    args.repeats, args.src_len = 1, 8

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ketchup_jax import models  # pylint: disable=g-import-not-at-top

  common.set_torch_threads(args.threads)
  device = common.jax_device(args.device)
  tdev = common.torch_device(args.device)
  info = common.machine_info(args.device)
  print(f"rollout: jax {info.get('jax_device_kind')} vs torch {tdev}"
        f" ({info.get('torch_threads')} threads), load {info['load_average_start']}")
  rows = []
  for shape in args.shapes.split(","):
    with tempfile.TemporaryDirectory() as d:
      common.save_random_t5(shape, d, seed=0)
      ref = transformers.T5ForConditionalGeneration.from_pretrained(d)
      ref = ref.to(tdev).eval()
      with jax.default_device(device):
        lm = models.load(d, dtype=jnp.float32)
    lm = models.T5LM(config=lm.config.replace(eos_token_id=-1),
                     params=lm.params)
    vocab = lm.config.vocab_size
    for batch, new, mode in itertools.product(
        [int(b) for b in args.batches.split(",")],
        [int(n) for n in args.new_tokens.split(",")], ("greedy", "sampled")):
      rng = np.random.default_rng(batch * 1000 + new)
      ids = rng.integers(2, vocab, (batch, args.src_len))
      mask = np.ones_like(ids)
      temperature = 0.0 if mode == "greedy" else 1.0
      key = jax.random.key(1)
      t_ids = torch.tensor(ids, device=tdev)
      t_mask = torch.tensor(mask, device=tdev)

      def run_jax():
        with jax.default_device(device):
          return np.asarray(jax.block_until_ready(lm.generate(
              ids, mask, max_new_tokens=new, temperature=temperature,
              rng=key)))

      def run_torch(new=new):
        with torch.inference_mode():
          kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
          out = ref.generate(
              input_ids=t_ids, attention_mask=t_mask, num_beams=1,
              max_new_tokens=new, min_new_tokens=new,
              **(kw if mode == "sampled" else dict(do_sample=False)))
          if tdev == "cuda":
            torch.cuda.synchronize()
          return out[:, 1:].cpu().numpy()  # Without the decoder start token.

      # PyTorch compiles nothing: its warm-up (allocator, kernels for these
      # shapes) is a short generate; ours compiles for the exact length.
      warm, times, outs = common.interleaved(
          {"jax": run_jax, "torch": run_torch}, args.repeats,
          warmups={"torch": lambda: run_torch(new=min(new, 4))})
      if outs["jax"].shape != outs["torch"].shape:
        raise RuntimeError(f"token counts differ: jax {outs['jax'].shape},"
                           f" torch {outs['torch'].shape}")
      tokens = batch * new
      jax_tps = tokens / common.median(times["jax"])
      torch_tps = tokens / common.median(times["torch"])
      # Per-repetition ratios of the interleaved pairs, and their median.
      pair_ratios = [t / j for j, t in zip(times["jax"], times["torch"])]
      row = {
          "shape": shape, "batch": batch, "new_tokens": new, "mode": mode,
          "src_len": args.src_len, "tokens_per_run": tokens,
          "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
          "ratio": jax_tps / torch_tps,
          "ratio_median_of_pairs": common.median(pair_ratios),
          "jax_warmup_s": warm["jax"], "torch_warmup_s": warm["torch"],
          "jax_s": times["jax"], "torch_s": times["torch"],
      }
      if mode == "greedy":
        row["greedy_equal_fraction"] = float(
            np.mean(outs["jax"] == outs["torch"]))
      rows.append(row)
      print(f"  {shape} B={batch} T={new} {mode}: jax {jax_tps:.0f} tok/s,"
            f" torch {torch_tps:.0f} tok/s, x{row['ratio_median_of_pairs']:.2f}",
            flush=True)
  common.print_table(
      "rollout: generate tokens/s (median of repetitions)",
      [("shape", "shape", "s"), ("batch", "B", "d"),
       ("new_tokens", "new", "d"), ("mode", "mode", "s"),
       ("jax_tokens_per_s", "jax tok/s", ".1f"),
       ("torch_tokens_per_s", "torch tok/s", ".1f"),
       ("ratio_median_of_pairs", "ratio", ".2f"),
       ("jax_warmup_s", "jax warm s", ".1f"),
       ("greedy_equal_fraction", "greedy eq", ".3f")], rows)
  common.write_json("rollout", {
      **info, "repeats": args.repeats, "dtype": "float32",
      "note": "ratio = jax tokens/s / torch tokens/s; jax warm-up includes"
              " compilation", "rows": rows}, args.out)


if __name__ == "__main__":
  main()
