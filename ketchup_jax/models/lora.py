"""LoRA adapters for decoder-only (Llama / Qwen2 / Qwen3) and T5 models:
rank-r updates of the attention and MLP kernels, and PEFT adapter
directories out.

An adapter of a kernel `W` (our layout, e.g. q `[embed, heads, kv]`) is a
pair `a [in, rank]`, `b [rank, out]`, `in` / `out` the kernel's input and
output axes flattened; the adapted kernel is

    W + (alpha / rank) * (a @ b).reshape(W.shape)

(`merge`). The kernels are found by walking the parameter tree: `KERNELS`
under an attention block (a decoder's `attention`, a T5's `self_attention`
and `cross_attention`) or an `mlp` block. `a` starts uniform in
`±1/sqrt(in)` and `b` at zero, as PEFT's default, so a fresh adapter leaves
the model unchanged.

Training (`LoraStudent`, `config.student.lora`; `train.loop.train_stage`):
the trained parameters and the optimizer state are the adapters; the frozen
base (float32 or bfloat16) is a constant of the step, and a step
differentiates `loss(merge(base, adapters))` with respect to the adapters
only. Merge-then-apply is the choice: the model code is unchanged (sampling,
scoring, chunked heads and remat see ordinary parameters), at the cost of
(1) the merged parameters in `LoraStudent.dtype` alive through the step's
forward and backward, a copy of the targeted kernels (of the whole base when
it is stored in bfloat16, every leaf being cast), and (2) the backward pass
forming each targeted kernel's full-size gradient dW' on its way to
`da = s dW' b^T`, `db = s a^T dW'` (never a whole tree of them, and no
gradient at all of the embeddings, norms or untargeted kernels). An inline
adapter (`y = x W + s (x a) b` inside the layers) would avoid both and is not
built; `python -m ketchup_jax.memory` prints the state bytes either way.

`save_peft` writes `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(<the HF base>, dir)` loads: PEFT's `lora_A`
is `a.T` `[rank, in]` and `lora_B` is `b.T` `[out, rank]`, with the in / out
axes in HF's order (the same flattening `hf_io`'s layouts use).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from ketchup_jax import fileio
from ketchup_jax.models import family
from ketchup_jax.models import hf_io

Params = Any
# Our kernel name -> (input axes of the kernel). The kernels are under an
# attention block (decoder `attention`; T5 `self_attention` and
# `cross_attention`) or an `mlp` block.
KERNELS = {"q": 1, "k": 1, "v": 1, "o": 2, "wi": 1, "wi_0": 1, "wi_1": 1,
           "wo": 1}
_BLOCKS = ("attention", "self_attention", "cross_attention", "mlp")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters, and their rank and scale.

  Attributes:
    rank: r, the inner width of every adapter.
    alpha: The update is scaled by `alpha / rank` (PEFT's `lora_alpha`).
    targets: Kernel names from `KERNELS`: every one of them the model has
      gets adapters (all by default: a decoder's q k v o wi_0 wi_1 wo, a
      T5's q k v o (self and cross attention) and wi | wi_0 wi_1, wo).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = tuple(KERNELS)

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(
        self.rank, int) or self.rank < 1:
      raise ValueError(f"rank must be a positive int, got {self.rank!r}")
    if isinstance(self.alpha, bool) or not isinstance(
        self.alpha, (int, float)) or not self.alpha > 0:
      raise ValueError(f"alpha must be a number > 0, got {self.alpha!r}")
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(
        self.targets)
    bad = [t for t in targets if t not in KERNELS]
    if bad or not targets or len(set(targets)) != len(targets):
      raise ValueError(f"targets must be distinct names from {list(KERNELS)},"
                       f" at least one, got {list(targets)}")
    object.__setattr__(self, "targets", targets)
    object.__setattr__(self, "alpha", float(self.alpha))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


BASE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraStudent:
  """A student trained through adapters on a frozen base (hashable: static
  in jit).

  Attributes:
    lora: The adapters' rank, alpha and targets.
    base_dtype: Storage dtype of the frozen base, "float32" or "bfloat16".
    dtype: The dtype the base is applied in, adapters merged (the student's
      `param_dtype`).
  """
  lora: LoraConfig
  base_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("base_dtype", "dtype"):
      if getattr(self, name) not in BASE_DTYPES:
        raise ValueError(f"{name} must be one of {BASE_DTYPES}, got "
                         f"{getattr(self, name)!r}")

  @classmethod
  def from_config(cls, cfg: Any, param_dtype: str = "float32"
                  ) -> LoraStudent | None:
    """From `config.student.lora` (None when absent or rank 0).

    Raises:
      ValueError: naming the bad field as `student.lora.<field>`.
    """
    if cfg is None or cfg.get("rank", 0) == 0:
      return None
    try:
      return cls(lora=LoraConfig(rank=cfg.get("rank"),
                                 alpha=cfg.get("alpha", 16.0),
                                 targets=tuple(cfg.get("targets",
                                                       tuple(KERNELS)))),
                 base_dtype=cfg.get("base_dtype", "float32"),
                 dtype=str(param_dtype))
    except ValueError as e:
      raise ValueError(f"student.lora.{e} (student.lora.rank 0 = no "
                       f"LoRA)") from None

  def frozen(self, params: Params) -> Params:
    """The base as stored: every leaf in `base_dtype` (a leaf already in it
    is kept, not copied)."""
    dtype = jnp.dtype(self.base_dtype)
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype),
                        params)

  def apply(self, adapters: Params, base: Params, config: Any) -> Params:
    """The parameters the model runs with: `merge` in `dtype`."""
    return merge(base, adapters, config, self.lora, dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class _Site:
  path: tuple[str, ...]     # e.g. ("layers_0", "attention", "q")
  shape: tuple[int, ...]    # the kernel's, e.g. [embed, heads, kv]
  n_in: int                 # its leading input axes

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[:self.n_in])

  @property
  def fan_out(self) -> int:
    return math.prod(self.shape[self.n_in:])


def _flat(tree: Params, prefix: tuple[str, ...] = ()
          ) -> list[tuple[tuple[str, ...], Any]]:
  if not isinstance(tree, dict):
    return [(prefix, tree)]
  return [kv for key in sorted(tree) for kv in _flat(tree[key],
                                                      prefix + (key,))]


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _sites(params: Params, config: Any, lora: LoraConfig) -> list[_Site]:
  """Every adapted kernel of `params` (a decoder-only or T5 tree), in path
  order; refuses targets the model does not have."""
  out, seen = [], set()
  for path, leaf in _flat(params):
    if len(path) >= 2 and path[-2] in _BLOCKS and path[-1] in lora.targets:
      out.append(_Site(path, tuple(leaf.shape), KERNELS[path[-1]]))
      seen.add(path[-1])
  missing = [t for t in lora.targets if t not in seen]
  # A default target list names kernels of both families; an explicit
  # one must name kernels this model has.
  if missing and lora.targets != tuple(KERNELS):
    have = sorted({p[-1] for p, _ in _flat(params) if len(p) >= 2
                   and p[-2] in _BLOCKS and p[-1] in KERNELS})
    raise ValueError(f"lora targets {missing} are not kernels of this "
                     f"{type(config).__name__} model; it has {have}")
  if not out:
    raise ValueError(f"no kernel of this {type(config).__name__} model is "
                     f"a lora target {list(lora.targets)}")
  return out


def _nest(pairs: list[tuple[tuple[str, ...], Any]]) -> Params:
  tree: dict[str, Any] = {}
  for path, value in pairs:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def init_adapters(params: Params, config: Any, lora: LoraConfig,
                  seed: int) -> Params:
  """Fresh adapters: the kernel's path, then `{a [in, rank], b [rank, out]}`
  (e.g. `{layers_i: {attention|mlp: {kernel: {a, b}}}}`), float32 numpy
  leaves drawn on the host from `seed`; `b` is zero, so `merge` returns the
  base."""
  rng = np.random.default_rng(seed)
  pairs = []
  for site in _sites(params, config, lora):
    bound = 1.0 / math.sqrt(site.fan_in)
    a = rng.uniform(-bound, bound, (site.fan_in, lora.rank)).astype(
        np.float32)
    pairs.append((site.path, {
        "a": a, "b": np.zeros((lora.rank, site.fan_out), np.float32)}))
  return _nest(pairs)


def merge(params: Params, adapters: Params, config: Any, lora: LoraConfig,
          *, dtype: Any = None) -> Params:
  """The base parameters with every adapter's update added (jit-friendly).

  Differentiable in `adapters`. With `dtype` every leaf is cast to it first
  (a bfloat16 base applied in float32); else each kernel keeps its dtype.
  """
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  pairs = dict(_flat(params))
  for site in _sites(params, config, lora):
    pair = _get(adapters, site.path)
    w = pairs[site.path]
    # [in, rank] @ [rank, out] -> the kernel's shape
    delta = (pair["a"] @ pair["b"]).reshape(site.shape) * lora.scale
    pairs[site.path] = (w + delta).astype(w.dtype)
  return _nest(list(pairs.items()))


def _module(site: _Site, config: Any) -> str:
  """The HF module of a kernel, e.g. `model.layers.0.self_attn.q_proj`."""
  found = hf_io.hf_key("/".join(site.path), config)
  if found is None:
    raise ValueError(f"no HF name for {'/'.join(site.path)}")
  return found[0][:-len(".weight")]


def to_peft(adapters: Params, config: Any, lora: LoraConfig
            ) -> dict[str, np.ndarray]:
  """The adapters as PEFT's state dict (`base_model.model.<module>.lora_A
  .weight` `[rank, in]`, `lora_B.weight` `[out, rank]`), float32."""
  state = {}
  for site in _sites(family.param_shapes(config), config, lora):
    module = "base_model.model." + _module(site, config)
    pair = _get(adapters, site.path)
    for part, array in (("lora_A", pair["a"]), ("lora_B", pair["b"])):
      state[f"{module}.{part}.weight"] = np.ascontiguousarray(
          np.asarray(jax.device_get(array), np.float32).T)
  return state


def save_peft(adapters: Params, config: Any, lora: LoraConfig,
              path: str | os.PathLike[str], *,
              base_model: str | None = None) -> None:
  """Writes a PEFT LoRA adapter directory: `adapter_model.safetensors`, then
  `adapter_config.json` (each whole or absent).

  Args:
    adapters: From `init_adapters` (trained).
    config: The base model's config (decoder-only or T5).
    lora: The adapters' rank, alpha and targets.
    path: The directory (created).
    base_model: `base_model_name_or_path` to record (a directory or hub
      name), or None.
  """
  state = to_peft(adapters, config, lora)
  sites = _sites(family.param_shapes(config), config, lora)
  adapter_config = {
      "peft_type": "LORA",
      "task_type": ("SEQ_2_SEQ_LM" if family.is_encoder_decoder(config) else
                    "CAUSAL_LM"),
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      # PEFT matches a module whose name is, or ends in ".<name>".
      "target_modules": sorted({_module(s, config).rsplit(".", 1)[-1]
                                for s in sites}),
      "base_model_name_or_path": base_model, "inference_mode": True,
  }
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  with fileio.atomic_file(os.path.join(path, "adapter_model.safetensors")
                          ) as tmp:
    safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"})
  fileio.atomic_write(os.path.join(path, "adapter_config.json"),
                      json.dumps(adapter_config, indent=2, sort_keys=True))


def adapter_count(config: Any, lora: LoraConfig) -> int:
  """Trainable numbers of the adapters (what an optimizer would hold)."""
  return sum(lora.rank * (s.fan_in + s.fan_out)
             for s in _sites(family.param_shapes(config), config, lora))


def target_count(config: Any, lora: LoraConfig) -> int:
  """Numbers in the base kernels the adapters update (what `merge` writes
  a new copy of)."""
  return sum(s.fan_in * s.fan_out
             for s in _sites(family.param_shapes(config), config, lora))
