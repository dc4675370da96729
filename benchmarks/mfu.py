"""Measured matmul peak of this machine, and the RL step's model FLOPs use.

Peak: the best of `--repeats` square matmuls (n = `--n`) under `jax.jit`, and
the same with torch, in float32 on the CPU (bfloat16 on GPU / TPU, the dtype
those are meant to run). MFU = model FLOPs of one RL step / median step time
(from benchmarks/results/rl_step.json, so run benchmarks.rl_step first) /
the JAX matmul peak that rl_step measured between its steps (same load; the
peak measured here is reported too, and is the denominator for older JSON).

Model FLOPs count the matmuls only (2 FLOPs per multiply-add), for one step
with batch B, source length S, T generated tokens, per model with embedding
E, heads H x head width D, feed-forward F, L layers per stack, vocab V:

  encoder(S)    = 2 B S L (4 E H D + 2 E F) + 4 B S^2 H D L
  decoder(T, S) = 2 B T L (6 E H D + 2 E F) + 2 B S L (2 E H D)
                  + 4 B T^2 H D L + 4 B T S H D L + 2 B T E V
  (self-attention q k v o + cross q o + feed-forward per target token; cross
   keys / values once per source token; attention scores and mixing; LM head)

  step = [enc + dec](student)           rollout (KV cache: same matmuls)
       + [enc + dec](teacher)           teacher-forced pass
       + 3 [enc + dec](student)         student forward + backward (2x)

Decoder-only models (G key / value heads, N = S + T positions, the LM head
on the T completion positions only):

  causal(N, T) = 2 B N L (2 E H D + 2 E G D + 3 E F) + 4 B N^2 H D L
                 + 2 B T E V
  (q o, k v, gated feed-forward; attention scores and mixing over the whole
   N x N square, as the T5 count; LM head)

  step = causal(student) + causal(teacher) + 3 causal(student)

Element-wise work (softmax, returns, AdamW) is not counted.

    python -m benchmarks.mfu [--device=cpu|gpu|tpu] [--quick]
"""

from __future__ import annotations

import argparse
import json

from benchmarks import common


def encoder_flops(s: dict[str, int], b: int, src: int) -> float:
  e, h, d, f, n = (s["d_model"], s["num_heads"], s["d_kv"], s["d_ff"],
                   s["num_layers"])
  return 2 * b * src * n * (4 * e * h * d + 2 * e * f) + 4 * b * src**2 * h * d * n


def decoder_flops(s: dict[str, int], b: int, tgt: int, src: int) -> float:
  e, h, d, f, n, v = (s["d_model"], s["num_heads"], s["d_kv"], s["d_ff"],
                      s["num_layers"], s["vocab_size"])
  return (2 * b * tgt * n * (6 * e * h * d + 2 * e * f)
          + 2 * b * src * n * 2 * e * h * d
          + 4 * b * tgt**2 * h * d * n + 4 * b * tgt * src * h * d * n
          + 2 * b * tgt * e * v)


def causal_flops(m: dict[str, int], b: int, n: int, out: int) -> float:
  """A decoder-only pass over n positions, the LM head on `out` of them
  (`m`: `common.decoder_dims`)."""
  e, f, h, kv, d, layers, v = (m["e"], m["f"], m["h"], m["kv"], m["d"],
                               m["n"], m["v"])
  return (2 * b * n * layers * (2 * e * h * d + 2 * e * kv * d + 3 * e * f)
          + 4 * b * n**2 * h * d * layers + 2 * b * out * e * v)


def model_pass_flops(shape: str, b: int, src: int, tgt: int) -> float:
  """One teacher-forced pass of `shape` over a prompt of src and tgt targets."""
  if common.is_decoder(shape):
    return causal_flops(common.decoder_dims(shape), b, src + tgt, tgt)
  s = common.T5_SHAPES[shape]
  return encoder_flops(s, b, src) + decoder_flops(s, b, tgt, src)


def rl_step_flops(student: str, teacher: str, b: int, src: int,
                  tgt: int) -> dict[str, float]:
  student_pass = model_pass_flops(student, b, src, tgt)
  teacher_pass = model_pass_flops(teacher, b, src, tgt)
  parts = {"rollout": student_pass, "teacher_forward": teacher_pass,
           "student_forward_backward": 3 * student_pass}
  parts["total"] = sum(parts.values())
  return parts


