"""The KV-cache sampler vs transformers' greedy generate and recomputation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from ketchup_jax import models
from ketchup_jax.models import api
from ketchup_jax.models import sampling
from ketchup_jax.models import t5
from test_models_t5 import make_hf_model

BATCH, SRC, NEW = 8, 11, 12


def _inputs(seed: int, vocab: int):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, (BATCH, SRC))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[5, 3:] = 0
  return ids, mask


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """(torch model, our model) for T5 v1.0 (tied) and v1.1 (untied)."""
  out = {}
  for tied in (True, False):
    d = str(tmp_path_factory.mktemp(f"t5_{tied}"))
    ref = make_hf_model(d, tied=tied, vocab_size=131, seed=0)
    out[tied] = (ref, models.load(d, dtype=jnp.float32))
  return out


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_generate_equals_transformers(hf_pair, tied):
  ref, lm = hf_pair[tied]
  ids, mask = _inputs(0, 131)
  got = np.asarray(lm.generate(ids, mask, max_new_tokens=NEW))
  with torch.no_grad():
    want = ref.generate(input_ids=torch.tensor(ids),
                        attention_mask=torch.tensor(mask), do_sample=False,
                        num_beams=1, max_new_tokens=NEW).numpy()
  assert want[:, 0].tolist() == [0] * BATCH  # Decoder start token.
  want = want[:, 1:]
  n = want.shape[1]
  np.testing.assert_array_equal(got[:, :n], want)
  assert (got[:, n:] == 0).all()
  assert len(np.unique(got)) > 5  # Not a degenerate constant output.
  if not tied:  # This seed ends one row with EOS; the rest is padding.
    row = int(np.nonzero((got == 1).any(axis=1))[0][0])
    first = int(np.argmax(got[row] == 1))
    assert (got[row, first + 1:] == 0).all()


def test_cached_decode_step_equals_teacher_forced_recompute(hf_pair):
  _, lm = hf_pair[False]
  ids, mask = _inputs(1, 131)
  tgt = np.random.default_rng(2).integers(2, 131, (BATCH, NEW))
  dec = np.concatenate([np.zeros((BATCH, 1), int), tgt[:, :-1]], axis=1)
  full = np.asarray(lm.logits(ids, mask, dec))  # [batch, NEW, vocab]
  params, config = lm.params, lm.config
  encoded = jax.jit(t5.encode, static_argnums=1)(params, config, ids, mask)
  cache = jax.jit(t5.init_decode_cache, static_argnums=1,
                  static_argnames="max_len")(params, config, encoded,
                                             jnp.asarray(mask), max_len=NEW)
  step = jax.jit(t5.decode_step, static_argnums=1)
  for pos in range(NEW):
    logits, cache = step(params, config, jnp.asarray(dec[:, pos]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, pos], atol=2e-5,
                               rtol=0, err_msg=f"position {pos}")
  assert int(cache.index) == NEW


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.7, 5)])
def test_sampler_tokens_and_logprobs_match_recompute(hf_pair, temperature,
                                                     top_k):
  _, lm = hf_pair[False]
  ids, mask = _inputs(0, 131)
  out = lm.sample(ids, mask, max_new_tokens=NEW, temperature=temperature,
                  top_k=top_k, rng=jax.random.key(7))
  tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
  lengths, done = np.asarray(out.lengths), np.asarray(out.done)
  dec = np.concatenate([np.zeros((BATCH, 1), int), tokens[:, :-1]], axis=1)
  logits = np.asarray(lm.logits(ids, mask, dec)).astype(np.float64)
  valid = np.arange(NEW)[None, :] < lengths[:, None]
  if temperature == 0:
    ref_dist = _log_softmax(logits)
    assert done.any()  # These inputs end one greedy row with EOS.
    np.testing.assert_array_equal(np.where(valid, tokens, 0),
                                  np.where(valid, logits.argmax(-1), 0))
  else:
    scaled = logits / temperature
    if top_k:
      kth = np.sort(scaled, axis=-1)[..., -top_k][..., None]
      scaled = np.where(scaled >= kth, scaled, -np.inf)
    ref_dist = _log_softmax(scaled)
  ref = np.take_along_axis(ref_dist, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(logprobs[valid], ref[valid], atol=1e-4)
  assert np.isfinite(logprobs).all()
  assert (logprobs[~valid] == 0).all() and (tokens[~valid] == 0).all()
  # Lengths / done agree with the first EOS of each row.
  for row in range(BATCH):
    eos = np.nonzero(tokens[row] == 1)[0]
    assert done[row] == (len(eos) > 0)
    assert lengths[row] == (eos[0] + 1 if len(eos) else NEW)


def test_eos_stops_rows_independently(hf_pair):
  _, lm = hf_pair[False]
  ids, mask = _inputs(6, 131)
  out = lm.sample(ids, mask, max_new_tokens=NEW, temperature=1.0, top_k=3,
                  rng=jax.random.key(2))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  done = np.asarray(out.done)
  assert 0 < done.sum() < BATCH  # Some rows stopped at EOS, some did not.
  for row in range(BATCH):
    n = lengths[row]
    assert (tokens[row, n:] == 0).all()
    assert (tokens[row, :n - 1] != 1).all()
    assert (tokens[row, n - 1] == 1) == done[row]
    assert done[row] or n == NEW


def test_top_k_one_and_tiny_top_p_are_greedy(hf_pair):
  _, lm = hf_pair[False]
  ids, mask = _inputs(4, 131)
  greedy = np.asarray(lm.generate(ids, mask, max_new_tokens=NEW))
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    got = lm.generate(ids, mask, max_new_tokens=NEW, temperature=1.0,
                      rng=jax.random.key(5), **kw)
    np.testing.assert_array_equal(np.asarray(got), greedy)


def test_no_recompilation_across_sampling_settings(hf_pair):
  _, lm = hf_pair[False]
  ids, mask = _inputs(5, 131)
  lm.generate(ids, mask, max_new_tokens=NEW)
  before = api._sample_jit._cache_size()  # pylint: disable=protected-access
  for i, (temp, k, p) in enumerate([(0.0, 0, 1.0), (1.0, 3, 1.0),
                                    (0.5, 0, 0.9), (2.0, 7, 0.5)]):
    lm.generate(ids + i % 2, mask, max_new_tokens=NEW, temperature=temp,
                top_k=k, top_p=p, rng=jax.random.key(i))
  after = api._sample_jit._cache_size()  # pylint: disable=protected-access
  assert after == before


def test_filter_logits_numbers():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05],
                              [0.05, 0.15, 0.3, 0.5]]))
  inf = -np.inf
  top2 = np.asarray(sampling.filter_logits(logits, jnp.int32(2),
                                           jnp.float32(1.0)))
  np.testing.assert_array_equal(np.isinf(top2), [[0, 0, 1, 1], [1, 1, 0, 0]])
  nucleus = np.asarray(sampling.filter_logits(logits, jnp.int32(0),
                                              jnp.float32(0.7)))
  np.testing.assert_array_equal(nucleus == inf, [[0, 0, 1, 1], [1, 1, 0, 0]])
  nucleus = np.asarray(sampling.filter_logits(logits, jnp.int32(0),
                                              jnp.float32(0.85)))
  np.testing.assert_array_equal(nucleus == inf, [[0, 0, 0, 1], [1, 0, 0, 0]])
  np.testing.assert_allclose(nucleus[0, :3], np.log([0.5, 0.3, 0.15]),
                             rtol=1e-6)


def test_inverse_cdf_categorical_frequencies():
  # 300 entries: three blocks of 128, the last one partial; zero-probability
  # entries (filtered tokens) in every block must never be drawn.
  probs = np.zeros(300)
  probs[[0, 5, 127, 128, 200, 299]] = [0.3, 0.1, 0.05, 0.25, 0.2, 0.1]
  logp = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  n = 40000
  keys = jax.random.split(jax.random.key(3), n)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: sampling.categorical(k, logp)))(keys))[:, 0]
  freq = np.bincount(draws, minlength=300) / n
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
  # 5 standard errors of a binomial proportion.
  np.testing.assert_allclose(freq, probs,
                             atol=5 * np.sqrt(0.25 / n))


def test_forward_grad_inside_user_jit_and_option_errors(hf_pair):
  _, lm = hf_pair[False]
  ids, mask = map(jnp.asarray, _inputs(7, 131))
  dec = jnp.asarray(np.random.default_rng(0).integers(2, 131, (BATCH, NEW)))

  @jax.jit
  def loss_and_grad(params):
    def loss(p):
      logits = t5.forward(p, lm.config, ids, mask, dec)
      return jax.nn.logsumexp(logits, axis=-1).mean()
    return jax.value_and_grad(loss)(params)

  value, grads = loss_and_grad(lm.params)
  assert np.isfinite(float(value))
  assert jax.tree.structure(grads) == jax.tree.structure(lm.params)
  norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and min(norms) > 0
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
    lm.generate(ids, mask, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
    lm.generate(ids, mask, max_new_tokens=2, top_p=1.5)


def test_bf16_sampler_runs_and_agrees_with_f32_greedy(hf_pair):
  _, lm = hf_pair[False]
  ids, mask = _inputs(0, 131)
  lm16 = models.T5LM(config=lm.config.replace(dtype=jnp.bfloat16),
                     params=lm.params)
  got = lm16.sample(ids, mask, max_new_tokens=NEW)
  want = np.asarray(lm.generate(ids, mask, max_new_tokens=NEW))
  assert got.tokens.dtype == jnp.int32 and got.logprobs.dtype == jnp.float32
  assert np.isfinite(np.asarray(got.logprobs)).all()
  tokens = np.asarray(got.tokens)
  np.testing.assert_array_equal(tokens[:, 0], want[:, 0])
  # bfloat16 drifts from float32 after the first differing token of a random
  # model: agreement was 0.74 in one CI run, above 0.75 in the earlier ones.
  assert np.mean(tokens == want) > 0.6
