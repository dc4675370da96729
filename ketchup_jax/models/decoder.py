"""Decoder-only LMs (Llama 3, Qwen2, Qwen3) in Flax linen, and pure functions.

Parameter tree (one entry per HF tensor; kernels `[in, out]`, attention
kernels keep heads as their own axis; `G` = key/value heads):

    embed/embedding                          [vocab, embed]
    layers_{i}/attention_norm/scale          [embed]
    layers_{i}/attention/q                   [embed, heads, kv]
    layers_{i}/attention/{k, v}              [embed, kv_heads, kv]
    layers_{i}/attention/o                   [heads, kv, embed]
    layers_{i}/attention/{q,k,v}_bias        [heads | kv_heads, kv] (qkv_bias)
    layers_{i}/attention/o_bias              [embed]                (o_bias)
    layers_{i}/attention/{q,k}_norm/scale    [kv]                   (qk_norm)
    layers_{i}/mlp_norm/scale                [embed]
    layers_{i}/mlp/{wi_0, wi_1}              [embed, mlp]  (gate, up)
    layers_{i}/mlp/wo                        [mlp, embed]  (down)
    final_norm/scale                         [embed]
    lm_head/kernel                           [embed, vocab]  (untied only)

Positions come from the attention mask as HF `generate` computes them for
left-padded prompts: `cumsum(mask) - 1`, clipped at 0. Padding keys are
masked; a padding query's output is garbage that no loss should read.

The KV cache (`KVCache`) holds `max_len` slots per row: `prefill` writes a
prompt chunk (its padding slots stay masked), `decode_step` one token per
call. Each row keeps its own RoPE position, so left padding costs slots but
not positions.
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
from ketchup_jax.models.decoder_config import DecoderConfig

Params = layers.Params
LogicalRules = partitioning.LogicalRules

# Logical axis of key/value heads. Not in `partitioning.DEFAULT_RULES`, so it
# is replicated (a name missing from the rules table is); with GQA there are
# few of them, often fewer than the tensor-parallel size.
KV_HEADS = "kv_heads"
_BATCH, _LENGTH, _HEADS, _KV = (layers.BATCH, layers.LENGTH, layers.HEADS,
                                 layers.KV)
_EMBED = layers.EMBED


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """RoPE positions `[batch, length]` int32: `cumsum(mask) - 1`, at least 0."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: jax.Array, positions: jax.Array,
         config: DecoderConfig) -> jax.Array:
  """Rotary embedding of `x` `[batch, length, heads, head_dim]` (HF layout:
  the two halves of the head are the rotated pairs); angles in float32,
  cos / sin cast to `x`'s dtype as HF does."""
  inv_freq = jnp.asarray(config.inv_freq())  # [head_dim // 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  return x * cos + _rotate_half(x) * sin


