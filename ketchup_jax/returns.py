"""Teacher Q-values, induced rewards and K-step returns (SPEC §1, §2, §5).

Pure functions, batch-first, arrays in and arrays out. Every `mask` is a prefix
mask `[B, T]`: 1 from position 0 up to and including the last real token `T_b`
of row `b`, then 0. Rows may have different lengths; a row of zeros is an empty
sequence and gets zeros everywhere.

    Q_t(a)  = f_t(a) - mean_v f_t(v)                    (teacher logits f)
    V_t     = max_a Q_t(a), sum_a softmax(Q_t)(a) Q_t(a) or logsumexp_a Q_t(a)
    r_t     = Q_t(a_t) - V_{t+1},   V_{T+1} = 0
    G_t     = sum_{i=t..T} r_i                          (full return, K = 1)
    Ĝ_t     = Q_t(a_t) - V_{n(t)} + Ĝ_{n(t)},  n(t) = min(t + K, T),  Ĝ_T = Q_T(a_T)

The other teacher-induced rewards of SPEC §6 (reverse KL, and its K-step
chain variant) are here too: `teacher_log_probs`, `reverse_kl_rewards`,
`chain_returns`, `discounted_returns`, and `summarize_returns`, which gives the
diagnostics of any return against its K = 1 counterpart.

Each function validates shapes, dtypes and options at trace time and raises
`ValueError` naming the bad argument; value checks (prefix masks, token ids in
range) run when the inputs are concrete. All functions jit.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ketchup_jax import checks
from ketchup_jax import chunked

Array = jax.Array
ArrayLike = Any

VALUES = ("max", "expected", "soft")


# --------------------------------------------------------------------------
# Q-values
# --------------------------------------------------------------------------


def teacher_q_values(
    teacher_logits: ArrayLike,
    actions: ArrayLike,
    mask: ArrayLike,
    *,
    center: bool = True,
    value: str = "max",
) -> tuple[Array, Array]:
  """Q-values of the taken actions and state values from teacher logits.

  `Q_t(a) = f_t(a) - mean_v f_t(v)` (or `f_t(a)` with `center=False`);
  `V_t = max_a Q_t(a)` (`value="max"`), `sum_a softmax(Q_t)(a) Q_t(a)`
  (`value="expected"`) or `log sum_a exp Q_t(a)` (`value="soft"`, SPEC §6).
  With "soft", `Q_t(a_t) - V_t = log p_T(a_t | s_t)`, the teacher's
  log-probability of the taken token, whatever `center` is.

  The logits may be bfloat16; everything is computed in float32, and at most
  one float32 `[B, T, V]` tensor exists at a time (XLA fuses the rest into the
  reductions).

  Args:
    teacher_logits: [B, T, V] float, teacher-forced logits on the rollout;
      position t scores a_t given the source and a_<t.
    actions: [B, T] int, the rollout tokens a_t.
    mask: [B, T] prefix mask of real tokens.
    center: subtract the per-position mean logit (SPEC default on).
    value: "max" (Bellman optimality), "expected" (softmax-weighted) or
      "soft" (logsumexp).

  Returns:
    (q_taken, values), both [B, T] float32 and zero where `mask` is 0:
    `q_taken[b, t] = Q_t(a_t)` and `values[b, t] = V_t`.
  """
  checks.check_choice("value", value, VALUES)
  _check_teacher_inputs(teacher_logits, actions, mask)
  return _teacher_q_values(
      teacher_logits, actions, mask, center=center, value=value)


def _check_teacher_inputs(teacher_logits, actions, mask) -> None:
  """[B, T, V] float logits, [B, T] int actions in range, [B, T] prefix mask."""
  checks.check_rank("teacher_logits", teacher_logits, 3, "[B, T, V]")
  checks.check_float("teacher_logits", teacher_logits)
  checks.check_int("actions", actions)
  checks.check_same_shape({
      "teacher_logits[..., 0]": jax.ShapeDtypeStruct(
          jnp.shape(teacher_logits)[:2], jnp.float32),
      "actions": actions,
      "mask": mask,
  })
  checks.check_prefix_mask("mask", mask)
  checks.check_token_ids("actions", actions, mask,
                          jnp.shape(teacher_logits)[-1])


@functools.partial(jax.jit, static_argnames=("center", "value"))
def _teacher_q_values(teacher_logits, actions, mask, *, center, value):
  stats = position_stats(teacher_logits, actions, center=center)
  return q_values_from_stats(stats, mask, value=value)


def position_stats(teacher_logits: Array, actions: Array, *,
                   center: bool) -> dict[str, Array]:
  """Every per-position reduction of the Q-values over V, in one pass.

  No checks (callers validate); used whole-sequence by `teacher_q_values` and
  chunk by chunk by `position_stats_chunked`.

  Args:
    teacher_logits: [B, T, V] float logits f.
    actions: [B, T] int taken tokens a_t.
    center: Q = f - mean_v f (else Q = f).

  Returns:
    A dict of [B, T] float32 arrays (unmasked):
      "q_taken": Q_t(a_t);
      "max": max_a Q_t(a);
      "expected": sum_a softmax(Q_t)(a) Q_t(a);
      "soft": log sum_a exp Q_t(a) (the soft value; the teacher's
        log-probability of the taken token is q_taken - soft).
  """
  f = teacher_logits.astype(jnp.float32)  # [B, T, V], the one float32 copy
  q_taken = taken_logits(f, actions)  # [B, T]
  # One logsumexp serves the expected and the soft value.
  lse = jax.nn.logsumexp(f, axis=-1)  # [B, T]
  # softmax(Q) = softmax(f), and sum_a p(a) Q(a) = sum_a p(a) f(a) - mean f.
  expected = jnp.sum(jnp.exp(f - lse[..., None]) * f, axis=-1)  # [B, T]
  stats = {"q_taken": q_taken, "max": jnp.max(f, axis=-1),
           "expected": expected, "soft": lse}
  if center:
    mean = jnp.mean(f, axis=-1)  # [B, T]
    stats = {name: x - mean for name, x in stats.items()}
  return stats


def position_stats_chunked(hidden: Array, head: chunked.Head, actions: Array,
                           *, center: bool, chunk: int) -> dict[str, Array]:
  """`position_stats` of the logits `project(hidden, head)`, chunk by chunk.

  Args:
    hidden: [B, T, E] the teacher's LM-head input (`t5.hidden_states`).
    head: its LM head (`t5.output_head`), vocabulary V.
    actions: [B, T] int taken tokens.
    center: as in `position_stats`.
    chunk: positions per chunk (`chunked.map_logits`).

  Returns:
    As `position_stats`; no `[B, T, V]` array exists, only `[B, chunk, V]`.
  """
  return chunked.map_logits(
      lambda z, a, _: position_stats(z, a, center=center), hidden, head,
      (actions,), chunk)


def q_values_from_stats(stats: dict[str, Array], mask: Array, *,
                        value: str) -> tuple[Array, Array]:
  """`(q_taken, values)` of `teacher_q_values` from `position_stats`' dict."""
  m = _bool_mask(mask)
  return (jnp.where(m, stats["q_taken"], 0.0),
          jnp.where(m, stats[value], 0.0))


