"""Layers that T5 and the decoder-only family share, and their parameter tools.

Every module here reads its sizes from a config that provides:

    vocab_size, embed_dim, norm_eps, mlp_dim, mlp_activation, mlp_gated,
    dtype, param_dtype, init_stddev(path) -> float | None

(`T5Config` and `DecoderConfig` both do). `init_stddev` is the family's
initialisation table: None for ones (norm scales), 0 for zeros (biases),
otherwise the standard deviation of a normal draw.

Precision: parameters are stored in `config.param_dtype` and cast to
`config.dtype` at use; norm statistics and output logits are float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from ketchup_jax import partitioning

Params = Any  # Nested dict of arrays (the linen 'params' collection).
LogicalRules = partitioning.LogicalRules

NEG_INF = -1e10  # Additive attention mask value (finite: no NaN rows).

# Logical names of activations.
BATCH, LENGTH = "activation_batch", "activation_length"
EMBED, HEADS, KV = "activation_embed", "activation_heads", "activation_kv"
MLP_ACT, VOCAB = "activation_mlp", "activation_vocab"

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


class Base(nn.Module):
  """Shared fields: config and the optional mesh for activation constraints."""
  config: Any
  mesh: Mesh | None = None
  rules: LogicalRules = partitioning.DEFAULT_RULES

  def _param(self, name: str, shape: tuple[int, ...],
             axes: tuple[str, ...]) -> jax.Array:
    std = self.config.init_stddev(tuple(self.scope.path) + (name,))
    if std is None:
      init = nn.initializers.ones
    elif std == 0:
      init = nn.initializers.zeros
    else:
      init = nn.initializers.normal(stddev=std)
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      self.config.param_dtype)

  def _constrain(self, x: jax.Array, axes: tuple[str | None, ...]
                 ) -> jax.Array:
    return partitioning.with_logical_constraint(
        x, axes, mesh=self.mesh, rules=self.rules)


class RMSNorm(Base):
  """Scale-only RMS norm, statistics in float32.

  Attributes:
    features: Normalised width (0: `config.embed_dim`).
    cast_before_scale: Cast the normalised input to the compute dtype before
      the scale multiplies it (Llama / Qwen in HF); otherwise multiply in
      float32 and cast the product (T5 in HF). Equal in float32.
    axis: Logical name of the scale's axis.
  """
  features: int = 0
  cast_before_scale: bool = False
  axis: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = self._param("scale", (self.features or cfg.embed_dim,),
                        (self.axis,))
    x32 = x.astype(jnp.float32)  # [..., features]
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + cfg.norm_eps)
    if self.cast_before_scale:
      return y.astype(cfg.dtype) * scale.astype(cfg.dtype)
    return (y * scale.astype(jnp.float32)).astype(cfg.dtype)


class Embed(Base):
  """The token embedding; `attend` is the tied output projection."""

  def setup(self):
    cfg = self.config
    self.embedding = self._param("embedding", (cfg.vocab_size, cfg.embed_dim),
                                 ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    # Gather the fsdp-sharded table (as FSDP does for every weight) but keep
    # it vocab-sharded, so the lookup is a masked local gather + reduction.
    table = self._constrain(self.embedding.astype(self.config.dtype),
                            ("vocab", None))
    x = jnp.take(table, ids, axis=0)
    return self._constrain(x, (BATCH, LENGTH, EMBED))  # [b, l, embed]

  def attend(self, x: jax.Array) -> jax.Array:
    logits = jnp.einsum("ble,ve->blv", x,
                        self.embedding.astype(self.config.dtype),
                        preferred_element_type=jnp.float32)
    return self._constrain(logits, (BATCH, LENGTH, VOCAB))


class MLP(Base):
  """Feed-forward block: `wo(act(wi x))` or gated `wo(act(wi_0 x) * wi_1 x)`.

  The gated form is Llama's `down(act(gate x) * up x)` with `wi_0` = gate,
  `wi_1` = up, `wo` = down.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    e, f = cfg.embed_dim, cfg.mlp_dim
    act = ACTIVATIONS[cfg.mlp_activation]

    def proj(name: str) -> jax.Array:
      w = self._param(name, (e, f), ("embed", "mlp"))
      h = jnp.einsum("ble,ef->blf", x, w.astype(cfg.dtype))
      return self._constrain(h, (BATCH, LENGTH, MLP_ACT))  # [b, l, mlp]

    if cfg.mlp_gated:
      h = act(proj("wi_0")) * proj("wi_1")
    else:
      h = act(proj("wi"))
    wo = self._param("wo", (f, e), ("mlp", "embed"))
    y = jnp.einsum("blf,fe->ble", h, wo.astype(cfg.dtype))
    return self._constrain(y, (BATCH, LENGTH, EMBED))


