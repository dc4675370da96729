"""Policy-gradient and cross-entropy losses (SPEC §3).

Every loss returns `(loss_sum, token_count)`, not a mean, so micro-batches and
devices reduce exactly: sum both over the pieces, then divide once. Masks are
prefix masks `[B, T]` over the target/rollout positions.

    A_t  = clip(w_t (Ĝ_t - b_t) / denom, -c, +c)           (no gradient)
    L    = -(1/N) sum_t m_t A_t log pi(a_t)  -  beta (1/N) sum_t m_t H_t(pi)

The word-level distillation losses, in the same form, are in `divergences`.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ketchup_jax import checks
from ketchup_jax import chunked

Array = jax.Array
ArrayLike = Any

BASELINES = ("none", "batch_mean", "teacher_expected", "value")
WEIGHTS = ("none", "importance", "reference_compat")


def _check_logits_and_ids(logits_name, logits, ids_name, ids, mask) -> None:
  checks.check_rank(logits_name, logits, 3, "[B, T, V]")
  checks.check_float(logits_name, logits)
  checks.check_int(ids_name, ids)
  checks.check_same_shape({
      f"{logits_name}[..., 0]": jax.ShapeDtypeStruct(
          jnp.shape(logits)[:2], jnp.float32),
      ids_name: ids,
      "mask": mask,
  })
  checks.check_prefix_mask("mask", mask)


def _check_optional_like(name: str, x: ArrayLike | None, like: ArrayLike,
                         needed_for: str) -> None:
  if x is None:
    raise ValueError(f"{name} is required for {needed_for}, got None")
  checks.check_float(name, x)
  checks.check_same_shape({name: x, "returns": like})


def log_softmax_f32(logits: Array) -> Array:
  """log softmax over the last axis, in float32."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _taken(logp: Array, ids: Array) -> Array:
  """logp [B, T, V], ids [B, T] -> logp[b, t, ids[b, t]] as [B, T]."""
  return jnp.take_along_axis(
      logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


# --------------------------------------------------------------------------
# Policy gradient
# --------------------------------------------------------------------------


def _check_advantage_options(returns, mask, *, logprobs, baseline,
                             teacher_values, weight, behavior_logprobs, denom,
                             reward_clip) -> tuple[float, float | None]:
  """Validates the advantage options; returns (denom, reward_clip) as floats."""
  checks.check_choice("baseline", baseline, BASELINES)
  checks.check_choice("weight", weight, WEIGHTS)
  checks.check_rank("returns", returns, 2, "[B, T]")
  checks.check_float("returns", returns)
  checks.check_same_shape({"returns": returns, "mask": mask})
  if not denom > 0:
    raise ValueError(f"denom must be > 0, got {denom!r}")
  if reward_clip is not None and not reward_clip > 0:
    raise ValueError(f"reward_clip must be > 0 or None, got {reward_clip!r}")
  if baseline in ("teacher_expected", "value"):
    _check_optional_like("teacher_values", teacher_values, returns,
                         f'baseline="{baseline}"')
  if weight != "none":
    _check_optional_like("logprobs", logprobs, returns, f"weight={weight!r}")
  if weight == "importance":
    _check_optional_like("behavior_logprobs", behavior_logprobs, returns,
                         'weight="importance"')
  return float(denom), None if reward_clip is None else float(reward_clip)


def pg_advantages(
    returns: ArrayLike,
    mask: ArrayLike,
    *,
    logprobs: ArrayLike | None = None,
    baseline: str = "none",
    teacher_values: ArrayLike | None = None,
    weight: str = "none",
    behavior_logprobs: ArrayLike | None = None,
    denom: float = 1.0,
    reward_clip: float | None = 50.0,
) -> Array:
  """The clipped, weighted advantage `A_t` of SPEC §3 (gradient stopped).

  Args:
    returns: [B, T] Ĝ_t, e.g. from `returns.k_step_returns`.
    mask: [B, T] prefix mask.
    logprobs: [B, T] `log pi_theta(a_t)` of the current student; needed by
      `weight` "importance" and "reference_compat".
    baseline: "none" (b = 0), "batch_mean" (b = the mean of Ĝ over the real
      tokens of this batch), "teacher_expected" or "value" (b_t =
      `teacher_values`, a state-only baseline either way).
    teacher_values: [B, T] the baseline's state values: for
      "teacher_expected" `sum_a softmax(Q_t)(a) Q_t(a)` (the `values` of
      `teacher_q_values(..., value="expected")`); for "value" V_t, the
      state value the returns use (`teacher_q_values`' `values`), so that
      `A_t = Ĝ_t - V_t` is the negated sum of the one-step regrets
      `V_i - Q_i(a_i)` along t's K-step chain.
    weight: "none" (w = 1), "importance" (w = pi/mu with mu =
      exp(`behavior_logprobs`)), or "reference_compat" (w = pi, as the
      authors' code multiplies by).
    behavior_logprobs: [B, T] `log mu(a_t)` of the policy that sampled.
    denom: divisor of the advantage, > 0.
    reward_clip: c > 0, or None for no clipping.

  Returns:
    [B, T] float32 advantages, zero where `mask` is 0, with no gradient.
  """
  denom, reward_clip = _check_advantage_options(
      returns, mask, logprobs=logprobs, baseline=baseline,
      teacher_values=teacher_values, weight=weight,
      behavior_logprobs=behavior_logprobs, denom=denom,
      reward_clip=reward_clip)
  return _pg_advantages(
      returns, mask, logprobs, teacher_values, behavior_logprobs,
      baseline=baseline, weight=weight, denom=denom, reward_clip=reward_clip)


@functools.partial(
    jax.jit, static_argnames=("baseline", "weight", "denom", "reward_clip"))
def _pg_advantages(returns, mask, logprobs, teacher_values, behavior_logprobs,
                   *, baseline, weight, denom, reward_clip):
  m = jnp.asarray(mask) != 0
  g = jnp.where(m, returns.astype(jnp.float32), 0.0)  # [B, T]
  if baseline == "batch_mean":
    b = jnp.sum(g) / jnp.maximum(jnp.sum(m), 1)
  elif baseline in ("teacher_expected", "value"):
    b = teacher_values.astype(jnp.float32)
  else:
    b = 0.0
  adv = g - b
  if weight == "importance":
    adv = adv * jnp.exp(logprobs.astype(jnp.float32)
                        - behavior_logprobs.astype(jnp.float32))
  elif weight == "reference_compat":
    adv = adv * jnp.exp(logprobs.astype(jnp.float32))
  adv = adv / denom
  if reward_clip is not None:
    adv = jnp.clip(adv, -reward_clip, reward_clip)
  return jax.lax.stop_gradient(jnp.where(m, adv, 0.0))


def policy_gradient_loss(
    student_logits: ArrayLike,
    actions: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    *,
    baseline: str = "none",
    teacher_values: ArrayLike | None = None,
    weight: str = "none",
    behavior_logprobs: ArrayLike | None = None,
    denom: float = 1.0,
    reward_clip: float | None = 50.0,
    entropy_coef: float = 0.0,
) -> tuple[Array, Array]:
  """REINFORCE loss on K-step returns (SPEC §3), as a sum and a token count.

      loss_sum = sum_t m_t (-A_t log pi(a_t) - beta H_t(pi)),   count = sum_t m_t

  so `loss_sum / count` is the SPEC loss. `A_t` is `pg_advantages(...)`; the
  gradient flows only through `log pi` and the entropy.

  Args:
    student_logits: [B, T, V] float, the student's teacher-forced logits on
      the rollout (recomputed, not the sampler's: temperature and top-k change
      those probabilities).
    actions: [B, T] int, the rollout tokens.
    returns: [B, T] Ĝ_t.
    mask: [B, T] prefix mask of the positions that count.
    baseline, teacher_values, weight, behavior_logprobs, denom, reward_clip:
      as in `pg_advantages`.
    entropy_coef: beta >= 0, weight of the entropy bonus.

  Returns:
    (loss_sum, count): float32 scalars.
  """
  _check_logits_and_ids("student_logits", student_logits, "actions", actions,
                        mask)
  checks.check_same_shape({"returns": returns, "actions": actions})
  if not entropy_coef >= 0:
    raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef!r}")
  # The student's own log-probs stand in for `logprobs`: same shape, and the
  # loss computes them itself.
  denom, reward_clip = _check_advantage_options(
      returns, mask, logprobs=returns, baseline=baseline,
      teacher_values=teacher_values, weight=weight,
      behavior_logprobs=behavior_logprobs, denom=denom,
      reward_clip=reward_clip)
  return _policy_gradient_loss(
      student_logits, actions, returns, mask, teacher_values,
      behavior_logprobs, baseline=baseline, weight=weight, denom=denom,
      reward_clip=reward_clip, entropy_coef=float(entropy_coef))


