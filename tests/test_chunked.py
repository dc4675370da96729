"""Chunked vocabulary reductions (`logits_chunk` > 0) = the full-logits path.

Returns, losses and gradients, with masks that have empty rows and a length
T = 7 (or 5 in the steps) that the chunk size 3 (or 2) does not divide.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ketchup_jax import chunked
from ketchup_jax import divergences
from ketchup_jax import losses
from ketchup_jax import models
from ketchup_jax import returns
from ketchup_jax.models import t5
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps

B, T, E, V, CHUNK = 3, 7, 8, 37, 3
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
  # The backward pass accumulates the head's gradient VOCAB_BLOCK entries at
  # a time: 16 makes V = 37 two blocks and a rest, SV = 64 four blocks.
  monkeypatch.setattr(chunked, "VOCAB_BLOCK", 16)


def _head(seed=0, vocab_first=False):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
  kernel = chunked.Head(jnp.asarray(
      rng.normal(size=(V, E) if vocab_first else (E, V)), jnp.float32),
                        vocab_first=vocab_first)
  ids = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  lengths = np.array([T, 4, 0])  # a full row, a short one, an empty one
  mask = jnp.asarray(np.arange(T)[None] < lengths[:, None], jnp.int32)
  return hidden, kernel, ids, mask


@pytest.mark.parametrize("size", ["tiny", "t5-tiny"])  # untied; tied + scaled
def test_hidden_states_times_output_kernel_is_forward(size):
  model = models.init(size, jax.random.PRNGKey(0), dtype=jnp.float32,
                      num_layers=1, num_decoder_layers=1)
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.integers(2, 128, (2, 6)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, 128, (2, 5)), jnp.int32)
  ones = jnp.ones_like
  want = t5.forward(model.params, model.config, src, ones(src), dec, ones(dec))
  hidden = t5.hidden_states(model.params, model.config, src, ones(src), dec,
                            ones(dec))
  head = t5.output_head(model.params, model.config)
  assert head.vocab_first == model.config.tie_word_embeddings
  got = chunked.project(hidden, head)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_position_stats_chunked_equal_whole_and_numpy(center):
  hidden, kernel, actions, mask = _head()
  logits = chunked.project(hidden, kernel)  # [B, T, V]
  want = returns.position_stats(logits, actions, center=center)
  got = returns.position_stats_chunked(hidden, kernel, actions, center=center,
                                       chunk=CHUNK)
  assert set(got) == {"q_taken", "max", "expected", "soft"}
  for name in want:
    np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)
  # The new soft value and the teacher log-prob against NumPy.
  f = np.asarray(logits, np.float64)
  q = f - f.mean(-1, keepdims=True) if center else f
  lse = np.log(np.exp(q).sum(-1))
  np.testing.assert_allclose(got["soft"], lse, **TOL)
  taken = np.take_along_axis(q, np.asarray(actions)[..., None], -1)[..., 0]
  logp = np.take_along_axis(f - np.log(np.exp(f).sum(-1, keepdims=True)),
                            np.asarray(actions)[..., None], -1)[..., 0]
  np.testing.assert_allclose(got["q_taken"] - got["soft"], logp, **TOL)
  np.testing.assert_allclose(got["q_taken"], taken, **TOL)
  for value in returns.VALUES:
    q_want, v_want = returns.teacher_q_values(logits, actions, mask,
                                              center=center, value=value)
    q_got, v_got = returns.q_values_from_stats(got, mask, value=value)
    np.testing.assert_allclose(q_got, q_want, **TOL)
    np.testing.assert_allclose(v_got, v_want, **TOL)
    np.testing.assert_allclose(
        returns.k_step_returns(q_got, v_got, mask, 2),
        returns.k_step_returns(q_want, v_want, mask, 2), **TOL)
    assert not np.any(np.asarray(v_got)[2])  # the empty row is zero


def _value_and_grads(loss, *args):
  fn = jax.jit(jax.value_and_grad(lambda h, w: loss(h, w)[0], argnums=(0, 1)))
  return fn(*args)


def _assert_same(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("vocab_first", [False, True])
def test_cross_entropy_and_policy_gradient_chunked_equal_whole(vocab_first):
  hidden, kernel, ids, mask = _head(1, vocab_first)
  returns_ = jnp.asarray(np.random.default_rng(2).normal(size=(B, T)),
                         jnp.float32)

  def ce(chunk):
    def loss(h, w):
      if chunk:
        return losses.cross_entropy_loss_chunked(
            h, w, ids, mask, chunk=chunk, label_smoothing=0.1)
      return losses.cross_entropy_loss(chunked.project(h, w), ids, mask,
                                       label_smoothing=0.1)
    return loss

  def pg(chunk):
    def loss(h, w):
      if chunk:
        logp, entropy = losses.token_logprobs_chunked(h, w, ids, chunk=chunk)
        return losses.policy_gradient_loss_from_logprobs(
            logp, entropy, returns_, mask, baseline="batch_mean",
            weight="reference_compat", entropy_coef=0.3)
      return losses.policy_gradient_loss(
          chunked.project(h, w), ids, returns_, mask, baseline="batch_mean",
          weight="reference_compat", entropy_coef=0.3)
    return loss

  for make in (ce, pg):
    want = _value_and_grads(make(0), hidden, kernel)
    got = _value_and_grads(make(CHUNK), hidden, kernel)
    assert float(want[0]) != 0.0
    _assert_same(got, want)


@pytest.mark.parametrize("divergence", divergences.DIVERGENCES)
def test_distillation_chunked_equals_whole(divergence):
  s_hidden, s_kernel, _, mask = _head(3)
  t_hidden, t_kernel, _, _ = _head(4)

  def loss(chunk):
    def fn(h, w):
      if chunk:
        return divergences.distillation_loss_chunked(
            h, w, t_hidden, t_kernel, mask, chunk=chunk,
            divergence=divergence)
      return divergences.distillation_loss(
          chunked.project(h, w), chunked.project(t_hidden, t_kernel), mask,
          divergence=divergence)
    return fn

  want = _value_and_grads(loss(0), s_hidden, s_kernel)
  got = _value_and_grads(loss(CHUNK), s_hidden, s_kernel)
  assert float(want[0]) != 0.0
  _assert_same(got, want)


@pytest.mark.parametrize("chunk", [-1, 1.5, True])
def test_bad_chunk_is_one_clear_error(chunk):
  with pytest.raises(ValueError, match="logits_chunk must be an int >= 0"):
    steps.StepModels(student=models.get_config("tiny"), logits_chunk=chunk)


# One tiny RL step and word-KD step, chunked and not: same metrics and the same
# updated parameters. T = 5, chunk 2; the last row is padding (an empty mask
# row). (The cross-entropy steps share the chunked CE tested above.)
SB, SS, ST, SV = 4, 6, 5, 64


def _step_models():
  kw = dict(dtype=jnp.float32, num_layers=1, num_decoder_layers=1,
            vocab_size=SV)
  return (models.init("tiny", jax.random.PRNGKey(1), **kw),
          models.init("t5-tiny", jax.random.PRNGKey(0), **kw))


def _step_batch():
  rng = np.random.default_rng(0)
  targets = rng.integers(2, SV, (SB, ST)).astype(np.int32)
  dmask = (np.arange(ST)[None] < np.array([5, 3, 4, 0])[:, None])
  return {"input_ids": rng.integers(2, SV, (SB, SS)).astype(np.int32),
          "attention_mask": np.ones((SB, SS), np.int32),
          "example_mask": np.array([1, 1, 1, 0], np.int32),
          "decoder_target_ids": targets,
          "decoder_attention_mask": dmask.astype(np.int32)}


@pytest.mark.parametrize("stage", ["rl", "word_kd"])
def test_steps_chunked_equal_whole(stage):
  student, teacher = _step_models()
  if stage == "word_kd":
    # The tied, rescaled head learns: its gradient reaches the embedding twice.
    student, teacher = teacher, student
  batch = _step_batch()
  optim = state_lib.OptimConfig(steps=2, learning_rate=1e-3)
  tx = state_lib.make_optimizer(optim)
  rl = rollouts.RLConfig(k=2, max_decode_len=ST, unfinished="bootstrap",
                      baseline="teacher_expected", entropy_coef=0.1)

  def run(chunk):
    mods = steps.StepModels(student=student.config, teacher=teacher.config,
                        logits_chunk=chunk)
    state = state_lib.init_state(student.params, tx, 0)
    if stage == "rl":
      fn = functools.partial(rollouts.rl_step, models=mods, optim=optim, rl=rl)
    else:
      fn = functools.partial(steps.word_kd_step, models=mods, optim=optim,
                             divergence="js")
    return jax.jit(fn)(state, teacher.params, batch)

  want_state, want = run(0)
  got_state, got = run(2)
  assert float(want["loss"]) != 0.0
  for key in want:
    np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)
  _assert_same(got_state.params, want_state.params)