def taken_logits(f: Array, actions: Array) -> Array:
  """f [..., V] float32, actions [...] int -> f[..., actions] as [...]."""
  return jnp.take_along_axis(
      f, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def taken_log_probs(f: Array, actions: Array) -> Array:
  """log softmax(f)[..., actions] for f [..., V] float32 -> [...]."""
  return taken_logits(f, actions) - jax.nn.logsumexp(f, axis=-1)


def teacher_log_probs(teacher_logits: ArrayLike, actions: ArrayLike,
                      mask: ArrayLike) -> Array:
  """The teacher's log-probability of each taken token, `log p_T(a_t|s_t)`.

  Equals `Q_t(a_t) - V_t` of `teacher_q_values(..., value="soft")`; computed
  directly (one logsumexp), in float32.

  Args:
    teacher_logits: [B, T, V] float, teacher-forced logits on the rollout.
    actions: [B, T] int, the rollout tokens.
    mask: [B, T] prefix mask.

  Returns:
    [B, T] float32, zero where `mask` is 0.
  """
  _check_teacher_inputs(teacher_logits, actions, mask)
  return _teacher_log_probs(teacher_logits, actions, mask)


@jax.jit
def _teacher_log_probs(teacher_logits, actions, mask):
  lp = taken_log_probs(teacher_logits.astype(jnp.float32), actions)  # [B, T]
  return jnp.where(_bool_mask(mask), lp, 0.0)


# --------------------------------------------------------------------------
# Rewards and returns
# --------------------------------------------------------------------------


def _check_q_v_mask(q_taken, values, mask) -> None:
  checks.check_rank("q_taken", q_taken, 2, "[B, T]")
  checks.check_float("q_taken", q_taken)
  checks.check_float("values", values)
  checks.check_same_shape(
      {"q_taken": q_taken, "values": values, "mask": mask})
  checks.check_prefix_mask("mask", mask)


def one_step_rewards(q_taken: ArrayLike, values: ArrayLike,
                     mask: ArrayLike) -> Array:
  """The induced one-step reward `r_t = Q_t(a_t) - V_{t+1}`, `V_{T+1} = 0`.

  Args:
    q_taken: [B, T] `Q_t(a_t)`, from `teacher_q_values`.
    values: [B, T] `V_t`, from `teacher_q_values`.
    mask: [B, T] prefix mask.

  Returns:
    [B, T] float32 rewards, zero after each row's terminal position.
  """
  _check_q_v_mask(q_taken, values, mask)
  return _one_step_rewards(q_taken, values, mask)


@jax.jit
def _one_step_rewards(q_taken, values, mask):
  m = _bool_mask(mask)
  q = jnp.where(m, q_taken.astype(jnp.float32), 0.0)
  v = jnp.where(m, values.astype(jnp.float32), 0.0)
  # V_{t+1}; it is 0 past the terminal because v is masked there.
  v_next = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))  # [B, T]
  return jnp.where(m, q - v_next, 0.0)


