"""One full KETCHUP RL step: ketchup_jax `rl_step` vs a PyTorch/transformers step.

Two student / teacher pairs by default (`--pairs`), random weights written
once by transformers and loaded by both sides, float32:
  * T5: teacher T5-base-shaped, student T5-small-shaped (T5 v1.0 layout);
  * decoder-only: `qwen2-small` / `qwen2-base` (`common.DECODER_SHAPES`: a
    Qwen2-layout pair with grouped-query attention and a small vocabulary).
The step: student rollout (sampling, temperature 1, exactly `--new_tokens`
tokens: EOS is disabled on both sides), teacher teacher-forced pass, K-step
returns (K = `--k`), student forward + backward, gradient clipping (global
norm 1) and AdamW (lr 1e-5, weight decay 0.01). Ours is
`ketchup_jax.train.rollouts.rl_step` under one `jax.jit` with the state donated
(it also computes the entropy and the return diagnostics, which the PyTorch
step does not); the PyTorch step is `benchmarks.torch_ref.RLStep`.

Timing: warm-up step of each side (ours: compilation + one step), then
`--repeats` (default 5) interleaved repetitions (JAX, PyTorch, then the other
order); tokens/s = B * new_tokens / median step time. Every ratio is
PyTorch seconds / JAX seconds per repetition (the two ran back to back),
reported as the median and the interquartile range (q1, q3) of those pairs.

Host probes, in the same interleaved repetitions (same load): the float32
2048^2 matmul peak (bfloat16 on GPU / TPU) and the copy bandwidth of a
256 MiB float32 array (`x + 1` in place: read + write bytes / seconds).
Per phase: GFLOP (`benchmarks.mfu` formulas), GFLOP/s and their share of the
matmul peak, both sides. Rollout: seconds per generated token (the encoder /
prefill included) against its floor, the bytes one decoding step must read
(float32 weights once, plus the whole preallocated KV cache) at the measured
bandwidth.

Phases (on by default, `--no_phases` skips them): the same step split into
student rollout, teacher forward + Q-values, K-step returns, and student
forward + backward + clipping + AdamW. JAX: each phase is its own jitted
function on fixed inputs of the step's shapes (built from the public pieces
of `rl_step`), blocked on its result, timed in the same interleaved
repetitions as the full steps; their sum is reported next to the fused step.
PyTorch: perf_counter marks inside the timed `RLStep` calls themselves.

Peak memory: each side runs again alone in a fresh subprocess that imports
only its own framework, loads the two models, and runs the warm-up plus one
step; we report that process's peak resident set size (VmHWM) during the
warm-up (for JAX: compilation included), the peak of the following step
alone (VmHWM reset through /proc/self/clear_refs), and the RSS right after
the imports (the framework's own share).

    python -m benchmarks.rl_step [--device=cpu|gpu|tpu] [--repeats 5] [--quick]
        [--pairs t5-small:t5-base,qwen2-small:qwen2-base] [--no_phases]
        [--no_memory]
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
from benchmarks import mfu


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


def build_jax(args, student_dir: str, teacher_dir: str, phases: bool = False,
              logits_chunk: int = 0):
  """Returns `(step() -> tokens, compile_seconds, phase calls)` for ketchup_jax.

  `logits_chunk` is `steps.StepModels.logits_chunk` (0 = whole logits).

  With `phases`, the third item maps each phase name (`PHASES`) to a call
  running that phase alone, as its own jitted function on fixed inputs of
  the step's shapes, blocked on its result; else it is empty.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ketchup_jax import models  # pylint: disable=g-import-not-at-top
  from ketchup_jax.train import rollouts  # pylint: disable=g-import-not-at-top
  from ketchup_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from ketchup_jax.train import steps  # pylint: disable=g-import-not-at-top

  device = common.jax_device(args.device)
  with jax.default_device(device):
    student = models.load(student_dir, dtype=jnp.float32)
    teacher = models.load(teacher_dir, dtype=jnp.float32)
  s_cfg, t_cfg = (common.no_eos(student.config),
                  common.no_eos(teacher.config))
  mods = steps.StepModels(student=s_cfg, teacher=t_cfg, logits_chunk=logits_chunk)
  optim = state_lib.OptimConfig(steps=1000, learning_rate=1e-5,
                                schedule="constant", weight_decay=0.01,
                                max_grad_norm=1.0)
  rl = rollouts.RLConfig(k=args.k, max_decode_len=args.new_tokens,
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
  phase_fns = (_jax_phases(state, teacher.params, batch, mods, optim, rl)
               if phases else {})
  step_fn = jax.jit(lambda s, t, b: rollouts.rl_step(s, t, b, models=mods,
                                                  optim=optim, rl=rl),
                    donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, teacher.params, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], teacher.params, batch)
    return float(jax.block_until_ready(metrics["tokens"]))

  return run, compile_s, phase_fns