@functools.partial(
    jax.jit,
    static_argnames=("baseline", "weight", "denom", "reward_clip",
                     "entropy_coef"))
def _policy_gradient_loss(student_logits, actions, returns, mask,
                          teacher_values, behavior_logprobs, *, baseline,
                          weight, denom, reward_clip, entropy_coef):
  logp, entropy = token_logprobs(student_logits, actions)  # [B, T] each
  return _pg_from_logprobs(
      logp, entropy, returns, mask, teacher_values, behavior_logprobs,
      baseline=baseline, weight=weight, denom=denom, reward_clip=reward_clip,
      entropy_coef=entropy_coef)


def _pg_from_logprobs(logp, entropy, returns, mask, teacher_values,
                      behavior_logprobs, *, baseline, weight, denom,
                      reward_clip, entropy_coef):
  adv = _pg_advantages(
      returns, mask, jax.lax.stop_gradient(logp), teacher_values,
      behavior_logprobs, baseline=baseline, weight=weight, denom=denom,
      reward_clip=reward_clip)  # [B, T]
  m = jnp.asarray(mask) != 0
  per_token = -adv * logp
  if entropy_coef:
    per_token = per_token - entropy_coef * entropy
  loss_sum = jnp.sum(jnp.where(m, per_token, 0.0))
  return loss_sum, jnp.sum(m).astype(jnp.float32)