class Attention(layers.Base):
  """Grouped-query self-attention with RoPE, optional biases and q/k norms."""

  def setup(self):
    cfg = self.config
    e, h, g, d = (cfg.hidden_size, cfg.num_attention_heads,
                  cfg.num_key_value_heads, cfg.head_dim)
    self.q = self._param("q", (e, h, d), ("embed", "heads", "kv"))
    self.k = self._param("k", (e, g, d), ("embed", KV_HEADS, "kv"))
    self.v = self._param("v", (e, g, d), ("embed", KV_HEADS, "kv"))
    self.o = self._param("o", (h, d, e), ("heads", "kv", "embed"))
    if cfg.qkv_bias:
      self.q_bias = self._param("q_bias", (h, d), ("heads", "kv"))
      self.k_bias = self._param("k_bias", (g, d), (KV_HEADS, "kv"))
      self.v_bias = self._param("v_bias", (g, d), (KV_HEADS, "kv"))
    if cfg.o_bias:
      self.o_bias = self._param("o_bias", (e,), ("embed",))
    if cfg.qk_norm:
      kw = dict(config=cfg, mesh=self.mesh, rules=self.rules, features=d,
                cast_before_scale=True, axis="kv")
      self.q_norm = layers.RMSNorm(**kw)
      self.k_norm = layers.RMSNorm(**kw)

  def _project(self, x: jax.Array, name: str) -> jax.Array:
    """`[batch, length, heads | kv_heads, kv]` projection (+ bias, norm)."""
    dtype = self.config.dtype
    y = jnp.einsum("ble,ehd->blhd", x, getattr(self, name).astype(dtype))
    if self.config.qkv_bias:
      y = y + getattr(self, f"{name}_bias").astype(dtype)
    if self.config.qk_norm and name in ("q", "k"):
      y = getattr(self, f"{name}_norm")(y)
    return self._constrain(y, (_BATCH, _LENGTH, _HEADS, _KV))

  def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends from `x` to itself, or to the cache after writing `x` into it.

    Args:
      x: `[batch, length, embed]`.
      positions: int `[batch, length]` RoPE positions.
      bias: float32 `[batch, 1, 1, length, k_len]` (causal + padding), with
        `k_len` = length, or the cache's `max_len` when `cache` is given.
      cache: Keys / values `[batch, kv_heads, max_len, kv]`; this call's are
        written at slot `index` onwards.
      index: Scalar int32 first slot of `x` in the cache.

    Returns:
      `[batch, length, embed]` and the updated cache (or None).
    """
    cfg = self.config
    dtype = cfg.dtype
    b, length = x.shape[:2]
    g, d = cfg.num_key_value_heads, cfg.head_dim
    q = rope(self._project(x, "q"), positions, cfg)  # [b, l, heads, kv]
    k = rope(self._project(x, "k"), positions, cfg)  # [b, l, kv_heads, kv]
    v = self._project(x, "v")
    q = q.reshape(b, length, g, -1, d)  # [b, l, kv_heads, group, kv]
    if cache is None:
      spec_k, spec_o = "blgrd,bsgd->bgrls", "bgrls,bsgd->blgrd"
    else:
      start = (0, 0, index, 0)
      k = jax.lax.dynamic_update_slice(
          cache[0], jnp.swapaxes(k, 1, 2).astype(cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(
          cache[1], jnp.swapaxes(v, 1, 2).astype(cache[1].dtype), start)
      cache = (k, v)
      spec_k, spec_o = "blgrd,bgsd->bgrls", "bgrls,bgsd->blgrd"
    scores = jnp.einsum(spec_k, q, k.astype(dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5) + bias  # [b, kv_heads, group, l, k_len]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum(spec_o, probs, v.astype(dtype))
    out = self._constrain(out.reshape(b, length, -1, d),
                          (_BATCH, _LENGTH, _HEADS, _KV))
    y = jnp.einsum("blhd,hde->ble", out, self.o.astype(dtype))
    if cfg.o_bias:
      y = y + self.o_bias.astype(dtype)
    return self._constrain(y, (_BATCH, _LENGTH, _EMBED)), cache


class DecoderLayer(layers.Base):
  """Pre-norm self-attention + gated feed-forward, residual around each."""

  def setup(self):
    kw = dict(config=self.config, mesh=self.mesh, rules=self.rules)
    self.attention_norm = layers.RMSNorm(cast_before_scale=True, **kw)
    self.attention = Attention(**kw)
    self.mlp_norm = layers.RMSNorm(cast_before_scale=True, **kw)
    self.mlp = layers.MLP(**kw)

  def __call__(self, x, positions, bias, cache=None, index=None):
    a, cache = self.attention(self.attention_norm(x), positions, bias, cache,
                              index)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), cache


class DecoderLM(layers.Base):
  """Embedding, decoder layers, final norm and a tied or untied LM head."""

  def setup(self):
    cfg = self.config
    kw = dict(config=cfg, mesh=self.mesh, rules=self.rules)
    self.embed = layers.Embed(**kw)
    layer = layers.remat(DecoderLayer, cfg.remat)
    self.layers = [layer(**kw) for _ in range(cfg.num_hidden_layers)]
    self.final_norm = layers.RMSNorm(cast_before_scale=True, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.LMHead(**kw)

  def logits(self, x: jax.Array) -> jax.Array:
    if self.config.tie_word_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x)

  def hidden(self, input_ids: jax.Array, attention_mask: jax.Array,
             positions: jax.Array) -> jax.Array:
    """Final-norm output `[batch, length, embed]`, teacher-forced."""
    length = input_ids.shape[1]
    causal = np.tril(np.ones((length, length), dtype=bool))
    allowed = causal[None] & (attention_mask[:, None, :] > 0)  # [b, l, l]
    bias = jnp.where(allowed, 0.0, layers.NEG_INF)[:, None, None]
    x = self.embed(input_ids)
    for layer in self.layers:
      x, _ = layer(x, positions, bias)
    return self.final_norm(x)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               positions: jax.Array) -> jax.Array:
    return self.logits(self.hidden(input_ids, attention_mask, positions))

  def cached(self, input_ids: jax.Array, positions: jax.Array,
             key_mask: jax.Array, kv: tuple[Any, ...], index: jax.Array
             ) -> tuple[jax.Array, tuple[Any, ...]]:
    """Runs `input_ids` `[batch, length]` at cache slots `index...`.

    `key_mask` `[batch, max_len]` marks the slots holding real tokens,
    these included. Returns the last position's logits `[batch, vocab]`.
    """
    length, max_len = input_ids.shape[1], key_mask.shape[1]
    slots = index + jnp.arange(length)  # [length]
    allowed = ((jnp.arange(max_len)[None, :] <= slots[:, None])[None] &
               (key_mask[:, None, :] > 0))  # [b, length, max_len]
    bias = jnp.where(allowed, 0.0, layers.NEG_INF)[:, None, None]
    x = self.embed(input_ids)
    new_kv = []
    for layer, c in zip(self.layers, kv):
      x, c = layer(x, positions, bias, cache=c, index=index)
      new_kv.append(c)
    x = self.final_norm(x[:, -1:])
    return self.logits(x)[:, 0], tuple(new_kv)


# ---------------------------------------------------------------------------
# Pure functions over params.
# ---------------------------------------------------------------------------


class KVCache(NamedTuple):
  """State of incremental decoding, a pytree.

  Attributes:
    kv: Per layer `(keys, values)`, each `[batch, kv_heads, max_len, kv]`.
    key_mask: int32 `[batch, max_len]`, 1 at slots holding a real token.
    positions: int32 `[batch]`, the RoPE position of each row's next token.
    index: Scalar int32, the next slot written.
  """
  kv: tuple[tuple[jax.Array, jax.Array], ...]
  key_mask: jax.Array
  positions: jax.Array
  index: jax.Array


def _model(config: DecoderConfig, mesh: Mesh | None,
           rules: LogicalRules) -> DecoderLM:
  return DecoderLM(config=config, mesh=mesh, rules=rules)


def _teacher_forced(params, config, input_ids, attention_mask, positions, *,
                    mesh, rules, method):
  layers.check_ids("input_ids", input_ids, attention_mask)
  if positions is None:
    positions = positions_from_mask(attention_mask)
  elif positions.shape != input_ids.shape:
    raise ValueError(f"positions must have shape {input_ids.shape}, got "
                     f"{positions.shape}")
  kwargs = {} if method is None else {"method": method}
  return _model(config, mesh, rules).apply(
      {"params": params}, input_ids, attention_mask, positions, **kwargs)


def forward(
    params: Params,
    config: DecoderConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> jax.Array:
  """Causal LM logits: `logits[b, t]` is the distribution of token t + 1.

  Args:
    params: The parameter pytree.
    config: Model hyperparameters (static under jit).
    input_ids: int `[batch, length]`, padded on either side.
    attention_mask: `[batch, length]`, 1 = real token.
    positions: int `[batch, length]` RoPE positions; from the mask if None.
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.

  Returns:
    float32 logits `[batch, length, vocab]`.
  """
  return _teacher_forced(params, config, input_ids, attention_mask, positions,
                         mesh=mesh, rules=rules, method=None)


def hidden_states(
    params: Params,
    config: DecoderConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> jax.Array:
  """What the LM head reads, `[batch, length, embed]` in `config.dtype`:
  `forward` is `chunked.project(hidden_states, output_head)`."""
  return _teacher_forced(params, config, input_ids, attention_mask, positions,
                         mesh=mesh, rules=rules, method=DecoderLM.hidden)


def output_head(params: Params, config: DecoderConfig) -> chunked.Head:
  """The LM head in the compute dtype: the tied `[vocab, embed]` embedding,
  or the untied `[embed, vocab]` kernel."""
  if config.tie_word_embeddings:
    return chunked.Head(params["embed"]["embedding"].astype(config.dtype),
                        vocab_first=True)
  return chunked.Head(params["lm_head"]["kernel"].astype(config.dtype))


def init_cache(
    config: DecoderConfig,
    batch_size: int,
    max_len: int,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> KVCache:
  """An empty cache of `max_len` slots per row (prompt + new tokens)."""
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)

  def zeros() -> jax.Array:
    z = jnp.zeros(shape, config.dtype)  # [batch, kv_heads, max_len, kv]
    return partitioning.with_logical_constraint(  # as `Attention._project`
        z, (_BATCH, _HEADS, _LENGTH, _KV), mesh=mesh, rules=rules)

  kv = tuple((zeros(), zeros()) for _ in range(config.num_hidden_layers))
  return KVCache(kv=kv, key_mask=jnp.zeros((batch_size, max_len), jnp.int32),
                 positions=jnp.zeros((batch_size,), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


def _run_cached(params, config, input_ids, mask, cache, mesh, rules):
  max_len = cache.key_mask.shape[1]
  if input_ids.shape[1] > max_len:
    raise ValueError(
        f"a prompt of {input_ids.shape[1]} tokens does not fit the KV cache "
        f"of {max_len} positions; make the cache at least prompt length + "
        f"new tokens long")
  mask = mask.astype(jnp.int32)
  positions = cache.positions[:, None] + positions_from_mask(mask)
  key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask,
                                          (0, cache.index))
  logits, kv = _model(config, mesh, rules).apply(
      {"params": params}, input_ids, positions, key_mask, cache.kv,
      cache.index, method=DecoderLM.cached)
  return logits, KVCache(kv=kv, key_mask=key_mask,
                         positions=cache.positions + jnp.sum(mask, axis=1),
                         index=cache.index + input_ids.shape[1])


def prefill(
    params: Params,
    config: DecoderConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    cache: KVCache,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> tuple[jax.Array, KVCache]:
  """Writes a prompt chunk into the cache.

  Args:
    params: The parameter pytree.
    config: Model hyperparameters.
    input_ids: int `[batch, length]`, left-padded (so the last column is
      every row's last token).
    attention_mask: `[batch, length]`, 1 = real token.
    cache: The cache; the chunk goes to slots `index ... index + length - 1`
      (`index` is traced: keeping `index + length <= max_len` is the
      caller's part; a chunk longer than the whole cache is an error).
    mesh: Optional mesh for activation sharding constraints.
    rules: Logical axis rules.

  Returns:
    float32 logits `[batch, vocab]` of the next token after the chunk's last
    column, and the cache.

  Raises:
    ValueError: if the chunk is longer than the cache.
  """
  layers.check_ids("input_ids", input_ids, attention_mask)
  return _run_cached(params, config, input_ids, attention_mask, cache, mesh,
                     rules)


def decode_step(
    params: Params,
    config: DecoderConfig,
    tokens: jax.Array,
    cache: KVCache,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = partitioning.DEFAULT_RULES,
) -> tuple[jax.Array, KVCache]:
  """One token per row at slot `cache.index`: float32 logits `[batch, vocab]`
  of the next token, and the cache advanced by one."""
  tokens = tokens[:, None]
  return _run_cached(params, config, tokens, jnp.ones_like(tokens), cache,
                     mesh, rules)


def _boxed_init(config: DecoderConfig, rng: jax.Array) -> Any:
  ids = jnp.zeros((1, 2), jnp.int32)
  return _model(config, None, partitioning.DEFAULT_RULES).init(
      rng, ids, jnp.ones_like(ids), ids)["params"]


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: DecoderConfig) -> Any:
  return jax.eval_shape(functools.partial(_boxed_init, config),
                        jax.random.key(0))


def param_shapes(config: DecoderConfig) -> Params:
  """`jax.ShapeDtypeStruct` tree of the parameters, without allocating."""
  return layers.unboxed_shapes(_abstract_boxed(config))


def logical_axes(config: DecoderConfig) -> Any:
  """Tree of logical axis-name tuples, one per parameter (same structure)."""
  return layers.boxed_axes(_abstract_boxed(config))


def init_params(config: DecoderConfig, rng: jax.Array) -> Params:
  """Random parameters (normal by `initializer_range`, zero biases, unit
  norm scales) as numpy arrays; see `layers.init_from_shapes`."""
  return layers.init_from_shapes(param_shapes(config), config, rng)

