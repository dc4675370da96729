"""Markdown tables of benchmarks/results/*.json (what NOTES.md quotes).

    python -m benchmarks.summarize
"""

from __future__ import annotations

import json

from benchmarks import common


def _load(name: str):
  path = common.RESULTS / f"{name}.json"
  if not path.exists():
    return None
  return json.loads(path.read_text())


def _table(headers: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(headers) + " |",
         "|" + "---|" * len(headers)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def _load_line(d) -> str:
  return (f"{d['date_utc']} UTC, load average at start"
          f" {d['load_average_start']}, at end {d['load_average_end']},"
          f" {d.get('repeats')} repetitions")


def _quartiles(r, prefix: str = "ratio") -> str:
  if f"{prefix}_q1" not in r:  # JSON written before the quartiles
    return "-"
  return f"{r[f'{prefix}_q1']:.2f}-{r[f'{prefix}_q3']:.2f}"


def _rate(p, side: str) -> str:
  if p.get(f"{side}_gflops") is None:
    return "-"
  return f"{p[f'{side}_gflops']:.1f} ({p[f'{side}_share_of_peak']:.0%})"


def main() -> None:
  d = _load("returns")
  if d:
    print(f"### returns ({_load_line(d)})\n")
    print(_table(
        ["B", "T", "K", "compile ms", "jax ms", "torch ms", "numpy ms",
         "jax vs torch", "jax vs numpy"],
        [[str(r["batch"]), str(r["T"]), str(r["K"]),
          f"{r['compile_ms']:.0f}", f"{r['jax_ms']:.3f}",
          f"{r['torch_ms']:.2f}", f"{r['numpy_ms']:.2f}",
          f"{r['speedup_vs_torch']:.0f}x", f"{r['speedup_vs_numpy']:.0f}x"]
         for r in d["rows"]]))
    print()
  d = _load("rollout")
  if d:
    print(f"### rollout ({_load_line(d)})\n")
    print(_table(
        ["shape", "B", "new", "mode", "jax tok/s", "torch tok/s",
         "ratio (median of pairs)", "ratio q1-q3", "jax warm-up s",
         "greedy equal", "pre-refactor sampler tok/s", "old / new s",
         "old = new tokens"],
        [[r["shape"], str(r["batch"]), str(r["new_tokens"]), r["mode"],
          f"{r['jax_tokens_per_s']:.1f}", f"{r['torch_tokens_per_s']:.1f}",
          f"{r['ratio_median_of_pairs']:.2f}", _quartiles(r),
          f"{r['jax_warmup_s']:.1f}",
          (f"{r['greedy_equal_fraction']:.3f}"
           if "greedy_equal_fraction" in r else "-"),
          (f"{r['jax_old_tokens_per_s']:.1f}" if "jax_old_s" in r else "-"),
          (f"{r['old_over_new_median_of_pairs']:.2f}"
           f" ({_quartiles(r, 'old_over_new')})" if "jax_old_s" in r
           else "-"),
          (f"{r['old_tokens_equal_fraction']:.3f}" if "jax_old_s" in r
           else "-")]
         for r in d["rows"]]))
    print()
  d = _load("rl_step")
  if d:
    print(f"### rl_step ({_load_line(d)})\n")
    print(_table(
        ["student / teacher", "B x T", "jax s", "torch s", "jax tok/s",
         "torch tok/s", "ratio (median of pairs)", "ratio q1-q3",
         "jax compile s", "peak RSS jax / torch MiB"],
        [[f"{r['student']} / {r['teacher']}",
          f"{r['batch']} x {r['new_tokens']}", f"{r['jax_step_s']:.2f}",
          f"{r['torch_step_s']:.2f}", f"{r['jax_tokens_per_s']:.1f}",
          f"{r['torch_tokens_per_s']:.1f}",
          f"{r['ratio_median_of_pairs']:.2f}", _quartiles(r),
          f"{r['jax_compile_s']:.1f}",
          f"{r.get('jax_peak_rss_mib') or 0:.0f} /"
          f" {r.get('torch_peak_rss_mib') or 0:.0f}"]
         for r in d["rows"]]))
    print()
    for r in d["rows"]:
      if "phases" not in r:
        continue
      peak = r["matmul_peak_gflops_during_steps"]
      print(f"Phases of {r['student']} / {r['teacher']} (median of"
            " repetitions; JAX: each phase its own jit; ratio = torch /"
            " jax, median and quartiles of the pairs; share = phase / full"
            " step of that side; GFLOP/s (share of the float32 matmul peak"
            f" measured between the steps, {peak:.1f} GFLOP/s))\n")
      rows = [[p["phase"], p["what"], f"{p['jax_s']:.3f}",
               f"{p['torch_s']:.3f}", f"{p['ratio_median_of_pairs']:.2f}",
               _quartiles(p), f"{p['jax_share']:.1%}",
               f"{p['torch_share']:.1%}",
               f"{p['gflop']:.1f}" if p.get("gflop") else "-",
               _rate(p, "jax"), _rate(p, "torch")]
              for p in r["phases"]]
      rows.append(["sum of phases", "", f"{r['jax_phase_sum_s']:.3f}",
                   f"{r['torch_phase_sum_s']:.3f}", "-", "-",
                   f"{r['jax_phase_sum_s'] / r['jax_step_s']:.1%}",
                   f"{r['torch_phase_sum_s'] / r['torch_step_s']:.1%}",
                   "-", "-", "-"])
      rows.append(["full step", "", f"{r['jax_step_s']:.3f}",
                   f"{r['torch_step_s']:.3f}",
                   f"{r['ratio_median_of_pairs']:.2f}", _quartiles(r),
                   "100%", "100%",
                   f"{r['gflop']:.1f}" if r.get("gflop") else "-",
                   _rate(r, "jax"), _rate(r, "torch")])
      print(_table(["phase", "what", "jax s", "torch s", "ratio",
                    "ratio q1-q3", "jax share", "torch share", "GFLOP",
                    "jax GFLOP/s (of peak)", "torch GFLOP/s (of peak)"],
                   rows))
      update = next(p for p in r["phases"] if p["phase"] == "update")
      print(f"\nPyTorch update split: forward + backward"
            f" {update['torch_student_fwd_bwd_s']:.3f} s, clipping + AdamW"
            f" {update['torch_optimizer_s']:.3f} s\n")
      if "decode_floor_ms" in r:
        print(f"Decode step (rollout / {r['new_tokens']} tokens, prompt"
              f" pass included): JAX {r['jax_decode_step_ms']:.1f} ms,"
              f" PyTorch {r['torch_decode_step_ms']:.1f} ms; floor"
              f" {r['decode_floor_ms']:.1f} ms = (float32 weights"
              f" {r['weights_bytes'] / 1e6:.0f} MB + KV cache"
              f" {r['kv_cache_bytes'] / 1e6:.1f} MB) at the copy bandwidth"
              f" {r['copy_bandwidth_gb_s']:.1f} GB/s measured between the"
              f" steps: JAX {r['jax_decode_over_floor']:.1f}x the floor,"
              f" PyTorch {r['torch_decode_over_floor']:.1f}x\n")
  d = _load("mfu")
  if d:
    print(f"### mfu ({d['date_utc']} UTC, load {d['load_average_start']})\n")
    p = d["peak"]
    print(f"matmul peak now: {p['dtype']} {p['n']}^2, JAX"
          f" {p['jax_flops_per_s'] / 1e9:.1f} GFLOP/s, torch"
          f" {p['torch_flops_per_s'] / 1e9:.1f} GFLOP/s\n")
    print(_table(
        ["student / teacher", "GFLOP / step", "peak GFLOP/s (denominator)",
         "jax GFLOP/s", "torch GFLOP/s", "jax MFU", "torch MFU"],
        [[f"{r['student']} / {r['teacher']}", f"{r['step_gflops']:.1f}",
          f"{r.get('mfu_denominator_gflops', r['peak_gflops']):.1f}",
          f"{r['jax_achieved_gflops']:.1f}",
          f"{r['torch_achieved_gflops']:.1f}", f"{r['jax_mfu']:.3f}",
          f"{r['torch_mfu']:.3f}"] for r in d["rows"]]))


if __name__ == "__main__":
  main()
