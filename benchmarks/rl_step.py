"""One full KETCHUP RL step: ketchup_jax `rl_step` vs a PyTorch/transformers step.

Teacher T5-base-shaped, student T5-small-shaped (T5 v1.0 layout, random
weights written once by transformers and loaded by both sides), float32.
The step: student rollout (sampling, temperature 1, exactly `--new_tokens`
tokens: EOS is disabled on both sides), teacher teacher-forced pass, K-step
returns (K = `--k`), student forward + backward, gradient clipping (global
norm 1) and AdamW (lr 1e-5, weight decay 0.01). Ours is
`ketchup_jax.train.steps.rl_step` under one `jax.jit` with the state donated
(it also computes the entropy and the return diagnostics, which the PyTorch
step does not); the PyTorch step is `benchmarks.torch_ref.RLStep`.

Timing: warm-up step of each side (ours: compilation + one step), then
`--repeats` alternating steps; tokens/s = B * new_tokens / median step time.

Peak memory: each side runs again alone in a fresh subprocess that imports
only its own framework, loads the two models, and runs the warm-up plus one
step; we report that process's peak resident set size (VmHWM) during the
warm-up (for JAX: compilation included), the peak of the following step
alone (VmHWM reset through /proc/self/clear_refs), and the RSS right after
the imports (the framework's own share).

    python -m benchmarks.rl_step [--device=cpu|gpu|tpu] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

from benchmarks import common


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_rss_mib() -> float:
  """VmHWM: this process image's peak RSS (ru_maxrss survives `exec`, so a
  child would report its parent's peak)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_jax(args, student_dir: str, teacher_dir: str):
  """Returns `(step() -> tokens, compile_seconds)` for ketchup_jax."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ketchup_jax import models  # pylint: disable=g-import-not-at-top
  from ketchup_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from ketchup_jax.train import steps  # pylint: disable=g-import-not-at-top

  device = common.jax_device(args.device)
  with jax.default_device(device):
    student = models.load(student_dir, dtype=jnp.float32)
    teacher = models.load(teacher_dir, dtype=jnp.float32)
  s_cfg = student.config.replace(eos_token_id=-1)
  t_cfg = teacher.config.replace(eos_token_id=-1)
  mods = steps.Models(student=s_cfg, teacher=t_cfg)
  optim = state_lib.OptimConfig(steps=1000, learning_rate=1e-5,
                                schedule="constant", weight_decay=0.01,
                                max_grad_norm=1.0)
  rl = steps.RLConfig(k=args.k, max_decode_len=args.new_tokens,
                      temperature=1.0, unfinished="terminal")
  tx = state_lib.make_optimizer(optim)
  with jax.default_device(device):
    state = jax.jit(lambda p: state_lib.init_state(p, tx, seed=0))(
        student.params)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, s_cfg.vocab_size, (args.batch, args.src_len))
    batch = {"input_ids": jnp.asarray(ids, jnp.int32),
             "attention_mask": jnp.ones(ids.shape, jnp.int32),
             "example_mask": jnp.ones((args.batch,), jnp.int32)}
  step_fn = jax.jit(lambda s, t, b: steps.rl_step(s, t, b, models=mods,
                                                  optim=optim, rl=rl),
                    donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, teacher.params, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], teacher.params, batch)
    return float(jax.block_until_ready(metrics["tokens"]))

  return run, compile_s


def build_torch(args, student_dir: str, teacher_dir: str):
  """Returns `step() -> tokens` for the PyTorch reference."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_ref  # pylint: disable=g-import-not-at-top

  common.set_torch_threads(args.threads)
  tdev = common.torch_device(args.device)
  load = transformers.T5ForConditionalGeneration.from_pretrained
  student = load(student_dir).to(tdev).eval()  # eval: no dropout, as ours.
  teacher = load(teacher_dir).to(tdev).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  step = torch_ref.RLStep(student, teacher, k=args.k,
                          new_tokens=args.new_tokens, learning_rate=1e-5,
                          weight_decay=0.01, clip=50.0, max_grad_norm=1.0)
  rng = np.random.default_rng(0)
  ids = torch.tensor(rng.integers(2, student.config.vocab_size,
                                  (args.batch, args.src_len)), device=tdev)
  mask = torch.ones_like(ids)
  torch.manual_seed(0)

  def run():
    out = step(ids, mask)
    if tdev == "cuda":
      torch.cuda.synchronize()
    return float(out["tokens"])

  return run