def measure_peak(device_flag: str, n: int, repeats: int) -> dict[str, float]:
  """Best-of-`repeats` FLOP/s of an n x n matmul, JAX and torch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  accel = device_flag != "cpu"
  device = common.jax_device(device_flag)
  dtype = jnp.bfloat16 if accel else jnp.float32
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  fn = jax.jit(lambda x, y: x @ y)
  fn(a, a).block_until_ready()
  best_jax = min(common.timed(lambda: fn(a, a).block_until_ready())[0]
                 for _ in range(repeats))
  tdev = common.torch_device(device_flag)
  ta = torch.ones((n, n), dtype=torch.bfloat16 if accel else torch.float32,
                  device=tdev)

  def run_torch():
    out = ta @ ta
    if tdev == "cuda":
      torch.cuda.synchronize()
    return out

  run_torch()
  best_torch = min(common.timed(run_torch)[0] for _ in range(repeats))
  flops = 2.0 * n**3
  return {"n": n, "dtype": "bfloat16" if accel else "float32",
          "jax_flops_per_s": flops / best_jax,
          "torch_flops_per_s": flops / best_torch}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--rl_step_json", default=None,
                      help="rl_step results (default benchmarks/results/"
                      "rl_step.json)")
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.repeats = 256, 2
  common.set_torch_threads(args.threads)
  info = common.machine_info(args.device)
  peak = measure_peak(args.device, args.n, args.repeats)
  path = args.rl_step_json or str(common.RESULTS / "rl_step.json")
  try:
    with open(path) as f:
      rl_rows = json.load(f)["rows"]
  except FileNotFoundError as e:
    raise SystemExit(f"{path} not found: run `python -m benchmarks.rl_step`"
                     " first (or pass --rl_step_json)") from e
  rows = []
  for r in rl_rows:
    flops = rl_step_flops(r["student"], r["teacher"], r["batch"],
                          r["src_len"], r["new_tokens"])
    row = {"student": r["student"], "teacher": r["teacher"],
           "batch": r["batch"], "src_len": r["src_len"],
           "new_tokens": r["new_tokens"],
           "step_gflops": flops["total"] / 1e9,
           "gflops_parts": {k: v / 1e9 for k, v in flops.items()},
           "peak_gflops": peak["jax_flops_per_s"] / 1e9,
           "torch_peak_gflops": peak["torch_flops_per_s"] / 1e9,
           "jax_step_s": r["jax_step_s"], "torch_step_s": r["torch_step_s"]}
    row["jax_achieved_gflops"] = row["step_gflops"] / r["jax_step_s"]
    row["torch_achieved_gflops"] = row["step_gflops"] / r["torch_step_s"]
    # On a shared machine the peak measured now and the step measured then
    # see different loads; rl_step also probes the peak between its steps,
    # and that one is the denominator when present.
    row["peak_gflops_during_steps"] = r.get("matmul_peak_gflops_during_steps")
    denominator = row["peak_gflops_during_steps"] or row["peak_gflops"]
    row["mfu_denominator_gflops"] = denominator
    row["jax_mfu"] = row["jax_achieved_gflops"] / denominator
    row["torch_mfu"] = row["torch_achieved_gflops"] / denominator
    rows.append(row)
  print(f"mfu: {peak['dtype']} {args.n}x{args.n} matmul peak: jax"
        f" {peak['jax_flops_per_s'] / 1e9:.1f} GFLOP/s, torch"
        f" {peak['torch_flops_per_s'] / 1e9:.1f} GFLOP/s")
  common.print_table(
      "mfu: RL step model FLOPs utilisation (vs the measured JAX peak)",
      [("student", "student", "s"), ("teacher", "teacher", "s"),
       ("step_gflops", "GFLOP/step", ".1f"),
       ("peak_gflops", "peak GF/s", ".1f"),
       ("peak_gflops_during_steps", "peak@step", ".1f"),
       ("jax_achieved_gflops", "jax GF/s", ".1f"),
       ("torch_achieved_gflops", "torch GF/s", ".1f"),
       ("jax_mfu", "jax MFU", ".3f"), ("torch_mfu", "torch MFU", ".3f")],
      rows)
  common.write_json("mfu", {
      **info, "peak": peak, "rl_step_json": path,
      "formula": __doc__.split("Model FLOPs count", 1)[1].split(
          "    python -m", 1)[0].strip(), "rows": rows}, args.out)


if __name__ == "__main__":
  main()