def policy_gradient_loss_from_logprobs(
    logprobs: ArrayLike,
    entropy: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    *,
    baseline: str = "none",
    teacher_values: ArrayLike | None = None,
    weight: str = "none",
    behavior_logprobs: ArrayLike | None = None,
    denom: float = 1.0,
    reward_clip: float | None = 50.0,
    entropy_coef: float = 0.0,
) -> tuple[Array, Array]:
  """`policy_gradient_loss` from the per-position `token_logprobs`.

  For callers that compute `log pi(a_t)` and `H_t(pi)` without the whole
  `[B, T, V]` logits (`token_logprobs_chunked`).

  Args:
    logprobs: [B, T] float `log pi(a_t)` (differentiable).
    entropy: [B, T] float `H_t(pi)` (differentiable; read only if
      `entropy_coef` > 0).
    returns, mask, baseline, teacher_values, weight, behavior_logprobs, denom,
    reward_clip, entropy_coef: as in `policy_gradient_loss`.

  Returns:
    (loss_sum, count): float32 scalars.
  """
  checks.check_float("logprobs", logprobs)
  checks.check_float("entropy", entropy)
  checks.check_same_shape({"logprobs": logprobs, "entropy": entropy,
                            "returns": returns})
  checks.check_prefix_mask("mask", mask)
  if not entropy_coef >= 0:
    raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef!r}")
  denom, reward_clip = _check_advantage_options(
      returns, mask, logprobs=logprobs, baseline=baseline,
      teacher_values=teacher_values, weight=weight,
      behavior_logprobs=behavior_logprobs, denom=denom,
      reward_clip=reward_clip)
  return _pg_from_logprobs(
      logprobs, entropy, returns, mask, teacher_values, behavior_logprobs,
      baseline=baseline, weight=weight, denom=denom, reward_clip=reward_clip,
      entropy_coef=float(entropy_coef))