def _matmul_probe(device_flag: str, n: int, sink: list[float]):
  """A callable timing the best of 3 n x n JAX matmuls (FLOP/s -> sink)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  accel = device_flag != "cpu"
  a = jax.device_put(jnp.ones((n, n), jnp.bfloat16 if accel else jnp.float32),
                     common.jax_device(device_flag))
  fn = jax.jit(lambda x, y: x @ y)

  def probe():
    best = min(common.timed(lambda: fn(a, a).block_until_ready())[0]
               for _ in range(3))
    sink.append(2.0 * n**3 / best)

  return probe


def memory_child(args) -> None:
  """Subprocess body: one side alone; prints one JSON line."""
  rss_start = _rss_mib()
  if args.memory_side == "jax":
    import jax  # pylint: disable=g-import-not-at-top,unused-import
    from ketchup_jax.train import steps  # pylint: disable=g-import-not-at-top,unused-import
  else:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  rss_imports = _rss_mib()
  if args.memory_side == "jax":
    run, _ = build_jax(args, args.student_dir, args.teacher_dir)
  else:
    run = build_torch(args, args.student_dir, args.teacher_dir)
  run()  # Warm-up (compilation for JAX).
  peak_warmup = _peak_rss_mib()
  # Reset the peak (Linux: "5" > clear_refs), so the next figure is the peak
  # of a steady-state step alone, without compilation.
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    reset = True
  except OSError:
    reset = False
  run()
  print(json.dumps({"side": args.memory_side, "rss_start_mib": rss_start,
                    "rss_after_imports_mib": rss_imports,
                    "peak_rss_with_warmup_mib": peak_warmup,
                    "peak_rss_mib": (_peak_rss_mib() if reset else
                                     max(peak_warmup, _peak_rss_mib())),
                    "peak_reset": reset}))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--src_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--student", default="t5-small")
  parser.add_argument("--teacher", default="t5-base")
  parser.add_argument("--no_memory", action="store_true",
                      help="Skip the two peak-memory subprocesses.")
  parser.add_argument("--memory_side", choices=("jax", "torch"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--student_dir", help=argparse.SUPPRESS)
  parser.add_argument("--teacher_dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.student, args.teacher = "tiny-small", "tiny-base"
    args.batch, args.src_len, args.new_tokens, args.repeats = 2, 8, 8, 1
  if args.memory_side:
    memory_child(args)
    return

  common.set_torch_threads(args.threads)
  info = common.machine_info(args.device)
  print(f"rl_step: student {args.student}, teacher {args.teacher}, B="
        f"{args.batch}, src {args.src_len}, new tokens {args.new_tokens},"
        f" K={args.k}; load {info['load_average_start']}", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    s_dir, t_dir = os.path.join(tmp, "student"), os.path.join(tmp, "teacher")
    common.save_random_t5(args.student, s_dir, seed=1)
    common.save_random_t5(args.teacher, t_dir, seed=2)
    run_jax, compile_s = build_jax(args, s_dir, t_dir)
    run_torch = build_torch(args, s_dir, t_dir)
    peaks = []
    matmul = _matmul_probe(args.device, 256 if args.quick else 2048, peaks)
    warm, times, outs = common.interleaved(
        {"jax": run_jax, "torch": run_torch, "matmul": matmul}, args.repeats)
    outs.pop("matmul")
    peaks = peaks[1:]  # Drop the warm-up (compilation).
    if outs["jax"] != outs["torch"]:
      raise RuntimeError(f"token counts differ: {outs}")
    memory: dict[str, Any] = {}
    if not args.no_memory:
      child = [sys.executable, "-m", "benchmarks.rl_step",
               f"--device={args.device}", f"--threads={args.threads}",
               f"--batch={args.batch}", f"--src_len={args.src_len}",
               f"--new_tokens={args.new_tokens}", f"--k={args.k}",
               f"--student_dir={s_dir}", f"--teacher_dir={t_dir}"]
      for side in ("jax", "torch"):
        memory[side] = common.run_json_subprocess(
            child + [f"--memory_side={side}"])
  tokens = outs["jax"]
  jax_tps = tokens / common.median(times["jax"])
  torch_tps = tokens / common.median(times["torch"])
  row = {
      "student": args.student, "teacher": args.teacher, "batch": args.batch,
      "src_len": args.src_len, "new_tokens": args.new_tokens, "k": args.k,
      "tokens_per_step": tokens,
      "jax_step_s": common.median(times["jax"]),
      "torch_step_s": common.median(times["torch"]),
      "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
      "ratio": jax_tps / torch_tps,
      "ratio_median_of_pairs": common.median(
          [t / j for j, t in zip(times["jax"], times["torch"])]),
      "jax_compile_s": compile_s, "jax_warmup_s": warm["jax"],
      "torch_warmup_s": warm["torch"],
      "jax_s": times["jax"], "torch_s": times["torch"],
      # The machine's matmul peak measured between the steps, under the same
      # load: the MFU denominator (benchmarks.mfu).
      "matmul_peak_gflops_during_steps": common.median(peaks) / 1e9,
      "jax_peak_rss_mib": memory.get("jax", {}).get("peak_rss_mib"),
      "torch_peak_rss_mib": memory.get("torch", {}).get("peak_rss_mib"),
      "jax_peak_rss_with_warmup_mib": memory.get("jax", {}).get(
          "peak_rss_with_warmup_mib"),
      "torch_peak_rss_with_warmup_mib": memory.get("torch", {}).get(
          "peak_rss_with_warmup_mib"),
      "jax_rss_after_imports_mib": memory.get("jax", {}).get(
          "rss_after_imports_mib"),
      "torch_rss_after_imports_mib": memory.get("torch", {}).get(
          "rss_after_imports_mib"),
  }
  common.print_table(
      "rl_step: one KETCHUP step (median of repetitions)",
      [("jax_step_s", "jax s", ".2f"), ("torch_step_s", "torch s", ".2f"),
       ("jax_tokens_per_s", "jax tok/s", ".1f"),
       ("torch_tokens_per_s", "torch tok/s", ".1f"),
       ("ratio_median_of_pairs", "ratio", ".2f"),
       ("jax_compile_s", "compile s", ".1f"),
       ("jax_peak_rss_mib", "jax MiB", ".0f"),
       ("torch_peak_rss_mib", "torch MiB", ".0f"),
       ("jax_peak_rss_with_warmup_mib", "jax MiB+w", ".0f"),
       ("torch_peak_rss_with_warmup_mib", "torch MiB+w", ".0f")], [row])
  common.write_json("rl_step", {
      **info, "repeats": args.repeats, "dtype": "float32",
      "memory_method": "peak RSS (/proc VmHWM) of a subprocess running one"
                       " side alone: during the warm-up, and (peak_rss) of"
                       " the next step after resetting the peak",
      "note": "ratio = jax tokens/s / torch tokens/s", "rows": [row]},
                    args.out)


if __name__ == "__main__":
  main()
