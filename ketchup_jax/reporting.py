"""Every Markdown table and plot the package writes, from plain results.

Pure functions of dicts (`results.json`, a sweep's `sweep.json`, the
diagnostics' results): no models, no run directory. The pipeline writes
`results.md` and `plots/`, the sweep `results.md` and its figures, the
diagnostics command its tables, all from here.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


def _pyplot() -> Any:
  """matplotlib's pyplot on the file-only Agg backend (imported when used)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def rl_verdict(results: dict[str, Any]) -> list[str]:
  """One line: the best RL row on the first metric against its start."""
  first = results["metric_names"][0]
  models = results["models"]
  start = [label for label, row in models.items()
           if row["source"] == "stage:predistill"]
  rl = {label: row["metrics"][first] for label, row in models.items()
        if row["source"].startswith("stage:rl_k")}
  if not start or not rl:
    return []
  base = models[start[0]]["metrics"][first]
  best = max(rl, key=rl.get)
  below = [label for label, value in rl.items() if value < base]
  return ["", f"Best RL row on {first}: **{best}**, {rl[best]:.2f} against "
          f"{base:.2f} for its start, {start[0]} "
          f"({rl[best] - base:+.2f}); "
          + (f"below the start: {', '.join(below)}." if below else
             "every RL row is at or above the start.")]


