"""Pure step functions `(state, batch, ...) -> (state, metrics)` for each stage.

Each step is one micro-batch: forward, loss as `(sum, count)`, gradient, and
the optimizer update with the non-finite guard of `state.apply_gradients`.
Static arguments (model configs, option dataclasses, mesh) are hashable, so
`jax.jit(step, static_argnames=...)` compiles once per batch shape.

Stages:
  `supervised_step`  cross-entropy on the batch's targets (teacher SFT).
  `seqkd_step`       cross-entropy on the teacher's greedy outputs (SeqKD).
  `word_kd_step`     word-level KL / RKL / JS / TVD on the gold targets.
  `rl_step`          rollout -> teacher Q-values -> K-step returns -> REINFORCE.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections

from ketchup_jax import chunked
from ketchup_jax import losses
from ketchup_jax import partitioning
from ketchup_jax import returns
from ketchup_jax.models import sampling
from ketchup_jax.models import t5
from ketchup_jax.models.config import T5Config
from ketchup_jax.train import state as state_lib

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

UNFINISHED = ("drop", "terminal", "bootstrap")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The KETCHUP knobs of SPEC §2–3 (hashable: a static jit argument).

  Attributes:
    k: Jump length of the K-step return; 1 is LLMR.
    value: "max" or "expected" state value.
    center_logits: Centre the teacher logits into Q-values.
    unfinished: Rollouts without EOS: "drop", "terminal" or "bootstrap".
    baseline: "none", "batch_mean" or "teacher_expected".
    weight: "none", "importance" or "reference_compat".
    denom: Advantage divisor.
    reward_clip: Advantage clip c (None: no clip).
    entropy_coef: Entropy bonus beta.
    max_decode_len: Rollout length (static).
    temperature: Sampling temperature of the rollout (0 = greedy).
    top_k: Rollout top-k (0 = off).
    top_p: Rollout nucleus mass (1 = off).
  """
  k: int = 1
  value: str = "max"
  center_logits: bool = True
  unfinished: str = "drop"
  baseline: str = "none"
  weight: str = "none"
  denom: float = 1.0
  reward_clip: float | None = 50.0
  entropy_coef: float = 0.0
  max_decode_len: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, *, k: int) -> RLConfig:
    fields = {f.name for f in dataclasses.fields(cls)} - {"k"}
    out = cls(k=k, **{name: cfg[name] for name in fields if name in cfg})
    return out

  def __post_init__(self):
    if not isinstance(self.k, int) or self.k < 1:
      raise ValueError(f"rl.k must be an int >= 1, got {self.k!r}")
    if self.value not in returns.VALUES:
      raise ValueError(
          f"rl.value must be one of {returns.VALUES}, got {self.value!r}")
    if self.unfinished not in UNFINISHED:
      raise ValueError(
          f"rl.unfinished must be one of {UNFINISHED}, got {self.unfinished!r}")
    if self.baseline not in losses.BASELINES:
      raise ValueError(f"rl.baseline must be one of {losses.BASELINES}, got "
                       f"{self.baseline!r}")
    if self.weight not in losses.WEIGHTS:
      raise ValueError(
          f"rl.weight must be one of {losses.WEIGHTS}, got {self.weight!r}")
    if not isinstance(self.max_decode_len, int) or self.max_decode_len < 1:
      raise ValueError(
          f"rl.max_decode_len must be an int >= 1, got {self.max_decode_len!r}")


