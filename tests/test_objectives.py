"""SPEC §6 objectives against independent references: the soft value, the
reverse-KL reward (immediate, discounted, K-step chain), GKD's generalised JSD
and step, their diagnostics and their config checks.

References are NumPy loops written from SPEC §6 (one position at a time) and,
for the JSD gradient, PyTorch autograd.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs.experiments import objectives
from configs.experiments import smoke_sweep
from ketchup_jax import diagnostics
from ketchup_jax import divergences
from ketchup_jax import losses
from ketchup_jax import models
from ketchup_jax import returns as R
from ketchup_jax import sweep
from ketchup_jax.models import t5
from ketchup_jax.train import pipeline
from ketchup_jax.train import rollouts
from ketchup_jax.train import settings
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from test_pipeline import smoke_config

B, T, V = 4, 9, 13
LENGTHS = [0, 1, 5, 9]


def prefix_mask(lengths, t_size):
  return (np.arange(t_size)[None, :] < np.asarray(lengths)[:, None]).astype(
      np.int32)


def random_case(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(scale=2.0, size=(B, T, V)).astype(np.float32),
          rng.integers(0, V, size=(B, T)).astype(np.int32),
          prefix_mask(LENGTHS, T))


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def taken(x, actions):
  return np.take_along_axis(x, actions[..., None], -1)[..., 0]


def chain(t, last, k):
  """SPEC §2's chain t, n(t), n(n(t)), ..., T (inclusive)."""
  out = [t]
  while out[-1] < last:
    out.append(min(out[-1] + k, last))
  return out


def loop_chain_returns(r, mask, k, gamma):
  """sum_j gamma^(p_j - t) r_{p_j} over t's chain, one position at a time."""
  out = np.zeros(r.shape, np.float64)
  for b in range(r.shape[0]):
    n = int(mask[b].sum())
    for t in range(n):
      out[b, t] = sum(gamma ** (p - t) * r[b, p] for p in chain(t, n - 1, k))
  return out


def loop_k_step(q, v, mask, k):
  """SPEC §2's recursion Ĝ_t = Q_t(a_t) - V_n(t) + Ĝ_n(t)."""
  out = np.zeros(q.shape, np.float64)
  for b in range(q.shape[0]):
    n = int(mask[b].sum())
    if not n:
      continue
    out[b, n - 1] = q[b, n - 1]
    for t in range(n - 2, -1, -1):
      nxt = min(t + k, n - 1)
      out[b, t] = q[b, t] - v[b, nxt] + out[b, nxt]
  return out


# --------------------------------------------------------------------------
# Soft value
# --------------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
def test_soft_value_q_minus_v_is_the_teacher_log_softmax(center):
  logits, actions, mask = random_case(0)
  q, v = R.teacher_q_values(logits, actions, mask, center=center,
                            value="soft")
  f = logits.astype(np.float64)
  if center:
    f = f - f.mean(-1, keepdims=True)
  v_ref = np.log(np.exp(f).sum(-1))  # logsumexp over the vocabulary
  np.testing.assert_allclose(q, taken(f, actions) * mask, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(v, v_ref * mask, rtol=1e-5, atol=1e-5)
  log_p = taken(np_log_softmax(logits), actions) * mask
  np.testing.assert_allclose(np.asarray(q) - np.asarray(v), log_p, atol=1e-5)
  np.testing.assert_allclose(R.teacher_log_probs(logits, actions, mask),
                             log_p, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_soft_value_k_step_return_and_bias_are_teacher_surprisal(k):
  logits, actions, mask = random_case(1)
  q, v = R.teacher_q_values(logits, actions, mask, value="soft")
  q64, v64 = np.asarray(q, np.float64), np.asarray(v, np.float64)
  np.testing.assert_allclose(R.k_step_returns(q, v, mask, k),
                             loop_k_step(q64, v64, mask, k), atol=1e-4)
  # SPEC §6: G_t = sum_{i >= t} log p_T(a_i) + V_t, and the K-step bias is
  # the teacher's surprisal -log p_T of the skipped actions (>= 0).
  log_p = taken(np_log_softmax(logits), actions)
  full = np.zeros((B, T))
  bias = np.zeros((B, T))
  for b in range(B):
    n = LENGTHS[b]
    for t in range(n):
      full[b, t] = log_p[b, t:n].sum() + v64[b, t]
      skipped = set(range(t, n)) - set(chain(t, n - 1, k))
      bias[b, t] = -sum(log_p[b, i] for i in skipped)
  np.testing.assert_allclose(R.k_step_returns(q, v, mask, 1), full,
                             atol=1e-4)
  got_bias = np.asarray(R.k_step_bias(q, v, mask, k))
  np.testing.assert_allclose(got_bias, bias, atol=1e-4)
  assert (got_bias >= -1e-5).all()
  if k > 1:
    assert got_bias.max() > 0.5


# --------------------------------------------------------------------------
# Reverse-KL reward and its returns
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k,gamma", [(1, 0.0), (1, 0.9), (3, 1.0), (3, 0.7),
                                     (20, 0.5)])
