"""Smoke test of the benchmarks: each runs with --quick and writes its JSON.

Tiny shapes, one repetition; checks that every figure the tables print is in
the JSON and is a finite number (the timings themselves are not asserted:
speed targets live in the benchmarks, not in tests). The K-step-return
benchmark also checks JAX and PyTorch against the NumPy loop on the way.
"""

import json
import math

from benchmarks import mfu
from benchmarks import returns
from benchmarks import rl_step
from benchmarks import rollout


def _finite(row, keys):
  for key in keys:
    assert isinstance(row[key], (int, float)), (key, row[key])
    assert math.isfinite(row[key]) and row[key] >= 0, (key, row[key])


def test_all_benchmarks_write_every_figure(tmp_path):
  out = {name: str(tmp_path / f"{name}.json")
         for name in ("returns", "rollout", "rl_step", "mfu")}
  returns.main(["--quick", "--out", out["returns"]])
  rows = json.load(open(out["returns"]))["rows"]
  assert [(r["T"], r["K"]) for r in rows] == [(16, 1), (16, 4)]
  for r in rows:
    _finite(r, ["compile_ms", "jax_ms", "torch_ms", "numpy_ms",
                "speedup_vs_torch", "speedup_vs_numpy"])

  rollout.main(["--quick", "--out", out["rollout"]])
  rows = json.load(open(out["rollout"]))["rows"]
  assert [r["mode"] for r in rows] == ["greedy", "sampled"]
  for r in rows:
    _finite(r, ["jax_tokens_per_s", "torch_tokens_per_s", "ratio",
                "ratio_median_of_pairs", "jax_warmup_s", "torch_warmup_s"])
    assert r["tokens_per_run"] == r["batch"] * r["new_tokens"]
  # Same random checkpoint, greedy: the two frameworks agree token for token.
  assert rows[0]["greedy_equal_fraction"] == 1.0

  rl_step.main(["--quick", "--no_memory", "--out", out["rl_step"]])
  data = json.load(open(out["rl_step"]))
  (r,) = data["rows"]
  _finite(r, ["jax_step_s", "torch_step_s", "jax_tokens_per_s",
              "torch_tokens_per_s", "ratio", "ratio_median_of_pairs",
              "jax_compile_s", "jax_warmup_s", "torch_warmup_s",
              "matmul_peak_gflops_during_steps"])
  assert r["tokens_per_step"] == r["batch"] * r["new_tokens"]
  # Per-phase split, both sides: every phase timed once per repetition.
  assert [p["phase"] for p in r["phases"]] == list(rl_step.PHASES)
  for p in r["phases"]:
    _finite(p, ["jax_s", "torch_s", "ratio_median_of_pairs", "jax_share",
                "torch_share"])
    assert len(p["jax_runs_s"]) == len(p["torch_runs_s"]) == data["repeats"]
  update = r["phases"][-1]
  _finite(update, ["torch_student_fwd_bwd_s", "torch_optimizer_s"])
  # The PyTorch phases are marks inside the timed step: they add up to it.
  assert r["torch_phase_sum_s"] <= r["torch_step_s"]
  assert r["torch_phase_sum_s"] > 0.5 * r["torch_step_s"]
  _finite(r, ["jax_phase_sum_s", "torch_phase_sum_s"])

  mfu.main(["--quick", "--rl_step_json", out["rl_step"], "--out", out["mfu"]])
  data = json.load(open(out["mfu"]))
  assert "2 FLOPs per multiply-add" in data["formula"]
  (r,) = data["rows"]
  _finite(r, ["step_gflops", "peak_gflops", "mfu_denominator_gflops",
              "jax_achieved_gflops",
              "torch_achieved_gflops", "jax_mfu", "torch_mfu"])
  assert data["peak"]["jax_flops_per_s"] > 0


def test_flop_formula_counts_a_known_case():
  # One layer, no attention terms dominating: check against a hand count.
  s = {"d_model": 4, "num_heads": 2, "d_kv": 2, "d_ff": 8, "num_layers": 1,
       "vocab_size": 10}
  # encoder, B=1, S=1: 2*(4*4*4 + 2*4*8) + 4*1*4 = 2*(64+64) + 16 = 272
  assert mfu.encoder_flops(s, 1, 1) == 272
  # decoder, B=1, T=1, S=1: 2*(6*16+64) + 2*2*16 + 4*4 + 4*4 + 2*4*10
  assert mfu.decoder_flops(s, 1, 1, 1) == 320 + 64 + 16 + 16 + 80
