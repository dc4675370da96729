"""The RL step (SPEC §2–3, §6): rollout -> teacher Q-values -> returns -> update.

`rl_step` is one KETCHUP step on a micro-batch of sources. It is built from
pieces that `teacher_slice` runs on two meshes and that the diagnostics
(`ketchup_jax.diagnostics`) and the eval-time return table reuse, so that all
of them compute the same thing:

  `student_rollout`  the student's sampled continuation: a `Rollout`;
  `teacher_scores`   the teacher's pass over it: `TeacherScores` ([B, T] only);
  `combine_scores`   both, with the loss mask: a `ScoredRollout`;
  `rollout_returns`  the [B, T] returns of a `ScoredRollout` for one K;
  `rollout_update`   the student's forward, the loss and the guarded update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from ketchup_jax import losses
from ketchup_jax import returns
from ketchup_jax.train import state as state_lib
from ketchup_jax.train.steps import Batch
from ketchup_jax.train.steps import length_mask
from ketchup_jax.train.steps import Metrics
from ketchup_jax.train.steps import minimize
from ketchup_jax.train.steps import StepModels
from ketchup_jax.train.steps import token_mean

UNFINISHED = ("drop", "terminal", "bootstrap")
REWARDS = ("llmr", "reverse_kl", "reverse_kl_kstep")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The KETCHUP knobs of SPEC §2–3 and §6 (hashable: a static jit argument).

  The reward (`reward`), per token t of a rollout:
    "llmr"              `r_t = Q_t(a_t) - V_{t+1}` from the teacher's logits,
                        K-step returns of SPEC §2 (K = 1 is LLMR).
    "reverse_kl"        `r_t = log p_T(a_t) - log pi_theta(a_t)`, both
                        detached (SPEC §6), with the discounted reward-to-go
                        `G_t = sum_{i >= t} gamma^(i - t) r_i`: gamma = 0 is
                        the immediate reward (the usual on-policy
                        distillation recipe), gamma > 0 MiniLLM's. K is unused.
    "reverse_kl_kstep"  the experimental K-step reverse KL: the same reward,
                        summed only over t's K-step chain positions
                        t, n(t), n(n(t)), ..., T (n(t) = min(t + K, T)),
                        discounted by gamma^(position - t)
                        (`returns.chain_returns`); K = 1 is "reverse_kl".
                        Needs gamma > 0 (gamma = 0 is the immediate reward
                        for every K).
  log pi_theta is the student's teacher-forced log-probability in the same
  forward the loss differentiates, under `stop_gradient`; the advantage,
  baseline, weight, clip and entropy options apply to every reward.

  Attributes:
    k: Jump length of the K-step return; 1 is LLMR.
    value: "max", "expected" or "soft" state value.
    center_logits: Centre the teacher logits into Q-values.
    unfinished: Rollouts without EOS: "drop", "terminal" or "bootstrap".
    baseline: "none", "batch_mean", "teacher_expected" or "value".
    weight: "none", "importance" or "reference_compat".
    denom: Advantage divisor.
    reward_clip: Advantage clip c (None: no clip).
    entropy_coef: Entropy bonus beta.
    max_decode_len: Rollout length (static).
    temperature: Sampling temperature of the rollout (0 = greedy).
    top_k: Rollout top-k (0 = off).
    top_p: Rollout nucleus mass (1 = off).
    reward: "llmr", "reverse_kl" or "reverse_kl_kstep" (above).
    gamma: Discount of the reverse-KL returns, in [0, 1].
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
  reward: str = "llmr"
  gamma: float = 0.0

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
    if self.reward not in REWARDS:
      raise ValueError(
          f"rl.reward must be one of {REWARDS}, got {self.reward!r}")
    try:
      returns.check_gamma(self.gamma)
    except ValueError as e:
      raise ValueError(f"rl.{e}") from None
    if self.reward == "reverse_kl_kstep" and self.gamma == 0:
      raise ValueError(
          "rl.reward='reverse_kl_kstep' needs rl.gamma > 0 (with gamma = 0 "
          "every K gives the immediate reward); got rl.gamma=0")
    if self.reward != "llmr":
      if self.unfinished == "bootstrap":
        raise ValueError(
            f"rl.unfinished='bootstrap' charges a cut rollout the teacher's "
            f"state value V_(T+1), which the rl.reward={self.reward!r} "
            f"return has none of; use 'drop' or 'terminal'")
      if self.baseline in ("teacher_expected", "value"):
        raise ValueError(
            f"rl.baseline={self.baseline!r} is a teacher state value on the "
            f"Q-value scale of the llmr reward, not a baseline of "
            f"rl.reward={self.reward!r}; use 'none' or 'batch_mean'")

  @property
  def uses_student_logprobs(self) -> bool:
    """Whether the return depends on the student's own log-probabilities."""
    return self.reward != "llmr"