def test_reverse_kl_chain_returns_match_the_loop_reference(k, gamma):
  rng = np.random.default_rng(2)
  mask = prefix_mask(LENGTHS, T)
  rewards = (rng.normal(size=(B, T)) * mask).astype(np.float32)
  got = R.chain_returns(rewards, mask, k, gamma)
  np.testing.assert_allclose(got, loop_chain_returns(rewards, mask, k, gamma),
                             rtol=1e-5, atol=1e-5)
  if k == 1:
    np.testing.assert_allclose(R.discounted_returns(rewards, mask, gamma), got)
  if gamma == 0.0:
    np.testing.assert_allclose(got, rewards)
  # Bias against the K = 1 return: minus the skipped positions' rewards.
  diag = R.summarize_returns(got, R.discounted_returns(rewards, mask, gamma),
                             mask)
  skipped = loop_chain_returns(rewards, mask, k, gamma) - loop_chain_returns(
      rewards, mask, 1, gamma)
  np.testing.assert_allclose(diag["bias_mean"],
                             skipped.sum() / mask.sum(), atol=1e-5)


def _scored(seed, reward_rows=B):
  """A hand-made `score_rollout` result with random teacher and actions."""
  teacher_logits, actions, mask = random_case(seed)
  lp_t = taken(np_log_softmax(teacher_logits), actions) * mask
  zeros = jnp.zeros((reward_rows, T))
  rollout = rollouts.Rollout(
      actions=jnp.asarray(actions), mask=jnp.asarray(mask),
      finished=jnp.ones((reward_rows,), bool),
      real_row=jnp.ones((reward_rows,), bool), behavior_logprobs=zeros,
      lengths=jnp.asarray(mask.sum(-1), jnp.int32))
  scores = rollouts.TeacherScores(
      q_taken=zeros, values=zeros,
      teacher_logprobs=jnp.asarray(lp_t, jnp.float32))
  return rollouts.ScoredRollout(
      rollout=rollout, scores=scores, loss_mask=jnp.asarray(mask),
      scale=jnp.float32(1.0)), lp_t


@pytest.mark.parametrize("reward,k,gamma", [("reverse_kl", 1, 0.0),
                                            ("reverse_kl", 1, 0.8),
                                            ("reverse_kl_kstep", 3, 0.8)])
def test_reverse_kl_loss_and_gradient_match_numpy_with_the_student_detached(
    reward, k, gamma):
  scored, lp_t = _scored(3)
  mask = np.asarray(scored.mask, np.float64)
  actions = np.asarray(scored.actions)
  logits = np.random.default_rng(4).normal(size=(B, T, V)).astype(np.float32)
  clip, beta = 2.0, 0.05
  rl = rollouts.RLConfig(k=k, reward=reward, gamma=gamma, baseline="batch_mean",
                      reward_clip=clip, entropy_coef=beta,
                      unfinished="terminal")

  def loss(z):
    logp, entropy = losses.token_logprobs(z, jnp.asarray(actions))
    return rollouts.rollout_objective(logp, entropy, scored, rl, rl.k)[0]

  got_loss, got_grad = jax.value_and_grad(loss)(jnp.asarray(logits))

  # NumPy: r = log p_T - log pi (a constant), chain returns, batch-mean
  # baseline, clip; L = (1/N) sum m (-A log pi - beta H).
  logp = np_log_softmax(logits)
  p = np.exp(logp)
  lp_s = taken(logp, actions)
  r = (lp_t - lp_s) * mask
  g = loop_chain_returns(r, mask, k if reward == "reverse_kl_kstep" else 1,
                         gamma)
  n = mask.sum()
  adv = np.clip(g - (g * mask).sum() / n, -clip, clip) * mask
  entropy = -(p * logp).sum(-1)
  ref_loss = ((-adv * lp_s - beta * entropy) * mask).sum() / n
  onehot = np.eye(V)[actions]
  # d(-A log pi(a))/dz = -A (onehot - p); d(-beta H)/dz = beta p (log p + H).
  ref_grad = (-adv[..., None] * (onehot - p)
              + beta * p * (logp + entropy[..., None])) * mask[..., None] / n
  np.testing.assert_allclose(float(got_loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_grad), ref_grad, atol=2e-6)
  # Were log pi not detached inside the reward, the gradient would differ.
  assert np.abs(adv).max() > 0.1