def token_logprobs(logits: Array, ids: Array) -> tuple[Array, Array]:
  """`(log p(ids), entropy)`, both [B, T] float32, from logits [B, T, V]."""
  logp_all = log_softmax_f32(logits)  # [B, T, V]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)  # [B, T]
  return _taken(logp_all, ids), entropy


def token_logprobs_chunked(hidden: Array, head: chunked.Head, ids: Array, *,
                           chunk: int) -> tuple[Array, Array]:
  """`token_logprobs` of `project(hidden, head)`, `chunk` positions at a time.

  hidden [B, T, E] and head are the LM head's input and matrix
  (`t5.hidden_states`, `t5.output_head`); forward and backward hold one
  `[B, chunk, V]` block of logits at a time.
  """
  return chunked.map_logits(lambda z, y, _: token_logprobs(z, y), hidden, head,
                            (ids,), chunk)


# --------------------------------------------------------------------------
# Supervised loss
# --------------------------------------------------------------------------


def cross_entropy_loss(
    logits: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike,
    *,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array]:
  """Token-level cross-entropy `-sum_t m_t log p(y_t)`, as a sum and a count.

  With label smoothing eps the target distribution is
  `(1 - eps) onehot(y_t) + eps / V`.

  Args:
    logits: [B, T, V] float.
    targets: [B, T] int.
    mask: [B, T] prefix mask.
    label_smoothing: eps in [0, 1).

  Returns:
    (loss_sum, count): float32 scalars.
  """
  _check_logits_and_ids("logits", logits, "targets", targets, mask)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(
        f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
  return _cross_entropy_loss(logits, targets, mask,
                             label_smoothing=float(label_smoothing))


@functools.partial(jax.jit, static_argnames=("label_smoothing",))
def _cross_entropy_loss(logits, targets, mask, *, label_smoothing):
  nll = _token_nll(logits, targets, label_smoothing)  # [B, T]
  return masked_sum(nll, mask)


def _token_nll(logits, targets, label_smoothing):
  """[B, T, V] logits, [B, T] targets -> [B, T] (smoothed) -log p."""
  logp_all = log_softmax_f32(logits)  # [B, T, V]
  nll = -_taken(logp_all, targets)  # [B, T]
  if label_smoothing:
    nll = ((1.0 - label_smoothing) * nll
           - label_smoothing * jnp.mean(logp_all, axis=-1))
  return nll


def masked_sum(per_token: Array, mask: ArrayLike) -> tuple[Array, Array]:
  """`(sum of per_token [B, T] where mask, count of mask)`, float32 scalars."""
  m = jnp.asarray(mask) != 0
  return jnp.sum(jnp.where(m, per_token, 0.0)), jnp.sum(m).astype(jnp.float32)


def cross_entropy_loss_chunked(
    hidden: ArrayLike,
    head: chunked.Head,
    targets: ArrayLike,
    mask: ArrayLike,
    *,
    chunk: int,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array]:
  """`cross_entropy_loss` of the logits `project(hidden, head)`, by chunks.

  Args:
    hidden: [B, T, E] LM-head input (`t5.hidden_states`).
    head: the LM head (`t5.output_head`).
    targets, mask, label_smoothing: as in `cross_entropy_loss`.
    chunk: positions per chunk (`chunked.map_logits`; 0 = all at once).

  Returns:
    (loss_sum, count): float32 scalars, forward and backward holding one
    `[B, chunk, V]` block of logits at a time.
  """
  chunked.check_head("hidden", hidden, "head", head)
  checks.check_int("targets", targets)
  checks.check_same_shape({
      "hidden[..., 0]": jax.ShapeDtypeStruct(jnp.shape(hidden)[:2],
                                             jnp.float32),
      "targets": targets, "mask": mask})
  checks.check_prefix_mask("mask", mask)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(
        f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
  nll = chunked.map_logits(
      lambda z, y, _: _token_nll(z, y, float(label_smoothing)), hidden, head,
      (targets,), chunk)  # [B, T]
  return masked_sum(nll, mask)