@flax.struct.dataclass
class Rollout:
  """The student's rollout of a micro-batch (`student_rollout`).

  Attributes:
    actions: int32 [B, T], the sampled tokens (EOS included), pad after.
    mask: int32 [B, T], 1 on the tokens of real rows up to EOS.
    finished: bool [B], a real row that produced EOS.
    real_row: bool [B], not a padding row of the batch.
    behavior_logprobs: float32 [B, T], log-prob of each token under the
      distribution it was drawn from; 0 after EOS.
    lengths: int32 [B], the sampler's lengths (padding rows included).
  """
  actions: jax.Array
  mask: jax.Array
  finished: jax.Array
  real_row: jax.Array
  behavior_logprobs: jax.Array
  lengths: jax.Array


@flax.struct.dataclass
class TeacherScores:
  """The teacher's pass on a rollout (`teacher_scores`): [B, T] / [B] only.

  Attributes:
    q_taken: float32 [B, T], Q_t(a_t), 0 off the mask.
    values: float32 [B, T], the state value `rl.value` of every position.
    bootstrap_value: float32 [B], V after the last position of an unfinished
      row (0 for finished ones); None unless rl.unfinished == "bootstrap".
    teacher_values: float32 [B, T], the baseline's state values; None unless
      rl.baseline is "teacher_expected" or "value".
    teacher_logprobs: float32 [B, T], log p_T(a_t); None unless rl.reward is
      a reverse-KL reward.
  """
  q_taken: jax.Array
  values: jax.Array
  bootstrap_value: jax.Array | None = None
  teacher_values: jax.Array | None = None
  teacher_logprobs: jax.Array | None = None


@flax.struct.dataclass
class ScoredRollout:
  """A rollout with its teacher scores and loss mask (`score_rollout`).

  Attributes:
    rollout: The `Rollout`; its `lengths` are 0 on padding rows here.
    scores: The `TeacherScores`.
    loss_mask: int32 [B, T], `rollout.mask` without the unfinished rows
      under rl.unfinished == "drop".
    scale: float32 [], what the mean loss is multiplied by: the finished
      fraction under "drop", else 1.
  """
  rollout: Rollout
  scores: TeacherScores
  loss_mask: jax.Array
  scale: jax.Array

  @property
  def actions(self) -> jax.Array:
    return self.rollout.actions

  @property
  def mask(self) -> jax.Array:
    return self.rollout.mask



def student_rollout(params: Any, batch: Batch, sample_rng: jax.Array, *,
                    models: StepModels, rl: RLConfig) -> Rollout:
  """Step 1 of `rl_step`: the student's rollout and its masks (student mesh)."""
  length = rl.max_decode_len
  out = models.sample(
      params, models.student, batch, sample_rng, max_new_tokens=length,
      temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)
  real_row = batch["example_mask"] > 0  # [B]
  mask = length_mask(out.lengths, length)  # [B, T], EOS included
  return Rollout(actions=out.tokens, mask=mask * real_row[:, None],
                 finished=out.done & real_row, real_row=real_row,
                 behavior_logprobs=out.logprobs, lengths=out.lengths)


def teacher_scores(teacher_params: Any, batch: Batch, actions: jax.Array,
                   mask: jax.Array, finished: jax.Array, *, models: StepModels,
                   rl: RLConfig) -> TeacherScores:
  """Step 2 of `rl_step`: the teacher's pass on a rollout -> Q-values.

  Needs only the sources (`batch` input_ids, attention_mask) and the [B, T]
  / [B] rollout arrays, and returns only [B, T] / [B] arrays: the [B, T, V]
  logits never leave this function (what `teacher_slice` sends between
  meshes).
  """
  length = rl.max_decode_len
  # The teacher scores one extra position for "bootstrap": V after the last.
  teacher_actions = actions
  if rl.unfinished == "bootstrap":
    teacher_actions = jnp.pad(actions, ((0, 0), (0, 1)))
  args = (teacher_params, models.teacher, batch["input_ids"],
          batch["attention_mask"], teacher_actions,
          jnp.ones_like(teacher_actions))
  # Every reduction over V of the Q-values, [B, T(+1)] each, in one pass.
  if models.logits_chunk:
    hidden, head = jax.lax.stop_gradient(models.score_head(*args))
    stats = returns.position_stats_chunked(
        hidden, head, teacher_actions, center=rl.center_logits,
        chunk=models.logits_chunk)
  else:
    teacher_logits = jax.lax.stop_gradient(
        models.score(*args))  # [B, T(+1), V]
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
  elif rl.baseline == "value":  # b_t = V_t of the returns' own value
    teacher_values = values
  teacher_logprobs = None
  if rl.uses_student_logprobs:  # log p_T(a_t) = Q_t(a_t) - soft value
    teacher_logprobs = jnp.where(mask != 0, stats["q_taken"] - stats["soft"],
                                 0.0)
  return TeacherScores(q_taken=q_taken, values=values,
                       bootstrap_value=bootstrap_value,
                       teacher_values=teacher_values,
                       teacher_logprobs=teacher_logprobs)