# --------------------------------------------------------------------------
# GKD's generalised JSD
# --------------------------------------------------------------------------


def torch_jsd(student, teacher, mask, beta):
  """(loss_sum, d loss_sum / d student) by autograd, SPEC §6's formula."""
  s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
  p = torch.softmax(torch.tensor(teacher, dtype=torch.float64), -1)
  q = torch.softmax(s, -1)
  if beta == 0.0:
    per = (p * (p.log() - q.log())).sum(-1)
  elif beta == 1.0:
    per = (q * (q.log() - p.log())).sum(-1)
  else:
    m = beta * p + (1 - beta) * q
    per = (beta * (p * (p.log() - m.log())).sum(-1)
           + (1 - beta) * (q * (q.log() - m.log())).sum(-1))
  total = (per * torch.tensor(mask, dtype=torch.float64)).sum()
  total.backward()
  return total.item(), s.grad.numpy()


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_gkd_generalized_jsd_and_gradient_match_torch(beta):
  teacher, _, mask = random_case(5)
  student = np.random.default_rng(6).normal(size=(B, T, V)).astype(np.float32)

  def loss(s):
    return divergences.generalized_jsd_loss(s, jnp.asarray(teacher), mask,
                                       beta=beta)[0]

  got, grad = jax.value_and_grad(loss)(jnp.asarray(student))
  ref, ref_grad = torch_jsd(student, teacher, mask, beta)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-5)
  count = divergences.generalized_jsd_loss(student, teacher, mask, beta=beta)[1]
  assert float(count) == mask.sum()


def test_gkd_beta_limits_approach_forward_and_reverse_kl():
  teacher, _, mask = random_case(7)
  student = np.random.default_rng(8).normal(size=(B, T, V)).astype(np.float32)
  kl = float(divergences.distillation_loss(student, teacher, mask,
                                      divergence="kl")[0])
  rkl = float(divergences.distillation_loss(student, teacher, mask,
                                       divergence="rkl")[0])
  assert abs(kl - rkl) > 0.1 * kl  # the two limits are distinguishable

  def jsd(beta):
    return float(divergences.generalized_jsd_loss(student, teacher, mask,
                                             beta=beta)[0])

  # JSD_beta ~ beta KL(P||Q) as beta -> 0 and (1 - beta) KL(Q||P) as
  # beta -> 1 (P = teacher): the scaled error shrinks linearly with the
  # distance.
  # (float32 rounding takes over below 1e-4.)
  eps = (1e-1, 1e-2, 1e-3, 1e-4)
  err0 = [abs(jsd(e) / e - kl) / kl for e in eps]
  err1 = [abs(jsd(1 - e) / e - rkl) / rkl for e in eps]
  for err in (err0, err1):
    assert all(a > b for a, b in zip(err, err[1:])) and err[-1] < 3e-3, err
  # At the ends exactly: the limits' divergences.
  np.testing.assert_allclose(jsd(0.0), kl, rtol=1e-6)
  np.testing.assert_allclose(jsd(1.0), rkl, rtol=1e-6)
  # Inside, the SPEC formula is symmetric under (P, Q, beta) -> (Q, P, 1-beta).
  swapped = float(divergences.generalized_jsd_loss(teacher, student, mask,
                                              beta=0.7)[0])
  np.testing.assert_allclose(jsd(0.3), swapped, rtol=1e-5)


# --------------------------------------------------------------------------
# The GKD step and reverse-KL diagnostics on a tiny model
# --------------------------------------------------------------------------


VOCAB, SRC, TGT, ROWS = 32, 5, 6, 4