# The phases of one RL step, in order. JAX: each its own jit. PyTorch:
# perf_counter marks inside `torch_ref.RLStep` (its student update is split
# further into forward + backward and clipping + AdamW).
PHASES = ("rollout", "teacher", "returns", "update")
TORCH_PHASES = {"rollout": ("generate",), "teacher": ("teacher",),
                "returns": ("returns",),
                "update": ("student_fwd_bwd", "optimizer")}
PHASE_NAMES = {"rollout": "student rollout (sampling)",
               "teacher": "teacher forward + Q-values",
               "returns": "K-step returns",
               "update": "student fwd + bwd + clip + AdamW"}


def _jax_phases(state, teacher_params, batch, mods, optim, rl):
  """Phase name -> call timing that phase of `rollouts.rl_step` alone.

  The calls are the public pieces `rl_step` is built from:
  `rollouts.student_rollout`, `rollouts.teacher_scores` (teacher forward +
  `returns.teacher_q_values`), `rollouts.rollout_returns`, and
  `rollouts.rollout_update` (student forward + backward + guarded AdamW).
  Nothing is donated: the state is a private copy, the step's own state is
  donated separately.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ketchup_jax.train import rollouts  # pylint: disable=g-import-not-at-top

  state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
  rng, sample_rng = jax.random.split(state.rng)

  def rollout(params, b, key):
    return rollouts.student_rollout(params, b, key, models=mods, rl=rl)

  def teacher(t_params, b, actions, mask, finished):
    return rollouts.teacher_scores(t_params, b, actions, mask, finished,
                                   models=mods, rl=rl)

  def update(s, b, scored, g, key):
    new_state, loss, _, _ = rollouts.rollout_update(
        s, b, scored, g, key, models=mods, optim=optim, rl=rl)
    return new_state, loss

  jitted = {"rollout": jax.jit(rollout), "teacher": jax.jit(teacher),
            "returns": jax.jit(
                lambda sc: rollouts.rollout_returns(sc, rl, rl.k)),
            "update": jax.jit(update)}
  # Inputs of the later phases: one scored rollout of the step's shapes, as
  # `rollouts.score_rollout` builds it, from the phases' own jits (no extra
  # compilation).
  rollout = jitted["rollout"](state.params, batch, sample_rng)
  scored = rollouts.combine_scores(
      rollout, jitted["teacher"](teacher_params, batch, rollout.actions,
                                 rollout.mask, rollout.finished), rl=rl)
  g = jitted["returns"](scored)
  args = {"rollout": (state.params, batch, sample_rng),
          "teacher": (teacher_params, batch, scored.actions, scored.mask,
                      scored.rollout.finished),
          "returns": (scored,),
          "update": (state, batch, scored, g, rng)}
  return {name: (lambda f=f, a=args[name]: jax.block_until_ready(f(*a)))
          for name, f in jitted.items()}


def build_torch(args, student_dir: str, teacher_dir: str,
                phase_log: list[dict[str, float]] | None = None):
  """Returns `step() -> tokens` for the PyTorch reference.

  With `phase_log`, each call appends its phase seconds (`RLStep` timings).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_ref  # pylint: disable=g-import-not-at-top

  common.set_torch_threads(args.threads)
  tdev = common.torch_device(args.device)
  # eval: no dropout, as ours.
  student = common.load_torch(args.student, student_dir).to(tdev)
  teacher = common.load_torch(args.teacher, teacher_dir).to(tdev)
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
    timings = {} if phase_log is not None else None
    out = step(ids, mask, timings=timings)
    if tdev == "cuda":
      torch.cuda.synchronize()
    if phase_log is not None:
      phase_log.append(timings)
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