def full_returns(rewards: ArrayLike, mask: ArrayLike) -> Array:
  """The full (LLMR) return `G_t = sum_{i=t..T} r_i`, a reverse cumsum.

  Args:
    rewards: [B, T] float, e.g. from `one_step_rewards`.
    mask: [B, T] prefix mask.

  Returns:
    [B, T] float32 returns, zero after each row's terminal position.
  """
  checks.check_rank("rewards", rewards, 2, "[B, T]")
  checks.check_float("rewards", rewards)
  checks.check_same_shape({"rewards": rewards, "mask": mask})
  checks.check_prefix_mask("mask", mask)
  return _full_returns(rewards, mask)


@jax.jit
def _full_returns(rewards, mask):
  m = _bool_mask(mask)
  r = jnp.where(m, rewards.astype(jnp.float32), 0.0)
  return jnp.where(m, _strided_suffix_sum(r, 1), 0.0)


def k_step_returns(q_taken: ArrayLike, values: ArrayLike, mask: ArrayLike,
                   k: int) -> Array:
  """KETCHUP K-step returns (SPEC §2), O(T) per sequence.

      n(t) = min(t + K, T),  Ĝ_T = Q_T(a_T),
      Ĝ_t  = Q_t(a_t) - V_{n(t)} + Ĝ_{n(t)}   for t < T.

  K = 1 gives the full return `G_t`; K >= T - t gives the single jump
  `Q_t(a_t) - V_T + Q_T(a_T)`.

  How: unrolling the chain t = p_0, p_1 = n(t), ..., p_m = T gives
  `Ĝ_t = V_t + sum_j D_{p_j}` with `D_p = Q_p(a_p) - V_p`, and the chain visits
  t, t + K, t + 2K, ... below T, then T. So `Ĝ_t = V_t + S_t + D_T` for t < T,
  where `S_t` is the K-strided suffix sum of D over positions below T: one
  reverse `lax.scan` over the T/K blocks of K positions, carrying K partial
  sums. Work is O(B T) for every K.

  Args:
    q_taken: [B, T] `Q_t(a_t)`.
    values: [B, T] `V_t`.
    mask: [B, T] prefix mask; row b's terminal T_b is its last 1.
    k: Python int >= 1, the jump length.

  Returns:
    [B, T] float32 returns, zero after each row's terminal position.
  """
  checks.check_positive_int("k", k)
  _check_q_v_mask(q_taken, values, mask)
  return _k_step_returns(q_taken, values, mask, k=int(k))


