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
         "ratio (median of pairs)", "jax warm-up s", "greedy equal"],
        [[r["shape"], str(r["batch"]), str(r["new_tokens"]), r["mode"],
          f"{r['jax_tokens_per_s']:.1f}", f"{r['torch_tokens_per_s']:.1f}",
          f"{r['ratio_median_of_pairs']:.2f}", f"{r['jax_warmup_s']:.1f}",
          (f"{r['greedy_equal_fraction']:.3f}"
           if "greedy_equal_fraction" in r else "-")]
         for r in d["rows"]]))
    print()
  d = _load("rl_step")
  if d:
    print(f"### rl_step ({_load_line(d)})\n")
    print(_table(
        ["student / teacher", "B x T", "jax s", "torch s", "jax tok/s",
         "torch tok/s", "ratio (median of pairs)", "jax compile s",
         "peak RSS jax / torch MiB"],
        [[f"{r['student']} / {r['teacher']}",
          f"{r['batch']} x {r['new_tokens']}", f"{r['jax_step_s']:.2f}",
          f"{r['torch_step_s']:.2f}", f"{r['jax_tokens_per_s']:.1f}",
          f"{r['torch_tokens_per_s']:.1f}",
          f"{r['ratio_median_of_pairs']:.2f}", f"{r['jax_compile_s']:.1f}",
          f"{r.get('jax_peak_rss_mib') or 0:.0f} /"
          f" {r.get('torch_peak_rss_mib') or 0:.0f}"]
         for r in d["rows"]]))
    print()
    for r in d["rows"]:
      if "phases" not in r:
        continue
      print("Phases (median of repetitions; JAX: each phase its own jit;"
            " ratio = torch / jax, median of pairs; share = phase / full"
            " step of that side)\n")
      rows = [[p["phase"], p["what"], f"{p['jax_s']:.3f}",
               f"{p['torch_s']:.3f}", f"{p['ratio_median_of_pairs']:.2f}",
               f"{p['jax_share']:.1%}", f"{p['torch_share']:.1%}"]
              for p in r["phases"]]
      rows.append(["sum of phases", "", f"{r['jax_phase_sum_s']:.3f}",
                   f"{r['torch_phase_sum_s']:.3f}", "-",
                   f"{r['jax_phase_sum_s'] / r['jax_step_s']:.1%}",
                   f"{r['torch_phase_sum_s'] / r['torch_step_s']:.1%}"])
      rows.append(["full step", "", f"{r['jax_step_s']:.3f}",
                   f"{r['torch_step_s']:.3f}",
                   f"{r['ratio_median_of_pairs']:.2f}", "100%", "100%"])
      print(_table(["phase", "what", "jax s", "torch s", "ratio",
                    "jax share", "torch share"], rows))
      update = next(p for p in r["phases"] if p["phase"] == "update")
      print(f"\nPyTorch update split: forward + backward"
            f" {update['torch_student_fwd_bwd_s']:.3f} s, clipping + AdamW"
            f" {update['torch_optimizer_s']:.3f} s\n")
  d = _load("mfu")
  if d:
    print(f"### mfu ({d['date_utc']} UTC, load {d['load_average_start']})\n")
    p = d["peak"]
    print(f"matmul peak now: {p['dtype']} {p['n']}^2, JAX"
          f" {p['jax_flops_per_s'] / 1e9:.1f} GFLOP/s, torch"
          f" {p['torch_flops_per_s'] / 1e9:.1f} GFLOP/s\n")
    print(_table(
        ["GFLOP / step", "peak GFLOP/s (denominator)", "jax GFLOP/s",
         "torch GFLOP/s", "jax MFU", "torch MFU"],
        [[f"{r['step_gflops']:.1f}",
          f"{r.get('mfu_denominator_gflops', r['peak_gflops']):.1f}",
          f"{r['jax_achieved_gflops']:.1f}",
          f"{r['torch_achieved_gflops']:.1f}", f"{r['jax_mfu']:.3f}",
          f"{r['torch_mfu']:.3f}"] for r in d["rows"]]))


if __name__ == "__main__":
  main()
