"""Property-based tests: random shapes, masks, lengths and K never give NaN.

Inputs cover all-masked rows, length 1, K far beyond T and extreme logits;
the only exceptions allowed are the documented `ValueError`s.
"""

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from ketchup_jax import divergences, losses, returns

# Few distinct shapes, so jit compiles a bounded number of programs.
SHAPES = st.sampled_from([(1, 1), (1, 5), (3, 4), (4, 9)])
VOCABS = st.sampled_from([2, 7])


@st.composite
def batches(draw):
  b_size, t_size = draw(SHAPES)
  vocab = draw(VOCABS)
  lengths = draw(st.lists(st.integers(0, t_size), min_size=b_size,
                          max_size=b_size))
  mask = (np.arange(t_size)[None] < np.array(lengths)[:, None]).astype(np.int32)
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  logits = draw(hnp.arrays(
      np.float32, (b_size, t_size, vocab),
      elements=st.floats(-1, 1, width=32))) * scale
  actions = draw(hnp.arrays(np.int32, (b_size, t_size),
                            elements=st.integers(0, vocab - 1)))
  return logits, actions, mask


@settings(max_examples=40, deadline=None)
@given(batch=batches(), k=st.sampled_from([1, 2, 3, 50]),
       value=st.sampled_from(returns.VALUES))
def test_returns_are_finite_and_zero_after_terminal(batch, k, value):
  logits, actions, mask = batch
  q, v = returns.teacher_q_values(logits, actions, mask, value=value)
  g = np.asarray(returns.k_step_returns(q, v, mask, k))
  full = np.asarray(returns.full_returns(
      returns.one_step_rewards(q, v, mask), mask))
  assert np.isfinite(g).all() and np.isfinite(full).all()
  assert (g[mask == 0] == 0).all()
  bias = np.asarray(returns.k_step_bias(q, v, mask, k))
  if value == "max":
    assert bias.min() >= -1e-4 * (1 + np.abs(full).max())
  diag = returns.return_diagnostics(q, v, mask, k)
  assert all(np.isfinite(float(x)) for x in diag.values())


@settings(max_examples=40, deadline=None)
@given(batch=batches(),
       baseline=st.sampled_from(["none", "batch_mean"]),
       weight=st.sampled_from(["none", "reference_compat"]),
       reward_clip=st.sampled_from([None, 1.0, 50.0]),
       divergence=st.sampled_from(divergences.DIVERGENCES))
def test_losses_are_finite(batch, baseline, weight, reward_clip, divergence):
  logits, actions, mask = batch
  g = logits[..., 0] * 100.0
  total, count = losses.policy_gradient_loss(
      logits, actions, g, mask, baseline=baseline, weight=weight,
      reward_clip=reward_clip, entropy_coef=0.01)
  assert np.isfinite(float(total)) and float(count) == mask.sum()
  if mask.sum() == 0:
    assert float(total) == 0.0
  kd, _ = divergences.distillation_loss(logits, logits[::-1], mask,
                                   divergence=divergence)
  ce, _ = losses.cross_entropy_loss(logits, actions, mask)
  assert np.isfinite(float(kd)) and float(kd) >= -1e-5
  assert np.isfinite(float(ce)) and float(ce) >= 0.0
