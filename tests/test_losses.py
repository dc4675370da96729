"""losses and divergences vs NumPy references (SPEC §3) and hand gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ketchup_jax import divergences as D
from ketchup_jax import losses as L

B, T, V = 5, 7, 11
LENGTHS = [0, 1, 3, 7, 5]


def prefix_mask(lengths, t_size):
  return (np.arange(t_size)[None, :] < np.asarray(lengths)[:, None]).astype(
      np.int32)


def case(seed):
  rng = np.random.default_rng(seed)
  return {
      "student_logits": rng.normal(size=(B, T, V)).astype(np.float32),
      "teacher_logits": rng.normal(scale=2.0, size=(B, T, V)).astype(
          np.float32),
      "actions": rng.integers(0, V, size=(B, T)).astype(np.int32),
      "returns": rng.normal(scale=30.0, size=(B, T)).astype(np.float32),
      "teacher_values": rng.normal(size=(B, T)).astype(np.float32),
      "behavior_logprobs": np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(
          np.float32),
      "mask": prefix_mask(LENGTHS, T),
  }


def log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_pg(c, *, baseline="none", weight="none", denom=1.0, reward_clip=50.0,
           entropy_coef=0.0):
  """Loop over tokens: returns (loss_sum, count, advantages)."""
  logp_all = log_softmax(c["student_logits"])
  mask = c["mask"]
  real = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
  batch_mean = np.mean([c["returns"][b, t] for b, t in real])
  adv = np.zeros((B, T))
  loss_sum = 0.0
  for b, t in real:
    a = c["actions"][b, t]
    base = {"none": 0.0, "batch_mean": batch_mean,
            "teacher_expected": c["teacher_values"][b, t]}[baseline]
    w = {"none": 1.0,
         "importance": np.exp(logp_all[b, t, a] - c["behavior_logprobs"][b, t]),
         "reference_compat": np.exp(logp_all[b, t, a])}[weight]
    x = w * (c["returns"][b, t] - base) / denom
    if reward_clip is not None:
      x = min(max(x, -reward_clip), reward_clip)
    adv[b, t] = x
    p = np.exp(logp_all[b, t])
    entropy = -(p * logp_all[b, t]).sum()
    loss_sum += -x * logp_all[b, t, a] - entropy_coef * entropy
  return loss_sum, len(real), adv


def pg_kwargs(c, **options):
  return dict(teacher_values=c["teacher_values"],
              behavior_logprobs=c["behavior_logprobs"], **options)


OPTIONS = [
    {},
    {"baseline": "batch_mean"},
    {"baseline": "teacher_expected", "denom": 4.0},
    {"weight": "importance", "reward_clip": 10.0},
    {"weight": "reference_compat", "reward_clip": None},
    {"baseline": "teacher_expected", "weight": "importance",
     "entropy_coef": 0.3, "reward_clip": 5.0, "denom": 2.0},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_policy_gradient_loss_matches_reference(options):
  c = case(0)
  loss_sum, count = L.policy_gradient_loss(
      c["student_logits"], c["actions"], c["returns"], c["mask"],
      **pg_kwargs(c, **options))
  want_sum, want_count, want_adv = ref_pg(c, **options)
  assert float(count) == want_count == sum(LENGTHS)
  np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5, atol=1e-4)
  logprobs = np.take_along_axis(log_softmax(c["student_logits"]),
                                c["actions"][..., None], -1)[..., 0]
  adv = L.pg_advantages(c["returns"], c["mask"],
                        logprobs=logprobs.astype(np.float32),
                        **pg_kwargs(c, **{k: v for k, v in options.items()
                                          if k != "entropy_coef"}))
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-4)


def test_reward_clip_bounds_advantages():
  c = case(1)
  adv = np.asarray(L.pg_advantages(c["returns"], c["mask"], reward_clip=7.0))
  assert np.abs(adv).max() == pytest.approx(7.0)
  assert np.all(adv[c["mask"] == 0] == 0.0)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_policy_gradient_matches_hand_derived_gradient(options):
  # d/dz [-A log softmax(z)_a - beta H(softmax z)] with A held fixed:
  #   -A (onehot(a) - p) + beta p (log p + H).
  c = case(2)
  mask = c["mask"]

  def loss(z):
    s, _ = L.policy_gradient_loss(z, c["actions"], c["returns"], mask,
                                  **pg_kwargs(c, **options))
    return s

  got = np.asarray(jax.grad(loss)(jnp.asarray(c["student_logits"])))
  _, _, adv = ref_pg(c, **options)
  beta = options.get("entropy_coef", 0.0)
  logp = log_softmax(c["student_logits"])
  p = np.exp(logp)
  entropy = -(p * logp).sum(-1, keepdims=True)
  onehot = np.eye(V)[c["actions"]]
  want = -adv[..., None] * (onehot - p) + beta * p * (logp + entropy)
  want *= mask[..., None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_policy_gradient_matches_finite_differences():
  c = case(3)
  options = {"baseline": "teacher_expected", "entropy_coef": 0.5}

  def loss(z):
    s, n = L.policy_gradient_loss(z, c["actions"], c["returns"], c["mask"],
                                  **pg_kwargs(c, **options))
    return s / n

  z0 = jnp.asarray(c["student_logits"])
  grad = np.asarray(jax.grad(loss)(z0))
  rng = np.random.default_rng(0)
  eps = 1e-2
  for _ in range(5):
    direction = rng.normal(size=z0.shape).astype(np.float32)
    fd = (float(loss(z0 + eps * direction)) -
          float(loss(z0 - eps * direction))) / (2 * eps)
    assert fd == pytest.approx(float((grad * direction).sum()), rel=2e-3)


def test_sum_and_count_reduce_exactly_over_microbatches():
  c = case(4)
  whole = L.policy_gradient_loss(c["student_logits"], c["actions"],
                                 c["returns"], c["mask"], entropy_coef=0.1)
  parts = [L.policy_gradient_loss(c["student_logits"][sl], c["actions"][sl],
                                  c["returns"][sl], c["mask"][sl],
                                  entropy_coef=0.1)
           for sl in (slice(0, 2), slice(2, B))]
  np.testing.assert_allclose(sum(p[0] for p in parts), whole[0], rtol=1e-6)
  assert sum(float(p[1]) for p in parts) == float(whole[1])


def test_pg_loss_accepts_bf16_logits():
  c = case(5)
  bf16 = jnp.asarray(c["student_logits"], jnp.bfloat16)
  loss_sum, _ = L.policy_gradient_loss(bf16, c["actions"], c["returns"],
                                       c["mask"])
  c32 = dict(c, student_logits=np.asarray(bf16.astype(jnp.float32)))
  np.testing.assert_allclose(float(loss_sum), ref_pg(c32)[0], rtol=1e-5)


# --------------------------------------------------------------------------
# Cross-entropy and word-level distillation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(smoothing):
  c = case(6)
  logp = log_softmax(c["student_logits"])
  want = 0.0
  for b in range(B):
    for t in range(T):
      if c["mask"][b, t]:
        target = (1 - smoothing) * np.eye(V)[c["actions"][b, t]] + smoothing / V
        want += -(target * logp[b, t]).sum()
  got, count = L.cross_entropy_loss(c["student_logits"], c["actions"],
                                    c["mask"], label_smoothing=smoothing)
  assert float(count) == sum(LENGTHS)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def ref_divergence(student, teacher, mask, kind, tau):
  total = 0.0
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      q = np.exp(log_softmax(student[b, t] / tau))
      p = np.exp(log_softmax(teacher[b, t] / tau))
      kl = lambda x, y: float((x * np.log(x / y)).sum())
      total += {"kl": lambda: kl(p, q), "rkl": lambda: kl(q, p),
                "js": lambda: 0.5 * kl(p, (p + q) / 2) + 0.5 * kl(q, (p + q) / 2),
                "tvd": lambda: 0.5 * float(np.abs(p - q).sum())}[kind]()
  return total


@pytest.mark.parametrize("kind", D.DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_distillation_loss_matches_reference(kind, tau):
  c = case(7)
  got, count = D.distillation_loss(c["student_logits"], c["teacher_logits"],
                                   c["mask"], divergence=kind, temperature=tau)
  want = ref_divergence(c["student_logits"], c["teacher_logits"], c["mask"],
                        kind, tau)
  assert float(count) == sum(LENGTHS)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_divergence_zero_on_equal_and_no_teacher_gradient(kind):
  c = case(8)
  same, _ = D.distillation_loss(c["teacher_logits"], c["teacher_logits"],
                                c["mask"], divergence=kind)
  assert abs(float(same)) < 1e-5
  teacher_grad = jax.grad(
      lambda t: D.distillation_loss(c["student_logits"], t, c["mask"],
                                    divergence=kind)[0])(
                                        jnp.asarray(c["teacher_logits"]))
  assert float(jnp.abs(teacher_grad).max()) == 0.0


def test_forward_kl_gradient_is_q_minus_p():
  c = case(9)
  grad = jax.grad(lambda z: D.distillation_loss(
      z, c["teacher_logits"], c["mask"], divergence="kl")[0])(
          jnp.asarray(c["student_logits"]))
  p = np.exp(log_softmax(c["teacher_logits"]))
  q = np.exp(log_softmax(c["student_logits"]))
  np.testing.assert_allclose(grad, (q - p) * c["mask"][..., None], atol=1e-6)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_bad_options_raise_naming_the_value():
  c = case(10)
  args = (c["student_logits"], c["actions"], c["returns"], c["mask"])
  with pytest.raises(ValueError, match=r"baseline must be one of .*'mean'"):
    L.policy_gradient_loss(*args, baseline="mean")
  with pytest.raises(ValueError, match=r"weight must be one of .*'ppo'"):
    L.policy_gradient_loss(*args, weight="ppo")
  with pytest.raises(ValueError, match=r"teacher_values is required for baseline=\"teacher_expected\""):
    L.policy_gradient_loss(*args, baseline="teacher_expected")
  with pytest.raises(ValueError, match=r"behavior_logprobs is required"):
    L.policy_gradient_loss(*args, weight="importance")
  with pytest.raises(ValueError, match=r"denom must be > 0, got 0"):
    L.policy_gradient_loss(*args, denom=0)
  with pytest.raises(ValueError, match=r"reward_clip must be > 0 or None, got -1"):
    L.policy_gradient_loss(*args, reward_clip=-1)
  with pytest.raises(ValueError, match=r"entropy_coef must be >= 0, got -0.1"):
    L.policy_gradient_loss(*args, entropy_coef=-0.1)
  with pytest.raises(ValueError, match=r"student_logits must be a floating"):
    L.policy_gradient_loss(c["actions"][..., None], *args[1:])
  with pytest.raises(ValueError, match=r"shapes must match.*returns \(5, 6\)"):
    L.policy_gradient_loss(*args[:2], c["returns"][:, :6], c["mask"])
  bad_mask = c["mask"].copy()
  bad_mask[0, 3] = 1
  with pytest.raises(ValueError, match=r"mask must be a prefix mask"):
    L.policy_gradient_loss(*args[:3], bad_mask)


def test_vocabulary_mismatch_names_both_sizes():
  c = case(11)
  with pytest.raises(ValueError, match=r"teacher_logits has 12 entries, student_logits 11"):
    D.distillation_loss(c["student_logits"],
                        np.zeros((B, T, 12), np.float32), c["mask"])
  with pytest.raises(ValueError, match=r"divergence must be one of .*'l2'"):
    D.distillation_loss(c["student_logits"], c["teacher_logits"], c["mask"],
                        divergence="l2")
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
    L.cross_entropy_loss(c["student_logits"], c["actions"], c["mask"],
                         label_smoothing=1.0)
