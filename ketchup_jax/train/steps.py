"""Pure step functions `(state, batch, ...) -> (state, metrics)` for each stage.

Each step is one micro-batch: forward, loss as `(sum, count)`, gradient, and
the optimizer update with the non-finite guard of `state.apply_gradients`.
Static arguments (model configs, option dataclasses, mesh) are hashable, so
`jax.jit(step, static_argnames=...)` compiles once per batch shape.

Stages:
  `supervised_step`  cross-entropy on the batch's targets (teacher SFT).
  `seqkd_step`       cross-entropy on the teacher's greedy outputs (SeqKD).
  `word_kd_step`     word-level KL / RKL / JS / TVD on the gold targets.
  `rl_step`          rollout -> teacher Q-values -> K-step returns -> REINFORCE
                     (or the reverse-KL reward of SPEC §6, `RLConfig.reward`).
  `gkd_step`         GKD: generalised JSD on student samples or gold targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections

from ketchup_jax import chunked
from ketchup_jax import divergences
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
      total, count = divergences.distillation_loss_chunked(
          hidden, head, *teacher_head, mask, chunk=chunk,
          divergence=divergence)
    else:
      logits = models.forward(params, models.student, *args)
      total, count = divergences.distillation_loss(
          logits, teacher_logits, mask, divergence=divergence)
    return _mean(total, count), count

  state, loss, count, info = _minimize(state, optim, rng, loss_fn)
  return state, {"loss": loss, "tokens": count, **info}


@dataclasses.dataclass(frozen=True)
class GKDConfig:
  """GKD (Agarwal et al. 2024; SPEC §6) options (hashable: static in jit).

  Each micro-batch, with probability `lmbda` (a coin from the step's key) the
  targets are the student's own samples of the sources, otherwise the batch's
  gold targets; the loss is the token-level generalised JSD between the
  teacher's and the student's full next-token distributions on those
  targets (`divergences.generalized_jsd_loss`).

  Attributes:
    lmbda: lambda in [0, 1], the fraction of batches on student samples
      (0 = always gold targets, 1 = always on-policy).
    beta: JSD weight in [0, 1]; P = teacher, Q = student,
      `JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)`,
      M = beta P + (1 - beta) Q: beta = 0 is forward KL(P || Q), beta = 1
      reverse KL(Q || P).
    temperature: Student sampling temperature (0 = greedy).
    max_decode_len: Length of the student's samples (new tokens).
  """
  lmbda: float = 0.5
  beta: float = 0.5
  temperature: float = 1.0
  max_decode_len: int = 64

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> GKDConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: cfg[name] for name in fields if name in cfg})

  def __post_init__(self):
    if isinstance(self.lmbda, bool) or not isinstance(
        self.lmbda, (int, float)) or not 0.0 <= self.lmbda <= 1.0:
      raise ValueError(f"gkd.lmbda (lambda, the fraction of batches on "
                       f"student samples) must be a number in [0, 1], got "
                       f"{self.lmbda!r}")
    try:
      divergences.check_beta(self.beta)
    except ValueError as e:
      raise ValueError(f"gkd.{e}") from None
    if isinstance(self.temperature, bool) or not isinstance(
        self.temperature, (int, float)) or not self.temperature >= 0:
      raise ValueError(f"gkd.temperature must be a number >= 0 (0 = greedy), "
                       f"got {self.temperature!r}")
    if isinstance(self.max_decode_len, bool) or not isinstance(
        self.max_decode_len, int) or self.max_decode_len < 1:
      raise ValueError(f"gkd.max_decode_len must be an int >= 1, got "
                       f"{self.max_decode_len!r}")


def gkd_targets(params: Any, batch: Batch, rng: jax.Array, *, models: Models,
                gkd: GKDConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This batch's GKD targets: (decoder inputs [B, L], mask [B, L], on-policy).

  L = max(gold target length, gkd.max_decode_len): both kinds are padded to
  it so that one `lax.cond` picks between them and only the picked branch
  runs (the student samples only on on-policy batches). `on_policy` is a
  bool scalar, drawn with probability `gkd.lmbda`.
  """
  coin_rng, sample_rng = jax.random.split(rng)
  gold_len = batch["decoder_input_ids"].shape[1]
  length = max(gold_len, gkd.max_decode_len)

  def gold():
    pad = ((0, 0), (0, length - gold_len))
    return (jnp.pad(batch["decoder_input_ids"], pad),
            jnp.pad(batch["decoder_attention_mask"], pad).astype(jnp.int32))

  def sampled():
    out = models.sample(params, models.student, batch, sample_rng,
                        max_new_tokens=gkd.max_decode_len,
                        temperature=gkd.temperature)
    mask = length_mask(out.lengths, gkd.max_decode_len) * (
        batch["example_mask"] > 0)[:, None]
    pad = ((0, 0), (0, length - gkd.max_decode_len))
    inputs = t5.shift_right(out.tokens, models.student)
    return (jnp.pad(inputs, pad).astype(batch["decoder_input_ids"].dtype),
            jnp.pad(mask, pad).astype(jnp.int32))

  if gkd.lmbda == 0.0:
    return (*gold(), jnp.asarray(False))
  if gkd.lmbda == 1.0:
    return (*sampled(), jnp.asarray(True))
  on_policy = jax.random.bernoulli(coin_rng, gkd.lmbda)
  inputs, mask = jax.lax.cond(on_policy, sampled, gold)
  return inputs, mask, on_policy


def gkd_step(state: state_lib.TrainState, teacher_params: Any, batch: Batch,
             *, models: Models, optim: state_lib.OptimConfig, gkd: GKDConfig
             ) -> tuple[state_lib.TrainState, Metrics]:
  """One GKD update: `gkd_targets`, then the generalised JSD on them."""
  rng, target_rng = jax.random.split(state.rng)
  inputs, mask, on_policy = gkd_targets(
      jax.lax.stop_gradient(state.params), batch, target_rng, models=models,
      gkd=gkd)
  args = (batch["input_ids"], batch["attention_mask"], inputs, mask)
  teacher_logits = jax.lax.stop_gradient(
      models.forward(teacher_params, models.teacher, *args))

  def loss_fn(params):
    logits = models.forward(params, models.student, *args)
    total, count = divergences.generalized_jsd_loss(
        logits, teacher_logits, mask, beta=gkd.beta)
    return _mean(total, count), count

  state, loss, count, info = _minimize(state, optim, rng, loss_fn)
  return state, {"loss": loss, "tokens": count,
                 "on_policy": on_policy.astype(jnp.float32), **info}


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
    "bootstrap"), teacher_values (the baseline's [B, T] state values; None
    unless rl.baseline is "teacher_expected" or "value"), teacher_logprobs
    (`log p_T(a_t)`, None unless rl.reward is a reverse-KL reward).
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
  elif rl.baseline == "value":  # b_t = V_t of the returns' own value
    teacher_values = values
  teacher_logprobs = None
  if rl.uses_student_logprobs:  # log p_T(a_t) = Q_t(a_t) - soft value
    teacher_logprobs = jnp.where(mask != 0, stats["q_taken"] - stats["soft"],
                                 0.0)
  return {"q_taken": q_taken, "values": values,
          "bootstrap_value": bootstrap_value, "teacher_values": teacher_values,
          "teacher_logprobs": teacher_logprobs}


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
    rl.baseline is "teacher_expected" or "value"), teacher_logprobs (None
    unless a reverse-KL reward), behavior_logprobs, decoder_inputs, lengths,
    finished, real_row.
  """
  rollout = student_rollout(params, batch, sample_rng, models=models, rl=rl)
  scores = teacher_scores(teacher_params, batch, rollout["actions"],
                          rollout["mask"], rollout["finished"], models=models,
                          rl=rl)
  return combine_scores(rollout, scores, models=models, rl=rl)


def student_token_stats(params: Any, batch: Batch, scored: dict[str, Any], *,
                        models: Models) -> tuple[jax.Array, jax.Array]:
  """The student's teacher-forced `(log pi(a_t), entropy)` on the rollout.

  Both [B, T] float32, differentiable in `params`; chunked over positions
  when `models.logits_chunk` > 0 (no [B, T, V] array, forward or backward).
  """
  args = (params, models.student, batch["input_ids"],
          batch["attention_mask"], scored["decoder_inputs"], scored["mask"])
  if models.logits_chunk:
    hidden, head = models.head_inputs(*args)
    return losses.token_logprobs_chunked(hidden, head, scored["actions"],
                                         chunk=models.logits_chunk)
  return losses.token_logprobs(models.forward(*args), scored["actions"])


def rollout_returns(scored: dict[str, Any], rl: RLConfig, k: int,
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
    r = returns.reverse_kl_rewards(scored["teacher_logprobs"], student_lp,
                                   scored["mask"])
    chain = k if rl.reward == "reverse_kl_kstep" else 1
    return returns.chain_returns(r, scored["mask"], chain, rl.gamma)
  g = returns.k_step_returns(scored["q_taken"], scored["values"],
                             scored["mask"], k)
  if scored["bootstrap_value"] is not None:
    # V_{T+1} is the teacher's value of the next state instead of 0; it
    # enters every chain once, through Ĝ_T.
    g = g - scored["bootstrap_value"][:, None] * scored["mask"]
  return g


def rollout_objective(logp: jax.Array, entropy: jax.Array,
                      scored: dict[str, Any], rl: RLConfig, k: int,
                      g: jax.Array | None = None
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array,
                                                  jax.Array]]:
  """The scalar loss `rl_step` differentiates (SPEC §3), from log pi.

  Args:
    logp: [B, T] the student's `log pi(a_t)` (`student_token_stats`, or
      `losses.token_logprobs` of its logits).
    entropy: [B, T] its entropy.
    scored: `score_rollout`'s dict.
    rl: The options.
    k: K of the returns.
    g: [B, T] returns to use instead of `rollout_returns(scored, rl, k, ...)`.

  The reverse-KL rewards' student log-probabilities are `logp` under
  `stop_gradient`: the gradient flows only through the policy-gradient
  term's `log pi` and the entropy.

  Returns:
    (loss, (loss token count, returns [B, T], returns at K = 1 [B, T])),
    the loss scaled by `scored["scale"]`, the returns without gradient.
  """
  lp = jax.lax.stop_gradient(logp) if rl.uses_student_logprobs else None
  g_used = rollout_returns(scored, rl, k, lp) if g is None else g
  g_k1 = rollout_returns(scored, rl, 1, lp)
  total, count = losses.policy_gradient_loss_from_logprobs(
      logp, entropy, g_used, scored["loss_mask"], baseline=rl.baseline,
      teacher_values=scored["teacher_values"], weight=rl.weight,
      behavior_logprobs=scored["behavior_logprobs"], denom=rl.denom,
      reward_clip=rl.reward_clip, entropy_coef=rl.entropy_coef)
  return _mean(total, count) * scored["scale"], (
      count, jax.lax.stop_gradient(g_used), jax.lax.stop_gradient(g_k1))


def rollout_update(state: state_lib.TrainState, batch: Batch,
                   scored: dict[str, Any], g: jax.Array | None,
                   rng: jax.Array, *, models: Models,
                   optim: state_lib.OptimConfig, rl: RLConfig
                   ) -> tuple[state_lib.TrainState, jax.Array, Any, Metrics]:
  """Steps 3-5 of `rl_step`: student forward + backward, guarded update.

  `g` None: the returns `rollout_returns(scored, rl, rl.k, ...)` are made
  inside, from this forward's detached student log-probabilities (what the
  reverse-KL rewards need).

  Returns (state, loss, (loss token count, mean entropy, returns [B, T],
  returns at K = 1 [B, T]), update info).
  """
  mask = scored["mask"]

  def loss_fn(params):
    logp, entropy = student_token_stats(params, batch, scored, models=models)
    loss, (count, g_used, g_k1) = rollout_objective(logp, entropy, scored,
                                                    rl, rl.k, g)
    mean_entropy = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1)
    return loss, (count, mean_entropy, g_used, g_k1)

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
  state, loss, (count, entropy, g, g_k1), info = rollout_update(
      state, batch, scored, None, rng, models=models, optim=optim, rl=rl)
  # Of the return in use against its K = 1 counterpart (for "llmr" that is
  # `returns.return_diagnostics`, with the bootstrap value if any).
  diag = returns.summarize_returns(g, g_k1, scored["loss_mask"])
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