@functools.partial(jax.jit, static_argnames=("k",))
def _k_step_returns(q_taken, values, mask, *, k):
  _, length = q_taken.shape
  # From any t < T a jump of K >= length lands on T, so K = length is the same.
  k = min(k, length)
  m = _bool_mask(mask)
  q = jnp.where(m, q_taken.astype(jnp.float32), 0.0)
  v = jnp.where(m, values.astype(jnp.float32), 0.0)
  terminal = _terminal_index(m)  # [B], -1 for an empty row
  pos = jnp.arange(length)[None, :]  # [1, T]
  before_terminal = pos < terminal[:, None]  # [B, T]
  at_terminal = pos == terminal[:, None]  # [B, T]
  d = q - v  # [B, T], D_p = Q_p(a_p) - V_p
  d_terminal = jnp.sum(jnp.where(at_terminal, d, 0.0), axis=1)  # [B]
  s = _strided_suffix_sum(jnp.where(before_terminal, d, 0.0), k)  # [B, T]
  returns = jnp.where(before_terminal, v + s + d_terminal[:, None], 0.0)
  return jnp.where(at_terminal, q, returns)


# --------------------------------------------------------------------------
# Reverse-KL rewards (SPEC §6) and returns over any per-token reward
# --------------------------------------------------------------------------


def check_gamma(gamma: Any) -> float:
  """Returns `gamma` as a float; raises unless it is a number in [0, 1]."""
  if isinstance(gamma, bool) or not isinstance(
      gamma, (int, float, np.floating, np.integer)) or not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma must be a number in [0, 1] (0 = immediate "
                     f"reward, 1 = undiscounted reward-to-go), got {gamma!r}")
  return float(gamma)


def reverse_kl_rewards(teacher_logprobs: ArrayLike, student_logprobs: ArrayLike,
                       mask: ArrayLike) -> Array:
  """The reverse-KL reward `r_t = log p_T(a_t) - log pi(a_t)`, both detached.

  Its expectation under the student is `-KL(pi(.|s_t) || p_T(.|s_t))`.

  Args:
    teacher_logprobs: [B, T] `log p_T(a_t | s_t)`, from `teacher_log_probs`.
    student_logprobs: [B, T] `log pi_theta(a_t | s_t)` of the student being
      trained (teacher-forced on the rollout, not the sampler's).
    mask: [B, T] prefix mask.

  Returns:
    [B, T] float32 rewards with no gradient, zero where `mask` is 0.
  """
  checks.check_rank("teacher_logprobs", teacher_logprobs, 2, "[B, T]")
  checks.check_float("teacher_logprobs", teacher_logprobs)
  checks.check_float("student_logprobs", student_logprobs)
  checks.check_same_shape({"teacher_logprobs": teacher_logprobs,
                            "student_logprobs": student_logprobs,
                            "mask": mask})
  checks.check_prefix_mask("mask", mask)
  return _reverse_kl_rewards(teacher_logprobs, student_logprobs, mask)


@jax.jit
def _reverse_kl_rewards(teacher_logprobs, student_logprobs, mask):
  r = (teacher_logprobs.astype(jnp.float32)
       - student_logprobs.astype(jnp.float32))
  return jax.lax.stop_gradient(jnp.where(_bool_mask(mask), r, 0.0))


def chain_returns(rewards: ArrayLike, mask: ArrayLike, k: int,
                  gamma: float) -> Array:
  """Discounted reward summed over the K-step chain of each position.

  With the chain of SPEC §2, `p_0 = t`, `p_{j+1} = n(p_j) = min(p_j + K, T)`,
  ending at the terminal `T`:

      Ĝ_t = sum_j gamma^(p_j - t) r_{p_j}          (Ĝ_T = r_T)

  K = 1 is the discounted reward-to-go `sum_{i >= t} gamma^(i - t) r_i`
  (`discounted_returns`); gamma = 0 is the immediate reward r_t for every K.
  For the reverse-KL reward this is the experimental "K-step reverse KL":
  only the chain positions' rewards enter, the skipped ones are dropped, so
  `Ĝ_t - G_t = -sum_{i skipped by t's chain} gamma^(i - t) r_i` (for the
  reverse-KL reward, the skipped positions' sampled KL estimates, which have
  non-negative expectation, so the return leans optimistic).

  How: for t < T the chain visits t, t + K, ... below T, then T; the first
  part is a K-strided suffix sum with decay gamma^K per jump (the same
  reverse `lax.scan` as `k_step_returns`), the last is `gamma^(T - t) r_T`.
  O(B T) for every K.

  Args:
    rewards: [B, T] float, e.g. from `reverse_kl_rewards`.
    mask: [B, T] prefix mask; row b's terminal T_b is its last 1.
    k: Python int >= 1, the jump length.
    gamma: discount in [0, 1].

  Returns:
    [B, T] float32 returns, zero after each row's terminal position.
  """
  checks.check_positive_int("k", k)
  gamma = check_gamma(gamma)
  checks.check_rank("rewards", rewards, 2, "[B, T]")
  checks.check_float("rewards", rewards)
  checks.check_same_shape({"rewards": rewards, "mask": mask})
  checks.check_prefix_mask("mask", mask)
  return _chain_returns(rewards, mask, k=int(k), gamma=gamma)


