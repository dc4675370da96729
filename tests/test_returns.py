"""returns.py against plain-loop NumPy references written from SPEC §1–2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ketchup_jax import returns as R

# --------------------------------------------------------------------------
# References: loops over positions, float64, straight from SPEC's formulas.
# --------------------------------------------------------------------------


def ref_q_values(logits, actions, mask, center=True, value="max"):
  logits = np.asarray(logits, np.float64)
  b_size, t_size, _ = logits.shape
  q_taken = np.zeros((b_size, t_size))
  values = np.zeros((b_size, t_size))
  for b in range(b_size):
    for t in range(t_size):
      if not mask[b, t]:
        continue
      q = logits[b, t] - (logits[b, t].mean() if center else 0.0)
      q_taken[b, t] = q[actions[b, t]]
      if value == "max":
        values[b, t] = q.max()
      else:
        p = np.exp(q - q.max())
        p /= p.sum()
        values[b, t] = (p * q).sum()
  return q_taken, values


def terminal(mask_row):
  ones = np.flatnonzero(mask_row)
  return ones[-1] if len(ones) else -1


def ref_rewards(q, v, mask):
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    big_t = terminal(mask[b])
    for t in range(big_t + 1):
      v_next = v[b, t + 1] if t + 1 <= big_t else 0.0
      out[b, t] = q[b, t] - v_next
  return out


def ref_full_returns(r, mask):
  out = np.zeros(r.shape)
  for b in range(r.shape[0]):
    big_t = terminal(mask[b])
    for t in range(big_t + 1):
      out[b, t] = sum(r[b, i] for i in range(t, big_t + 1))
  return out


def ref_k_step(q, v, mask, k):
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    big_t = terminal(mask[b])
    if big_t < 0:
      continue
    out[b, big_t] = q[b, big_t]
    for t in range(big_t - 1, -1, -1):
      n = min(t + k, big_t)
      out[b, t] = q[b, t] - v[b, n] + out[b, n]
  return out


def ref_chain(t, big_t, k):
  chain = [t]
  while chain[-1] < big_t:
    chain.append(min(chain[-1] + k, big_t))
  return chain


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def prefix_mask(lengths, t_size):
  return (np.arange(t_size)[None, :] < np.asarray(lengths)[:, None]).astype(
      np.int32)


def random_case(seed, lengths, t_size, vocab=13):
  rng = np.random.default_rng(seed)
  b_size = len(lengths)
  logits = rng.normal(scale=2.0, size=(b_size, t_size, vocab)).astype(
      np.float32)
  actions = rng.integers(0, vocab, size=(b_size, t_size)).astype(np.int32)
  return logits, actions, prefix_mask(lengths, t_size)


# Mixed lengths in one batch: empty, length 1, short, full.
LENGTHS = [0, 1, 2, 5, 9, 16, 16, 11]
T = 16


@pytest.mark.parametrize("value", ["max", "expected"])
@pytest.mark.parametrize("center", [True, False])
def test_teacher_q_values_matches_reference(value, center):
  logits, actions, mask = random_case(0, LENGTHS, T)
  q, v = R.teacher_q_values(logits, actions, mask, center=center, value=value)
  q_ref, v_ref = ref_q_values(logits, actions, mask, center, value)
  assert q.dtype == jnp.float32 and v.dtype == jnp.float32
  np.testing.assert_allclose(q, q_ref, atol=1e-5)
  np.testing.assert_allclose(v, v_ref, atol=1e-5)


def test_teacher_q_values_bf16_computes_in_float32():
  logits, actions, mask = random_case(1, LENGTHS, T, vocab=257)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  q, v = R.teacher_q_values(bf16, actions, mask, value="expected")
  # The reference sees exactly the bf16 values, upcast: float32 accumulation
  # over 257 entries must agree far below bf16's own resolution (~1e-2).
  q_ref, v_ref = ref_q_values(np.asarray(bf16.astype(jnp.float32)), actions,
                              mask, True, "expected")
  assert q.dtype == jnp.float32
  np.testing.assert_allclose(q, q_ref, atol=1e-5)
  np.testing.assert_allclose(v, v_ref, atol=1e-5)


def test_teacher_q_values_holds_at_most_one_float32_logits_copy():
  b_size, t_size, vocab = 4, 32, 4096
  logits = jax.ShapeDtypeStruct((b_size, t_size, vocab), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((b_size, t_size), jnp.int32)
  one_copy = b_size * t_size * vocab * 4
  for value in R.VALUES:
    compiled = jax.jit(
        lambda f, a, m, value=value: R.teacher_q_values(f, a, m, value=value)
    ).lower(logits, ids, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # One float32 copy plus [B, T]-sized scratch; a second copy would double it.
    assert temp < 1.5 * one_copy, (value, temp, one_copy)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 15, 16, 17, 100])
def test_k_step_returns_matches_reference(k):
  logits, actions, mask = random_case(2, LENGTHS, T)
  q, v = R.teacher_q_values(logits, actions, mask)
  q64, v64 = np.asarray(q, np.float64), np.asarray(v, np.float64)
  got = R.k_step_returns(q, v, mask, k)
  np.testing.assert_allclose(got, ref_k_step(q64, v64, mask, k), atol=1e-4)
  # Zero after each row's terminal position.
  assert np.all(np.asarray(got)[mask == 0] == 0.0)


def test_k_step_returns_arbitrary_values_not_from_logits():
  # q and v need not come from logits (e.g. a notebook prototype).
  rng = np.random.default_rng(3)
  lengths = rng.integers(0, 41, size=12)
  mask = prefix_mask(lengths, 40)
  q = rng.normal(size=(12, 40)).astype(np.float32)
  v = rng.normal(size=(12, 40)).astype(np.float32)
  for k in (1, 5, 7, 39, 40, 1000):
    np.testing.assert_allclose(
        R.k_step_returns(q, v, mask, k),
        ref_k_step(q * mask, v * mask, mask, k), atol=1e-4)


def test_one_step_rewards_and_full_returns_match_reference():
  logits, actions, mask = random_case(4, LENGTHS, T)
  q, v = R.teacher_q_values(logits, actions, mask, value="expected")
  q64, v64 = np.asarray(q, np.float64), np.asarray(v, np.float64)
  r = R.one_step_rewards(q, v, mask)
  r_ref = ref_rewards(q64, v64, mask)
  np.testing.assert_allclose(r, r_ref, atol=1e-5)
  np.testing.assert_allclose(
      R.full_returns(r, mask), ref_full_returns(r_ref, mask), atol=1e-4)


@pytest.mark.parametrize("value", ["max", "expected"])
def test_k1_equals_full_return(value):
  logits, actions, mask = random_case(5, LENGTHS, T)
  q, v = R.teacher_q_values(logits, actions, mask, value=value)
  full = R.full_returns(R.one_step_rewards(q, v, mask), mask)
  np.testing.assert_allclose(R.k_step_returns(q, v, mask, 1), full, atol=1e-4)


def test_one_jump_when_k_reaches_terminal():
  logits, actions, mask = random_case(6, LENGTHS, T)
  q, v = (np.asarray(x, np.float64)
          for x in R.teacher_q_values(logits, actions, mask))
  for k in (T, T + 1, 10 * T):
    got = np.asarray(R.k_step_returns(q, v, mask, k))
    for b, length in enumerate(LENGTHS):
      big_t = length - 1
      for t in range(big_t):
        want = q[b, t] - v[b, big_t] + q[b, big_t]
        assert abs(got[b, t] - want) < 1e-4, (k, b, t)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 16])
def test_bias_is_sum_over_skipped_positions(k):
  logits, actions, mask = random_case(7, LENGTHS, T)
  q, v = (np.asarray(x, np.float64)
          for x in R.teacher_q_values(logits, actions, mask))
  bias = np.asarray(R.k_step_bias(q, v, mask, k))
  for b, length in enumerate(LENGTHS):
    big_t = length - 1
    for t in range(big_t + 1):
      chain = set(ref_chain(t, big_t, k))
      skipped = [i for i in range(t, big_t + 1) if i not in chain]
      want = sum(v[b, i] - q[b, i] for i in skipped)
      assert abs(bias[b, t] - want) < 1e-4, (b, t)
  # Bellman optimality: with value="max" the bias is never negative.
  assert bias.min() >= -1e-5


def test_bias_zero_on_teacher_greedy_actions():
  logits, _, mask = random_case(8, LENGTHS, T)
  greedy = logits.argmax(-1).astype(np.int32)
  q, v = R.teacher_q_values(logits, greedy, mask)
  for k in (1, 2, 4, 8, 16, 64):
    np.testing.assert_allclose(R.k_step_bias(q, v, mask, k), 0.0, atol=1e-5)
    diag = R.return_diagnostics(q, v, mask, k)
    assert abs(float(diag["bias_mean"])) < 1e-5
    assert abs(float(diag["bias_max"])) < 1e-5


def test_return_diagnostics_match_reference():
  logits, actions, mask = random_case(9, LENGTHS, T)
  q, v = R.teacher_q_values(logits, actions, mask)
  q64, v64 = np.asarray(q, np.float64), np.asarray(v, np.float64)
  k = 3
  g_k = ref_k_step(q64, v64, mask, k)
  g_1 = ref_full_returns(ref_rewards(q64, v64, mask), mask)
  real = mask.astype(bool)

  def batch_var(g):
    per_pos = [g[real[:, t], t].var() for t in range(T)
               if real[:, t].sum() >= 2]
    return np.mean(per_pos)

  bias = (g_k - g_1)[real]
  want = {
      "return_mean": g_k[real].mean(),
      "return_var": batch_var(g_k),
      "return_var_k1": batch_var(g_1),
      "bias_mean": bias.mean(),
      "bias_std": bias.std(),
      "bias_max": bias.max(),
  }
  got = R.return_diagnostics(q, v, mask, k)
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(float(got[name]), value, rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_return_variance_falls_as_k_grows():
  # i.i.d. Q-values: Ĝ_t sums ~(T - t)/K independent terms, so the batch
  # variance of the returns must drop markedly with each doubling of K.
  rng = np.random.default_rng(10)
  b_size, t_size = 512, 64
  mask = prefix_mask(np.full(b_size, t_size), t_size)
  v = rng.normal(size=(b_size, t_size)).astype(np.float32) + 2.0
  q = v - rng.exponential(size=(b_size, t_size)).astype(np.float32)
  variances = [float(R.return_variance(R.k_step_returns(q, v, mask, k), mask))
               for k in (1, 2, 4, 8, 16)]
  for lower_k, higher_k in zip(variances, variances[1:]):
    assert higher_k < 0.75 * lower_k, variances


def test_works_under_outer_jit_with_traced_mask():
  logits, actions, mask = random_case(11, LENGTHS, T)

  @jax.jit
  def pipeline(f, a, m):
    q, v = R.teacher_q_values(f, a, m)
    return R.k_step_returns(q, v, m, 4)

  q, v = R.teacher_q_values(logits, actions, mask)
  np.testing.assert_allclose(
      pipeline(logits, actions, mask), R.k_step_returns(q, v, mask, 4),
      atol=1e-6)


def test_bool_and_float_masks_are_accepted():
  logits, actions, mask = random_case(12, LENGTHS, T)
  q, v = R.teacher_q_values(logits, actions, mask)
  want = R.k_step_returns(q, v, mask, 2)
  for m in (mask.astype(bool), mask.astype(np.float32)):
    np.testing.assert_allclose(R.k_step_returns(q, v, m, 2), want)


# --------------------------------------------------------------------------
# Bad input: one ValueError naming the argument and the bad value.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -3, 1.5, True, None, "2"])
def test_bad_k(k):
  q = np.zeros((2, 4), np.float32)
  with pytest.raises(ValueError, match=r"k must be a Python int >= 1, got"):
    R.k_step_returns(q, q, np.ones((2, 4)), k)


def test_bad_value_option():
  logits, actions, mask = random_case(0, [3], 4)
  with pytest.raises(ValueError, match=r"value must be one of .*'mean'"):
    R.teacher_q_values(logits, actions, mask, value="mean")


def test_integer_logits():
  _, actions, mask = random_case(0, [3], 4)
  with pytest.raises(ValueError, match=r"teacher_logits must be a floating.*int"):
    R.teacher_q_values(np.zeros((1, 4, 13), np.int32), actions, mask)


def test_float_actions():
  logits, _, mask = random_case(0, [3], 4)
  with pytest.raises(ValueError, match=r"actions must be an integer array"):
    R.teacher_q_values(logits, np.zeros((1, 4), np.float32), mask)


def test_actions_out_of_vocabulary():
  logits, actions, mask = random_case(0, [3], 4)
  actions[0, 2] = 13
  with pytest.raises(ValueError, match=r"actions must be token ids in \[0, 13\).*13 at row 0, position 2"):
    R.teacher_q_values(logits, actions, mask)
  # Beyond the terminal the id does not matter (padding).
  actions[0, 2], actions[0, 3] = 0, -1
  R.teacher_q_values(logits, actions, mask)


def test_mismatched_shapes():
  q = np.zeros((2, 5), np.float32)
  with pytest.raises(ValueError, match=r"shapes must match.*q_taken \(2, 5\).*values \(2, 4\)"):
    R.k_step_returns(q, np.zeros((2, 4), np.float32), np.ones((2, 5)), 2)
  logits, actions, mask = random_case(0, [3, 2], 4)
  with pytest.raises(ValueError, match=r"shapes must match.*mask \(2, 3\)"):
    R.teacher_q_values(logits, actions, mask[:, :3])
  with pytest.raises(ValueError, match=r"teacher_logits must have shape \[B, T, V\]"):
    R.teacher_q_values(logits[0], actions, mask)


def test_mask_not_prefix():
  q = np.zeros((2, 5), np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
  with pytest.raises(ValueError, match=r"mask must be a prefix mask.*row 1 has a 0 at position 1"):
    R.k_step_returns(q, q, mask, 2)
  with pytest.raises(ValueError, match=r"mask must hold only 0 and 1, found 2"):
    R.k_step_returns(q, q, mask * 2, 2)
