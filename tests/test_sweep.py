"""The sweep runner: aggregation by hand, a real 2 x 2 sweep, resumption."""

import json
import math
import os
import pathlib

import jax
import pytest

from configs.experiments import smoke_sweep
from ketchup_jax import partitioning
from ketchup_jax import reporting
from ketchup_jax import sweep
from ketchup_jax.train import pipeline


def test_aggregate_is_mean_and_sample_std_over_seeds():
  records = [
      {"label": "teacher", "seed": None, "kind": "teacher", "k": 0,
       "metrics": {"chrf": 50.0}},
      {"label": "KL", "seed": 0, "kind": "continue", "k": 0,
       "metrics": {"chrf": 10.0}},
      {"label": "KL", "seed": 1, "kind": "continue", "k": 0,
       "metrics": {"chrf": 14.0}},
      {"label": "KL", "seed": 2, "kind": "continue", "k": 0,
       "metrics": {"chrf": 15.0}},
  ]
  diags = {0: {"by_k": {"1": {"grad_var": 2.0}, "4": {"grad_var": 1.0}}},
           1: {"by_k": {"1": {"grad_var": 4.0}, "4": {"grad_var": 1.0}}}}
  out = reporting.aggregate(records, diags, {}, task="t", metric_names=["chrf"])
  kl = out["rows"]["KL"]["metrics"]["chrf"]
  # By hand: mean 13, deviations -3, 1, 2 -> sum of squares 14, / (3-1) = 7.
  assert kl["mean"] == pytest.approx(13.0)
  assert kl["std"] == pytest.approx(math.sqrt(7.0))
  assert out["rows"]["teacher"]["metrics"]["chrf"] == {
      "mean": 50.0, "std": 0.0, "n": 1}
  assert out["diagnostics"]["1"]["grad_var"]["mean"] == pytest.approx(3.0)
  assert out["diagnostics"]["1"]["grad_var"]["std"] == pytest.approx(
      math.sqrt(2.0))
  assert out["diagnostics"]["4"]["grad_var"]["std"] == 0.0
  md = reporting.sweep_markdown(out)
  assert "| KL | 13.00 ± 2.65 |" in md and "| teacher | 50.00 |" in md


def test_plan_gives_every_method_the_same_start_and_budget():
  c = smoke_sweep.get_config()
  c.methods = ("seqkd", "kl", "llmr", "ketchup")
  c.ks = (2, 8)
  c.scratch_ks = (2,)
  specs = sweep.plan(c)
  names = [(s.seed, s.name) for s in specs]
  assert names[:2] == [(None, "teacher"), (0, "predistill")]
  assert (0, "ketchup_k8") in names and (1, "scratch_k2") in names
  start = os.path.abspath("W/seed1/predistill/models/predistill")
  for spec in specs:
    if spec.seed != 1 or spec.kind in ("teacher", "predistill"):
      continue
    cfg = sweep.run_config(c, spec, "W")
    if spec.from_scratch:
      assert cfg.student.init_from == c.base.student.init_from
    else:
      assert cfg.student.init_from == start
    budget = cfg.predistill if spec.kind == "continue" else cfg.rl
    assert (budget.steps, budget.batch_size, budget.learning_rate) == (
        c.base.rl.steps, c.base.rl.batch_size, c.base.rl.learning_rate)
    # The training stage's data seed: rl uses seed + 2, predistill seed + 1.
    stage_seed = cfg.seed + (1 if spec.kind == "continue" else 2)
    assert stage_seed == 3


@pytest.fixture
def one_device(monkeypatch):
  original = partitioning.make_mesh
  monkeypatch.setattr(partitioning, "make_mesh",
                      lambda **kw: original(devices=jax.devices()[:1], **kw))