def combine_scores(rollout: Rollout, scores: TeacherScores, *,
                   rl: RLConfig) -> ScoredRollout:
  """`student_rollout` + `teacher_scores` -> what `score_rollout` returns."""
  if rl.unfinished == "drop":
    loss_mask = rollout.mask * rollout.finished[:, None]
    n_real = jnp.maximum(jnp.sum(rollout.real_row), 1)
    scale = jnp.sum(rollout.finished) / n_real  # the finished fraction
  else:
    loss_mask = rollout.mask
    scale = 1.0
  return ScoredRollout(
      rollout=rollout.replace(lengths=rollout.lengths * rollout.real_row),
      scores=scores, loss_mask=loss_mask,
      scale=jnp.asarray(scale, jnp.float32))


def score_rollout(params: Any, teacher_params: Any, batch: Batch,
                  sample_rng: jax.Array, *, models: StepModels, rl: RLConfig
                  ) -> ScoredRollout:
  """Steps 1-2 of `rl_step`: student rollout, teacher Q-values, loss mask.

  Everything the policy-gradient loss needs except the K-step return, so that
  `rl_step`, the per-K diagnostics (`ketchup_jax.diagnostics`) and the
  eval-time return table share one implementation and all K can be scored
  from the same rollout. It is `student_rollout`, `teacher_scores` and
  `combine_scores` in one trace (`teacher_slice` runs the first two on
  different meshes).
  """
  rollout = student_rollout(params, batch, sample_rng, models=models, rl=rl)
  scores = teacher_scores(teacher_params, batch, rollout.actions,
                          rollout.mask, rollout.finished, models=models,
                          rl=rl)
  return combine_scores(rollout, scores, rl=rl)


def student_token_stats(params: Any, batch: Batch, scored: ScoredRollout, *,
                        models: StepModels) -> tuple[jax.Array, jax.Array]:
  """The student's teacher-forced `(log pi(a_t), entropy)` on the rollout.

  Both [B, T] float32, differentiable in `params`; chunked over positions
  when `models.logits_chunk` > 0 (no [B, T, V] array, forward or backward).
  """
  args = (params, models.student, batch["input_ids"],
          batch["attention_mask"], scored.actions, scored.mask)
  if models.logits_chunk:
    hidden, head = models.score_head(*args)
    return losses.token_logprobs_chunked(hidden, head, scored.actions,
                                         chunk=models.logits_chunk)
  return losses.token_logprobs(models.score(*args), scored.actions)


def rollout_returns(scored: ScoredRollout, rl: RLConfig, k: int,
                    student_lp: jax.Array | None = None) -> jax.Array:
  """Step 3 of `rl_step`: the [B, T] returns of a scored rollout.

  "llmr": the K-step return of SPEC §2. Reverse-KL rewards: the discounted
  (`reverse_kl`) or K-step chain (`reverse_kl_kstep`) return of
  `log p_T - log pi`, for which `student_lp` ([B, T], `student_logprobs` of
  the forward being differentiated) is required.
  """
  if rl.uses_student_logprobs:
    if student_lp is None:
      raise ValueError(f"rl.reward={rl.reward!r} needs the student's "
                       f"log-probabilities (student_lp), got None")
    r = returns.reverse_kl_rewards(scored.scores.teacher_logprobs, student_lp,
                                   scored.mask)
    chain = k if rl.reward == "reverse_kl_kstep" else 1
    return returns.chain_returns(r, scored.mask, chain, rl.gamma)
  g = returns.k_step_returns(scored.scores.q_taken, scored.scores.values,
                             scored.mask, k)
  if scored.scores.bootstrap_value is not None:
    # V_{T+1} is the teacher's value of the next state instead of 0; it
    # enters every chain once, through Ĝ_T.
    g = g - scored.scores.bootstrap_value[:, None] * scored.mask
  return g