def _copy_probe(device_flag: str, mib: int, sink: list[float]):
  """A callable timing the best of 3 in-place `x + 1` over a `mib` MiB
  float32 array (bytes read + written per second -> sink)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = mib * 2**20 // 4
  holder = {"x": jax.device_put(jnp.zeros((n,), jnp.float32),
                                common.jax_device(device_flag))}
  fn = jax.jit(lambda x: x + 1.0, donate_argnums=0)

  def step():
    holder["x"] = fn(holder["x"]).block_until_ready()

  def probe():
    best = min(common.timed(step)[0] for _ in range(3))
    sink.append(2.0 * 4 * n / best)

  return probe


def decode_bytes(shape: str, batch: int, src_len: int, new_tokens: int
                 ) -> dict[str, float]:
  """Bytes one decoding step reads at least: the float32 weights once and
  the whole preallocated KV cache (self-attention over prompt + new tokens
  for a decoder-only model; T5: self-attention over the new tokens plus the
  cross-attention keys / values of the prompt)."""
  if common.is_decoder(shape):
    m = common.decoder_dims(shape)
    cache = 2 * batch * m["kv"] * (src_len + new_tokens) * m["d"] * m["n"]
  else:
    s = common.T5_SHAPES[shape]
    cache = (2 * batch * s["num_heads"] * (new_tokens + src_len) * s["d_kv"]
             * s["num_layers"])
  return {"weights_bytes": 4.0 * common.params(shape),
          "kv_cache_bytes": 4.0 * cache}


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
    run, _, _ = build_jax(args, args.student_dir, args.teacher_dir)
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


# Which part of `mfu.rl_step_flops` each phase computes (returns: none).
PHASE_FLOPS = {"rollout": "rollout", "teacher": "teacher_forward",
               "returns": None, "update": "student_forward_backward"}


def _flop_fields(row: dict[str, Any], gflop: float | None,
                 seconds: dict[str, float], peak_gflops: float) -> None:
  """Adds GFLOP, GFLOP/s and share of the peak of both sides to `row`
  (`seconds`: side -> median seconds)."""
  row["gflop"] = gflop
  for side in ("jax", "torch"):
    rate = gflop / seconds[side] if gflop else None
    row[f"{side}_gflops"] = rate
    row[f"{side}_share_of_peak"] = rate / peak_gflops if rate else None


def _phase_rows(times: dict[str, list[float]],
                torch_log: list[dict[str, float]], flops: dict[str, float],
                peak_gflops: float) -> list[dict[str, Any]]:
  """One row per phase: medians, the median and quartiles of the
  per-repetition ratios (torch / jax), each phase's share of its side's full
  step, and its GFLOP/s against the matmul peak."""
  jax_step = common.median(times["jax"])
  torch_step = common.median(times["torch"])
  rows = []
  for name in PHASES:
    jax_runs = times[f"jax_{name}"]
    torch_runs = [sum(t[k] for k in TORCH_PHASES[name]) for t in torch_log]
    row = {"phase": name, "what": PHASE_NAMES[name],
           "torch_parts": list(TORCH_PHASES[name]),
           "jax_s": common.median(jax_runs),
           "torch_s": common.median(torch_runs),
           **common.ratio_stats(torch_runs, jax_runs),
           "jax_runs_s": jax_runs, "torch_runs_s": torch_runs}
    row["jax_share"] = row["jax_s"] / jax_step
    row["torch_share"] = row["torch_s"] / torch_step
    part = PHASE_FLOPS[name]
    _flop_fields(row, flops[part] / 1e9 if part else None,
                 {"jax": row["jax_s"], "torch": row["torch_s"]}, peak_gflops)
    for part in TORCH_PHASES[name]:
      if len(TORCH_PHASES[name]) > 1:
        row[f"torch_{part}_s"] = common.median([t[part] for t in torch_log])
    rows.append(row)
  return rows


def _decode_fields(row: dict[str, Any], rollout_s: dict[str, float],
                   args, bandwidth: float) -> None:
  """Seconds per generated token of each side's rollout against the
  bytes-read floor of one decoding step at the measured bandwidth."""
  floor = decode_bytes(args.student, args.batch, args.src_len,
                       args.new_tokens)
  row.update(floor)
  row["decode_floor_ms"] = 1e3 * (
      floor["weights_bytes"] + floor["kv_cache_bytes"]) / bandwidth
  for side, seconds in rollout_s.items():
    row[f"{side}_decode_step_ms"] = 1e3 * seconds / args.new_tokens
    row[f"{side}_decode_over_floor"] = (row[f"{side}_decode_step_ms"] /
                                        row["decode_floor_ms"])


# (key, header, format) of the phase table; also the full-step row.
PHASE_COLUMNS = [
    ("phase", "phase", "s"), ("jax_s", "jax s", ".3f"),
    ("torch_s", "torch s", ".3f"), ("ratio_median_of_pairs", "ratio", ".2f"),
    ("ratio_q1", "ratio q1", ".2f"), ("ratio_q3", "ratio q3", ".2f"),
    ("ratio_iqr", "ratio IQR", ".2f"), ("jax_share", "jax share", ".1%"),
    ("torch_share", "torch share", ".1%"), ("gflop", "GFLOP", ".1f"),
    ("jax_gflops", "jax GF/s", ".1f"),
    ("jax_share_of_peak", "jax %peak", ".1%"),
    ("torch_gflops", "torch GF/s", ".1f"),
    ("torch_share_of_peak", "torch %peak", ".1%")]


def run_pair(args, tmp: str) -> dict[str, Any]:
  """Times one student / teacher pair (`args.student`, `args.teacher`);
  prints its tables and returns its JSON row."""
  print(f"rl_step: student {args.student}, teacher {args.teacher}, B="
        f"{args.batch}, src {args.src_len}, new tokens {args.new_tokens},"
        f" K={args.k}, {args.repeats} repetitions; load"
        f" {common.load_average()}", flush=True)
  s_dir = os.path.join(tmp, f"student-{args.student}")
  t_dir = os.path.join(tmp, f"teacher-{args.teacher}")
  common.save_random(args.student, s_dir, seed=1)
  common.save_random(args.teacher, t_dir, seed=2)
  run_jax, compile_s, jax_phases = build_jax(args, s_dir, t_dir,
                                             phases=not args.no_phases)
  chunked_side = {}
  if args.logits_chunk:
    chunked_side["jax_chunked"] = build_jax(
        args, s_dir, t_dir, logits_chunk=args.logits_chunk)[0]
  torch_phase_log: list[dict[str, float]] = []
  run_torch = build_torch(args, s_dir, t_dir, torch_phase_log)
  peaks: list[float] = []
  bandwidths: list[float] = []
  matmul = _matmul_probe(args.device, 256 if args.quick else 2048, peaks)
  copy = _copy_probe(args.device, 8 if args.quick else 256, bandwidths)
  warm, times, outs = common.interleaved(
      {"jax": run_jax, **chunked_side, "torch": run_torch, "matmul": matmul,
       "copy": copy, **{f"jax_{name}": fn for name, fn in jax_phases.items()}},
      args.repeats)
  outs.pop("matmul")
  outs.pop("copy")
  if chunked_side and outs.pop("jax_chunked") != outs["jax"]:
    raise RuntimeError("chunked and whole-logits steps differ in tokens")
  torch_phase_log = torch_phase_log[1:]  # Drop the warm-up.
  peaks, bandwidths = peaks[1:], bandwidths[1:]  # Drop the warm-ups.
  if outs["jax"] != outs["torch"]:
    raise RuntimeError(f"token counts differ: {outs}")
  memory: dict[str, Any] = {}
  if not args.no_memory:
    child = [sys.executable, "-m", "benchmarks.rl_step",
             f"--device={args.device}", f"--threads={args.threads}",
             f"--batch={args.batch}", f"--src_len={args.src_len}",
             f"--new_tokens={args.new_tokens}", f"--k={args.k}",
             f"--pairs={args.student}:{args.teacher}",
             f"--student_dir={s_dir}", f"--teacher_dir={t_dir}"]
    for side in ("jax", "torch"):
      memory[side] = common.run_json_subprocess(
          child + [f"--memory_side={side}"])
  tokens = outs["jax"]
  jax_tps = tokens / common.median(times["jax"])
  torch_tps = tokens / common.median(times["torch"])
  peak_gflops = common.median(peaks) / 1e9
  flops = mfu.rl_step_flops(args.student, args.teacher, args.batch,
                            args.src_len, args.new_tokens)
  row = {
      "student": args.student, "teacher": args.teacher, "batch": args.batch,
      "src_len": args.src_len, "new_tokens": args.new_tokens, "k": args.k,
      "family": "decoder" if common.is_decoder(args.student) else "t5",
      "tokens_per_step": tokens,
      "jax_step_s": common.median(times["jax"]),
      "torch_step_s": common.median(times["torch"]),
      "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
      "ratio": jax_tps / torch_tps,
      **common.ratio_stats(times["torch"], times["jax"]),
      "jax_compile_s": compile_s, "jax_warmup_s": warm["jax"],
      "torch_warmup_s": warm["torch"],
      "jax_s": times["jax"], "torch_s": times["torch"],
      # The machine's matmul peak and copy bandwidth measured between the
      # steps, under the same load: the MFU denominator (benchmarks.mfu) and
      # the decode floor's.
      "matmul_peak_gflops_during_steps": peak_gflops,
      "matmul_peak_gflops_runs": [p / 1e9 for p in peaks],
      "copy_bandwidth_gb_s": common.median(bandwidths) / 1e9,
      "copy_bandwidth_gb_s_runs": [b / 1e9 for b in bandwidths],
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
  _flop_fields(row, flops["total"] / 1e9, {
      "jax": row["jax_step_s"], "torch": row["torch_step_s"]}, peak_gflops)
  row["jax_mfu"], row["torch_mfu"] = (row["jax_share_of_peak"],
                                      row["torch_share_of_peak"])
  if chunked_side:
    row["logits_chunk"] = args.logits_chunk
    row["jax_chunked_step_s"] = common.median(times["jax_chunked"])
    row["jax_chunked_s"] = times["jax_chunked"]
    # > 1: the chunked step is slower (target: <= 1.05).
    row["chunked_over_whole_median_of_pairs"] = common.median(
        [c / w for c, w in zip(times["jax_chunked"], times["jax"])])
    common.print_table(
        f"our step, logits_chunk={args.logits_chunk} vs whole logits "
        f"(interleaved; target chunked / whole <= 1.05)",
        [("jax_step_s", "whole s", ".3f"),
         ("jax_chunked_step_s", "chunked s", ".3f"),
         ("chunked_over_whole_median_of_pairs", "chunk/whole", ".3f")],
        [row])
  common.print_table(
      f"rl_step {args.student} / {args.teacher}: one KETCHUP step (median of"
      f" {args.repeats} repetitions; ratio = torch s / jax s per pair)",
      [("jax_step_s", "jax s", ".2f"), ("torch_step_s", "torch s", ".2f"),
       ("jax_tokens_per_s", "jax tok/s", ".1f"),
       ("torch_tokens_per_s", "torch tok/s", ".1f"),
       ("ratio_median_of_pairs", "ratio", ".2f"),
       ("ratio_iqr", "ratio IQR", ".2f"),
       ("jax_mfu", "jax MFU", ".3f"), ("torch_mfu", "torch MFU", ".3f"),
       ("jax_compile_s", "compile s", ".1f"),
       ("jax_peak_rss_mib", "jax MiB", ".0f"),
       ("torch_peak_rss_mib", "torch MiB", ".0f"),
       ("jax_peak_rss_with_warmup_mib", "jax MiB+w", ".0f"),
       ("torch_peak_rss_with_warmup_mib", "torch MiB+w", ".0f")], [row])
  print(f"host: matmul peak {peak_gflops:.1f} GFLOP/s, copy bandwidth"
        f" {row['copy_bandwidth_gb_s']:.1f} GB/s (medians between the steps)")
  if args.no_phases:
    return row
  phase_rows = _phase_rows(times, torch_phase_log, flops, peak_gflops)
  row["phases"] = phase_rows
  row["jax_phase_sum_s"] = sum(p["jax_s"] for p in phase_rows)
  row["torch_phase_sum_s"] = sum(p["torch_s"] for p in phase_rows)
  row["torch_phase_s"] = torch_phase_log
  rollout = phase_rows[PHASES.index("rollout")]
  _decode_fields(row, {"jax": rollout["jax_s"], "torch": rollout["torch_s"]},
                 args, row["copy_bandwidth_gb_s"] * 1e9)
  total = {"phase": "sum of phases", "jax_s": row["jax_phase_sum_s"],
           "torch_s": row["torch_phase_sum_s"],
           "jax_share": row["jax_phase_sum_s"] / row["jax_step_s"],
           "torch_share": row["torch_phase_sum_s"] / row["torch_step_s"]}
  full = {**{k: row[k] for k, _, _ in PHASE_COLUMNS[3:] if k in row},
          "phase": "full step", "jax_s": row["jax_step_s"],
          "torch_s": row["torch_step_s"], "jax_share": 1.0,
          "torch_share": 1.0}
  common.print_table(
      f"rl_step {args.student} / {args.teacher} phases (median of"
      f" repetitions; ratio = torch / jax per pair, its quartiles; JAX: each"
      f" phase its own jit; share = phase / full step of that side; %peak ="
      f" GFLOP/s / {peak_gflops:.1f})", PHASE_COLUMNS,
      phase_rows + [total, full])
  print("torch update split: " + ", ".join(
      f"{k} {common.median([t[k] for t in torch_phase_log]):.3f} s"
      for k in TORCH_PHASES["update"]))
  print(f"decode step (rollout / {args.new_tokens} tokens, prompt pass"
        f" included): jax {row['jax_decode_step_ms']:.1f} ms, torch"
        f" {row['torch_decode_step_ms']:.1f} ms; floor"
        f" {row['decode_floor_ms']:.1f} ms = (weights"
        f" {row['weights_bytes'] / 1e6:.0f} MB + KV cache"
        f" {row['kv_cache_bytes'] / 1e6:.1f} MB) /"
        f" {row['copy_bandwidth_gb_s']:.1f} GB/s; jax at"
        f" {row['jax_decode_over_floor']:.1f}x the floor, torch"
        f" {row['torch_decode_over_floor']:.1f}x")
  return row


DEFAULT_PAIRS = "t5-small:t5-base,qwen2-small:qwen2-base"
QUICK_PAIRS = "tiny-small:tiny-base,tiny-qwen2-small:tiny-qwen2-base"


def _pairs(text: str) -> list[tuple[str, str]]:
  pairs = []
  for item in text.split(","):
    names = item.split(":")
    if len(names) != 2 or not all(names):
      raise SystemExit(f"--pairs: {item!r} is not STUDENT:TEACHER (e.g."
                       f" {DEFAULT_PAIRS})")
    if common.is_decoder(names[0]) != common.is_decoder(names[1]):
      raise SystemExit(f"--pairs: {item!r} mixes a T5 and a decoder-only"
                       f" shape; both must be one family")
    pairs.append((names[0], names[1]))
  return pairs


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--src_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--pairs", default=None,
                      help="Comma-separated STUDENT:TEACHER shapes of"
                      f" benchmarks.common (default {DEFAULT_PAIRS}; with"
                      f" --quick {QUICK_PAIRS}).")
  parser.add_argument("--logits_chunk", type=int, default=0,
                      help="Also time our step with StepModels.logits_chunk = N"
                      " (N < new_tokens), interleaved with the whole-logits"
                      " one; 0 = skip.")
  parser.add_argument("--no_memory", action="store_true",
                      help="Skip the two peak-memory subprocesses.")
  parser.add_argument("--no_phases", action="store_true",
                      help="Skip the per-phase split (JAX phases as separate"
                      " jits, PyTorch phases timed inside its step).")
  parser.add_argument("--memory_side", choices=("jax", "torch"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--student_dir", help=argparse.SUPPRESS)
  parser.add_argument("--teacher_dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.src_len, args.new_tokens, args.repeats = 2, 8, 8, 1
  pairs = _pairs(args.pairs or (QUICK_PAIRS if args.quick else DEFAULT_PAIRS))
  if args.repeats < 1:
    raise SystemExit(f"--repeats={args.repeats}: must be >= 1")
  if args.memory_side:
    args.student, args.teacher = pairs[0]
    memory_child(args)
    return

  common.set_torch_threads(args.threads)
  info = common.machine_info(args.device)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for student, teacher in pairs:
      rows.append(run_pair(argparse.Namespace(
          **{**vars(args), "student": student, "teacher": teacher}), tmp))
  common.write_json("rl_step", {
      **info, "repeats": args.repeats, "dtype": "float32",
      "memory_method": "peak RSS (/proc VmHWM) of a subprocess running one"
                       " side alone: during the warm-up, and (peak_rss) of"
                       " the next step after resetting the peak",
      "note": "ratio = jax tokens/s / torch tokens/s; ratio_median_of_pairs,"
              " ratio_q1, ratio_q3, ratio_iqr: quartiles of torch s / jax s"
              " over the interleaved repetitions", "rows": rows}, args.out)


if __name__ == "__main__":
  main()