def discounted_returns(rewards: ArrayLike, mask: ArrayLike,
                       gamma: float) -> Array:
  """`G_t = sum_{i=t..T} gamma^(i - t) r_i` ([B, T] float32); K = 1 chains."""
  return chain_returns(rewards, mask, 1, gamma)


@functools.partial(jax.jit, static_argnames=("k", "gamma"))
def _chain_returns(rewards, mask, *, k, gamma):
  _, length = rewards.shape
  k = min(k, length)
  m = _bool_mask(mask)
  r = jnp.where(m, rewards.astype(jnp.float32), 0.0)
  terminal = _terminal_index(m)  # [B]
  pos = jnp.arange(length)[None, :]  # [1, T]
  before_terminal = pos < terminal[:, None]
  at_terminal = pos == terminal[:, None]
  r_terminal = jnp.sum(jnp.where(at_terminal, r, 0.0), axis=1)  # [B]
  s = _strided_suffix_sum(jnp.where(before_terminal, r, 0.0), k,
                          decay=gamma ** k)  # [B, T]
  # gamma^(T - t) for t < T (exponent >= 1, so gamma = 0 gives 0).
  gap = jnp.maximum(terminal[:, None] - pos, 1).astype(jnp.float32)
  tail = jnp.power(jnp.float32(gamma), gap) * r_terminal[:, None]
  out = jnp.where(before_terminal, s + tail, 0.0)
  return jnp.where(at_terminal, r, out)


def _strided_suffix_sum(x: Array, k: int, decay: float = 1.0) -> Array:
  """`out[:, t] = sum_{j >= 0} decay^j x[:, t + j k]` for x [B, T], O(B T).

  The positions are laid out as blocks [T/K, B, K] (zero-padded) and a reverse
  `lax.scan` over blocks carries the K running sums, one per residue t mod K.
  """
  batch, length = x.shape
  n_blocks = -(-length // k)
  padded = jnp.pad(x, ((0, 0), (0, n_blocks * k - length)))
  blocks = padded.reshape(batch, n_blocks, k).transpose(1, 0, 2)  # [N, B, K]

  def step(carry, block):  # carry, block: [B, K]
    carry = block + carry if decay == 1.0 else block + decay * carry
    return carry, carry

  _, sums = jax.lax.scan(
      step, jnp.zeros((batch, k), x.dtype), blocks, reverse=True)
  return sums.transpose(1, 0, 2).reshape(batch, n_blocks * k)[:, :length]


def _bool_mask(mask: Array) -> Array:
  return jnp.asarray(mask) != 0


def _terminal_index(m: Array) -> Array:
  """Index of the last True in each row of m [B, T]; -1 for an all-False row."""
  length = m.shape[1]
  last = length - 1 - jnp.argmax(m[:, ::-1], axis=1)
  return jnp.where(m.any(axis=1), last, -1)


# --------------------------------------------------------------------------
# Diagnostics (SPEC §5)
# --------------------------------------------------------------------------


def k_step_bias(q_taken: ArrayLike, values: ArrayLike, mask: ArrayLike,
                k: int) -> Array:
  """Per-position bias of the K-step return, `Ĝ_t - G_t` (SPEC §2).

  Equals `sum_{i skipped by t's chain} (V_i - Q_i(a_i))`: >= 0 with
  `value="max"`, and 0 where every skipped action is the teacher's argmax.

  Returns:
    [B, T] float32, zero after each row's terminal position.
  """
  checks.check_positive_int("k", k)
  _check_q_v_mask(q_taken, values, mask)
  return _k_step_bias(q_taken, values, mask, k=int(k))


@functools.partial(jax.jit, static_argnames=("k",))
def _k_step_bias(q_taken, values, mask, *, k):
  g_k = _k_step_returns(q_taken, values, mask, k=k)
  g_1 = _full_returns(_one_step_rewards(q_taken, values, mask), mask)
  return g_k - g_1


def return_variance(returns: ArrayLike, mask: ArrayLike) -> Array:
  """Batch variance of returns, averaged over positions (SPEC §5).

  For each position t, the population variance of `returns[:, t]` over the rows
  that are real at t; then the mean over positions where at least two rows are
  real (a single row has no spread to measure). 0 if there is no such position.

  Args:
    returns: [B, T] float.
    mask: [B, T] prefix mask.

  Returns:
    float32 scalar.
  """
  checks.check_rank("returns", returns, 2, "[B, T]")
  checks.check_float("returns", returns)
  checks.check_same_shape({"returns": returns, "mask": mask})
  return _return_variance(returns, mask)


@jax.jit
def _return_variance(returns, mask):
  m = _bool_mask(mask)
  x = jnp.where(m, returns.astype(jnp.float32), 0.0)
  count = jnp.sum(m, axis=0).astype(jnp.float32)  # [T]
  mean = jnp.sum(x, axis=0) / jnp.maximum(count, 1.0)  # [T]
  var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0.0), axis=0) / jnp.maximum(
      count, 1.0)  # [T]
  usable = count >= 2
  n_usable = jnp.sum(usable)
  return jnp.where(
      n_usable > 0,
      jnp.sum(jnp.where(usable, var, 0.0)) / jnp.maximum(n_usable, 1), 0.0)


