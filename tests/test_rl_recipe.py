"""The RL recipe's pieces: the state-value baseline, and self-distillation.

With `baseline="value"` the advantage is `Ĝ_t - V_t`, which SPEC §2's
recursion turns into minus the sum of the one-step regrets `V_i - Q_i(a_i)`
along t's K-step chain `t, n(t), n(n(t)), ...`. The reference below walks the
chain with a Python loop, independent of `returns.k_step_returns`' scan.

A teacher equal to the student, with greedy rollouts, has no regret anywhere
(every action is the teacher's argmax), so that baseline gives the update
nothing to do: the parameters stay bit-identical. Without a baseline (the
authors' recipe) the same rollout has all-positive advantages V_t and the
update moves the student, reinforcing its own outputs (issue 13's
self-distillation control).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ketchup_jax import losses
from ketchup_jax import models
from ketchup_jax import returns
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from ketchup_jax.train import validation


def _chain_regret_loop(q, v, mask, k):
  """-sum of V_i - Q_i(a_i) over t's chain, per SPEC §2, by a Python loop."""
  b, t_len = q.shape
  out = np.zeros((b, t_len))
  for row in range(b):
    length = int(mask[row].sum())
    last = length - 1
    for t in range(length):
      i, total = t, 0.0
      while True:
        total -= v[row, i] - q[row, i]
        if i == last:
          break
        i = min(i + k, last)
      out[row, t] = total
  return out


@pytest.mark.parametrize("k", [1, 2, 3, 16])
def test_value_baseline_advantage_is_minus_the_chain_regret(k):
  rng = np.random.default_rng(k)
  b, t_len = 5, 11
  v = rng.normal(3.0, 1.0, (b, t_len)).astype(np.float32)
  q = (v - rng.exponential(1.0, (b, t_len))).astype(np.float32)  # Q <= V
  lengths = np.array([11, 7, 1, 4, 0])  # a full row, short ones, an empty one
  mask = (np.arange(t_len)[None] < lengths[:, None]).astype(np.int32)
  g = returns.k_step_returns(jnp.asarray(q), jnp.asarray(v),
                             jnp.asarray(mask), k)
  adv = losses.pg_advantages(g, mask, baseline="value",
                             teacher_values=jnp.asarray(v), reward_clip=None)
  expected = _chain_regret_loop(q, v, mask, k)
  np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv) <= 1e-6)  # regrets are >= 0 under max
  # Clipping applies after the baseline, as for the others.
  clipped = losses.pg_advantages(g, mask, baseline="value",
                                 teacher_values=jnp.asarray(v),
                                 reward_clip=0.5)
  np.testing.assert_allclose(np.asarray(clipped),
                             np.clip(expected, -0.5, 0.5), atol=1e-5)


def _self_distillation_step(rl):
  config = models.get_config("tiny", vocab_size=64, dtype=jnp.float32,
                             num_layers=1, num_decoder_layers=1)
  params = models.place_params(models.init_params(config,
                                                  jax.random.PRNGKey(3)),
                               config, None)
  optim = state_lib.OptimConfig(steps=1, learning_rate=1e-2,
                                max_grad_norm=0.0)
  mods = steps.StepModels(student=config, teacher=config)
  state = state_lib.init_state(params, state_lib.make_optimizer(optim),
                               seed=0)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(2, 64, (8, 6)).astype(np.int32),
           "attention_mask": np.ones((8, 6), np.int32),
           "example_mask": np.ones((8,), np.int32)}
  new, metrics = jax.jit(lambda s, t, b: rollouts.rl_step(
      s, t, b, models=mods, optim=optim, rl=rl))(state, params, batch)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(new.params), jax.tree.leaves(params)))
  return moved, metrics


def test_greedy_self_distillation_with_the_value_baseline_does_not_move():
  rl = rollouts.RLConfig(k=2, max_decode_len=8, unfinished="terminal",
                      temperature=0.0, baseline="value")
  moved, metrics = _self_distillation_step(rl)
  assert moved == 0.0
  assert float(metrics["loss"]) == 0.0
  assert float(metrics["bias_mean"]) == 0.0  # no skipped regret either


def test_greedy_self_distillation_without_a_baseline_moves_the_student():
  # The authors' loss: A_t = pi * V_t > 0 on every token of the rollout.
  rl = rollouts.RLConfig(k=2, max_decode_len=8, unfinished="terminal",
                      temperature=0.0, weight="reference_compat")
  moved, metrics = _self_distillation_step(rl)
  assert moved > 1e-3  # Adam's first step is lr * sign(grad) = 1e-2
  assert float(metrics["loss"]) > 0.0  # -mean(A * log pi): A > 0, log pi < 0


def test_validation_carve_out_is_deterministic_disjoint_and_removed():
  train = [{"source": f"s{i}", "target": f"t{i}"} for i in range(100)]
  rest, held = validation.carve_out(train, 30)
  assert len(held) == 10 and len(rest) == 90  # at most a tenth of train
  assert {ex["source"] for ex in held}.isdisjoint(ex["source"] for ex in rest)
  assert [ex for ex in train if ex in held] == held  # order kept
  again, held_again = validation.carve_out(list(reversed(train)), 30)
  assert sorted(ex["source"] for ex in held_again) == sorted(
      ex["source"] for ex in held)  # chosen by content, not position
  with pytest.raises(ValueError, match="has 9 examples, too few"):
    validation.carve_out(train[:9], 5)


def test_validation_subset_of_a_sorted_split_spans_it_not_a_prefix():
  split = [{"source": f"{i:04d}", "target": str(i)} for i in range(1000)]
  chosen = validation.subset(split, 100)
  numbers = [int(ex["target"]) for ex in chosen]
  assert len(numbers) == 100 and numbers == sorted(numbers)  # order kept
  quarters = np.bincount(np.asarray(numbers) // 250, minlength=4)
  assert quarters.min() >= 10, quarters  # a prefix would be [100, 0, 0, 0]
  assert validation.subset(split[:50], 100) == split[:50]  # small: all of it