@dataclasses.dataclass(frozen=True)
class Models:
  """Static description of the models a step uses.

  `logits_chunk` > 0 computes every loss and the teacher's Q-values from the
  LM heads' inputs that many positions at a time (`ketchup_jax.chunked`): no
  `[B, T, V]` float32 logits, forward or backward; the same numbers. 0 (the
  default) materialises the whole logits.
  """
  student: T5Config
  teacher: T5Config | None = None
  mesh: Mesh | None = None
  rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES
  logits_chunk: int = 0

  def __post_init__(self):
    chunked.check_chunk(self.logits_chunk)

  def head_inputs(self, params: Any, config: T5Config, input_ids: jax.Array,
                  attention_mask: jax.Array, decoder_input_ids: jax.Array,
                  decoder_mask: jax.Array
                  ) -> tuple[jax.Array, chunked.Head]:
    """`(hidden [B, T, E], head)`: `forward` is `chunked.project` of them."""
    hidden = t5.hidden_states(params, config, input_ids, attention_mask,
                              decoder_input_ids, decoder_mask, mesh=self.mesh,
                              rules=self.rules)
    return hidden, t5.output_head(params, config)

  def forward(self, params: Any, config: T5Config, input_ids: jax.Array,
              attention_mask: jax.Array, decoder_input_ids: jax.Array,
              decoder_mask: jax.Array) -> jax.Array:
    return t5.forward(params, config, input_ids, attention_mask,
                      decoder_input_ids, decoder_mask, mesh=self.mesh,
                      rules=self.rules)

  def sample(self, params: Any, config: T5Config, batch: Batch,
             rng: jax.Array, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0) -> sampling.SampleOutput:
    return sampling.sample(
        params, config, batch["input_ids"], batch["attention_mask"], rng,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, mesh=self.mesh, rules=self.rules)


def length_mask(lengths: jax.Array, length: int) -> jax.Array:
  """[B] lengths -> [B, length] int32 prefix mask."""
  return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)


def _minimize(state: state_lib.TrainState, optim: state_lib.OptimConfig,
              rng: jax.Array, loss_fn: Any
              ) -> tuple[state_lib.TrainState, jax.Array, Any, Metrics]:
  """One guarded update; `loss_fn(params) -> (loss, aux)`."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state, info = state_lib.apply_gradients(
      state, state_lib.make_optimizer(optim), grads, loss, rng)
  return state, loss, aux, info


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / jnp.maximum(count, 1.0)


def _ce_update(state: state_lib.TrainState, models: Models,
               optim: state_lib.OptimConfig, batch: Batch, targets: jax.Array,
               target_mask: jax.Array, rng: jax.Array
               ) -> tuple[state_lib.TrainState, Metrics]:
  """Cross-entropy of the student on `targets`, and the update."""
  config = models.student
  decoder_inputs = t5.shift_right(targets, config)
  args = (batch["input_ids"], batch["attention_mask"], decoder_inputs,
          target_mask)

  def loss_fn(params):
    if models.logits_chunk:
      hidden, head = models.head_inputs(params, config, *args)
      total, count = losses.cross_entropy_loss_chunked(
          hidden, head, targets, target_mask, chunk=models.logits_chunk)
    else:
      logits = models.forward(params, config, *args)  # [B, T, V]
      total, count = losses.cross_entropy_loss(logits, targets, target_mask)
    return _mean(total, count), count

  state, loss, count, info = _minimize(state, optim, rng, loss_fn)
  return state, {"loss": loss, "tokens": count, **info}


def supervised_step(state: state_lib.TrainState, batch: Batch, *,
                    models: Models, optim: state_lib.OptimConfig
                    ) -> tuple[state_lib.TrainState, Metrics]:
  """Cross-entropy on the batch's gold targets."""
  rng, _ = jax.random.split(state.rng)
  return _ce_update(state, models, optim, batch, batch["decoder_target_ids"],
                    batch["decoder_attention_mask"], rng)


