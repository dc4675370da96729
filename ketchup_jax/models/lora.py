"""LoRA adapters for decoder-only models (Llama / Qwen2 / Qwen3): rank-r
updates of the attention and MLP kernels, and PEFT adapter directories out.

An adapter of a kernel `W` (our layout, e.g. q `[embed, heads, kv]`) is a
pair `a [in, rank]`, `b [rank, out]`, `in` / `out` the kernel's input and
output axes flattened; the adapted kernel is

    W + (alpha / rank) * (a @ b).reshape(W.shape)

(`merge`). The base stays frozen: a training step differentiates
`loss(merge(base, adapters))` with respect to `adapters` only. `a` starts
uniform in `±1/sqrt(in)` and `b` at zero, as PEFT's default, so a fresh
adapter leaves the model unchanged.

`save_peft` writes `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(<the HF base>, dir)` loads: PEFT's `lora_A`
is `a.T` `[rank, in]` and `lora_B` is `b.T` `[out, rank]`, with the in / out
axes in HF's order (the same flattening `hf_io`'s layouts use).

Not yet wired into the training stages (optimizer state, checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from ketchup_jax import fileio
from ketchup_jax.models import decoder
from ketchup_jax.models import hf_io
from ketchup_jax.models.decoder_config import DecoderConfig

Params = Any
# Our kernel name -> (its block, input axes of the kernel, the HF module).
KERNELS = {
    "q": ("attention", 1, "q_proj"), "k": ("attention", 1, "k_proj"),
    "v": ("attention", 1, "v_proj"), "o": ("attention", 2, "o_proj"),
    "wi_0": ("mlp", 1, "gate_proj"), "wi_1": ("mlp", 1, "up_proj"),
    "wo": ("mlp", 1, "down_proj"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters, and their rank and scale.

  Attributes:
    rank: r, the inner width of every adapter.
    alpha: The update is scaled by `alpha / rank` (PEFT's `lora_alpha`).
    targets: Kernel names from `KERNELS` (all seven by default).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = tuple(KERNELS)

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"rank must be a positive int, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
    bad = [t for t in self.targets if t not in KERNELS]
    if bad or not self.targets or len(set(self.targets)) != len(
        self.targets):
      raise ValueError(f"targets must be distinct names from {list(KERNELS)},"
                       f" at least one, got {list(self.targets)}")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _check(config: Any) -> None:
  if not isinstance(config, DecoderConfig):
    raise TypeError(f"LoRA adapters are for decoder-only models, got a "
                    f"{type(config).__name__}")


def _sites(params: Params, config: DecoderConfig, lora: LoraConfig
           ) -> list[tuple[str, str, str, tuple[int, ...], int]]:
  """(layer, block, kernel, kernel shape, input axes) of every adapter."""
  _check(config)
  out = []
  for i in range(config.num_hidden_layers):
    layer = f"layers_{i}"
    for name in lora.targets:
      block, n_in, _ = KERNELS[name]
      out.append((layer, block, name, tuple(params[layer][block][name].shape),
                  n_in))
  return out


def init_adapters(params: Params, config: DecoderConfig, lora: LoraConfig,
                  seed: int) -> Params:
  """Fresh adapters: `{layers_i: {attention|mlp: {kernel: {a, b}}}}`,
  float32 numpy leaves (drawn on the host from `seed`); `b` is zero, so
  `merge` returns the base."""
  rng = np.random.default_rng(seed)
  tree: dict[str, Any] = {}
  for layer, block, name, shape, n_in in _sites(params, config, lora):
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    bound = 1.0 / math.sqrt(fan_in)
    a = rng.uniform(-bound, bound, (fan_in, lora.rank)).astype(np.float32)
    tree.setdefault(layer, {}).setdefault(block, {})[name] = {
        "a": a, "b": np.zeros((lora.rank, fan_out), np.float32)}
  return tree


def merge(params: Params, adapters: Params, config: DecoderConfig,
          lora: LoraConfig) -> Params:
  """The base parameters with every adapter's update added (jit-friendly;
  each kernel keeps its dtype). Differentiable in `adapters`."""
  out = dict(params)
  for layer, block, name, shape, _ in _sites(params, config, lora):
    pair = adapters[layer][block][name]
    w = params[layer][block][name]
    delta = (pair["a"] @ pair["b"]).reshape(shape) * lora.scale
    out[layer] = dict(out[layer])
    out[layer][block] = dict(out[layer][block])
    out[layer][block][name] = (w + delta).astype(w.dtype)
  return out


def to_peft(adapters: Params, config: DecoderConfig, lora: LoraConfig
            ) -> dict[str, np.ndarray]:
  """The adapters as PEFT's state dict (`base_model.model.<module>.lora_A
  .weight` `[rank, in]`, `lora_B.weight` `[out, rank]`), float32."""
  _check(config)
  state = {}
  for i in range(config.num_hidden_layers):
    for name in lora.targets:
      block = KERNELS[name][0]
      path = f"layers_{i}/{block}/{name}"
      hf, _ = hf_io.hf_key(path, config)
      module = "base_model.model." + hf[:-len(".weight")]
      pair = adapters[f"layers_{i}"][block][name]
      for part, array in (("lora_A", pair["a"]), ("lora_B", pair["b"])):
        state[f"{module}.{part}.weight"] = np.ascontiguousarray(
            np.asarray(jax.device_get(array), np.float32).T)
  return state


def save_peft(adapters: Params, config: DecoderConfig, lora: LoraConfig,
              path: str | os.PathLike[str], *,
              base_model: str | None = None) -> None:
  """Writes a PEFT LoRA adapter directory: `adapter_model.safetensors`, then
  `adapter_config.json` (each whole or absent).

  Args:
    adapters: From `init_adapters` (trained).
    config: The base model's config.
    lora: The adapters' rank, alpha and targets.
    path: The directory (created).
    base_model: `base_model_name_or_path` to record (a directory or hub
      name), or None.
  """
  state = to_peft(adapters, config, lora)
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
      "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False,
      "target_modules": sorted(KERNELS[t][2] for t in lora.targets),
      "base_model_name_or_path": base_model, "inference_mode": True,
  }
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  with fileio.atomic_file(os.path.join(path, "adapter_model.safetensors")
                          ) as tmp:
    safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"})
  fileio.atomic_write(os.path.join(path, "adapter_config.json"),
                      json.dumps(adapter_config, indent=2, sort_keys=True))


def adapter_count(config: DecoderConfig, lora: LoraConfig) -> int:
  """Trainable numbers of the adapters (what an optimizer would hold)."""
  shapes = decoder.param_shapes(config)
  total = 0
  for layer, block, name, shape, n_in in _sites(shapes, config, lora):
    del layer, block, name
    total += lora.rank * (math.prod(shape[:n_in]) + math.prod(shape[n_in:]))
  return total
