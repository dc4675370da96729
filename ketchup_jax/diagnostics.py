"""Gradient-variance, return-variance and bias of the K-step return (SPEC §2, §5).

For a student, a teacher and a task, draw M independent rollout minibatches.
For each minibatch `m`: one student rollout and one teacher pass; then, for
every K in a list, the policy-gradient estimate `g_m^K` of exactly the loss the
RL stage minimises (`rollouts.rl_step`: same rollout settings, same unfinished-
row handling, baseline, weight, clip and entropy term). All K share the same
rollouts and teacher pass, so the comparison between K is paired.

Per K it reports

  grad_var       trace of the covariance of `g_m^K` across minibatches,
                 `1/(M-1) sum_m ||g_m - g_bar||^2` (unbiased);
  grad_mean_sq   `||g_bar||^2`, the squared norm of the mean gradient (signal);
  return_var ... the `returns.summarize_returns` of the returns the loss used,
                 pooled over the M minibatches (for "llmr" without
                 "bootstrap", `returns.return_diagnostics`): return variance
                 (`return_var`, and `return_var_k1`), and the bias `Ĝ - G`
                 (`bias_mean`, `bias_std`, `bias_max`).

The objective is `rl.reward` (SPEC §6): "llmr" (the K-step return of Q-values,
with `rl.value` max, expected or soft), "reverse_kl" (the same at every K:
its return has no K) or "reverse_kl_kstep" (the K-step chain of the reverse-KL
reward, bias against its discounted reward-to-go). Several objectives on the
same rollouts: `objective_diagnostics`, or `--rewards` on the command line;
the rollouts are drawn from the same keys for each, so they are identical.

Two estimators of `grad_var`:
  full           the flattened gradient (exact; memory M x #params per K).
  projections=R  the gradient projected on R fixed Gaussian directions u_r
                 (drawn from one key, the same for every minibatch and K):
                 `grad_var ~= 1/R sum_r Var_m(u_r . g_m)`, unbiased for the
                 trace because E[u u^T] = I. Memory M x R; for large models.

Command line, on a finished pipeline run directory:

  python -m ketchup_jax.diagnostics --workdir=RUN --ks=1,2,4,8,16 \
      --minibatches=16 [--student=predistill] [--projections=0]

writes `RUN/diagnostics/<student>.json` and `.md` and prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from ketchup_jax import cli
from ketchup_jax import fileio
from ketchup_jax import losses
from ketchup_jax import reporting
from ketchup_jax import returns
from ketchup_jax.train import context
from ketchup_jax.train import rollouts
from ketchup_jax.train import sources
from ketchup_jax.train import steps

Batch = dict[str, jax.Array]

RETURN_KEYS = ("return_mean", "return_var", "return_var_k1", "bias_mean",
               "bias_std", "bias_max")


# --------------------------------------------------------------------------
# The pieces of `rollouts.rl_step`, split so the gradient can be taken per K
# --------------------------------------------------------------------------


def pg_objective(student_logits: jax.Array, scored: rollouts.ScoredRollout,
                 rl: rollouts.RLConfig, k: int
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """The scalar loss `rollouts.rl_step` differentiates at jump length k.

  Returns (loss, (returns [B, T], returns at K = 1 [B, T])) for any
  `rl.reward` (`rollouts.rollout_objective`).
  """
  logp, entropy = losses.token_logprobs(student_logits, scored.actions)
  loss, (_, g, g_k1) = rollouts.rollout_objective(logp, entropy, scored, rl, k)
  return loss, (g, g_k1)


def student_logits_fn(batch: Batch, scored: rollouts.ScoredRollout,
                      models: steps.StepModels) -> Callable[[Any], jax.Array]:
  """params -> the student's teacher-forced logits on the rollout."""
  def logits(params):
    return models.score(params, models.student, batch["input_ids"],
                        batch["attention_mask"], scored.actions, scored.mask)
  return logits


# --------------------------------------------------------------------------
# Per-minibatch gradients for every K
# --------------------------------------------------------------------------


def _tree_normal(key: jax.Array, like: Any) -> Any:
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      jax.random.normal(k, x.shape, jnp.float32)
      for k, x in zip(keys, leaves)])


def project(grad: Any, key: jax.Array, num: int) -> jax.Array:
  """[R] projections `u_r . grad` on R Gaussian directions from `key`.

  Direction r is drawn from `fold_in(key, r)`, one at a time (`lax.map`), so
  memory stays at one parameter-sized tree whatever R is.
  """
  def one(r):
    u = _tree_normal(jax.random.fold_in(key, r), grad)
    return sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32))
               for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(grad)))
  return jax.lax.map(one, jnp.arange(num))