def _tiny_config():
  return models.get_config("tiny", vocab_size=VOCAB, dtype=jnp.float32,
                           d_model=16, d_ff=32, num_heads=2, d_kv=8,
                           num_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def tiny():
  config = _tiny_config()
  return (config, models.init_params(config, jax.random.PRNGKey(2)),
          models.init_params(config, jax.random.PRNGKey(1)))


def _gold_batch(seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, VOCAB, (ROWS, TGT)).astype(np.int32)
  target_mask = prefix_mask([6, 3, 1, 4], TGT)
  return {"input_ids": rng.integers(2, VOCAB, (ROWS, SRC)).astype(np.int32),
          "attention_mask": np.ones((ROWS, SRC), np.int32),
          "example_mask": np.array([1, 1, 1, 0], np.int32),
          "decoder_target_ids": targets * target_mask,
          "decoder_attention_mask": target_mask}


def _np_jsd_mean(student_logits, teacher_logits, mask, beta):
  logp, logq = np_log_softmax(teacher_logits), np_log_softmax(student_logits)
  p, q = np.exp(logp), np.exp(logq)
  m = beta * p + (1 - beta) * q
  per = (beta * (p * (logp - np.log(m))).sum(-1)
         + (1 - beta) * (q * (logq - np.log(m))).sum(-1))
  return (per * mask).sum() / mask.sum()


def test_gkd_step_at_lambda_1_is_the_jsd_on_the_students_samples(tiny):
  # (lambda = 0, the gold targets: the next test.)
  config, student, teacher = tiny
  gkd = steps.GKDConfig(lmbda=1.0, beta=0.4, temperature=1.5,
                        max_decode_len=8)
  mods = steps.StepModels(student=config, teacher=config)
  optim = state_lib.OptimConfig(steps=1, learning_rate=1e-3)
  state = state_lib.init_state(student, state_lib.make_optimizer(optim),
                               seed=3)
  batch = jax.tree.map(jnp.asarray, _gold_batch())
  new_state, metrics = jax.jit(lambda s, t, b: steps.gkd_step(
      s, t, b, models=mods, optim=optim, gkd=gkd))(state, teacher, batch)

  # The reference draws the student's samples with the step's key at
  # temperature 1.5 and scores them with NumPy.
  _, target_rng = jax.random.split(state.rng)
  _, sample_rng = jax.random.split(target_rng)
  out = mods.sample(student, config, batch, sample_rng, max_new_tokens=8,
                    temperature=1.5)
  inputs = np.asarray(t5.shift_right(out.tokens, config))
  mask = prefix_mask(np.asarray(out.lengths), 8) * np.array(
      [1, 1, 1, 0])[:, None]
  fwd = lambda p: np.asarray(t5.forward(
      p, config, batch["input_ids"], batch["attention_mask"],
      jnp.asarray(inputs), jnp.asarray(mask)), np.float64)
  ref = _np_jsd_mean(fwd(student), fwd(teacher), mask, 0.4)
  np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-4)
  assert float(metrics["on_policy"]) == 1.0
  assert float(metrics["tokens"]) == mask.sum()
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params,
      student))
  assert max(moved) > 0


def test_gkd_targets_mix_student_samples_and_gold_at_lambda_half(tiny):
  config, student, _ = tiny
  gkd = steps.GKDConfig(lmbda=0.5, max_decode_len=8)
  mods = steps.StepModels(student=config, teacher=config)
  batch = jax.tree.map(jnp.asarray, _gold_batch())
  fn = jax.jit(jax.vmap(lambda key: steps.gkd_targets(
      student, batch, key, models=mods, gkd=gkd)))
  targets, mask, on_policy = fn(jax.random.split(jax.random.PRNGKey(0), 64))
  on_policy = np.asarray(on_policy)
  assert 16 < on_policy.sum() < 48  # Binomial(64, 1/2): 5.5 sd either side
  gold = np.pad(np.asarray(batch["decoder_attention_mask"]), ((0, 0), (0, 2)))
  gold_targets = np.pad(np.asarray(batch["decoder_target_ids"]),
                        ((0, 0), (0, 2)))
  for i in np.flatnonzero(~on_policy):
    np.testing.assert_array_equal(mask[i], gold)
    np.testing.assert_array_equal(targets[i], gold_targets)
  # Samples: each real row is a prefix ending at its EOS or at 8 tokens.
  assert (np.asarray(mask)[on_policy][:, 3] == 0).all()  # the padding row


