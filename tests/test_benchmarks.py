"""Smoke test of the benchmarks: each runs with --quick and writes its JSON.

Tiny shapes, one repetition; checks that every figure the tables print is in
the JSON and is a finite number (the timings themselves are not asserted:
speed targets live in the benchmarks, not in tests). The K-step-return
benchmark also checks JAX and PyTorch against the NumPy loop on the way.
"""

import json
import math

from benchmarks import common
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
  assert [(r["family"], r["mode"]) for r in rows] == [
      ("t5", "greedy"), ("t5", "sampled"), ("decoder", "greedy"),
      ("decoder", "sampled")]
  for r in rows:
    _finite(r, ["jax_tokens_per_s", "torch_tokens_per_s", "ratio",
                "ratio_median_of_pairs", "ratio_q1", "ratio_q3", "ratio_iqr",
                "jax_warmup_s", "torch_warmup_s"])
    assert r["ratio_q1"] <= r["ratio_median_of_pairs"] <= r["ratio_q3"]
    assert r["tokens_per_run"] == r["batch"] * r["new_tokens"]
    # Same random checkpoint, greedy: the two frameworks agree token for
    # token (T5 and the decoder-only Qwen2 shape).
    if r["mode"] == "greedy":
      assert r["greedy_equal_fraction"] == 1.0, r["shape"]
  for r in rows[:2]:
    # The pre-refactor T5 sampler, from git, next to today's: same tokens.
    _finite(r, ["jax_old_tokens_per_s", "old_over_new_median_of_pairs",
                "old_over_new_iqr"])
    assert r["old_tokens_equal_fraction"] == 1.0

  rl_step.main(["--quick", "--no_memory", "--out", out["rl_step"]])
  data = json.load(open(out["rl_step"]))
  assert [r["family"] for r in data["rows"]] == ["t5", "decoder"]
  for r in data["rows"]:
    _finite(r, ["jax_step_s", "torch_step_s", "jax_tokens_per_s",
                "torch_tokens_per_s", "ratio", "ratio_median_of_pairs",
                "ratio_q1", "ratio_q3", "ratio_iqr", "jax_compile_s",
                "jax_warmup_s", "torch_warmup_s",
                "matmul_peak_gflops_during_steps", "copy_bandwidth_gb_s",
                "gflop", "jax_gflops", "jax_share_of_peak", "jax_mfu",
                "decode_floor_ms", "jax_decode_step_ms",
                "torch_decode_step_ms", "jax_decode_over_floor"])
    assert r["tokens_per_step"] == r["batch"] * r["new_tokens"]
    assert len(r["jax_s"]) == len(r["copy_bandwidth_gb_s_runs"]) == (
        data["repeats"])
    # Per-phase split, both sides: every phase timed once per repetition.
    assert [p["phase"] for p in r["phases"]] == list(rl_step.PHASES)
    for p in r["phases"]:
      _finite(p, ["jax_s", "torch_s", "ratio_median_of_pairs", "ratio_iqr",
                  "jax_share", "torch_share"])
      assert p["ratio_q1"] <= p["ratio_median_of_pairs"] <= p["ratio_q3"]
      assert len(p["jax_runs_s"]) == len(p["torch_runs_s"]) == (
          data["repeats"])
      if p["phase"] != "returns":
        _finite(p, ["gflop", "jax_gflops", "torch_gflops",
                    "jax_share_of_peak", "torch_share_of_peak"])
    # The phases' FLOPs are the step's.
    assert abs(sum(p["gflop"] or 0 for p in r["phases"]) - r["gflop"]) < (
        1e-9 * r["gflop"])
    update = r["phases"][-1]
    _finite(update, ["torch_student_fwd_bwd_s", "torch_optimizer_s"])
    # The PyTorch phases are marks inside the timed step: they add up to it.
    assert r["torch_phase_sum_s"] <= r["torch_step_s"]
    assert r["torch_phase_sum_s"] > 0.5 * r["torch_step_s"]
    _finite(r, ["jax_phase_sum_s", "torch_phase_sum_s"])

  mfu.main(["--quick", "--rl_step_json", out["rl_step"], "--out", out["mfu"]])
  data = json.load(open(out["mfu"]))
  assert "2 FLOPs per multiply-add" in data["formula"]
  assert len(data["rows"]) == 2
  for r in data["rows"]:
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


def test_decoder_flops_and_floor_count_a_known_case(tmp_path):
  # causal_flops, one layer, B=1, N=2 positions, LM head on 1 of them:
  # 2*1*2*(2*4*2*2 + 2*4*1*2 + 3*4*8) + 4*1*2^2*2*2 + 2*1*4*10
  m = {"e": 4, "f": 8, "n": 1, "h": 2, "kv": 1, "d": 2, "v": 10}
  assert mfu.causal_flops(m, 1, 2, 1) == 4 * (32 + 16 + 96) + 64 + 80
  # The decode floor: every float32 parameter of the transformers model
  # once, and the KV cache, 2 (k, v) * B * kv heads * (S + T) * D * layers.
  for shape in ("tiny-qwen2-small", "tiny-qwen2-base"):
    common.save_random(shape, str(tmp_path / shape), seed=0)
    model = common.load_torch(shape, str(tmp_path / shape))
    floor = rl_step.decode_bytes(shape, 2, 8, 8)
    assert floor["weights_bytes"] == 4 * sum(
        p.numel() for p in model.parameters())
  assert floor["kv_cache_bytes"] == 4 * 2 * 2 * 2 * 16 * 16 * 3


def test_ratio_quartiles():
  # Pairs 2/1, 3/1, 1/1, 8/2, 5/1 -> ratios 2, 3, 1, 4, 5: q1 2, median 3,
  # q3 4 (inclusive method).
  stats = common.ratio_stats([2, 3, 1, 8, 5], [1, 1, 1, 2, 1])
  assert stats == {"ratio_median_of_pairs": 3.0, "ratio_q1": 2.0,
                   "ratio_q3": 4.0, "ratio_iqr": 2.0}
  assert common.quartiles([7.0]) == (7.0, 7.0, 7.0)