def flatten(grad: Any) -> jax.Array:
  """The gradient pytree as one float32 vector (leaf order of the tree)."""
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                          for x in jax.tree.leaves(grad)])


def minibatch_gradients(student_params: Any, teacher_params: Any,
                        batch: Batch, sample_rng: jax.Array,
                        proj_key: jax.Array, *, models: steps.StepModels,
                        rl: rollouts.RLConfig, ks: tuple[int, ...],
                        projections: int = 0
                        ) -> tuple[jax.Array, jax.Array,
                                   dict[str, jax.Array]]:
  """One minibatch: the PG gradient for every K from one rollout.

  One student forward builds the VJP; each K's loss gives a cotangent on the
  logits, and the VJP maps it to the parameter gradient: the chain rule for
  the same loss `rl_step` differentiates, with the forward done once.

  Returns:
    (vectors, losses, scored, returns): `vectors` [len(ks), D] flattened
    gradients (projections == 0) or [len(ks), R] projections; `losses`
    [len(ks)] the loss values; `scored` as from `rollouts.score_rollout`;
    `returns` [len(ks) + 1, B, T], the return of each K and last the K = 1
    return, of `rl.reward`.
  """
  scored = rollouts.score_rollout(student_params, teacher_params, batch,
                               sample_rng, models=models, rl=rl)
  logits, vjp = jax.vjp(student_logits_fn(batch, scored, models),
                        student_params)
  vectors, values, gs = [], [], []
  g_k1 = None
  for k in ks:
    (loss, (g, g_k1)), ct = jax.value_and_grad(pg_objective, has_aux=True)(
        logits, scored, rl, k)
    (grad,) = vjp(ct)
    vectors.append(project(grad, proj_key, projections) if projections
                   else flatten(grad))
    values.append(loss)
    gs.append(g)
  return jnp.stack(vectors), jnp.stack(values), scored, jnp.stack(gs + [g_k1])


# --------------------------------------------------------------------------
# Variance estimators
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _jitted(models: steps.StepModels, rl: rollouts.RLConfig, ks: tuple[int, ...],
            projections: int) -> Callable[..., Any]:
  """One compiled `minibatch_gradients` per static setting (hook reuse)."""
  return jax.jit(functools.partial(
      minibatch_gradients, models=models, rl=rl, ks=ks,
      projections=projections))


def trace_covariance(vectors: np.ndarray) -> float:
  """`1/(M-1) sum_m ||x_m - x_bar||^2` for x [M, D] (float64)."""
  x = np.asarray(vectors, np.float64)
  if x.shape[0] < 2:
    raise ValueError(f"need at least 2 minibatches, got {x.shape[0]}")
  dev = x - x.mean(axis=0, keepdims=True)
  return float(np.sum(dev * dev) / (x.shape[0] - 1))


def projected_trace(projections: np.ndarray) -> float:
  """Trace estimate from projections [M, R] on directions with E[uu^T] = I.

  `1/R sum_r Var_m(p[:, r])` (unbiased variance over m). Gaussian directions
  make it an unbiased estimate of `trace_covariance`; the directions of an
  orthonormal basis of the whole space, each scaled by sqrt(D), make it equal
  (`sum_r (u_r . x)^2 = D ||x||^2`).
  """
  p = np.asarray(projections, np.float64)
  return trace_covariance(p) / p.shape[1]


@dataclasses.dataclass(frozen=True)
class Options:
  """What `gradient_diagnostics` measures.

  Attributes:
    ks: The K values, all from the same rollouts.
    minibatches: M, independent rollout minibatches (>= 2).
    projections: 0 for the full gradient, else R random directions.
    seed: Seed of the rollouts and the directions.
  """
  ks: tuple[int, ...] = (1, 2, 4, 8, 16)
  minibatches: int = 16
  projections: int = 0
  seed: int = 0

  def __post_init__(self):
    if not self.ks or any(isinstance(k, bool) or not isinstance(k, int)
                          or k < 1 for k in self.ks):
      raise ValueError(f"ks must be a non-empty list of ints >= 1, got "
                       f"{self.ks!r}")
    if not isinstance(self.minibatches, int) or self.minibatches < 2:
      raise ValueError(f"minibatches must be an int >= 2 (a variance needs "
                       f"two), got {self.minibatches!r}")
    if not isinstance(self.projections, int) or self.projections < 0:
      raise ValueError(f"projections must be an int >= 0 (0 = full "
                       f"gradient), got {self.projections!r}")


