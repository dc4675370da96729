"""Gradient-variance / bias diagnostics on tiny models with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ketchup_jax import diagnostics
from ketchup_jax import models
from ketchup_jax.models import t5
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps

VOCAB = 32
LENGTH = 7


def _config():
  return models.get_config("tiny", vocab_size=VOCAB, dtype=jnp.float32,
                           d_model=16, d_ff=32, num_heads=2, d_kv=8,
                           num_layers=1, num_decoder_layers=1)


def _batches(n, rows=6, seed=0):
  rng = np.random.default_rng(seed)
  return [{"input_ids": rng.integers(2, VOCAB, (rows, 5)).astype(np.int32),
           "attention_mask": np.ones((rows, 5), np.int32),
           "example_mask": np.ones((rows,), np.int32)} for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  student = models.init_params(config, jax.random.PRNGKey(2))
  teacher = models.init_params(config, jax.random.PRNGKey(1))
  return config, student, teacher


# --------------------------------------------------------------------------
# An independent reference: NumPy returns from the SPEC recursion, and the
# REINFORCE loss written out on t5.forward.
# --------------------------------------------------------------------------


def _np_k_returns(q, v, mask, k):
  """SPEC §2 recursion, one position at a time (O(T^2) is fine here)."""
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    n = int(mask[b].sum())
    if not n:
      continue
    last = n - 1
    g = np.zeros(n)
    g[last] = q[b, last]
    for t in range(last - 1, -1, -1):
      nxt = min(t + k, last)
      g[t] = q[b, t] - v[b, nxt] + g[nxt]
    out[b, :n] = g
  return out


def _reference_gradients(config, student, teacher, batches, rl, ks, seed):
  """[M, len(ks), D] flattened gradients, computed without diagnostics.py."""
  base = jax.random.PRNGKey(seed)
  mods = steps.StepModels(student=config, teacher=config)

  @jax.jit
  def rollout(batch, key):
    roll = mods.sample(student, config, batch, key,
                       max_new_tokens=rl.max_decode_len,
                       temperature=rl.temperature)
    logits = t5.forward(
        teacher, config, batch["input_ids"], batch["attention_mask"],
        t5.shift_right(roll.tokens, config), jnp.ones_like(roll.tokens))
    return roll.tokens, roll.lengths, logits

  @jax.jit
  def grad_fn(params, batch, tokens, mask, adv):
    def loss(params):
      logits = t5.forward(params, config, batch["input_ids"],
                          batch["attention_mask"],
                          t5.shift_right(tokens, config), mask)
      logp = jax.nn.log_softmax(logits, -1)
      taken = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
      return -jnp.sum(adv * taken) / jnp.sum(mask)
    return jax.grad(loss)(params)

  out = []
  for m, batch in enumerate(batches):
    batch = jax.tree.map(jnp.asarray, batch)
    tokens, lengths, logits = rollout(batch, jax.random.fold_in(base, m))
    actions = np.asarray(tokens)
    mask = np.asarray(steps.length_mask(lengths, rl.max_decode_len),
                      np.float64)
    f = np.asarray(logits, np.float64)
    centred = f - f.mean(-1, keepdims=True)
    q = np.take_along_axis(centred, actions[..., None], -1)[..., 0] * mask
    v = centred.max(-1) * mask
    row = []
    for k in ks:
      adv = np.clip(_np_k_returns(q, v, mask, k), -rl.reward_clip,
                    rl.reward_clip) * mask
      grad = grad_fn(student, batch, tokens, jnp.asarray(mask, jnp.int32),
                     jnp.asarray(adv, jnp.float32))
      row.append(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                 for x in jax.tree.leaves(grad)]))
    out.append(row)
  return np.array(out)


def _np_trace_cov(x):
  return float(np.sum((x - x.mean(0)) ** 2) / (len(x) - 1))


def test_gradient_variance_matches_an_independent_computation(tiny):
  config, student, teacher = tiny
  rl = rollouts.RLConfig(k=1, max_decode_len=LENGTH, unfinished="terminal",
                      temperature=1.0, reward_clip=50.0)
  batches = _batches(4)
  ks = (1, 3)
  got = diagnostics.gradient_diagnostics(
      student, teacher, batches,
      models=steps.StepModels(student=config, teacher=config), rl=rl,
      options=diagnostics.Options(ks=ks, minibatches=4, seed=5))
  ref = _reference_gradients(config, student, teacher, batches, rl, ks,
                             seed=5)
  for i, k in enumerate(ks):
    np.testing.assert_allclose(got[k]["grad_var"], _np_trace_cov(ref[:, i]),
                               rtol=1e-4)
    mean = ref[:, i].mean(0)
    np.testing.assert_allclose(got[k]["grad_mean_sq"], mean @ mean,
                               rtol=1e-4)
  # The variance is not trivially the same for both K here.
  assert abs(got[1]["grad_var"] - got[3]["grad_var"]) > 1e-3 * got[1][
      "grad_var"]
  assert got[1]["bias_mean"] == pytest.approx(0.0, abs=1e-4)
  assert got[3]["bias_mean"] > 0.1  # value=max: bias >= 0, here > 0


def test_projected_estimate_agrees_with_the_full_gradient(tiny):
  config, student, teacher = tiny
  # The same static settings as the test above: its compiled step is reused.
  rl = rollouts.RLConfig(k=1, max_decode_len=LENGTH, unfinished="terminal",
                      temperature=1.0, reward_clip=50.0)
  mods = steps.StepModels(student=config, teacher=config)
  batches = _batches(4, seed=1)
  kw = dict(models=mods, rl=rl)
  full = diagnostics.gradient_diagnostics(
      student, teacher, batches,
      options=diagnostics.Options(ks=(1, 3), minibatches=4, seed=3), **kw)
  proj = diagnostics.gradient_diagnostics(
      student, teacher, batches,
      options=diagnostics.Options(ks=(1, 3), minibatches=4, seed=3,
                                  projections=1000), **kw)
  # Relative sd of the R=1000 Gaussian estimate: sqrt(2/(rR)) for r equal
  # eigenvalues, 2.6% for the rank-3 covariance of M=4, 4.5% for the rank-1
  # squared mean (fixed keys: the test is deterministic).
  for k in (1, 3):
    np.testing.assert_allclose(proj[k]["grad_var"], full[k]["grad_var"],
                               rtol=0.15)
    np.testing.assert_allclose(proj[k]["grad_mean_sq"],
                               full[k]["grad_mean_sq"], rtol=0.15)
    # Return statistics do not depend on the gradient estimator.
    assert proj[k]["return_var"] == full[k]["return_var"]


def test_projected_trace_is_exact_with_a_scaled_orthonormal_basis():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 40))
  basis, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  p = x @ basis * np.sqrt(40)  # directions sqrt(D) q_r, R = D
  np.testing.assert_allclose(diagnostics.projected_trace(p),
                             diagnostics.trace_covariance(x), rtol=1e-12)
  np.testing.assert_allclose(diagnostics.trace_covariance(x),
                             np.var(x, axis=0, ddof=1).sum(), rtol=1e-12)


def test_teacher_followed_greedily_has_zero_bias_for_every_k(tiny):
  # Teacher = student and greedy rollouts: every action is the teacher's
  # argmax, so every skipped term V_i - Q_i(a_i) is 0 (SPEC §2).
  config, student, _ = tiny
  rl = rollouts.RLConfig(k=1, max_decode_len=LENGTH, unfinished="terminal",
                      temperature=0.0)
  ks = (1, 3, 16)
  got = diagnostics.gradient_diagnostics(
      student, student, _batches(3, seed=2),
      models=steps.StepModels(student=config, teacher=config), rl=rl,
      options=diagnostics.Options(ks=ks, minibatches=3))
  for k in ks:
    assert got[k]["bias_mean"] == pytest.approx(0.0, abs=1e-4)
    assert got[k]["bias_max"] == pytest.approx(0.0, abs=1e-4)
    assert got[k]["bias_std"] == pytest.approx(0.0, abs=1e-4)
    # Same returns, so the same gradients and variances for every K.
    np.testing.assert_allclose(got[k]["grad_var"], got[1]["grad_var"],
                               rtol=1e-4)
    np.testing.assert_allclose(got[k]["return_var"], got[1]["return_var"],
                               rtol=1e-4, atol=1e-4)
  assert got[1]["grad_var"] > 0


# The per-K gradient goes through a VJP of the logits rather than rl_step's
# value_and_grad; the loss must still be rl_step's, including the bootstrap
# value and the teacher-expected baseline (one case: a compile costs ~20 s).
@pytest.mark.parametrize("unfinished,baseline", [
    ("bootstrap", "teacher_expected")])
def test_loss_is_the_one_rl_step_minimises(tiny, unfinished, baseline):
  config, student, teacher = tiny
  rl = rollouts.RLConfig(k=2, max_decode_len=LENGTH, unfinished=unfinished,
                      baseline=baseline)
  mods = steps.StepModels(student=config, teacher=config)
  optim = state_lib.OptimConfig(steps=1, learning_rate=1e-4)
  state = state_lib.init_state(student, state_lib.make_optimizer(optim),
                               seed=0)
  batch = jax.tree.map(jnp.asarray, _batches(1, seed=4)[0])
  _, metrics = jax.jit(lambda s, t, b: rollouts.rl_step(
      s, t, b, models=mods, optim=optim, rl=rl))(state, teacher, batch)
  _, sample_rng = jax.random.split(state.rng)
  _, loss_values, _, _ = diagnostics.minibatch_gradients(
      student, teacher, batch, sample_rng, jax.random.PRNGKey(0),
      models=mods, rl=rl, ks=(2,))
  np.testing.assert_allclose(float(loss_values[0]), float(metrics["loss"]),
                             rtol=1e-5, atol=1e-6)


def test_options_and_command_line_refuse_bad_values(tmp_path, capsys):
  with pytest.raises(ValueError, match="minibatches must be an int >= 2"):
    diagnostics.Options(minibatches=1)
  with pytest.raises(ValueError, match="ks must be"):
    diagnostics.Options(ks=(0, 2))
  assert diagnostics.main(["--workdir", str(tmp_path), "--ks", "1,x"]) == 2
  assert "--ks must be a comma-separated list" in capsys.readouterr().err
  assert diagnostics.main(["--workdir", str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err
  assert "not a pipeline run directory" in err and err.count("\n") == 1