def rollout_objective(logp: jax.Array, entropy: jax.Array,
                      scored: ScoredRollout, rl: RLConfig, k: int,
                      g: jax.Array | None = None
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array,
                                                  jax.Array]]:
  """The scalar loss `rl_step` differentiates (SPEC §3), from log pi.

  Args:
    logp: [B, T] the student's `log pi(a_t)` (`student_token_stats`, or
      `losses.token_logprobs` of its logits).
    entropy: [B, T] its entropy.
    scored: `score_rollout`'s result.
    rl: The options.
    k: K of the returns.
    g: [B, T] returns to use instead of `rollout_returns(scored, rl, k, ...)`.

  The reverse-KL rewards' student log-probabilities are `logp` under
  `stop_gradient`: the gradient flows only through the policy-gradient
  term's `log pi` and the entropy.

  Returns:
    (loss, (loss token count, returns [B, T], returns at K = 1 [B, T])),
    the loss scaled by `scored.scale`, the returns without gradient.
  """
  lp = jax.lax.stop_gradient(logp) if rl.uses_student_logprobs else None
  g_used = rollout_returns(scored, rl, k, lp) if g is None else g
  g_k1 = rollout_returns(scored, rl, 1, lp)
  total, count = losses.policy_gradient_loss_from_logprobs(
      logp, entropy, g_used, scored.loss_mask, baseline=rl.baseline,
      teacher_values=scored.scores.teacher_values, weight=rl.weight,
      behavior_logprobs=scored.rollout.behavior_logprobs, denom=rl.denom,
      reward_clip=rl.reward_clip, entropy_coef=rl.entropy_coef)
  return token_mean(total, count) * scored.scale, (
      count, jax.lax.stop_gradient(g_used), jax.lax.stop_gradient(g_k1))


def rollout_update(state: state_lib.TrainState, batch: Batch,
                   scored: ScoredRollout, g: jax.Array | None,
                   rng: jax.Array, *, models: StepModels,
                   optim: state_lib.OptimConfig, rl: RLConfig
                   ) -> tuple[state_lib.TrainState, jax.Array, Any, Metrics]:
  """Steps 3-5 of `rl_step`: student forward + backward, guarded update.

  `g` None: the returns `rollout_returns(scored, rl, rl.k, ...)` are made
  inside, from this forward's detached student log-probabilities (what the
  reverse-KL rewards need).

  Returns (state, loss, (loss token count, mean entropy, returns [B, T],
  returns at K = 1 [B, T]), update info).
  """
  mask = scored.mask

  def loss_fn(params):
    logp, entropy = student_token_stats(params, batch, scored, models=models)
    loss, (count, g_used, g_k1) = rollout_objective(logp, entropy, scored,
                                                    rl, rl.k, g)
    mean_entropy = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1)
    return loss, (count, mean_entropy, g_used, g_k1)

  return minimize(state, optim, rng, loss_fn, models)


def rl_step(state: state_lib.TrainState, teacher_params: Any, batch: Batch,
            *, models: StepModels, optim: state_lib.OptimConfig, rl: RLConfig
            ) -> tuple[state_lib.TrainState, Metrics]:
  """One KETCHUP step on a micro-batch of sources (SPEC §2–3).

  1. Roll out the student (the jitted KV-cache sampler).
  2. Teacher-forced teacher logits on the rollout -> Q-values and values.
  3. K-step returns (and, from the same pass, the K = 1 diagnostics).
  4. Student log-probs by a teacher-forced forward -> policy-gradient loss.
  5. AdamW update (skipped if not finite).
  """
  rng, sample_rng = jax.random.split(state.rng)
  scored = score_rollout(models.student_params(state.params, state.frozen),
                         teacher_params, batch, sample_rng, models=models,
                         rl=rl)
  return rl_update(state, batch, scored, rng, models=models, optim=optim,
                   rl=rl)


def rl_update(state: state_lib.TrainState, batch: Batch,
              scored: ScoredRollout, rng: jax.Array, *, models: StepModels,
              optim: state_lib.OptimConfig, rl: RLConfig
              ) -> tuple[state_lib.TrainState, Metrics]:
  """Steps 3-5 of `rl_step` on a scored rollout; `rng` becomes state.rng."""
  state, loss, (count, entropy, g, g_k1), info = rollout_update(
      state, batch, scored, None, rng, models=models, optim=optim, rl=rl)
  # Of the return in use against its K = 1 counterpart (for "llmr" that is
  # `returns.return_diagnostics`, with the bootstrap value if any).
  diag = returns.summarize_returns(g, g_k1, scored.loss_mask)
  real = jnp.maximum(jnp.sum(scored.rollout.real_row), 1)
  return state, {
      "loss": loss,
      # Rollout tokens generated (what tokens_per_s counts) and tokens in the
      # loss (fewer when unfinished rows are dropped).
      "tokens": jnp.sum(scored.rollout.lengths).astype(jnp.float32),
      "loss_tokens": count,
      "entropy": jax.lax.stop_gradient(entropy),
      "finished_fraction": jnp.sum(scored.rollout.finished) / real,
      "rollout_length": jnp.sum(scored.rollout.lengths) / real,
      **diag,
      **info,
  }