def results_table(results: dict[str, Any]) -> str:
  """The eval results as a Markdown table (model x metric)."""
  names = results["metric_names"]
  lines = [f"Task `{results['task']}`, split `{results['split']}` "
           f"({results['num_examples']} examples).", "",
           "| model | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
  for label, row in results["models"].items():
    lines.append(f"| {label} | " + " | ".join(
        f"{row['metrics'][n]:.2f}" for n in names) + " |")
  lines += rl_verdict(results)
  selected = {label: row["selection"] for label, row in
              results["models"].items() if row.get("selection")}
  if selected:
    lines += ["", f"Models are scored on `{results['split']}`. Stages that "
              "validated chose their exported parameters on the validation "
              "split (never on the reported split); the starting point "
              "never competes:", "",
              "| model | select | every | selected update | val metric | "
              "val at start | val selected | validation s |",
              "|---|---|---:|---:|---|---:|---:|---:|"]
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    for label, sel in selected.items():
      lines.append(
          f"| {label} | {sel['select']} | {sel['eval_every']} | "
          f"{sel['selected_step']} | {sel['val_metric']} | "
          f"{fmt(sel.get('start_val_score'))} | "
          f"{fmt(sel.get('selected_val_score'))} | "
          f"{sel['val_seconds']:.1f} |")
  diag = results.get("return_diagnostics")
  if diag:
    lines += ["", "Return variance and bias of the pre-distilled student's "
              "rollouts, per K (one teacher pass, SPEC §5):", "",
              "| K | Var[Ĝ] | Var[G] (K=1) | mean Ĝ−G | max Ĝ−G |",
              "|---:|---:|---:|---:|---:|"]
    for k, d in diag.items():
      lines.append(f"| {k} | {d['return_var']:.3f} | {d['return_var_k1']:.3f}"
                   f" | {d['bias_mean']:.3f} | {d['bias_max']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_diagnostics(results: dict[str, Any], directory: str) -> list[str]:
  """PNG plots of return variance and bias against K."""
  diag = results.get("return_diagnostics")
  if not diag:
    return []
  plt = _pyplot()
  os.makedirs(directory, exist_ok=True)
  ks = [int(k) for k in diag]
  written = []
  for key, title, fname in (
      ("return_var", "Batch variance of the K-step return", "return_var.png"),
      ("bias_mean", "Mean bias Ĝ − G of the K-step return", "bias.png")):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [diag[str(k)][key] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, fname)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


# A sweep (`ketchup_jax.sweep`): mean ± std over seeds of every method.


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (ddof 1; 0 for one value)."""
  x = np.asarray(values, np.float64)
  return {"mean": float(x.mean()),
          "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
          "n": int(len(x))}


def aggregate(records: Sequence[dict[str, Any]],
              diags: dict[int, dict[str, Any]],
              training: dict[str, dict[int, list[dict[str, float]]]],
              *, task: str, metric_names: Sequence[str]) -> dict[str, Any]:
  """Mean ± std over seeds of every row's metrics and of the diagnostics."""
  rows: dict[str, dict[str, Any]] = {}
  start = {str(r["seed"]): r["metrics"] for r in records
           if r["kind"] == "predistill"}
  for r in records:
    row = rows.setdefault(r["label"], {"kind": r["kind"], "k": r["k"],
                                       "per_seed": {}})
    row["per_seed"][str(r["seed"])] = r["metrics"]
    if r.get("selection"):
      row.setdefault("selected_step", {})[str(r["seed"])] = (
          r["selection"]["selected_step"])
  for row in rows.values():
    row["metrics"] = {m: mean_std([s[m] for s in row["per_seed"].values()])
                      for m in metric_names}
    # The change from the same seed's pre-distilled start (paired).
    paired = [seed for seed in row["per_seed"] if seed in start]
    if row["kind"] in ("rl", "continue") and paired:
      row["delta"] = {m: mean_std([row["per_seed"][seed][m] - start[seed][m]
                                   for seed in paired])
                      for m in metric_names}
  by_k: dict[str, dict[str, Any]] = {}
  for seed, d in sorted(diags.items()):
    for k, values in d["by_k"].items():
      entry = by_k.setdefault(k, {})
      for key, value in values.items():
        entry.setdefault(key, {}).setdefault("per_seed", {})[str(seed)] = value
  for entry in by_k.values():
    for stats in entry.values():
      stats.update(mean_std(list(stats["per_seed"].values())))
  return {"task": task, "metric_names": list(metric_names), "rows": rows,
          "diagnostics": by_k, "training": training}


def _fmt(stats: dict[str, float], digits: int = 2) -> str:
  if stats["n"] > 1:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
  return f"{stats['mean']:.{digits}f}"


def _fmt_g(stats: dict[str, float]) -> str:
  if stats["n"] > 1:
    return f"{stats['mean']:.4g} ± {stats['std']:.2g}"
  return f"{stats['mean']:.4g}"


def sweep_markdown(results: dict[str, Any], *, title: str = "") -> str:
  """The paper-shaped table (method x metric, mean ± std) and diagnostics."""
  names = results["metric_names"]
  seeds = sorted({s for r in results["rows"].values() for s in r["per_seed"]
                  if s != "None"})
  first = names[0]
  lines = ([f"## {title}", ""] if title else []) + [
      f"Task `{results['task']}`; mean ± std (sample std) over seeds "
      f"{', '.join(seeds)} (the teacher is trained once). Δ: the change of "
      f"{first} from the same seed's pre-distilled student, mean ± std of "
      f"the paired differences. Selected: the update each seed's run "
      f"exported, when it selected on validation.", "",
      "| method | " + " | ".join(names) + f" | Δ {first} | selected |",
      "|---|" + "---:|" * len(names) + "---:|---|"]
  for label, row in results["rows"].items():
    delta = _fmt(row["delta"][first]) if "delta" in row else ""
    if "delta" in row:
      delta = ("+" if row["delta"][first]["mean"] >= 0 else "") + delta
    chosen = ", ".join(str(v) for _, v in sorted(
        row.get("selected_step", {}).items()))
    lines.append(f"| {label} | " + " | ".join(
        _fmt(row["metrics"][n]) for n in names) + f" | {delta} | {chosen} |")
  diag = results["diagnostics"]
  if diag:
    lines += ["", "Diagnostics of the pre-distilled student (all K on the "
              "same rollouts, per seed; mean ± std over seeds):", "",
              "| K | grad var (trace) | ‖mean grad‖² | return var | "
              "bias mean | bias std | bias max |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for k, d in sorted(diag.items(), key=lambda kv: int(kv[0])):
      cells = [_fmt_g(d[key]) if key in d else "–" for key in (
          "grad_var", "grad_mean_sq", "return_var", "bias_mean", "bias_std",
          "bias_max")]
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def sweep_plots(results: dict[str, Any], directory: str,
         metric: str | None = None) -> list[str]:
  """grad var / bias / return var vs K, metric vs K, curves over training."""
  plt = _pyplot()
  os.makedirs(directory, exist_ok=True)
  written = []

  def save(fig, name):
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

  diag = results["diagnostics"]
  if diag:
    ks = sorted(int(k) for k in diag)
    for key, title, fname, logy in (
        ("grad_var", "Policy-gradient variance (trace of covariance)",
         "grad_var_vs_k.png", True),
        ("bias_mean", "Bias of the K-step return, mean Ĝ − G",
         "bias_vs_k.png", False),
        ("return_var", "Return variance Var[Ĝ]", "return_var_vs_k.png",
         True)):
      fig, ax = plt.subplots(figsize=(4.6, 3.3))
      mean = [diag[str(k)][key]["mean"] for k in ks]
      std = [diag[str(k)][key]["std"] for k in ks]
      ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3)
      ax.set_xscale("log", base=2)
      ax.set_xticks(ks, [str(k) for k in ks])
      if logy:
        ax.set_yscale("log")
      ax.set_xlabel("K")
      ax.set_title(title, fontsize=9)
      ax.grid(alpha=0.3)
      save(fig, fname)

  metric = metric or results["metric_names"][0]
  rows = results["rows"]
  # LLMR / KETCHUP with the base options only (no ", <variant>" suffix).
  rl = sorted((r["k"], r["metrics"][metric]) for label, r in rows.items()
              if r["kind"] == "rl" and label.startswith(("LLMR", "KETCHUP"))
              and "," not in label)
  if rl:
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    ax.errorbar([k for k, _ in rl], [s["mean"] for _, s in rl],
                yerr=[s["std"] for _, s in rl], marker="o", capsize=3,
                label="LLMR (K=1) / KETCHUP")
    styles = iter(["--", ":", "-.", (0, (1, 3)), (0, (5, 2)), (0, (3, 1, 1, 1))])
    for label, r in rows.items():
      if r["kind"] in ("continue", "predistill"):
        ax.axhline(r["metrics"][metric]["mean"], ls=next(styles, "--"),
                   color="gray" if r["kind"] == "predistill" else None,
                   lw=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([k for k, _ in rl], [str(k) for k, _ in rl])
    ax.set_xlabel("K")
    ax.set_ylabel(metric)
    n_seeds = max(s["n"] for _, s in rl)
    ax.set_title(f"Test {metric} vs K (mean ± std, {n_seeds} seeds)"
                 if n_seeds > 1 else f"Test {metric} vs K (1 seed)",
                 fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    save(fig, "metric_vs_k.png")

  training = results.get("training") or {}
  if training:
    for key, title, fname in (
        ("grad_var", "Policy-gradient variance during RL", "grad_var_train.png"),
        ("return_var", "Return variance during RL", "return_var_train.png")):
      fig, ax = plt.subplots(figsize=(4.6, 3.3))
      for label, per_seed in training.items():
        curves = [c for c in per_seed.values() if c]
        n = min(len(c) for c in curves)
        steps_ = [c["step"] for c in curves[0][:n]]
        vals = np.array([[c[i][key] for i in range(n)] for c in curves])
        mean, std = vals.mean(0), (vals.std(0, ddof=1) if len(vals) > 1
                                   else np.zeros(n))
        ax.plot(steps_, mean, marker=".", label=label)
        ax.fill_between(steps_, mean - std, mean + std, alpha=0.2)
      ax.set_yscale("log")
      ax.set_xlabel("RL step")
      n_seeds = max(len(v) for v in training.values())
      ax.set_title(title + (f" (mean ± std, {n_seeds} seeds)" if n_seeds > 1
                            else " (1 seed)"), fontsize=9)
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
      save(fig, fname)
  return written


# The diagnostics (`ketchup_jax.diagnostics`): variance and bias per K.


def diagnostics_table(diag: dict[int, dict[str, float]], *, title: str = "") -> str:
  """Markdown table of `gradient_diagnostics` output, one row per K."""
  lines = ([title, ""] if title else []) + [
      "| K | grad var (trace) | ‖mean grad‖² | var/‖mean‖² | return var | "
      "bias mean | bias std | bias max |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for k, d in diag.items():
    lines.append(
        f"| {k} | {d['grad_var']:.4g} | {d['grad_mean_sq']:.4g} | "
        f"{d['grad_var_rel']:.3g} | {d['return_var']:.4g} | "
        f"{d['bias_mean']:.4g} | {d['bias_std']:.4g} | {d['bias_max']:.4g} |")
  return "\n".join(lines) + "\n"


def diagnostics_tables(result: dict[str, Any]) -> str:
  """The Markdown of a `diagnose_workdir` result: one table per reward."""
  by_reward = result.get("by_reward") or {"": result["by_k"]}
  parts = []
  for reward, by_k in by_reward.items():
    title = _diagnostics_title(result) + (f" Objective `{reward}`." if reward
                                          else "")
    parts.append(diagnostics_table({int(k): d for k, d in by_k.items()},
                                   title=title))
  return "\n".join(parts)


def _diagnostics_title(result: dict[str, Any]) -> str:
  o = result["options"]
  how = (f"{o['projections']} random projections" if o["projections"]
         else "full gradient")
  return (f"Student `{result['student']}`, {o['minibatches']} minibatches of "
          f"{result['batch_size']} from split `{result['split']}`, {how}; "
          f"all K on the same rollouts.")
