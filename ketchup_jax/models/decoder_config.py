"""Decoder-only hyperparameters (Llama 3, Qwen2 / Qwen1.5 / Qwen2.5, Qwen3).

One frozen `DecoderConfig` covers the three families; what differs between
them is flags read from HF `config.json`:

* `llama`: `attention_bias` (q/k/v/o), `head_dim` (default width / heads),
  RoPE `default` or `llama3` (frequency-dependent scaling of long wavelengths).
* `qwen2` (also Qwen1.5 and Qwen2.5): bias on q/k/v, none on o.
* `qwen3`: an RMS norm over each head of q and k before RoPE, an explicit
  `head_dim`, `attention_bias` (q/k/v/o).

All have grouped-query attention (`num_key_value_heads` <= heads), a gated
SiLU feed-forward, RMS norms computed in float32 and cast back before the
scale (as HF does), and a tied or untied LM head.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from ketchup_jax.models.config import REMAT_POLICIES

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyperparameters of a decoder-only model (hashable: a jit static arg).

  Attributes:
    model_type: HF `model_type`, one of `MODEL_TYPES`.
    vocab_size: Rows of the embedding.
    hidden_size: Width of the residual stream.
    intermediate_size: Hidden width of the gated feed-forward.
    num_hidden_layers: Depth.
    num_attention_heads: Query heads.
    num_key_value_heads: Key / value heads (grouped-query attention).
    head_dim: Width of one head.
    rms_norm_eps: RMS norm epsilon.
    hidden_act: Feed-forward activation (`silu`).
    qkv_bias: q/k/v projections have a bias.
    o_bias: The output projection has a bias.
    qk_norm: RMS norm over each head of q and k before RoPE (Qwen3).
    rope_theta: RoPE base.
    rope_type: `default` or `llama3`.
    rope_factor, rope_low_freq_factor, rope_high_freq_factor,
    rope_original_max_position_embeddings: The `llama3` scaling.
    max_position_embeddings: Longest context of the checkpoint (metadata).
    tie_word_embeddings: The LM head is the embedding.
    bos_token_id: Beginning-of-sequence id (metadata; None if none).
    eos_token_id: End-of-sequence ids, a tuple (Qwen has several); sampling
      stops at any of them. Empty: never stops early.
    pad_token_id: Id written after EOS (Qwen's is an EOS id).
    initializer_range: Standard deviation of random weights.
    dtype: Compute dtype.
    param_dtype: Storage dtype of parameters.
    remat: Activation rematerialisation per layer, one of `REMAT_POLICIES`.
  """
  model_type: str = "llama"
  vocab_size: int = 128
  hidden_size: int = 32
  intermediate_size: int = 64
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int = 8
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int = 0
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got "
                       f"{self.model_type!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be a "
          f"multiple of num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got "
                       f"{self.rope_type!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
          f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    eos = self.eos_token_id
    eos = (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    object.__setattr__(self, "eos_token_id", tuple(int(e) for e in eos))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

  # The layer protocol of `ketchup_jax.models.layers`.
  @property
  def embed_dim(self) -> int:
    return self.hidden_size

  @property
  def norm_eps(self) -> float:
    return self.rms_norm_eps

  @property
  def mlp_dim(self) -> int:
    return self.intermediate_size

  @property
  def mlp_activation(self) -> str:
    return self.hidden_act

  @property
  def mlp_gated(self) -> bool:
    return True

  def init_stddev(self, path: tuple[str, ...]) -> float | None:
    """None (ones) for norm scales, 0 for biases, else `initializer_range`."""
    name = path[-1]
    if name == "scale":
      return None
    if name.endswith("_bias"):
      return 0.0
    return self.initializer_range

  def replace(self, **changes: Any) -> DecoderConfig:
    """A copy with `changes` applied."""
    return dataclasses.replace(self, **changes)

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2]`, float32, as HF computes
    them (`llama3`: long wavelengths divided by `rope_factor`, a smooth
    blend between `low_freq_factor` and `high_freq_factor`)."""
    d = self.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
    inv = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
    if self.rope_type == "default":
      return inv
    factor = self.rope_factor
    low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
    old = self.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, scaled).astype(np.float32)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any],
                   generation: Mapping[str, Any] | None = None,
                   **overrides: Any) -> DecoderConfig:
    """Builds a config from an HF `config.json` (and `generation_config.json`).

    Args:
      hf: The parsed `config.json`.
      generation: The parsed `generation_config.json`, if any; its EOS ids
        come first, then the config's (as HF `generate` stops at them).
      **overrides: Fields to set afterwards (e.g. `dtype`).

    Raises:
      ValueError: naming the field, for an unsupported `model_type`, RoPE
        type, sliding-window attention, an MLP bias or partial rotary.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"expected a decoder config with model_type one of "
                       f"{MODEL_TYPES}, got model_type {model_type!r}")
    layer_types = hf.get("layer_types") or ()
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
      raise ValueError(f"{model_type}: sliding-window attention "
                       f"(use_sliding_window / layer_types) is not supported")
    if hf.get("mlp_bias"):
      raise ValueError(f"{model_type}: mlp_bias=true is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{model_type}: rope_type {rope_type!r} is not "
                       f"supported; expected one of {ROPE_TYPES}")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                1.0)) != 1.0:
      raise ValueError(f"{model_type}: partial_rotary_factor != 1 is not "
                       f"supported")
    heads = hf.get("num_attention_heads", 32)
    hidden = hf.get("hidden_size", 4096)
    head_dim = hf.get("head_dim") or hidden // heads
    bias = bool(hf.get("attention_bias", False))
    eos: list[int] = []
    for source in (generation or {}, hf):
      ids = source.get("eos_token_id")
      ids = [] if ids is None else [ids] if isinstance(ids, int) else ids
      eos += [int(i) for i in ids if int(i) not in eos]
    pad = hf.get("pad_token_id")
    if pad is None:
      pad = (generation or {}).get("pad_token_id")
    if pad is None:
      pad = eos[0] if eos else 0
    kwargs = dict(
        model_type=model_type,
        vocab_size=hf.get("vocab_size", 32000),
        hidden_size=hidden,
        intermediate_size=hf.get("intermediate_size", 11008),
        num_hidden_layers=hf.get("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=False if model_type == "qwen2" else bias,
        qk_norm=model_type == "qwen3",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta",
                                                       10000.0))),
        rope_type=rope_type,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos),
        pad_token_id=int(pad),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    if rope_type == "llama3":
      kwargs.update(
          rope_factor=float(rope["factor"]),
          rope_low_freq_factor=float(rope["low_freq_factor"]),
          rope_high_freq_factor=float(rope["high_freq_factor"]),
          rope_original_max_position_embeddings=int(
              rope["original_max_position_embeddings"]))
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` contents for `<Family>ForCausalLM` (RoPE in the
    transformers 5 `rope_parameters` and in the 4.x `rope_theta` /
    `rope_scaling` spelling)."""
    rope: dict[str, Any] = {"rope_type": self.rope_type,
                            "rope_theta": self.rope_theta}
    if self.rope_type == "llama3":
      rope.update(factor=self.rope_factor,
                  low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=(
                      self.rope_original_max_position_embeddings))
    out = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "hidden_act": self.hidden_act,
        "rope_parameters": rope,
        # The transformers 4 spelling of the same, for older readers.
        "rope_theta": self.rope_theta,
        "rope_scaling": ({k: v for k, v in rope.items() if k != "rope_theta"}
                         if self.rope_type != "default" else None),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if len(self.eos_token_id) > 1
                         else self.eos_token_id[0] if self.eos_token_id
                         else None),
        "pad_token_id": self.pad_token_id,
        "initializer_range": self.initializer_range,
        "use_cache": True,
        "dtype": "float32",
    }
    if self.model_type != "qwen2":
      out["attention_bias"] = self.qkv_bias
    return out

  def generation_dict(self) -> dict[str, Any]:
    """The HF `generation_config.json` contents."""
    return {"bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) or None,
            "pad_token_id": self.pad_token_id}


def _tiny(model_type: str, **kw: Any) -> dict[str, Any]:
  return dict(model_type=model_type, vocab_size=128, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              eos_token_id=(1,), pad_token_id=0, **kw)


# Size ladder of decoder shapes: `*-tiny` for CPU tests and smoke runs, and
# the shapes of the paper's and the memory table's checkpoints (from their
# HF config.json files; load the real directory to train them).
DECODER_SIZES: dict[str, dict[str, Any]] = {
    "llama-tiny": _tiny("llama", rope_type="llama3", rope_factor=8.0,
                        rope_original_max_position_embeddings=16),
    "qwen2-tiny": _tiny("qwen2", qkv_bias=True, tie_word_embeddings=True),
    "qwen3-tiny": _tiny("qwen3", qk_norm=True),
    "qwen1.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1024,
        intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, head_dim=64, qkv_bias=True, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True,
        eos_token_id=(151643,), pad_token_id=151643),
    "qwen1.5-4b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=2560,
        intermediate_size=6912, num_hidden_layers=40, num_attention_heads=20,
        num_key_value_heads=20, head_dim=128, qkv_bias=True, rope_theta=5e6,
        max_position_embeddings=32768, tie_word_embeddings=False,
        eos_token_id=(151643,), pad_token_id=151643),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, head_dim=64, qkv_bias=True, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True,
        eos_token_id=(151643,), pad_token_id=151643),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, qkv_bias=True, rope_theta=1e6,
        max_position_embeddings=131072, tie_word_embeddings=True,
        eos_token_id=(151643,), pad_token_id=151643),
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=5e5, max_position_embeddings=8192,
        eos_token_id=(128001,), pad_token_id=128001, bos_token_id=128000),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=5e5, rope_type="llama3", rope_factor=32.0,
        rope_original_max_position_embeddings=8192,
        max_position_embeddings=131072, tie_word_embeddings=True,
        eos_token_id=(128001,), pad_token_id=128001, bos_token_id=128000),
}


def get_decoder_config(name: str, **overrides: Any) -> DecoderConfig:
  """The config of a named decoder shape (a key of `DECODER_SIZES`).

  Raises:
    ValueError: if `name` is not a known shape.
  """
  if name not in DECODER_SIZES:
    raise ValueError(f"unknown decoder size {name!r}; expected one of "
                     f"{sorted(DECODER_SIZES)}")
  return DecoderConfig(**{**DECODER_SIZES[name], **overrides})