def seqkd_targets(teacher_params: Any, batch: Batch, rng: jax.Array, *,
                  models: Models, max_decode_len: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The teacher's greedy outputs: tokens, target mask [B, T], done [B]."""
  out = models.sample(teacher_params, models.teacher, batch, rng,
                      max_new_tokens=max_decode_len)
  return out.tokens, length_mask(out.lengths, max_decode_len), out.done


def seqkd_update(state: state_lib.TrainState, batch: Batch, targets: jax.Array,
                 target_mask: jax.Array, done: jax.Array, *, models: Models,
                 optim: state_lib.OptimConfig
                 ) -> tuple[state_lib.TrainState, Metrics]:
  """The student's cross-entropy update on `seqkd_targets`' outputs."""
  rng, _ = jax.random.split(state.rng)
  state, metrics = _ce_update(state, models, optim, batch, targets,
                              target_mask, rng)
  metrics["teacher_finished"] = jnp.mean(done.astype(jnp.float32))
  return state, metrics


def seqkd_step(state: state_lib.TrainState, teacher_params: Any, batch: Batch,
               *, models: Models, optim: state_lib.OptimConfig,
               max_decode_len: int) -> tuple[state_lib.TrainState, Metrics]:
  """SeqKD: cross-entropy on the teacher's greedy output for the sources."""
  rng, _ = jax.random.split(state.rng)
  targets, target_mask, done = seqkd_targets(
      teacher_params, batch, rng, models=models, max_decode_len=max_decode_len)
  return seqkd_update(state, batch, targets, target_mask, done, models=models,
                      optim=optim)


def word_kd_step(state: state_lib.TrainState, teacher_params: Any,
                 batch: Batch, *, models: Models,
                 optim: state_lib.OptimConfig, divergence: str
                 ) -> tuple[state_lib.TrainState, Metrics]:
  """Word-level distillation on the gold targets (teacher-forced)."""
  rng, _ = jax.random.split(state.rng)
  args = (batch["input_ids"], batch["attention_mask"],
          batch["decoder_input_ids"], batch["decoder_attention_mask"])
  mask = batch["decoder_attention_mask"]
  chunk = models.logits_chunk
  if chunk:
    teacher_head = jax.lax.stop_gradient(
        models.head_inputs(teacher_params, models.teacher, *args))
  else:
    teacher_logits = jax.lax.stop_gradient(
        models.forward(teacher_params, models.teacher, *args))

  def loss_fn(params):
    if chunk:
      hidden, head = models.head_inputs(params, models.student, *args)
      total, count = losses.distillation_loss_chunked(
          hidden, head, *teacher_head, mask, chunk=chunk,
          divergence=divergence)
    else:
      logits = models.forward(params, models.student, *args)
      total, count = losses.distillation_loss(
          logits, teacher_logits, mask, divergence=divergence)
    return _mean(total, count), count

  state, loss, count, info = _minimize(state, optim, rng, loss_fn)
  return state, {"loss": loss, "tokens": count, **info}


def student_rollout(params: Any, batch: Batch, sample_rng: jax.Array, *,
                    models: Models, rl: RLConfig) -> dict[str, Any]:
  """Step 1 of `rl_step`: the student's rollout and its masks (student mesh).

  Returns:
    A dict: actions, mask (EOS included), finished, real_row,
    behavior_logprobs, lengths (the sampler's, padding rows included).
  """
  length = rl.max_decode_len
  rollout = models.sample(
      params, models.student, batch, sample_rng, max_new_tokens=length,
      temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)
  real_row = batch["example_mask"] > 0  # [B]
  mask = length_mask(rollout.lengths, length)  # [B, T], EOS included
  return {"actions": rollout.tokens,  # [B, T]
          "mask": mask * real_row[:, None],
          "finished": rollout.done & real_row,  # [B]
          "real_row": real_row, "behavior_logprobs": rollout.logprobs,
          "lengths": rollout.lengths}


def teacher_scores(teacher_params: Any, batch: Batch, actions: jax.Array,
                   mask: jax.Array, finished: jax.Array, *, models: Models,
                   rl: RLConfig) -> dict[str, Any]:
  """Step 2 of `rl_step`: the teacher's pass on a rollout -> Q-values.

  Needs only the sources (`batch` input_ids, attention_mask) and the [B, T]
  / [B] rollout arrays, and returns only [B, T] / [B] arrays: the [B, T, V]
  logits never leave this function (what `teacher_slice` sends between
  meshes).

  Returns:
    A dict: q_taken, values, bootstrap_value (None unless rl.unfinished ==
    "bootstrap"), teacher_values (None unless rl.baseline ==
    "teacher_expected").
  """
  length = rl.max_decode_len
  # The teacher scores one extra position for "bootstrap": V after the last.
  teacher_actions = actions
  if rl.unfinished == "bootstrap":
    teacher_actions = jnp.pad(actions, ((0, 0), (0, 1)))
  teacher_inputs = t5.shift_right(teacher_actions, models.teacher)
  teacher_mask = jnp.ones_like(teacher_inputs)
  args = (teacher_params, models.teacher, batch["input_ids"],
          batch["attention_mask"], teacher_inputs, teacher_mask)
  # Every reduction over V of the Q-values, [B, T(+1)] each, in one pass.
  if models.logits_chunk:
    hidden, head = jax.lax.stop_gradient(models.head_inputs(*args))
    stats = returns.position_stats_chunked(
        hidden, head, teacher_actions, center=rl.center_logits,
        chunk=models.logits_chunk)
  else:
    teacher_logits = jax.lax.stop_gradient(
        models.forward(*args))  # [B, T(+1), V]
    stats = returns.position_stats(teacher_logits, teacher_actions,
                                   center=rl.center_logits)
  bootstrap_value = None
  if rl.unfinished == "bootstrap":
    bootstrap_value = jnp.where(finished, 0.0,
                                stats[rl.value][:, length])  # [B]
    stats = {name: x[:, :length] for name, x in stats.items()}

  q_taken, values = returns.q_values_from_stats(stats, mask, value=rl.value)
  teacher_values = None
  if rl.baseline == "teacher_expected":
    _, teacher_values = returns.q_values_from_stats(stats, mask,
                                                    value="expected")
  return {"q_taken": q_taken, "values": values,
          "bootstrap_value": bootstrap_value, "teacher_values": teacher_values}


def combine_scores(rollout: dict[str, Any], scores: dict[str, Any], *,
                   models: Models, rl: RLConfig) -> dict[str, Any]:
  """`student_rollout` + `teacher_scores` -> the dict of `score_rollout`."""
  mask, finished, real_row = (rollout["mask"], rollout["finished"],
                              rollout["real_row"])
  if rl.unfinished == "drop":
    loss_mask = mask * finished[:, None]
    n_real = jnp.maximum(jnp.sum(real_row), 1)
    scale = jnp.sum(finished) / n_real  # the finished fraction
  else:
    loss_mask = mask
    scale = 1.0
  return {
      "actions": rollout["actions"], "mask": mask, "loss_mask": loss_mask,
      "scale": jnp.asarray(scale, jnp.float32), **scores,
      "behavior_logprobs": rollout["behavior_logprobs"],
      "decoder_inputs": t5.shift_right(rollout["actions"], models.student),
      "lengths": rollout["lengths"] * real_row, "finished": finished,
      "real_row": real_row,
  }


def score_rollout(params: Any, teacher_params: Any, batch: Batch,
                  sample_rng: jax.Array, *, models: Models, rl: RLConfig
                  ) -> dict[str, Any]:
  """Steps 1-2 of `rl_step`: student rollout, teacher Q-values, loss mask.

  Everything the policy-gradient loss needs except the K-step return, so that
  `rl_step` and the per-K diagnostics (`ketchup_jax.diagnostics`) share one
  implementation and all K can be scored from the same rollout. It is
  `student_rollout`, `teacher_scores` and `combine_scores` in one trace
  (`teacher_slice` runs the first two on different meshes).

  Returns:
    A dict: actions, mask (EOS included), loss_mask, scale (the finished
    fraction under "drop", else 1), q_taken, values, bootstrap_value (None
    unless rl.unfinished == "bootstrap"), teacher_values (None unless
    rl.baseline == "teacher_expected"), behavior_logprobs, decoder_inputs,
    lengths, finished, real_row.
  """
  rollout = student_rollout(params, batch, sample_rng, models=models, rl=rl)
  scores = teacher_scores(teacher_params, batch, rollout["actions"],
                          rollout["mask"], rollout["finished"], models=models,
                          rl=rl)
  return combine_scores(rollout, scores, models=models, rl=rl)


def rollout_returns(scored: dict[str, Any], rl: RLConfig, k: int) -> jax.Array:
  """Step 3 of `rl_step`: the [B, T] K-step returns of a scored rollout."""
  g = returns.k_step_returns(scored["q_taken"], scored["values"],
                             scored["mask"], k)
  if scored["bootstrap_value"] is not None:
    # V_{T+1} is the teacher's value of the next state instead of 0; it
    # enters every chain once, through Ĝ_T.
    g = g - scored["bootstrap_value"][:, None] * scored["mask"]
  return g


def rollout_loss(student_logits: jax.Array, scored: dict[str, Any],
                 g: jax.Array, rl: RLConfig) -> tuple[jax.Array, jax.Array]:
  """Step 4 of `rl_step`: the policy-gradient loss as `(sum, count)`."""
  return losses.policy_gradient_loss(
      student_logits, scored["actions"], g, scored["loss_mask"],
      baseline=rl.baseline, teacher_values=scored["teacher_values"],
      weight=rl.weight, behavior_logprobs=scored["behavior_logprobs"],
      denom=rl.denom, reward_clip=rl.reward_clip,
      entropy_coef=rl.entropy_coef)


def rollout_loss_from_logprobs(logp: jax.Array, entropy: jax.Array,
                               scored: dict[str, Any], g: jax.Array,
                               rl: RLConfig) -> tuple[jax.Array, jax.Array]:
  """`rollout_loss` from the student's [B, T] log pi(a_t) and entropy."""
  return losses.policy_gradient_loss_from_logprobs(
      logp, entropy, g, scored["loss_mask"], baseline=rl.baseline,
      teacher_values=scored["teacher_values"], weight=rl.weight,
      behavior_logprobs=scored["behavior_logprobs"], denom=rl.denom,
      reward_clip=rl.reward_clip, entropy_coef=rl.entropy_coef)


def rollout_update(state: state_lib.TrainState, batch: Batch,
                   scored: dict[str, Any], g: jax.Array, rng: jax.Array, *,
                   models: Models, optim: state_lib.OptimConfig, rl: RLConfig
                   ) -> tuple[state_lib.TrainState, jax.Array, Any, Metrics]:
  """Steps 4-5 of `rl_step`: student forward + backward, guarded update.

  Returns (state, loss, (loss token count, mean entropy), update info).
  """
  mask = scored["mask"]

  def loss_fn(params):
    args = (params, models.student, batch["input_ids"],
            batch["attention_mask"], scored["decoder_inputs"], mask)
    if models.logits_chunk:
      hidden, head = models.head_inputs(*args)
      logp, entropy = losses.token_logprobs_chunked(
          hidden, head, scored["actions"], chunk=models.logits_chunk)
    else:
      logits = models.forward(*args)  # [B, T, V]
      logp, entropy = losses.token_logprobs(logits, scored["actions"])
    total, count = rollout_loss_from_logprobs(logp, entropy, scored, g, rl)
    mean_entropy = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1)
    return _mean(total, count) * scored["scale"], (count, mean_entropy)

  return _minimize(state, optim, rng, loss_fn)


