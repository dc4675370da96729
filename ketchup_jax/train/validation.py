"""Validation during training and best-checkpoint selection (SPEC §4.3).

A stage with `eval_every = N > 0` decodes the validation split greedily after
every N optimizer updates (and after the last one), scores it with the task's
metric, and logs the score and the seconds it took to `metrics.jsonl` (stage
`<stage>_val`) and TensorBoard. With `select = "best"` the parameters of the
best-scoring validation step become the stage's exported model; with
`"last"`, the final parameters do. The starting point is scored (step 0, for
the record) but never competes: only updated parameters can be selected, so a
stage cannot "improve" by handing back its input.

The best-so-far (its parameters, score and step) lives in the checkpointed
`TrainState.selection`, so a stage killed and resumed selects exactly what an
uninterrupted run selects.

The validation split is the task's own `validation` split when it has one
(its `max_examples` lowest-hashing examples, not a prefix: splits are often
sorted); otherwise a deterministic carve-out of train (the examples whose source
hashes lowest, removed from train), which never overlaps test because train
does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

SELECT = ("last", "best")
TRAINING_STAGES = ("teacher_sft", "predistill", "rl")


@flax.struct.dataclass
class Selection:
  """The validation record a stage checkpoints.

  Attributes:
    params: The best-scoring updated parameters so far (select=best), or None
      (select=last).
    score: float32 scalar, their validation score (-inf before the first
      validation after an update).
    step: int32 scalar, the optimizer update they come from (0 = none yet).
    start_score: float32 scalar, the score of the stage's starting parameters
      (NaN if not measured).
    last_score: float32 scalar, the score of the latest validation (NaN
      before the first).
    seconds: float32 scalar, seconds spent validating so far.
  """
  params: Any
  score: jax.Array
  step: jax.Array
  start_score: jax.Array
  last_score: jax.Array
  seconds: jax.Array


def initial_selection(params: Any, select: str) -> Selection:
  """A fresh record; with select=best, `params` is copied as a placeholder."""
  return Selection(
      params=jax.tree.map(jnp.copy, params) if select == "best" else None,
      score=jnp.full((), -jnp.inf, jnp.float32),
      step=jnp.zeros((), jnp.int32),
      start_score=jnp.full((), jnp.nan, jnp.float32),
      last_score=jnp.full((), jnp.nan, jnp.float32),
      seconds=jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class StageValidation:
  """How one stage validates (checked by `from_config`).

  Attributes:
    every: Validate after every this many optimizer updates; 0 = never.
    select: "last" or "best".
  """
  every: int = 0
  select: str = "last"

  @classmethod
  def from_config(cls, stage: str,
                  sub: ml_collections.ConfigDict) -> StageValidation:
    every, select = sub.get("eval_every", 0), sub.get("select", "last")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
      raise ValueError(f"config.{stage}.eval_every must be an int >= 0 "
                       f"(optimizer updates between validations; 0 = never), "
                       f"got {every!r}")
    if select not in SELECT:
      raise ValueError(f"config.{stage}.select must be one of {SELECT}, got "
                       f"{select!r}")
    if select == "best" and every == 0:
      raise ValueError(f"config.{stage}.select='best' needs "
                       f"config.{stage}.eval_every > 0 (validation picks the "
                       f"best step), got eval_every=0")
    return cls(every=every, select=select)

  @property
  def enabled(self) -> bool:
    return self.every > 0

  def due(self, update: int, total_updates: int) -> bool:
    """Whether to validate after optimizer update `update` (1-based)."""
    return self.enabled and (update % self.every == 0 or
                             update == total_updates)


def needed(cfg: ml_collections.ConfigDict) -> bool:
  """Whether any stage of this config validates."""
  return any(StageValidation.from_config(s, cfg[s]).enabled
             for s in TRAINING_STAGES)


def _source_hash(example: dict[str, str]) -> bytes:
  return hashlib.blake2b(example["source"].encode("utf-8"),
                         digest_size=8).digest()


def _lowest_hashing(examples: list[dict[str, str]], n: int) -> set[int]:
  return set(sorted(range(len(examples)),
                    key=lambda i: _source_hash(examples[i]))[:n])


def subset(examples: list[dict[str, str]], n: int) -> list[dict[str, str]]:
  """At most n examples: the n whose source hashes lowest, in their order.

  Not a prefix: splits are often sorted (the numbers tasks ascend), and a
  prefix would validate on one end of the distribution only.
  """
  if len(examples) <= n:
    return list(examples)
  chosen = _lowest_hashing(examples, n)
  return [ex for i, ex in enumerate(examples) if i in chosen]


def carve_out(train: list[dict[str, str]], n: int
              ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """(train without the carve-out, the carve-out): the n lowest-hashing.

  Deterministic on every machine; order within each part is kept. At most a
  tenth of train is taken, so training keeps most of its data.
  """
  n = min(n, len(train) // 10)
  if n < 1:
    raise ValueError(f"the train split has {len(train)} examples, too few to "
                     f"carve a validation set out of (needs >= 10)")
  chosen = _lowest_hashing(train, n)
  return ([ex for i, ex in enumerate(train) if i not in chosen],
          [ex for i, ex in enumerate(train) if i in chosen])


def metric_name(cfg: ml_collections.ConfigDict,
                metric_names: tuple[str, ...]) -> str:
  """The metric selection maximises: config.validation.metric or the first."""
  name = cfg.get("validation", ml_collections.ConfigDict()).get("metric", "")
  name = name or metric_names[0]
  if name not in metric_names:
    raise ValueError(f"config.validation.metric must be one of the task's "
                     f"metrics {tuple(metric_names)}, got {name!r}")
  return name


class Validator:
  """Scores parameters on the validation split and keeps the selection.

  Args:
    spec: The stage's settings.
    score_fn: params -> validation score (higher is better); decodes greedily.
    log_fn: (update, {name: value}) -> None, writes the record.
    metric: The score's metric name (for the log).
  """

  def __init__(self, spec: StageValidation, score_fn: Callable[[Any], float],
               log_fn: Callable[[int, dict[str, float]], None], metric: str):
    self.spec, self._score, self._log, self.metric = (spec, score_fn, log_fn,
                                                      metric)

  def _timed(self, params: Any) -> tuple[float, float]:
    start = time.perf_counter()
    score = float(self._score(params))
    return score, time.perf_counter() - start

  def start(self, state: Any) -> Any:
    """Scores the starting parameters (recorded, never selected)."""
    score, seconds = self._timed(state.params)
    self._log(0, {self.metric: score, "val_seconds": seconds})
    return state.replace(selection=state.selection.replace(
        start_score=jnp.float32(score),
        seconds=state.selection.seconds + seconds))

  def after_update(self, state: Any, update: int) -> Any:
    """Scores `state.params` after update `update`; keeps them if best."""
    score, seconds = self._timed(state.params)
    sel = state.selection
    better = score > float(sel.score)
    self._log(update, {self.metric: score, "val_seconds": seconds,
                       "val_best": max(score, float(sel.score))})
    sel = sel.replace(seconds=sel.seconds + seconds,
                      last_score=jnp.float32(score))
    if better:
      sel = sel.replace(
          score=jnp.float32(score), step=jnp.int32(update),
          params=(None if sel.params is None else
                  jax.tree.map(jnp.copy, state.params)))
    return state.replace(selection=sel)


def selected_params(state: Any, spec: StageValidation) -> Any:
  """The parameters the stage exports."""
  if spec.select == "best":
    return state.selection.params
  return state.params


def summary(state: Any, spec: StageValidation, metric: str,
            total_updates: int) -> dict[str, Any]:
  """What `stages/<stage>.json` and results.md record of the selection."""
  if not spec.enabled:
    return {}
  sel = jax.device_get(state.selection.replace(params=None))
  best = spec.select == "best"
  number = lambda x: None if x != x else float(x)  # NaN -> None (JSON)
  return {
      "select": spec.select, "eval_every": spec.every,
      "val_metric": metric,
      "selected_step": int(sel.step) if best else total_updates,
      "selected_val_score": number(sel.score if best else sel.last_score),
      "best_val_step": int(sel.step), "best_val_score": number(sel.score),
      "start_val_score": number(sel.start_score),
      "val_seconds": float(sel.seconds)}