def _np_reverse_kl_gradients(config, student, teacher, batches, rl, ks,
                             seed):
  """[M, len(ks), D] gradients of SPEC §6's loss, without diagnostics.py."""
  base = jax.random.PRNGKey(seed)
  mods = steps.StepModels(student=config, teacher=config)

  @jax.jit
  def rollout(batch, key):
    roll = mods.sample(student, config, batch, key,
                       max_new_tokens=rl.max_decode_len,
                       temperature=rl.temperature)
    inputs = t5.shift_right(roll.tokens, config)
    ones = jnp.ones_like(roll.tokens)
    args = (batch["input_ids"], batch["attention_mask"], inputs)
    return (roll.tokens, roll.lengths, t5.forward(teacher, config, *args, ones),
            t5.forward(student, config, *args,
                       steps.length_mask(roll.lengths, rl.max_decode_len)))

  @jax.jit
  def grad_fn(batch, tokens, mask, adv):
    def loss(params):
      logits = t5.forward(params, config, batch["input_ids"],
                          batch["attention_mask"],
                          t5.shift_right(tokens, config), mask)
      logp = jax.nn.log_softmax(logits, -1)
      lp = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
      return -jnp.sum(adv * lp) / jnp.sum(mask)
    return jax.grad(loss)(student)

  out, bias = [], []
  for m, batch in enumerate(batches):
    batch = jax.tree.map(jnp.asarray, batch)
    tokens, lengths, f_t, f_s = rollout(batch, jax.random.fold_in(base, m))
    actions = np.asarray(tokens)
    mask = prefix_mask(np.asarray(lengths), rl.max_decode_len)
    r = (taken(np_log_softmax(f_t), actions)
         - taken(np_log_softmax(f_s), actions)) * mask
    row, row_bias = [], []
    for k in ks:
      g = loop_chain_returns(r, mask, k, rl.gamma)
      row_bias.append(((g - loop_chain_returns(r, mask, 1, rl.gamma))
                       * mask).sum())
      adv = np.clip(g, -rl.reward_clip, rl.reward_clip) * mask
      grad = grad_fn(batch, tokens, jnp.asarray(mask),
                     jnp.asarray(adv, jnp.float32))
      row.append(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                 for x in jax.tree.leaves(grad)]))
    out.append(row)
    bias.append((row_bias, mask.sum()))
  return np.array(out), bias


def test_reverse_kl_kstep_diagnostics_match_an_independent_computation(tiny):
  config, student, teacher = tiny
  rl = rollouts.RLConfig(k=1, max_decode_len=7, unfinished="terminal",
                      temperature=1.0, reward="reverse_kl_kstep", gamma=0.9)
  rng = np.random.default_rng(9)
  batches = [{"input_ids": rng.integers(2, VOCAB, (6, SRC)).astype(np.int32),
              "attention_mask": np.ones((6, SRC), np.int32),
              "example_mask": np.ones((6,), np.int32)} for _ in range(3)]
  ks = (1, 3)
  got = diagnostics.gradient_diagnostics(
      student, teacher, batches,
      models=steps.StepModels(student=config, teacher=config), rl=rl,
      options=diagnostics.Options(ks=ks, minibatches=3, seed=4))
  ref, bias = _np_reverse_kl_gradients(config, student, teacher, batches, rl,
                                       ks, seed=4)
  for i, k in enumerate(ks):
    x = ref[:, i]
    np.testing.assert_allclose(
        got[k]["grad_var"], np.sum((x - x.mean(0)) ** 2) / 2, rtol=1e-3)
    np.testing.assert_allclose(got[k]["grad_mean_sq"],
                               x.mean(0) @ x.mean(0), rtol=1e-3)
    ref_bias = sum(b[i] for b, _ in bias) / sum(n for _, n in bias)
    np.testing.assert_allclose(got[k]["bias_mean"], ref_bias, atol=1e-4)
  assert got[1]["bias_mean"] == pytest.approx(0.0, abs=1e-5)
  assert abs(got[3]["bias_mean"]) > 1e-3
  assert got[1]["grad_var"] != pytest.approx(got[3]["grad_var"], rel=1e-3)