def rl_step(state: state_lib.TrainState, teacher_params: Any, batch: Batch,
            *, models: Models, optim: state_lib.OptimConfig, rl: RLConfig
            ) -> tuple[state_lib.TrainState, Metrics]:
  """One KETCHUP step on a micro-batch of sources (SPEC §2–3).

  1. Roll out the student (the jitted KV-cache sampler).
  2. Teacher-forced teacher logits on the rollout -> Q-values and values.
  3. K-step returns (and, from the same pass, the K = 1 diagnostics).
  4. Student log-probs by a teacher-forced forward -> policy-gradient loss.
  5. AdamW update (skipped if not finite).
  """
  rng, sample_rng = jax.random.split(state.rng)
  scored = score_rollout(state.params, teacher_params, batch, sample_rng,
                         models=models, rl=rl)
  return rl_update(state, batch, scored, rng, models=models, optim=optim,
                   rl=rl)


def rl_update(state: state_lib.TrainState, batch: Batch,
              scored: dict[str, Any], rng: jax.Array, *, models: Models,
              optim: state_lib.OptimConfig, rl: RLConfig
              ) -> tuple[state_lib.TrainState, Metrics]:
  """Steps 3-5 of `rl_step` on a scored rollout; `rng` becomes state.rng."""
  g = rollout_returns(scored, rl, rl.k)  # [B, T]
  state, loss, (count, entropy), info = rollout_update(
      state, batch, scored, g, rng, models=models, optim=optim, rl=rl)
  diag = returns.return_diagnostics(scored["q_taken"], scored["values"],
                                    scored["loss_mask"], rl.k)
  real = jnp.maximum(jnp.sum(scored["real_row"]), 1)
  return state, {
      "loss": loss,
      # Rollout tokens generated (what tokens_per_s counts) and tokens in the
      # loss (fewer when unfinished rows are dropped).
      "tokens": jnp.sum(scored["lengths"]).astype(jnp.float32),
      "loss_tokens": count,
      "entropy": jax.lax.stop_gradient(entropy),
      "finished_fraction": jnp.sum(scored["finished"]) / real,
      "rollout_length": jnp.sum(scored["lengths"]) / real,
      **diag,
      **info,
  }
