"""T5 hyperparameters: a frozen dataclass from HF `config.json` or a size name.

One `T5Config` covers the whole family:

* T5 v1.0 (`t5-small`, ...): ReLU feed-forward, `lm_head` tied to the shared
  embedding, decoder output scaled by `d_model ** -0.5` before the projection.
* T5 v1.1 / FLAN-T5 (`small` ... `xxl`): gated-GELU feed-forward, separate
  (untied) `lm_head`, no output scaling.

Two HF flags are kept apart because transformers 5 keeps them apart:
`tie_word_embeddings` (is there a separate `lm_head` matrix?) and
`scale_decoder_outputs` (multiply by `d_model ** -0.5` before it?). Older
`config.json` files only have `tie_word_embeddings`, which then decides both.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

_ACTIVATIONS = ("relu", "gelu_new", "gelu", "silu")
# Activation rematerialisation of each encoder/decoder layer under autodiff:
# "none" keeps every activation, "full" keeps only each layer's input and
# recomputes the rest in the backward pass, "minimal" also keeps the outputs
# of the weight matmuls (recomputes attention scores and elementwise ops).
REMAT_POLICIES = ("none", "full", "minimal")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of an encoder-decoder T5 model.

  Attributes:
    vocab_size: Number of token ids (rows of the embedding).
    d_model: Width of the residual stream.
    d_kv: Width of one attention head.
    d_ff: Hidden width of the feed-forward block.
    num_layers: Encoder depth.
    num_decoder_layers: Decoder depth.
    num_heads: Attention heads.
    relative_attention_num_buckets: Relative position buckets.
    relative_attention_max_distance: Distance beyond which all positions share
      the last bucket.
    layer_norm_epsilon: RMS norm epsilon.
    is_gated_act: Gated feed-forward (`wi_0`, `wi_1`) as in v1.1 / FLAN-T5.
    dense_act_fn: Feed-forward activation (`relu`, `gelu_new`, ...).
    tie_word_embeddings: Output projection reuses the shared embedding.
    scale_decoder_outputs: Multiply the decoder output by `d_model ** -0.5`
      before the output projection (T5 v1.0).
    pad_token_id: Padding id (also the decoder start id in HF T5).
    eos_token_id: End-of-sequence id.
    decoder_start_token_id: First decoder input id.
    dtype: Compute dtype of activations and matmuls (bf16 on TPU).
    param_dtype: Storage dtype of parameters (float32 master weights).
    remat: Activation rematerialisation per layer, one of `REMAT_POLICIES`
      (memory for compute; the numbers are the same).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_decoder_layers: int = 8
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  is_gated_act: bool = True
  dense_act_fn: str = "gelu_new"
  tie_word_embeddings: bool = False
  scale_decoder_outputs: bool = False
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: str = "none"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                 "num_decoder_layers", "num_heads",
                 "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.dense_act_fn not in _ACTIVATIONS:
      raise ValueError(
          f"dense_act_fn must be one of {_ACTIVATIONS}, got"
          f" {self.dense_act_fn!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
          f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    # Normalise dtypes so that equal configs hash equally (jit static args).
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

  @property
  def feed_forward_proj(self) -> str:
    """HF's name of the feed-forward variant (`relu`, `gated-gelu`, ...)."""
    act = "gelu" if self.dense_act_fn == "gelu_new" and self.is_gated_act else (
        self.dense_act_fn)
    return f"gated-{act}" if self.is_gated_act else act

  # The layer protocol of `ketchup_jax.models.layers`.
  @property
  def embed_dim(self) -> int:
    return self.d_model

  @property
  def norm_eps(self) -> float:
    return self.layer_norm_epsilon

  @property
  def mlp_dim(self) -> int:
    return self.d_ff

  @property
  def mlp_activation(self) -> str:
    return self.dense_act_fn

  @property
  def mlp_gated(self) -> bool:
    return self.is_gated_act

  def init_stddev(self, path: tuple[str, ...]) -> float | None:
    """Initial standard deviation of the parameter at `path` (None: ones).

    HF T5's initialisation (`initializer_factor` 1): attention `q` by
    `(d_model * d_kv) ** -0.5`, `k` / `v` by `d_model ** -0.5`, `o` by
    `(heads * d_kv) ** -0.5`, feed-forward `wi*` by `d_model ** -0.5` and
    `wo` by `d_ff ** -0.5`, embeddings and `lm_head` by 1, relative position
    biases by `d_model ** -0.5`, norm scales 1. Used by the modules' own
    initialisers and by the fast `init_params`, so there is one table.
    """
    e, d, h, f = self.d_model, self.d_kv, self.num_heads, self.d_ff
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    if name == "scale":
      return None
    if name == "embedding":
      return e ** -0.5 if parent == "relpos_bias" else 1.0
    table = {"kernel": 1.0, "q": (e * d) ** -0.5, "k": e ** -0.5,
             "v": e ** -0.5, "o": (h * d) ** -0.5, "wi": e ** -0.5,
             "wi_0": e ** -0.5, "wi_1": e ** -0.5, "wo": f ** -0.5}
    if name not in table:
      raise ValueError(f"no initialiser for parameter {'/'.join(path)!r}")
    return table[name]

  def replace(self, **changes: Any) -> T5Config:
    """A copy with `changes` applied."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **overrides: Any) -> T5Config:
    """Builds a config from the contents of an HF T5 `config.json`.

    Args:
      hf: The parsed JSON.
      **overrides: Fields to set afterwards (e.g. `dtype`).

    Returns:
      The config.

    Raises:
      ValueError: if the JSON is not a T5 config or has an unknown
        `feed_forward_proj`.
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      raise ValueError(f"expected an HF T5 config (model_type 't5'), got"
                       f" model_type {model_type!r}")
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(
          f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}")
    is_gated = len(parts) == 2
    act = parts[-1]
    if is_gated and act == "gelu":
      act = "gelu_new"  # As transformers does for 'gated-gelu'.
    tie = hf.get("tie_word_embeddings", True)
    scale = hf.get("scale_decoder_outputs", tie is not False)
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else pad
    num_layers = hf.get("num_layers", 6)
    num_dec = hf.get("num_decoder_layers")
    kwargs = dict(
        vocab_size=hf.get("vocab_size", 32128),
        d_model=hf.get("d_model", 512),
        d_kv=hf.get("d_kv", 64),
        d_ff=hf.get("d_ff", 2048),
        num_layers=num_layers,
        num_decoder_layers=num_layers if num_dec is None else num_dec,
        num_heads=hf.get("num_heads", 8),
        relative_attention_num_buckets=hf.get(
            "relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get(
            "relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        is_gated_act=is_gated,
        dense_act_fn=act,
        tie_word_embeddings=bool(tie),
        scale_decoder_outputs=bool(scale),
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=hf.get("decoder_start_token_id", pad) or 0,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike[str],
                     **overrides: Any) -> T5Config:
    """Reads an HF `config.json` (see `from_hf_dict`)."""
    with open(path) as f:
      return cls.from_hf_dict(json.load(f), **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` contents for `T5ForConditionalGeneration`."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": self.vocab_size,
        "d_model": self.d_model,
        "d_kv": self.d_kv,
        "d_ff": self.d_ff,
        "num_layers": self.num_layers,
        "num_decoder_layers": self.num_decoder_layers,
        "num_heads": self.num_heads,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance":
            self.relative_attention_max_distance,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": self.feed_forward_proj,
        "dense_act_fn": self.dense_act_fn,
        "is_gated_act": self.is_gated_act,
        "tie_word_embeddings": self.tie_word_embeddings,
        "scale_decoder_outputs": self.scale_decoder_outputs,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": self.pad_token_id,
        "eos_token_id": self.eos_token_id,
        "decoder_start_token_id": self.decoder_start_token_id,
        "dtype": "float32",
    }


def _v11(d_model: int, d_ff: int, num_heads: int, num_layers: int,
         d_kv: int = 64) -> dict[str, Any]:
  return dict(d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
              num_layers=num_layers, num_decoder_layers=num_layers,
              is_gated_act=True, dense_act_fn="gelu_new",
              tie_word_embeddings=False, scale_decoder_outputs=False)


def _v10(d_model: int, d_ff: int, num_heads: int, num_layers: int,
         d_kv: int = 64) -> dict[str, Any]:
  return dict(d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
              num_layers=num_layers, num_decoder_layers=num_layers,
              is_gated_act=False, dense_act_fn="relu",
              tie_word_embeddings=True, scale_decoder_outputs=True)


# Size ladder. Unprefixed names are T5 v1.1 / FLAN-T5 shapes (FLAN-T5 has the
# v1.1 architecture); `t5-*` are T5 v1.0 shapes. `tiny` is for CPU tests.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(_v11(d_model=32, d_ff=64, num_heads=4, num_layers=2, d_kv=8),
                 vocab_size=128),
    "small": _v11(512, 1024, 6, 8),
    "base": _v11(768, 2048, 12, 12),
    "large": _v11(1024, 2816, 16, 24),
    "xl": _v11(2048, 5120, 32, 24),
    "xxl": _v11(4096, 10240, 64, 24),
    "t5-tiny": dict(_v10(d_model=32, d_ff=64, num_heads=4, num_layers=2,
                         d_kv=8), vocab_size=128),
    "t5-small": _v10(512, 2048, 8, 6),
    "t5-base": _v10(768, 3072, 12, 12),
    "t5-large": _v10(1024, 4096, 16, 24),
}


def get_config(name: str, **overrides: Any) -> T5Config:
  """The config of a named size (`tiny`, `small`, ..., `xl`, `t5-small`, ...).

  Args:
    name: A key of `SIZES`.
    **overrides: Fields to change (e.g. `dtype=jnp.float32`).

  Returns:
    The config.

  Raises:
    ValueError: if `name` is not a known size.
  """
  if name not in SIZES:
    raise ValueError(
        f"unknown T5 size {name!r}; expected one of {sorted(SIZES)}")
  return T5Config(**{**SIZES[name], **overrides})