class LMHead(Base):
  """Untied output projection `[embed, vocab]`."""

  def setup(self):
    cfg = self.config
    self.kernel = self._param("kernel", (cfg.embed_dim, cfg.vocab_size),
                              ("embed", "vocab"))

  def __call__(self, x: jax.Array) -> jax.Array:
    logits = jnp.einsum("ble,ev->blv", x, self.kernel.astype(self.config.dtype),
                        preferred_element_type=jnp.float32)
    return self._constrain(logits, (BATCH, LENGTH, VOCAB))


def mask_bias(mask: jax.Array) -> jax.Array:
  """`[batch, k_len]` 0/1 mask -> float32 bias `[batch, 1, 1, k_len]`."""
  return jnp.where(mask[:, None, None, :] > 0, 0.0, NEG_INF).astype(
      jnp.float32)


def remat(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
  """`layer_cls`, rematerialised under autodiff by the config's `remat`.

  "none" keeps every activation, "full" keeps only each layer's input,
  "minimal" also keeps the outputs of the weight matmuls.
  """
  if policy == "none":
    return layer_cls
  saveable = {
      "full": jax.checkpoint_policies.nothing_saveable,
      "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[policy]
  return nn.remat(layer_cls, policy=saveable)


def check_ids(name: str, ids: jax.Array, mask: jax.Array | None) -> None:
  """`ids` must be `[batch, length]` and `mask` (if any) the same shape."""
  if ids.ndim != 2:
    raise ValueError(f"{name} must be [batch, length], got shape {ids.shape}")
  if mask is not None and mask.shape != ids.shape:
    raise ValueError(f"the mask of {name} must have shape {ids.shape}, got"
                     f" {mask.shape}")


# ---------------------------------------------------------------------------
# Parameter trees without running the model.
# ---------------------------------------------------------------------------

_INIT_CHUNK = 1 << 24  # Elements per random draw in `init_from_shapes`.


@functools.partial(jax.jit, static_argnums=1)
def _standard_normal(rng: jax.Array, size: int) -> jax.Array:
  return jax.random.normal(rng, (size,), jnp.float32)


def init_from_shapes(shapes: Params, config: Any, rng: jax.Array) -> Params:
  """Random parameters by `config.init_stddev`, as numpy arrays.

  All parameters are cut from one stream of standard normals drawn in
  fixed-size chunks (one compiled random kernel, bounded device memory), then
  scaled on the host; norm scales are ones and biases zeros.

  Args:
    shapes: `jax.ShapeDtypeStruct` tree (the family's `param_shapes`).
    config: Gives `init_stddev(path)`.
    rng: PRNG key.

  Returns:
    The tree with `param_dtype` numpy leaves.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  total = sum(leaf.size for _, leaf in flat)
  chunk = min(total, _INIT_CHUNK)
  stream, buffered, index = [], 0, 0
  leaves = []
  for path, leaf in flat:
    names = tuple(p.key for p in path)
    std = config.init_stddev(names)
    if std is None or std == 0:
      fill = np.ones if std is None else np.zeros
      leaves.append(fill(leaf.shape, leaf.dtype))
      continue
    while buffered < leaf.size:
      stream.append(np.asarray(
          _standard_normal(jax.random.fold_in(rng, index), chunk)))
      buffered += chunk
      index += 1
    z = np.concatenate(stream) if len(stream) > 1 else stream[0]
    leaves.append((z[:leaf.size].reshape(leaf.shape) * std).astype(leaf.dtype))
    stream, buffered = [z[leaf.size:]], buffered - leaf.size
  return jax.tree.unflatten(treedef, leaves)


def unboxed_shapes(boxed: Any) -> Params:
  """`jax.ShapeDtypeStruct` tree from an abstract boxed (logical) init."""
  return nn.unbox(boxed)


def boxed_axes(boxed: Any) -> Any:
  """Tree of logical axis-name tuples from an abstract boxed init."""
  return jax.tree.map(lambda b: tuple(b.names), boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