def return_diagnostics(q_taken: ArrayLike, values: ArrayLike, mask: ArrayLike,
                       k: int) -> dict[str, Array]:
  """Scalar diagnostics of the K-step return from one teacher pass (SPEC §5).

  Returns:
    A dict of float32 scalars:
      `return_mean`: mean of Ĝ_t over real tokens (K in use);
      `return_var`: `return_variance` of Ĝ (K in use);
      `return_var_k1`: `return_variance` of the full return G (K = 1);
      `bias_mean`, `bias_std`, `bias_max`: mean, standard deviation and maximum
        of `Ĝ_t - G_t` over real tokens.
  """
  checks.check_positive_int("k", k)
  _check_q_v_mask(q_taken, values, mask)
  return _return_diagnostics(q_taken, values, mask, k=int(k))


@functools.partial(jax.jit, static_argnames=("k",))
def _return_diagnostics(q_taken, values, mask, *, k):
  g_k = _k_step_returns(q_taken, values, mask, k=k)
  g_1 = _full_returns(_one_step_rewards(q_taken, values, mask), mask)
  return _summarize_returns(g_k, g_1, mask)


def summarize_returns(returns: ArrayLike, returns_k1: ArrayLike,
                      mask: ArrayLike) -> dict[str, Array]:
  """`return_diagnostics` for any return and its K = 1 counterpart.

  For objectives whose return is not built from (Q, V), e.g. the reverse-KL
  reward's `chain_returns` against `discounted_returns`; the bias is
  `returns - returns_k1`.

  Args:
    returns: [B, T] float, the return in use (Ĝ).
    returns_k1: [B, T] float, the K = 1 return of the same reward (G).
    mask: [B, T] prefix mask of the positions that count.

  Returns:
    The dict of `return_diagnostics`.
  """
  checks.check_rank("returns", returns, 2, "[B, T]")
  checks.check_float("returns", returns)
  checks.check_float("returns_k1", returns_k1)
  checks.check_same_shape({"returns": returns, "returns_k1": returns_k1,
                            "mask": mask})
  return _summarize_returns(returns, returns_k1, mask)


@jax.jit
def _summarize_returns(g_k, g_1, mask):
  m = _bool_mask(mask)
  n = jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)
  g_k = jnp.where(m, g_k.astype(jnp.float32), 0.0)
  g_1 = jnp.where(m, g_1.astype(jnp.float32), 0.0)
  bias = g_k - g_1
  bias_mean = jnp.sum(bias) / n
  bias_var = jnp.sum(jnp.where(m, (bias - bias_mean) ** 2, 0.0)) / n
  return {
      "return_mean": jnp.sum(g_k) / n,
      "return_var": _return_variance(g_k, mask),
      "return_var_k1": _return_variance(g_1, mask),
      "bias_mean": bias_mean,
      "bias_std": jnp.sqrt(bias_var),
      "bias_max": jnp.where(
          jnp.any(m), jnp.max(jnp.where(m, bias, -jnp.inf)), 0.0),
  }