def test_smoke_sweep_aggregates_its_runs_and_resumes(tmp_path, one_device,
                                                     monkeypatch):
  c = smoke_sweep.get_config()
  c.base.eval.max_examples = 8
  for stage in ("teacher_sft", "predistill", "rl"):
    c.base[stage].steps = 2
  workdir = str(tmp_path / "sweep")
  results = sweep.run_sweep(c, workdir, log=lambda *a, **k: None)

  # 1 teacher + 2 seeds x (predistill, kl, llmr) runs, 2 diagnostics.
  evals = sorted(pathlib.Path(workdir).glob("**/eval.json"))
  assert len(evals) == 7 and len(results["ran"]) == 9
  per_run = {}
  for path in evals:
    rec = json.loads(path.read_text())
    per_run.setdefault(rec["label"], []).append(rec["metrics"]["chrf"])
  assert set(per_run) == {"teacher", "pre-distilled (seqkd)", "KL",
                          "LLMR (K=1)"}
  for label, values in per_run.items():
    got = results["rows"][label]["metrics"]["chrf"]
    mean = sum(values) / len(values)
    assert got["mean"] == pytest.approx(mean)
    if len(values) == 2:  # sample std of two values: |a - b| / sqrt(2)
      assert got["std"] == pytest.approx(abs(values[0] - values[1])
                                         / math.sqrt(2))
  for k in ("1", "2"):
    assert results["diagnostics"][k]["grad_var"]["n"] == 2
  assert results["diagnostics"]["1"]["bias_mean"]["mean"] == pytest.approx(
      0.0, abs=1e-4)
  for name in ("results.json", "results.md", "plots/grad_var_vs_k.png",
               "plots/bias_vs_k.png", "plots/metric_vs_k.png"):
    assert os.path.exists(os.path.join(workdir, name)), name

  # Rerun: nothing is trained or evaluated again, the results are the same.
  mtimes = {p: p.stat().st_mtime_ns for p in evals}

  def refuse(*args, **kwargs):
    raise AssertionError("a finished run was run again")

  monkeypatch.setattr(pipeline, "run", refuse)
  again = sweep.run_sweep(c, workdir, log=lambda *a, **k: None)
  assert again["ran"] == []
  assert again["rows"] == json.loads(json.dumps(results["rows"]))
  assert {p: p.stat().st_mtime_ns for p in evals} == mtimes


def test_bad_sweep_config_is_refused_before_anything_runs(tmp_path):
  c = smoke_sweep.get_config()
  c.methods = ("kl", "ppo")
  with pytest.raises(ValueError, match=r"config.methods must be .*'ppo'"):
    sweep.run_sweep(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  c = smoke_sweep.get_config()
  c.seeds = (0, 0)
  with pytest.raises(ValueError, match="config.seeds must be distinct"):
    sweep.run_sweep(c, str(tmp_path / "w"))


def test_reuse_from_takes_the_other_sweeps_teacher_and_checks_settings(
    tmp_path):
  c = smoke_sweep.get_config()
  other, mine = tmp_path / "other", str(tmp_path / "mine")
  c.reuse_from = str(other)
  teacher_spec, predistill_spec, kl_spec = sweep.plan(c)[:3]
  cfg = sweep.run_config(c, kl_spec, mine)
  assert cfg.teacher.init_from == str(other / "teacher/models/teacher_sft")
  assert cfg.student.init_from == str(
      other / "seed0/predistill/models/predistill")
  assert predistill_spec.directory(mine, c.reuse_from) == str(
      other / "seed0/predistill")
  assert kl_spec.directory(mine, c.reuse_from) == os.path.join(
      mine, "seed0", "kl")
  with pytest.raises(ValueError, match="no finished teacher"):
    sweep.execute(c, teacher_spec, mine)
  # A finished teacher made with other settings is refused.
  (other / "teacher").mkdir(parents=True)
  (other / "teacher/eval.json").write_text(json.dumps({"metrics": {}}))
  stored = sweep.run_config(c, teacher_spec, str(other))
  stored.teacher_sft.steps += 1
  (other / "teacher/config.json").write_text(stored.to_json_best_effort())
  with pytest.raises(ValueError, match="different config.base.teacher_sft"):
    sweep.execute(c, teacher_spec, mine)
  stored.teacher_sft.steps -= 1
  (other / "teacher/config.json").write_text(stored.to_json_best_effort())
  assert sweep.execute(c, teacher_spec, mine) == ({"metrics": {}}, False)


def test_a_given_teacher_is_only_evaluated_and_used_as_is():
  # The paper's setting: a prompted FLAN-T5 teacher, no teacher SFT.
  c = smoke_sweep.get_config()
  c.base.stages = "predistill,rl,eval"
  c.base.teacher.init_from = "/models/flan-t5-xl"
  teacher_spec, predistill_spec, kl_spec = sweep.plan(c)[:3]
  assert sweep.run_config(c, teacher_spec, "W").stages == "eval"
  for spec in (predistill_spec, kl_spec):
    assert sweep.run_config(c, spec, "W").teacher.init_from == (
        "/models/flan-t5-xl")


@pytest.mark.parametrize("arg,message", [
    ("--config.bogus=1", "unknown config field 'bogus'"),
    ("--config.methods=('ppo',)", "config.methods must be a non-empty list"),
])
def test_command_line_error_is_one_line_and_exit_2(tmp_path, arg, message):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
      [sys.executable, "-m", "ketchup_jax.sweep",
       "--config=configs/experiments/smoke_sweep.py",
       f"--workdir={tmp_path / 'w'}", arg],
      cwd=repo, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0]
  assert not (tmp_path / "w").exists()
