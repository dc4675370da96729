"""T5 / FLAN-T5 encoder-decoder in Flax linen, and pure functions over params.

The modules only declare parameters (with logical axis names) and compute; the
pure functions at the bottom (`forward`, `encode`, `init_decode_cache`,
`decode_step`, `init_params`, `logical_axes`) take the parameters as a plain
nested-dict pytree so that a training step can differentiate, shard
(`in_shardings`) and donate them inside its own `jax.jit`.

Parameter tree (`params`, one entry per HF tensor; kernels are `[in, out]`,
attention kernels keep heads as their own axis):

    shared/embedding                              [vocab, embed]
    encoder/relpos_bias/embedding                 [relpos_buckets, heads]
    encoder/layers_{i}/self_attention_norm/scale  [embed]
    encoder/layers_{i}/self_attention/{q,k,v}     [embed, heads, kv]
    encoder/layers_{i}/self_attention/o           [heads, kv, embed]
    encoder/layers_{i}/mlp_norm/scale             [embed]
    encoder/layers_{i}/mlp/{wi | wi_0, wi_1}      [embed, mlp]
    encoder/layers_{i}/mlp/wo                     [mlp, embed]
    encoder/final_norm/scale                      [embed]
    decoder/...                                   as encoder, plus per layer
    decoder/layers_{i}/cross_attention_norm/scale and cross_attention/{q,k,v,o}
    lm_head/kernel                                [embed, vocab]  (untied only)

Decoder inputs follow HF: `decoder_input_ids` are the targets shifted right by
one with `decoder_start_token_id` (= pad = 0 for T5) in front, so the logits at
position t predict target token t:

    targets            = [y0, y1, y2, EOS]
    decoder_input_ids  = [0,  y0, y1, y2 ]
    decoder_attention_mask marks the real positions (1) and padding (0).

Precision: parameters are stored in `config.param_dtype` (float32 master
weights) and cast to `config.dtype` (bf16 on TPU) at use; RMS norm statistics,
attention softmax and output logits are float32.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from ketchup_jax import chunked
from ketchup_jax import partitioning
from ketchup_jax.models import layers
from ketchup_jax.models import relpos
from ketchup_jax.models.config import REMAT_POLICIES  # pylint: disable=unused-import
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.relpos import relative_position_bucket  # pylint: disable=unused-import

Params = Any  # Nested dict of arrays (the linen 'params' collection).
LogicalRules = partitioning.LogicalRules

_BATCH, _LENGTH, _HEADS, _KV = (layers.BATCH, layers.LENGTH, layers.HEADS,
                                 layers.KV)
_EMBED, _NEG_INF = layers.EMBED, layers.NEG_INF


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------


class Attention(layers.Base):
  """Multi-head attention without 1/sqrt(d) scaling (folded into T5's init)."""

  def setup(self):
    cfg = self.config
    h, d, e = cfg.num_heads, cfg.d_kv, cfg.d_model
    in_axes, out_axes = ("embed", "heads", "kv"), ("heads", "kv", "embed")
    self.q = self._param("q", (e, h, d), in_axes)
    self.k = self._param("k", (e, h, d), in_axes)
    self.v = self._param("v", (e, h, d), in_axes)
    self.o = self._param("o", (h, d, e), out_axes)

  def _project(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    y = jnp.einsum("ble,ehd->blhd", x, kernel.astype(self.config.dtype))
    return self._constrain(y, (_BATCH, _LENGTH, _HEADS, _KV))

  def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values, each `[batch, length, heads, kv]`."""
    return self._project(x, self.k), self._project(x, self.v)

  def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array,
               bias: jax.Array, heads_first: bool = False) -> jax.Array:
    """Attends from `x` to precomputed keys / values.

    Args:
      x: Queries' inputs `[batch, q_len, embed]`.
      key: `[batch, k_len, heads, kv]` (`[batch, heads, k_len, kv]` if
        `heads_first`).
      value: Same layout as `key`.
      bias: float32 additive bias (relative positions + mask), broadcastable
        to `[batch, heads, q_len, k_len]`.
      heads_first: Keys / values are `[batch, heads, k_len, kv]`, the layout
        of the decoding caches: the batched matmuls then read them in place
        instead of transposing the whole cache at every decoding step.

    Returns:
      `[batch, q_len, embed]` in the compute dtype.
    """
    dtype = self.config.dtype
    q = self._project(x, self.q)  # [batch, q_len, heads, kv]
    if heads_first:
      scores = jnp.einsum("bqhd,bhkd->bhqk", q, key.astype(dtype),
                          preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
      out = jnp.einsum("bhqk,bhkd->bhqd", probs, value.astype(dtype))
      y = jnp.einsum("bhqd,hde->bqe", out, self.o.astype(dtype))
      return self._constrain(y, (_BATCH, _LENGTH, _EMBED))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, key.astype(dtype),
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, value.astype(dtype))
    out = self._constrain(out, (_BATCH, _LENGTH, _HEADS, _KV))
    y = jnp.einsum("bqhd,hde->bqe", out, self.o.astype(dtype))
    return self._constrain(y, (_BATCH, _LENGTH, _EMBED))


class EncoderLayer(layers.Base):
  """Pre-norm self-attention + feed-forward, residual around each."""

  def setup(self):
    kw = dict(config=self.config, mesh=self.mesh, rules=self.rules)
    self.self_attention_norm = layers.RMSNorm(**kw)
    self.self_attention = Attention(**kw)
    self.mlp_norm = layers.RMSNorm(**kw)
    self.mlp = layers.MLP(**kw)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    h = self.self_attention_norm(x)
    k, v = self.self_attention.key_value(h)
    x = x + self.self_attention(h, k, v, bias)
    return x + self.mlp(self.mlp_norm(x))


class DecoderLayer(layers.Base):
  """Causal self-attention, cross-attention and feed-forward (pre-norm)."""

  def setup(self):
    kw = dict(config=self.config, mesh=self.mesh, rules=self.rules)
    self.self_attention_norm = layers.RMSNorm(**kw)
    self.self_attention = Attention(**kw)
    self.cross_attention_norm = layers.RMSNorm(**kw)
    self.cross_attention = Attention(**kw)
    self.mlp_norm = layers.RMSNorm(**kw)
    self.mlp = layers.MLP(**kw)

  def cross_key_value(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys / values of the encoder output, computed once."""
    return self.cross_attention.key_value(encoded)

  def __call__(
      self,
      x: jax.Array,
      self_bias: jax.Array,
      cross_kv: tuple[jax.Array, jax.Array],
      cross_bias: jax.Array,
      cache: tuple[jax.Array, jax.Array] | None = None,
      index: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder layer.

    Args:
      x: `[batch, length, embed]` (length 1 when decoding with a cache).
      self_bias: float32 bias `[batch|1, heads|1, length, k_len]`.
      cross_kv: Encoder keys and values, each `[batch, src_len, heads, kv]`
        (`[batch, heads, src_len, kv]` when decoding with a cache).
      cross_bias: float32 bias `[batch, 1, 1, src_len]`.
      cache: Self-attention keys / values `[batch, heads, max_len, kv]`; the
        new ones are written at `index`.
      index: Scalar int32 position of `x` in the cache.

    Returns:
      The output `[batch, length, embed]` and the updated cache (or None).
    """
    h = self.self_attention_norm(x)
    k, v = self.self_attention.key_value(h)  # [batch, length, heads, kv]
    heads_first = cache is not None
    if heads_first:
      start = (0, 0, index, 0)
      k = jax.lax.dynamic_update_slice(
          cache[0], jnp.swapaxes(k, 1, 2).astype(cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(
          cache[1], jnp.swapaxes(v, 1, 2).astype(cache[1].dtype), start)
      cache = (k, v)
    x = x + self.self_attention(h, k, v, self_bias, heads_first)
    h = self.cross_attention_norm(x)
    x = x + self.cross_attention(h, cross_kv[0], cross_kv[1], cross_bias,
                                 heads_first)
    x = x + self.mlp(self.mlp_norm(x))
    return x, cache


class Encoder(layers.Base):
  """T5 encoder stack (token embeddings are passed in)."""

  def setup(self):
    kw = dict(config=self.config, mesh=self.mesh, rules=self.rules)
    self.relpos_bias = relpos.RelativePositionBias(bidirectional=True, **kw)
    layer = layers.remat(EncoderLayer, self.config.remat)
    self.layers = [layer(**kw) for _ in range(self.config.num_layers)]
    self.final_norm = layers.RMSNorm(**kw)

  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    length = x.shape[1]
    bias = self.relpos_bias(length, length) + layers.mask_bias(attention_mask)
    for layer in self.layers:
      x = layer(x, bias)
    return self.final_norm(x)  # [batch, src_len, embed]


class Decoder(layers.Base):
  """T5 decoder stack; teacher-forced `__call__` and cached `step`."""

  def setup(self):
    kw = dict(config=self.config, mesh=self.mesh, rules=self.rules)
    self.relpos_bias = relpos.RelativePositionBias(bidirectional=False, **kw)
    layer = layers.remat(DecoderLayer, self.config.remat)
    self.layers = [
        layer(**kw) for _ in range(self.config.num_decoder_layers)
    ]
    self.final_norm = layers.RMSNorm(**kw)

  def cross_key_value(self, encoded: jax.Array) -> tuple[Any, ...]:
    return tuple(layer.cross_key_value(encoded) for layer in self.layers)

  def __call__(self, x: jax.Array, mask: jax.Array, cross_kv: tuple[Any, ...],
               cross_bias: jax.Array) -> jax.Array:
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), dtype=bool))
    allowed = jnp.logical_and(causal[None, None], mask[:, None, None, :] > 0)
    bias = self.relpos_bias(length, length) + jnp.where(allowed, 0.0, _NEG_INF)
    for layer, kv in zip(self.layers, cross_kv):
      x, _ = layer(x, bias, kv, cross_bias)
    return self.final_norm(x)

  def step(self, x: jax.Array, index: jax.Array, cache: tuple[Any, ...],
           cross_kv: tuple[Any, ...], cross_bias: jax.Array
           ) -> tuple[jax.Array, tuple[Any, ...]]:
    max_len = cache[0][0].shape[2]
    allowed = jnp.arange(max_len) <= index  # Keys written so far.
    bias = (self.relpos_bias.at(index, max_len) +
            jnp.where(allowed, 0.0, _NEG_INF)[None, None, None, :])
    new_cache = []
    for layer, kv, c in zip(self.layers, cross_kv, cache):
      x, c = layer(x, bias, kv, cross_bias, cache=c, index=index)
      new_cache.append(c)
    return self.final_norm(x), tuple(new_cache)


class T5(layers.Base):
  """T5 encoder-decoder with an LM head (tied or untied)."""

  def setup(self):
    kw = dict(config=self.config, mesh=self.mesh, rules=self.rules)
    self.shared = layers.Embed(**kw)
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw)
    if not self.config.tie_word_embeddings:
      self.lm_head = layers.LMHead(**kw)

  def _scale(self, x: jax.Array) -> jax.Array:
    """The decoder output as the LM head reads it (T5 v1.0: d_model**-0.5)."""
    cfg = self.config
    if cfg.scale_decoder_outputs:
      x = x * (cfg.d_model ** -0.5)
    return x

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self._scale(x)
    if self.config.tie_word_embeddings:
      return self.shared.attend(x)
    return self.lm_head(x)

  def encode(self, input_ids: jax.Array,
             attention_mask: jax.Array) -> jax.Array:
    return self.encoder(self.shared(input_ids), attention_mask)

  def cross_key_value(self, encoded: jax.Array) -> tuple[Any, ...]:
    return self.decoder.cross_key_value(encoded)

  def decode(self, decoder_input_ids: jax.Array,
             decoder_attention_mask: jax.Array, encoded: jax.Array,
             attention_mask: jax.Array) -> jax.Array:
    """The final norm's output `[batch, tgt_len, embed]`."""
    x = self.shared(decoder_input_ids)
    cross_kv = self.decoder.cross_key_value(encoded)
    return self.decoder(x, decoder_attention_mask, cross_kv,
                        layers.mask_bias(attention_mask))

  def hidden(self, input_ids: jax.Array, attention_mask: jax.Array,
             decoder_input_ids: jax.Array,
             decoder_attention_mask: jax.Array) -> jax.Array:
    """The LM head's input `[batch, tgt_len, embed]` (rescaled if tied)."""
    encoded = self.encode(input_ids, attention_mask)
    return self._scale(self.decode(decoder_input_ids, decoder_attention_mask,
                                   encoded, attention_mask))

  def decode_step(self, tokens: jax.Array, index: jax.Array,
                  cache: tuple[Any, ...], cross_kv: tuple[Any, ...],
                  attention_mask: jax.Array) -> tuple[jax.Array, Any]:
    x = self.shared(tokens[:, None])  # [batch, 1, embed]
    x, cache = self.decoder.step(x, index, cache, cross_kv,
                                 layers.mask_bias(attention_mask))
    return self._logits(x)[:, 0], cache

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               decoder_input_ids: jax.Array,
               decoder_attention_mask: jax.Array) -> jax.Array:
    encoded = self.encode(input_ids, attention_mask)
    return self._logits(self.decode(decoder_input_ids, decoder_attention_mask,
                                    encoded, attention_mask))


# ---------------------------------------------------------------------------
# Pure functions over params.
# ---------------------------------------------------------------------------


class DecodeCache(NamedTuple):
  """State of incremental decoding, a pytree.

  Attributes:
    self_kv: Per decoder layer, `(keys, values)` of the decoder's
      self-attention, each `[batch, heads, max_len, kv]`, preallocated.
    cross_kv: Per decoder layer, `(keys, values)` of the cross-attention over
      the encoder output, each `[batch, heads, src_len, kv]`, computed once.
      (Heads before positions: the attention matmuls of a decoding step read
      both caches without transposing them.)
    attention_mask: Encoder padding mask `[batch, src_len]`.
    index: Scalar int32, the position the next `decode_step` writes.
  """
  self_kv: tuple[tuple[jax.Array, jax.Array], ...]
  cross_kv: tuple[tuple[jax.Array, jax.Array], ...]
  attention_mask: jax.Array
  index: jax.Array


def shift_right(targets: jax.Array, config: T5Config) -> jax.Array:
  """Decoder inputs from targets: `[start, y0, ..., y_{T-2}]` (HF convention).

  Args:
    targets: int `[batch, length]` target ids (padding after EOS is fine).
    config: Gives `decoder_start_token_id` (0 = pad for T5).

  Returns:
    int32 `[batch, length]` decoder input ids.
  """
  targets = jnp.asarray(targets, jnp.int32)
  start = jnp.full((targets.shape[0], 1), config.decoder_start_token_id,
                   jnp.int32)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


def _model(config: T5Config, mesh: Mesh | None,
           rules: LogicalRules) -> T5:
  return T5(config=config, mesh=mesh, rules=rules)


def forward(
    params: Params,
    config: T5Config,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    decoder_input_ids: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> jax.Array:
  """Teacher-forced logits, `logits[b, t]` = distribution of target token t.

  Args:
    params: The parameter pytree.
    config: Model hyperparameters (static under jit).
    input_ids: Encoder ids `[batch, src_len]`.
    attention_mask: Encoder mask `[batch, src_len]`, 1 = real token.
    decoder_input_ids: `[batch, tgt_len]`, targets shifted right with
      `config.decoder_start_token_id` first (see module docstring).
    decoder_attention_mask: `[batch, tgt_len]`, 1 = real; all ones if None.
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.

  Returns:
    float32 logits `[batch, tgt_len, vocab]`.
  """
  return _teacher_forced(params, config, input_ids, attention_mask,
                         decoder_input_ids, decoder_attention_mask, mesh=mesh,
                         rules=rules, method=None)


def hidden_states(
    params: Params,
    config: T5Config,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    decoder_input_ids: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> jax.Array:
  """What the LM head reads: `forward` is `project(hidden_states, output_head)`.

  The decoder's final-norm output, times `d_model ** -0.5` when
  `config.scale_decoder_outputs` (T5 v1.0's tied head), in the compute dtype.
  With `output_head` it lets a loss project a few positions at a time
  (`ketchup_jax.chunked`) instead of materialising `[batch, tgt_len, vocab]`.

  Args: as `forward`.

  Returns:
    `[batch, tgt_len, embed]` in `config.dtype`.
  """
  return _teacher_forced(params, config, input_ids, attention_mask,
                         decoder_input_ids, decoder_attention_mask, mesh=mesh,
                         rules=rules, method=T5.hidden)


def _teacher_forced(params, config, input_ids, attention_mask,
                    decoder_input_ids, decoder_attention_mask, *, mesh, rules,
                    method):
  """`forward` (method None: `T5.__call__`) or `hidden_states`, checked."""
  layers.check_ids("input_ids", input_ids, attention_mask)
  layers.check_ids("decoder_input_ids", decoder_input_ids, decoder_attention_mask)
  if decoder_attention_mask is None:
    decoder_attention_mask = jnp.ones_like(decoder_input_ids)
  kwargs = {} if method is None else {"method": method}
  return _model(config, mesh, rules).apply(
      {"params": params}, input_ids, attention_mask, decoder_input_ids,
      decoder_attention_mask, **kwargs)


def output_head(params: Params, config: T5Config) -> chunked.Head:
  """The LM head in the compute dtype: the tied `[vocab, embed]` embedding,
  or the untied `[embed, vocab]` kernel (no transposed copy)."""
  if config.tie_word_embeddings:
    return chunked.Head(params["shared"]["embedding"].astype(config.dtype),
                        vocab_first=True)
  return chunked.Head(params["lm_head"]["kernel"].astype(config.dtype))


def encode(
    params: Params,
    config: T5Config,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> jax.Array:
  """Encoder output `[batch, src_len, embed]` in the compute dtype."""
  layers.check_ids("input_ids", input_ids, attention_mask)
  return _model(config, mesh, rules).apply(
      {"params": params}, input_ids, attention_mask, method=T5.encode)


def init_decode_cache(
    params: Params,
    config: T5Config,
    encoded: jax.Array,
    attention_mask: jax.Array,
    *,
    max_len: int,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> DecodeCache:
  """Preallocates the self-attention cache and computes cross keys / values.

  Args:
    params: The parameter pytree.
    config: Model hyperparameters.
    encoded: Encoder output `[batch, src_len, embed]`.
    attention_mask: Encoder mask `[batch, src_len]`.
    max_len: Number of decoder positions the cache holds.
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.

  Returns:
    A `DecodeCache` at index 0.
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  batch = encoded.shape[0]
  cross_kv = _model(config, mesh, rules).apply(
      {"params": params}, encoded, method=T5.cross_key_value)
  axes = (_BATCH, _HEADS, _LENGTH, _KV)
  cross_kv = jax.tree.map(
      lambda a: partitioning.with_logical_constraint(
          jnp.swapaxes(a, 1, 2), axes, mesh=mesh, rules=rules), cross_kv)
  shape = (batch, config.num_heads, max_len, config.d_kv)

  def zeros() -> jax.Array:
    z = jnp.zeros(shape, config.dtype)  # [batch, heads, max_len, kv]
    return partitioning.with_logical_constraint(z, axes, mesh=mesh,
                                                rules=rules)

  self_kv = tuple((zeros(), zeros()) for _ in range(config.num_decoder_layers))
  return DecodeCache(self_kv=self_kv, cross_kv=cross_kv,
                     attention_mask=attention_mask,
                     index=jnp.zeros((), jnp.int32))


def decode_step(
    params: Params,
    config: T5Config,
    tokens: jax.Array,
    cache: DecodeCache,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> tuple[jax.Array, DecodeCache]:
  """One decoder position with the KV cache.

  Args:
    params: The parameter pytree.
    config: Model hyperparameters.
    tokens: `[batch]` decoder input ids at position `cache.index`.
    cache: The decoding state.
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.

  Returns:
    float32 logits `[batch, vocab]` for the next token, and the cache with
    this position written and `index + 1`.
  """
  logits, self_kv = _model(config, mesh, rules).apply(
      {"params": params}, tokens, cache.index, cache.self_kv, cache.cross_kv,
      cache.attention_mask, method=T5.decode_step)
  return logits, cache._replace(self_kv=self_kv, index=cache.index + 1)


def _dummy_inputs() -> tuple[jax.Array, ...]:
  ids = jnp.zeros((1, 2), jnp.int32)
  return ids, jnp.ones_like(ids), ids, jnp.ones_like(ids)


def _boxed_init(config: T5Config, rng: jax.Array) -> Any:
  return _model(config, None, partitioning.DEFAULT_RULES).init(
      rng, *_dummy_inputs())["params"]


def init_params(config: T5Config, rng: jax.Array) -> Params:
  """Random parameters with HF T5's scales (`T5Config.init_stddev`), as numpy
  arrays (`layers.init_from_shapes`); `ketchup_jax.models.place_params` puts
  them on devices."""
  return layers.init_from_shapes(param_shapes(config), config, rng)


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: T5Config) -> Any:
  """Traces the model's init once per config (tracing costs seconds)."""
  return jax.eval_shape(functools.partial(_boxed_init, config),
                        jax.random.key(0))


def param_shapes(config: T5Config) -> Params:
  """`jax.ShapeDtypeStruct` tree of the parameters, without allocating."""
  return layers.unboxed_shapes(_abstract_boxed(config))


def logical_axes(config: T5Config) -> Any:
  """Tree of logical axis-name tuples, one per parameter (same structure)."""
  return layers.boxed_axes(_abstract_boxed(config))