def gradient_diagnostics(student_params: Any, teacher_params: Any,
                         batches: Sequence[Batch] | Any, *,
                         models: steps.StepModels, rl: rollouts.RLConfig,
                         options: Options, progress: bool = False,
                         put: Callable[[Batch], Batch] | None = None
                         ) -> dict[int, dict[str, float]]:
  """Per-K gradient variance, return variance and bias (module docstring).

  Args:
    student_params, teacher_params: Parameter pytrees.
    batches: An iterable yielding at least `options.minibatches` batches
      (dicts with input_ids, attention_mask, example_mask).
    models: Static model description (`steps.StepModels`).
    rl: The RL options (its `k` is ignored; `options.ks` are used).
    options: What to measure.
    progress: Show a progress bar.
    put: Optional placement of each batch (e.g. `jax.device_put` with a
      sharding).

  Returns:
    {K: {"grad_var", "grad_mean_sq", "grad_var_rel", "loss_mean",
         "finished_fraction", *RETURN_KEYS}}.
  """
  ks = tuple(options.ks)
  fn = _jitted(models, rl, ks, options.projections)
  base = jax.random.PRNGKey(options.seed)
  proj_key = jax.random.fold_in(base, 1 << 30)
  iterator = iter(batches)
  vectors, loss_values, gs, ms, finished = [], [], [], [], []
  for m in tqdm.trange(options.minibatches, desc="diagnostics",
                       disable=not progress, leave=False):
    batch = next(iterator)
    if put is not None:
      batch = put(batch)
    vec, lv, scored, g = fn(student_params, teacher_params, batch,
                            jax.random.fold_in(base, m), proj_key)
    vectors.append(np.asarray(jax.device_get(vec), np.float64))
    loss_values.append(np.asarray(jax.device_get(lv), np.float64))
    gs.append(g), ms.append(scored.loss_mask)
    real = max(float(jnp.sum(scored.rollout.real_row)), 1.0)
    finished.append(float(jnp.sum(scored.rollout.finished)) / real)
  vectors = np.stack(vectors)  # [M, len(ks), D or R]
  width = max(x.shape[-1] for x in ms)
  pad = lambda x: jnp.pad(
      x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  g_all = jnp.concatenate([pad(x) for x in gs], axis=1)  # [len(ks)+1, MB, T]
  mask = jnp.concatenate([pad(x) for x in ms])  # [MB, T]
  out = {}
  for i, k in enumerate(ks):
    x = vectors[:, i]
    var = (projected_trace(x) if options.projections else
           trace_covariance(x))
    mean = x.mean(axis=0)
    mean_sq = float(mean @ mean)
    if options.projections:
      mean_sq /= options.projections
    diag = returns.summarize_returns(g_all[i], g_all[-1], mask)
    out[k] = {
        "grad_var": var,
        "grad_mean_sq": mean_sq,
        "grad_var_rel": var / mean_sq if mean_sq > 0 else float("inf"),
        "loss_mean": float(np.mean([lv[i] for lv in loss_values])),
        "finished_fraction": float(np.mean(finished)),
        **{name: float(diag[name]) for name in RETURN_KEYS},
    }
  return out


def objective_diagnostics(student_params: Any, teacher_params: Any,
                          batches: Callable[[], Any], *,
                          models: steps.StepModels,
                          rls: dict[str, rollouts.RLConfig], options: Options,
                          progress: bool = False,
                          put: Callable[[Batch], Batch] | None = None
                          ) -> dict[str, dict[int, dict[str, float]]]:
  """`gradient_diagnostics` of several objectives on the same rollouts.

  Args:
    batches: () -> a fresh iterable of the same batches (called once per
      objective).
    rls: {name: RLConfig}; they must agree on the rollout settings
      (temperature, top_k, top_p, max_decode_len), so that the same keys
      draw the same rollouts for each.
    The rest as in `gradient_diagnostics`.

  Returns:
    {name: {K: {...}}}.
  """
  rollout = {(r.temperature, r.top_k, r.top_p, r.max_decode_len)
             for r in rls.values()}
  if len(rollout) > 1:
    raise ValueError(f"the objectives must share the rollout settings "
                     f"(temperature, top_k, top_p, max_decode_len), got "
                     f"{sorted(rollout)}")
  return {name: gradient_diagnostics(
      student_params, teacher_params, batches(), models=models, rl=rl,
      options=options, progress=progress, put=put)
          for name, rl in rls.items()}


# --------------------------------------------------------------------------
# On a pipeline run: a finished run directory, or inside the RL stage
# --------------------------------------------------------------------------


def objective_configs(rl: rollouts.RLConfig, rewards: Sequence[str],
                      gamma: float | None = None) -> dict[str, rollouts.RLConfig]:
  """{reward: rl with that reward (and `gamma`, if given)}; checked."""
  out = {}
  for reward in rewards:
    changes = {"reward": reward}
    if gamma is not None:
      changes["gamma"] = gamma
    out[reward] = dataclasses.replace(rl, **changes)
  return out


def run_diagnostics(run: context.Run, student: Any, teacher: Any, *,
                    options: Options, split: str = "train",
                    batch_size: int | None = None, progress: bool = True,
                    k: int = 1, rewards: Sequence[str] = (),
                    gamma: float | None = None
                    ) -> dict[str, dict[int, dict[str, float]]]:
  """`objective_diagnostics` for a `context.Run` and two loaded `T5LM`s.

  The objectives are `rewards` (default: the run's `rl.reward`), each with
  the run's other RL options (and `gamma`, if given). Minibatches come from
  `split` ("train" or the run's eval split), shuffled with `options.seed`
  (independent of the training data order).

  Returns:
    {reward: {K: {...}}}.
  """
  cfg = run.cfg
  data = run.train if split == "train" else run.eval
  rl = rollouts.RLConfig.from_config(cfg.rl, k=k)
  rls = objective_configs(rl, tuple(rewards) or (rl.reward,), gamma)
  models = run.step_models(student, teacher)
  sharding = run.batch_sharding()
  return objective_diagnostics(
      student.params, teacher.params,
      lambda: run.batches(data, batch_size=batch_size or cfg.rl.batch_size,
                          seed=10_000 + options.seed),
      models=models, rls=rls, options=options,
      progress=progress and run.is_main,
      put=lambda b: jax.device_put(b, sharding))


def training_hook(run: context.Run, stage: str, teacher: Any, student_like: Any, *,
                  k: int, every: int, minibatches: int
                  ) -> Callable[[int, Any], None]:
  """A `loop.train_stage` hook: gradient/return variance every N steps.

  Logs `grad_var`, `grad_mean_sq`, `return_var`, `bias_mean` of the stage's
  own K (at the current parameters) to metrics.jsonl under `<stage>_diag`.
  It uses its own data order and RNG, so training is unchanged by it.
  """
  options = Options(ks=(k,), minibatches=minibatches, seed=run.cfg.seed + 7)

  def hook(step: int, state: Any) -> None:
    if step % every:
      return
    student = dataclasses.replace(student_like, params=state.params)
    (by_k,) = run_diagnostics(run, student, teacher, options=options,
                              progress=False, k=k).values()
    diag = by_k[k]
    run.writer.write(f"{stage}_diag", step, {
        name: diag[name] for name in (
            "grad_var", "grad_mean_sq", "return_var", "bias_mean",
            "loss_mean")})
  return hook


def _parse_ks(text: str) -> tuple[int, ...]:
  try:
    ks = tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    ks = ()
  if not ks or any(k < 1 for k in ks):
    raise ValueError(f"--ks must be a comma-separated list of ints >= 1, "
                     f"e.g. 1,2,4,8,16; got {text!r}")
  return ks


def load_run(workdir: str) -> context.Run:
  """A `context.Run` for a finished run directory (reads config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"--workdir {workdir!r} is not a pipeline run directory "
                     f"(no config.json); give the DIR of a run of "
                     f"`python -m ketchup_jax.main`")
  with open(path, encoding="utf-8") as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  return context.setup(cfg, workdir)


def diagnose_workdir(workdir: str, *, student: str, options: Options,
                     split: str = "train", batch_size: int = 0,
                     progress: bool = True, rewards: Sequence[str] = (),
                     gamma: float | None = None) -> dict[str, Any]:
  """Runs the diagnostics on `workdir/models/<student>` and writes the files.

  `rewards` (default: the run's `rl.reward`) are the objectives, all on the
  same rollouts; `by_k` is the first one's.

  Returns:
    {"student", "split", "options", "seconds", "rewards", "by_k": {K: {...}},
     "by_reward": {reward: {K: {...}}}}.
  """
  run = load_run(workdir)
  if split not in ("train", run.cfg.eval.split):
    raise ValueError(f"--split must be 'train' or the run's eval split "
                     f"{run.cfg.eval.split!r}, got {split!r}")
  models_dir = run.path("models")
  have = sorted(os.listdir(models_dir)) if os.path.isdir(models_dir) else []
  if student not in have:
    raise ValueError(f"--student={student!r}: no model {run.path('models', student)}; "
                     f"this run has: {', '.join(have) or 'none'}")
  teacher_lm = run.load_model("teacher", run.teacher_source(),
                              run.cfg.teacher, run.cfg.seed)
  student_lm = run.load_model("student", sources.stage_source(student),
                              run.cfg.student, run.cfg.seed)
  start = time.perf_counter()
  by_reward = run_diagnostics(run, student_lm, teacher_lm, options=options,
                              split=split, batch_size=batch_size or None,
                              progress=progress, rewards=rewards, gamma=gamma)
  first = next(iter(by_reward))
  result = {"student": student, "split": split,
            "options": dataclasses.asdict(options),
            "batch_size": batch_size or run.cfg.rl.batch_size,
            "seconds": time.perf_counter() - start,
            "rewards": list(by_reward),
            "by_k": {str(k): d for k, d in by_reward[first].items()},
            "by_reward": {r: {str(k): d for k, d in by_k.items()}
                          for r, by_k in by_reward.items()}}
  if run.is_main:
    out = run.path("diagnostics")
    os.makedirs(out, exist_ok=True)
    fileio.atomic_write(os.path.join(out, f"{student}.json"),
                        json.dumps(result, indent=1))
    fileio.atomic_write(os.path.join(out, f"{student}.md"),
                        reporting.diagnostics_tables(result))
  return result


FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline run DIR.",
                               flag_values=FLAGS)
_KS = flags.DEFINE_string("ks", "1,2,4,8,16",
                          "Comma-separated K values (default 1,2,4,8,16).",
                          flag_values=FLAGS)
_MINIBATCHES = flags.DEFINE_integer(
    "minibatches", 16, "M independent rollout minibatches (>= 2).",
    flag_values=FLAGS)
_PROJECTIONS = flags.DEFINE_integer(
    "projections", 0, "0: full gradient; R > 0: R random directions.",
    flag_values=FLAGS)
_STUDENT = flags.DEFINE_string(
    "student", "predistill", "Model under DIR/models/ (default predistill).",
    flag_values=FLAGS)
_SPLIT = flags.DEFINE_string("split", "train", "Data split of the rollouts.",
                             flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Rows per minibatch (default: config rl.batch_size).",
    flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the rollouts.",
                             flag_values=FLAGS)
_REWARDS = flags.DEFINE_string(
    "rewards", "", "Comma-separated objectives on the same rollouts, from "
    f"{','.join(rollouts.REWARDS)} (default: the run's rl.reward).",
    flag_values=FLAGS)
_GAMMA = flags.DEFINE_float(
    "gamma", None, "rl.gamma of the reverse-KL objectives (default: the "
    "run's).", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; `argv` without the program name (default sys.argv).

  Returns the exit status: 0, or 2 after one `error:` line.
  """
  try:
    cli.parse(FLAGS, sys.argv[1:] if argv is None else argv,
              prog="python -m ketchup_jax.diagnostics", doc=__doc__,
              required=("workdir",))
    options = Options(ks=_parse_ks(_KS.value), minibatches=_MINIBATCHES.value,
                      projections=_PROJECTIONS.value, seed=_SEED.value)
    if _BATCH_SIZE.value < 0:
      raise ValueError(f"--batch_size must be >= 0, got {_BATCH_SIZE.value}")
    rewards = tuple(r.strip() for r in _REWARDS.value.split(",")
                    if r.strip())
    bad = [r for r in rewards if r not in rollouts.REWARDS]
    if bad:
      raise ValueError(f"--rewards must hold values from {rollouts.REWARDS}, "
                       f"got {_REWARDS.value!r}")
    result = diagnose_workdir(_WORKDIR.value, student=_STUDENT.value,
                              options=options, split=_SPLIT.value,
                              batch_size=_BATCH_SIZE.value, rewards=rewards,
                              gamma=_GAMMA.value)
  except (ValueError, OSError) as e:
    return cli.error(e)
  print(reporting.diagnostics_tables(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