# --------------------------------------------------------------------------
# Config checks and the sweep
# --------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,names", [
    ("rl.reward", "rkl", ["rl.reward", "'rkl'", "reverse_kl"]),
    ("rl.gamma", 1.5, ["rl.gamma", "1.5", "[0, 1]"]),
    ("gkd.lmbda", -0.1, ["gkd.lmbda", "-0.1", "[0, 1]"]),
    ("gkd.beta", 2.0, ["gkd.beta", "2.0", "[0, 1]"]),
    ("rl.value", "hard", ["rl.value", "'hard'", "soft"]),
])
def test_bad_reverse_kl_and_gkd_options_are_one_error_before_writing(
    tmp_path, field, value, names):
  workdir = tmp_path / "run"
  cfg = smoke_config(**{field: value})
  with pytest.raises(ValueError) as e:
    pipeline.run(cfg, str(workdir))
  assert all(n in str(e.value) for n in names), str(e.value)
  assert not workdir.exists()


def test_reverse_kl_refuses_options_without_meaning_for_it():
  with pytest.raises(ValueError, match="needs rl.gamma > 0"):
    rollouts.RLConfig(reward="reverse_kl_kstep", gamma=0.0)
  with pytest.raises(ValueError, match="bootstrap"):
    rollouts.RLConfig(reward="reverse_kl", unfinished="bootstrap")
  with pytest.raises(ValueError, match="teacher_expected"):
    rollouts.RLConfig(reward="reverse_kl", baseline="teacher_expected")
  with pytest.raises(ValueError, match="'value' is a teacher state value"):
    rollouts.RLConfig(reward="reverse_kl_kstep", gamma=1.0, baseline="value")


def test_sweep_runs_soft_reverse_kl_and_gkd_with_the_same_start_and_budget():
  c = smoke_sweep.get_config()
  c.methods = ("llmr", "gkd", "soft", "reverse_kl", "reverse_kl_kstep")
  c.ks = (2,)
  c.reverse_kl_gammas = (0.0, 0.5)
  c.kstep_gamma = 0.9
  sweep.check_sweep_config(c)
  specs = [s for s in sweep.plan(c) if s.seed == c.seeds[0]]
  by_name = {s.name: sweep.run_config(c, s, "W") for s in specs}
  assert set(by_name) >= {"llmr", "gkd", "soft_k1", "soft_k2",
                          "reverse_kl_g0", "reverse_kl_g0.5",
                          "reverse_kl_k2_g0.9"}
  start = os.path.abspath(f"W/seed{c.seeds[0]}/predistill/models/predistill")
  for name in ("gkd", "soft_k1", "soft_k2", "reverse_kl_g0.5",
               "reverse_kl_k2_g0.9"):
    cfg = by_name[name]
    budget = cfg.predistill if name == "gkd" else cfg.rl
    assert cfg.student.init_from == start
    assert (budget.steps, budget.batch_size, budget.learning_rate) == (
        c.base.rl.steps, c.base.rl.batch_size, c.base.rl.learning_rate)
  assert by_name["gkd"].predistill.method == "gkd"
  assert by_name["gkd"].gkd.max_decode_len == c.base.rl.max_decode_len
  assert (by_name["soft_k2"].rl.value, by_name["soft_k2"].rl.k) == ("soft", 2)
  assert [(by_name[f"reverse_kl_g{g}"].rl.reward,
           by_name[f"reverse_kl_g{g}"].rl.gamma) for g in ("0", "0.5")] == [
               ("reverse_kl", 0.0), ("reverse_kl", 0.5)]
  kstep = by_name["reverse_kl_k2_g0.9"].rl
  assert (kstep.reward, kstep.k, kstep.gamma) == ("reverse_kl_kstep", 2, 0.9)
  for cfg in by_name.values():
    settings.check_config(cfg)
  c.kstep_gamma = 0.0
  with pytest.raises(ValueError, match="config.kstep_gamma must be > 0"):
    sweep.check_sweep_config(c)
  c.kstep_gamma, c.reverse_kl_gammas = 0.9, (0.0, -1.0)
  with pytest.raises(ValueError, match="config.reverse_kl_gammas"):
    sweep.check_sweep_config(c)
  sweep.check_sweep_config(objectives.get_config())


def test_diagnostics_command_line_refuses_an_unknown_reward(tmp_path, capsys):
  assert diagnostics.main(["--workdir", str(tmp_path),
                           "--rewards", "llmr,rkl"]) == 2
  err = capsys.readouterr().err
  assert "--rewards must hold values from" in err and "'llmr,rkl'" in err
  assert err.count("\n") == 1
