"""Rollout throughput: ketchup_jax `generate` vs transformers `generate`.

One random-weight checkpoint per shape is written by transformers
(`save_pretrained`) and loaded by both sides from that directory: T5-small
(d_model 512, 6+6 layers) and T5-base (768, 12+12) shapes, T5 v1.0 layout,
and the decoder-only `qwen2-small` (Qwen2 layout, 512 wide, 8 layers,
grouped-query attention, vocabulary 8192: `common.DECODER_SHAPES`), all
float32. For batch {8, 32} x new tokens {64, 128} x {greedy, sampled}
(temperature 1, no top-k / top-p) both sides generate exactly the same number
of tokens: transformers with `min_new_tokens = max_new_tokens`, ours with the
config's EOS disabled (no row stops), and the output shapes are checked.
Greedy outputs are compared token for token.

T5 rows also time the sampler as it was before the model-family refactor
(`--old_sampler`, default the commit before it, 4afceea^: the T5-only
`ketchup_jax/models/sampling.py`, read with `git show` and run on today's
T5 model code, which that refactor did not change), interleaved with
today's family-agnostic one in the same repetitions: `old_over_new` is old
seconds / new seconds per pair (> 1: today's is faster), and their tokens are
compared (same key).

Per configuration: a warm-up of each side (ours: compilation + one run;
PyTorch: a 4-token generate), then `--repeats` alternating timed runs
(default 2, so that the full default grid fits in `make bench` on a 2-core
CPU; see benchmarks/NOTES.md); tokens/s from the median. Prints a table
and writes benchmarks/results/rollout.json.

    python -m benchmarks.rollout [--device=cpu|gpu|tpu] [--repeats 2] [--quick]
        [--shapes t5-small,t5-base,qwen2-small] [--old_sampler REV|none]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import pathlib
import subprocess
import sys
import tempfile

from benchmarks import common


# The commit before the model-family refactor (4afceea): its sampler is the
# T5-only one.
OLD_SAMPLER_REV = "4afceea^"


def load_old_sampler(rev: str):
  """`ketchup_jax/models/sampling.py` at git revision `rev`, as a module
  (`_old_sampling_<rev>`) importing today's package; None if git cannot
  show it (no git, a shallow clone)."""
  root = pathlib.Path(__file__).resolve().parent.parent
  path = "ketchup_jax/models/sampling.py"
  try:
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    print(f"--old_sampler={rev}: cannot read {path} there ({e}); skipped")
    return None
  name = "_old_sampling_" + "".join(c if c.isalnum() else "_" for c in rev)
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_loader(name, loader=None))
  sys.modules[name] = module
  exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--src_len", type=int, default=32)
  parser.add_argument("--shapes", default="t5-small,t5-base,qwen2-small")
  parser.add_argument("--old_sampler", default=OLD_SAMPLER_REV,
                      help="git revision whose T5-only sampler is timed next"
                      " to today's on the T5 rows; 'none' skips it.")
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--new_tokens", default="64,128")
  args = parser.parse_args(argv)
  if args.quick:
    args.shapes, args.batches = "tiny-small,tiny-qwen2-small", "2"
    args.new_tokens = "8"
    args.repeats, args.src_len = 1, 8

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ketchup_jax import models  # pylint: disable=g-import-not-at-top

  common.set_torch_threads(args.threads)
  device = common.jax_device(args.device)
  tdev = common.torch_device(args.device)
  info = common.machine_info(args.device)
  print(f"rollout: jax {info.get('jax_device_kind')} vs torch {tdev}"
        f" ({info.get('torch_threads')} threads), load {info['load_average_start']}")
  shapes = args.shapes.split(",")
  for shape in shapes:
    common.is_decoder(shape)  # A clear error for an unknown shape.
  old = (None if args.old_sampler == "none" or
         all(common.is_decoder(s) for s in shapes)
         else load_old_sampler(args.old_sampler))
  old_jit = old and jax.jit(old.sample, static_argnames=(
      "config", "mesh", "rules", "max_new_tokens"))
  rows = []
  for shape in shapes:
    decoder_only = common.is_decoder(shape)
    with tempfile.TemporaryDirectory() as d:
      common.save_random(shape, d, seed=0)
      ref = common.load_torch(shape, d).to(tdev)
      with jax.default_device(device):
        lm = models.load(d, dtype=jnp.float32)
    lm = type(lm)(config=common.no_eos(lm.config), params=lm.params)
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

      def run_old():
        with jax.default_device(device):
          return np.asarray(jax.block_until_ready(old_jit(
              lm.params, lm.config, jnp.asarray(ids, jnp.int32),
              jnp.asarray(mask, jnp.int32), key, max_new_tokens=new,
              temperature=temperature).tokens))

      def run_torch(new=new):
        with torch.inference_mode():
          kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
          out = ref.generate(
              input_ids=t_ids, attention_mask=t_mask, num_beams=1,
              max_new_tokens=new, min_new_tokens=new,
              **(kw if mode == "sampled" else dict(do_sample=False)))
          if tdev == "cuda":
            torch.cuda.synchronize()
          # Without the decoder start token (T5) or the prompt.
          return out[:, ids.shape[1] if decoder_only else 1:].cpu().numpy()

      # PyTorch compiles nothing: its warm-up (allocator, kernels for these
      # shapes) is a short generate; ours compiles for the exact length.
      old_side = {} if decoder_only or not old else {"jax_old": run_old}
      warm, times, outs = common.interleaved(
          {"jax": run_jax, **old_side, "torch": run_torch}, args.repeats,
          warmups={"torch": lambda: run_torch(new=min(new, 4))})
      if outs["jax"].shape != outs["torch"].shape:
        raise RuntimeError(f"token counts differ: jax {outs['jax'].shape},"
                           f" torch {outs['torch'].shape}")
      tokens = batch * new
      jax_tps = tokens / common.median(times["jax"])
      torch_tps = tokens / common.median(times["torch"])
      # Per-repetition ratios of the interleaved pairs: median, quartiles.
      row = {
          "shape": shape, "family": "decoder" if decoder_only else "t5",
          "batch": batch, "new_tokens": new, "mode": mode,
          "src_len": args.src_len, "tokens_per_run": tokens,
          "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
          "ratio": jax_tps / torch_tps,
          **common.ratio_stats(times["torch"], times["jax"]),
          "jax_warmup_s": warm["jax"], "torch_warmup_s": warm["torch"],
          "jax_s": times["jax"], "torch_s": times["torch"],
      }
      if old_side:
        row["old_sampler_rev"] = args.old_sampler
        row["jax_old_s"] = times["jax_old"]
        row["jax_old_tokens_per_s"] = tokens / common.median(times["jax_old"])
        row.update(common.ratio_stats(times["jax_old"], times["jax"],
                                      prefix="old_over_new"))
        row["old_tokens_equal_fraction"] = float(
            np.mean(outs["jax_old"] == outs["jax"]))
      if mode == "greedy":
        row["greedy_equal_fraction"] = float(
            np.mean(outs["jax"] == outs["torch"]))
      rows.append(row)
      print(f"  {shape} B={batch} T={new} {mode}: jax {jax_tps:.0f} tok/s,"
            f" torch {torch_tps:.0f} tok/s, x{row['ratio_median_of_pairs']:.2f}"
            + (f"; pre-refactor sampler {row['jax_old_tokens_per_s']:.0f}"
               f" tok/s, old/new x{row['old_over_new_median_of_pairs']:.2f}"
               if old_side else ""), flush=True)
  common.print_table(
      "rollout: generate tokens/s (median of repetitions)",
      [("shape", "shape", "s"), ("batch", "B", "d"),
       ("new_tokens", "new", "d"), ("mode", "mode", "s"),
       ("jax_tokens_per_s", "jax tok/s", ".1f"),
       ("torch_tokens_per_s", "torch tok/s", ".1f"),
       ("ratio_median_of_pairs", "ratio", ".2f"),
       ("ratio_iqr", "ratio IQR", ".2f"),
       ("jax_warmup_s", "jax warm s", ".1f"),
       ("greedy_equal_fraction", "greedy eq", ".3f"),
       ("jax_old_tokens_per_s", "old tok/s", ".1f"),
       ("old_over_new_median_of_pairs", "old/new", ".2f"),
       ("old_over_new_iqr", "old/new IQR", ".2f"),
       ("old_tokens_equal_fraction", "old eq", ".3f")], rows)
  common.write_json("rollout", {
      **info, "repeats": args.repeats, "dtype": "float32",
      "note": "ratio = jax tokens/s / torch tokens/s; ratio_median_of_pairs,"
              " _q1, _q3, _iqr: quartiles of torch s / jax s per pair;"
              " old_over_new_*: the same of pre-refactor sampler s / today's"
              " s; jax warm-up includes compilation", "rows": rows}, args.out)


if __name__ == "__main__":
  main()
