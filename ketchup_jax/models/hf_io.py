"""Hugging Face checkpoints <-> our parameter trees, one rules table a family.

`RULES` (T5) and `DECODER_RULES` (Llama / Qwen2 / Qwen3) list, once, how each
HF tensor name maps to a path in our tree and how its layout changes
(transpose / reshape). Import matches HF keys against the HF side, export
matches our paths against our side, so both directions use the same table.
Every tensor is shape-checked against the model's expected parameter shapes;
unmatched or missing names fail with one error naming them.

`load_checkpoint` dispatches on `config.json`'s `model_type` (`SUPPORTED`);
the files themselves are read by `checkpoint_files`: `model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin`
(and its index) when torch is installed; or a hub name, fetched when online.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
import re
from typing import Any

from jax.experimental import multihost_utils
import jax
import numpy as np
import safetensors.numpy

from ketchup_jax import fileio
from ketchup_jax.models import decoder
from ketchup_jax.models import t5
from ketchup_jax.models.checkpoint_files import check_weights
from ketchup_jax.models.checkpoint_files import could_be_hub_name  # pylint: disable=unused-import
from ketchup_jax.models.checkpoint_files import read_state_dict
from ketchup_jax.models.checkpoint_files import resolve_path
from ketchup_jax.models.checkpoint_files import tensor_shapes
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.decoder_config import DecoderConfig
from ketchup_jax.models.decoder_config import MODEL_TYPES as DECODER_TYPES

Params = Any
Config = T5Config | DecoderConfig
T5_TYPES = ("t5", "mt5")
SUPPORTED = T5_TYPES + DECODER_TYPES  # HF `model_type`s `load_checkpoint` reads.
_SAFE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Rule:
  """One mapping `HF key <-> our path`, `{i}` standing for a layer index.

  Attributes:
    hf: HF state-dict key template, e.g. `encoder.block.{i}.layer.1...`.
    ours: Our `/`-joined parameter path template, or None for HF tensors that
      are dropped on import (aliases of the shared embedding, unused biases).
    layout: How the tensor is rearranged: `copy`, `transpose` (`[out, in]` ->
      `[in, out]`), `qkv` (`[heads*kv, embed]` -> `[embed, heads, kv]`),
      `out` (`[embed, heads*kv]` -> `[heads, kv, embed]`) or `heads`
      (`[heads*kv]` -> `[heads, kv]`, a q/k/v bias).
  """
  hf: str
  ours: str | None
  layout: str = "copy"

  @staticmethod
  def _regex(template: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in template.split("{i}")]
    return re.compile("^" + r"(\d+)".join(parts) + "$")

  def match_hf(self, key: str) -> str | None | bool:
    """Our path for HF `key`, None if dropped, False if no match."""
    m = self._regex(self.hf).match(key)
    if not m:
      return False
    if self.ours is None:
      return None
    return self.ours.replace("{i}", m.group(1)) if m.groups() else self.ours

  def match_ours(self, path: str) -> str | bool:
    """HF key for our `path`, False if no match."""
    if self.ours is None:
      return False
    m = self._regex(self.ours).match(path)
    if not m:
      return False
    return self.hf.replace("{i}", m.group(1)) if m.groups() else self.hf


_ATTN = ("q", "k", "v", "o")


def _attention_rules(hf_prefix: str, ours_prefix: str) -> list[Rule]:
  return [Rule(f"{hf_prefix}.{n}.weight", f"{ours_prefix}/{n}",
               "out" if n == "o" else "qkv") for n in _ATTN]


def _mlp_rules(hf_prefix: str, ours_prefix: str) -> list[Rule]:
  return [Rule(f"{hf_prefix}.DenseReluDense.{n}.weight", f"{ours_prefix}/{n}",
               "transpose") for n in ("wi", "wi_0", "wi_1", "wo")]


def _build_rules() -> tuple[Rule, ...]:
  enc, dec = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
  eo, do = "encoder/layers_{i}", "decoder/layers_{i}"
  rules = [
      Rule("shared.weight", "shared/embedding"),
      Rule("encoder.embed_tokens.weight", None),  # Alias of shared.
      Rule("decoder.embed_tokens.weight", None),  # Alias of shared.
      Rule("lm_head.weight", "lm_head/kernel", "transpose"),
      Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
           ".weight", "encoder/relpos_bias/embedding"),
      Rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias"
           ".weight", "decoder/relpos_bias/embedding"),
      # Present in some old checkpoints, never used by T5.
      Rule("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias"
           ".weight", None),
      Rule("encoder.final_layer_norm.weight", "encoder/final_norm/scale"),
      Rule("decoder.final_layer_norm.weight", "decoder/final_norm/scale"),
      Rule(f"{enc}.0.layer_norm.weight", f"{eo}/self_attention_norm/scale"),
      Rule(f"{enc}.1.layer_norm.weight", f"{eo}/mlp_norm/scale"),
      Rule(f"{dec}.0.layer_norm.weight", f"{do}/self_attention_norm/scale"),
      Rule(f"{dec}.1.layer_norm.weight", f"{do}/cross_attention_norm/scale"),
      Rule(f"{dec}.2.layer_norm.weight", f"{do}/mlp_norm/scale"),
  ]
  rules += _attention_rules(f"{enc}.0.SelfAttention", f"{eo}/self_attention")
  rules += _attention_rules(f"{dec}.0.SelfAttention", f"{do}/self_attention")
  rules += _attention_rules(f"{dec}.1.EncDecAttention",
                            f"{do}/cross_attention")
  rules += _mlp_rules(f"{enc}.1", f"{eo}/mlp")
  rules += _mlp_rules(f"{dec}.2", f"{do}/mlp")
  return tuple(rules)


RULES: tuple[Rule, ...] = _build_rules()


def _build_decoder_rules() -> tuple[Rule, ...]:
  hf, ours = "model.layers.{i}", "layers_{i}"
  rules = [
      Rule("model.embed_tokens.weight", "embed/embedding"),
      Rule("lm_head.weight", "lm_head/kernel", "transpose"),
      Rule("model.norm.weight", "final_norm/scale"),
      Rule(f"{hf}.input_layernorm.weight", f"{ours}/attention_norm/scale"),
      Rule(f"{hf}.post_attention_layernorm.weight", f"{ours}/mlp_norm/scale"),
      Rule(f"{hf}.self_attn.o_proj.weight", f"{ours}/attention/o", "out"),
      Rule(f"{hf}.self_attn.o_proj.bias", f"{ours}/attention/o_bias"),
      Rule(f"{hf}.self_attn.rotary_emb.inv_freq", None),  # Old checkpoints.
  ]
  for n in ("q", "k", "v"):
    rules += [
        Rule(f"{hf}.self_attn.{n}_proj.weight", f"{ours}/attention/{n}", "qkv"),
        Rule(f"{hf}.self_attn.{n}_proj.bias", f"{ours}/attention/{n}_bias",
             "heads")]
  for n in ("q", "k"):
    rules.append(Rule(f"{hf}.self_attn.{n}_norm.weight",
                      f"{ours}/attention/{n}_norm/scale"))
  for name, path in (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")):
    rules.append(Rule(f"{hf}.mlp.{name}_proj.weight", f"{ours}/mlp/{path}",
                      "transpose"))
  return tuple(rules)


DECODER_RULES: tuple[Rule, ...] = _build_decoder_rules()


def _rules(config: Config) -> tuple[Rule, ...]:
  return DECODER_RULES if isinstance(config, DecoderConfig) else RULES


def _param_shapes(config: Config) -> Params:
  if isinstance(config, DecoderConfig):
    return decoder.param_shapes(config)
  return t5.param_shapes(config)


def _reshapes(shape: tuple[int, ...], layout: str,
              want: tuple[int, ...]) -> bool:
  """Whether a `qkv` / `out` / `heads` tensor of `shape` becomes `want`."""
  if layout == "qkv":  # [heads*kv, embed] -> [embed, heads, kv]
    return len(want) == 3 and shape == (want[1] * want[2], want[0])
  if layout == "out":  # [embed, heads*kv] -> [heads, kv, embed]
    return len(want) == 3 and shape == (want[2], want[0] * want[1])
  if layout == "heads":  # [heads*kv] -> [heads, kv]
    return len(shape) == 1 and len(want) == 2 and shape[0] == want[0] * want[1]
  raise ValueError(f"unknown layout {layout!r}")


def _ours_shape(shape: tuple[int, ...], layout: str,
                want: tuple[int, ...]) -> tuple[int, ...]:
  """The shape `_to_ours` gives a tensor of `shape`."""
  if layout == "copy":
    return shape
  if layout == "transpose":
    return shape[::-1]
  return want if _reshapes(shape, layout, want) else shape


def _to_ours(x: np.ndarray, layout: str, want: tuple[int, ...]) -> np.ndarray:
  """`x` in our layout, or unchanged if its shape cannot be (the shape check
  then names it)."""
  if layout == "copy":
    return x
  if layout == "transpose":
    return x.T
  if layout in ("qkv", "out"):
    return x.T.reshape(want) if _reshapes(x.shape, layout, want) else x
  return x.reshape(want) if _reshapes(x.shape, layout, want) else x


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "copy":
    return x
  if layout == "transpose":
    return x.T
  if layout == "qkv":  # [embed, heads, kv] -> [heads*kv, embed]
    return x.reshape(x.shape[0], -1).T
  if layout == "out":  # [heads, kv, embed] -> [embed, heads*kv]
    return x.reshape(-1, x.shape[-1]).T
  if layout == "heads":
    return x.reshape(-1)
  raise ValueError(f"unknown layout {layout!r}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten(v, path))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def resolve_tied(state: Mapping[str, np.ndarray], config: T5Config) -> T5Config:
  """Decides T5's `tie_word_embeddings` from the tensors, as transformers 5
  does.

  transformers 5 writes `tie_word_embeddings: true` into every T5 config and
  ties `lm_head` to `shared` unless the checkpoint holds an `lm_head.weight`
  that differs from `shared.weight`. We follow the tensors: untied iff an
  `lm_head.weight` is present and differs from `shared.weight`.
  """
  head = state.get("lm_head.weight")
  shared = state.get("shared.weight")
  tied = head is None or (shared is not None and head.shape == shared.shape
                          and np.array_equal(head, shared))
  return config.replace(tie_word_embeddings=bool(tied))


def _describe(config: Config) -> str:
  if isinstance(config, DecoderConfig):
    return (f"the {config.model_type} config (hidden_size="
            f"{config.hidden_size}, layers={config.num_hidden_layers}, "
            f"heads={config.num_attention_heads}/{config.num_key_value_heads}"
            f", qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}, "
            f"tied={config.tie_word_embeddings})")
  return (f"the T5 config (d_model={config.d_model}, layers="
          f"{config.num_layers}/{config.num_decoder_layers}, gated="
          f"{config.is_gated_act}, tied={config.tie_word_embeddings})")


def hf_to_params(state: Mapping[str, np.ndarray], config: Config) -> Params:
  """Converts an HF state dict to our parameter tree (numpy leaves).

  Args:
    state: HF key -> array (torch layout), e.g. from `read_state_dict`.
    config: Model config; T5's `tie_word_embeddings` must already agree with
      the tensors (see `resolve_tied`). A tied decoder ignores an
      `lm_head.weight` (HF ties it to the embedding).

  Returns:
    The parameter tree, leaves cast to `config.param_dtype` (numpy arrays).

  Raises:
    ValueError: naming every unexpected HF key, every missing parameter and
      every shape mismatch.
  """
  params, problems = _convert(state, config)
  if problems:
    raise ValueError(f"HF checkpoint does not match {_describe(config)}: "
                     + "; ".join(problems))
  return _unflatten(params)


def _convert(state: Mapping[str, Any], config: Config
             ) -> tuple[dict[str, Any], list[str]]:
  """Our flat params from `state` (arrays, or shapes: then the values are
  the shapes) and the problems found."""
  expected = _flatten(_param_shapes(config))
  is_decoder = isinstance(config, DecoderConfig)
  params: dict[str, Any] = {}
  unexpected, bad_shapes = [], []
  for key, value in state.items():
    if config.tie_word_embeddings and key == "lm_head.weight" and (
        is_decoder or np.array_equal(value, state.get("shared.weight"))):
      continue  # A saved copy of the tied embedding.
    for rule in _rules(config):
      path = rule.match_hf(key)
      if path is not False:
        break
    else:
      unexpected.append(key)
      continue
    if path is None:
      continue
    if path not in expected:
      unexpected.append(key)
      continue
    want = expected[path].shape
    if isinstance(value, tuple):  # A shape from a header.
      got = _ours_shape(value, rule.layout, want)
      converted = value
    else:
      converted = _to_ours(np.asarray(value), rule.layout, want)
      got = converted.shape
    if got != want:
      bad_shapes.append(f"{key}: got {got} after layout"
                        f" {rule.layout!r}, expected {want} for {path}")
      continue
    params[path] = (converted if isinstance(value, tuple) else
                    converted.astype(config.param_dtype))
  missing = sorted(set(expected) - set(params))
  problems = []
  if unexpected:
    problems.append(f"unexpected HF keys {_some(sorted(unexpected))}")
  if missing:
    problems.append(f"missing parameters {_some(missing)}")
  if bad_shapes:
    problems.append("shape mismatches: " + "; ".join(_some(bad_shapes)))
  return params, problems


def _some(names: list[str], shown: int = 4) -> list[str]:
  """The first `shown` names, then how many more: errors stay one line."""
  if len(names) <= shown:
    return names
  return names[:shown] + [f"... {len(names) - shown} more"]


def hf_key(path: str, config: Config) -> tuple[str, Rule] | None:
  """The HF state-dict key of our parameter `path` ("layers_0/attn/q") and
  the rule that names it, or None when no rule of the family matches."""
  for rule in _rules(config):
    key = rule.match_ours(path)
    if key is not False:
      return key, rule
  return None


def params_to_hf(params: Params, config: Config) -> dict[str, np.ndarray]:
  """Converts our parameter tree to an HF state dict (float32, torch layout).

  A tied model has no `lm_head` parameter, so no `lm_head.weight` is written.

  Raises:
    ValueError: if a parameter path matches no rule.
  """
  out, unknown = {}, []
  for path, value in _flatten(params).items():
    found = hf_key(path, config)
    if found is None:
      unknown.append(path)
      continue
    key, rule = found
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    out[key] = np.ascontiguousarray(_to_hf(array, rule.layout))
  if unknown:
    raise ValueError(f"parameters with no HF name: {sorted(unknown)}")
  return out


# ---------------------------------------------------------------------------
# Directories.
# ---------------------------------------------------------------------------


def _read_hf_config(directory: str) -> dict[str, Any]:
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in {directory!r}")
  config = fileio.read_json(config_path, "the model's HF config.json")
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: a JSON {type(config).__name__}, "
                     f"expected an object of HF config fields")
  return config


def config_from_dir(directory: str, *,
                    model_types: tuple[str, ...] = SUPPORTED,
                    **overrides: Any) -> Config:
  """The config of an HF directory, by its `model_type`.

  Args:
    directory: Holds `config.json` (and, for decoders, optionally
      `generation_config.json`, whose EOS ids are added).
    model_types: The `model_type`s accepted.
    **overrides: Config fields to set (`dtype`, `param_dtype`).

  Raises:
    ValueError: naming `config.json` and the unsupported type or field.
  """
  hf = _read_hf_config(directory)
  config_path = os.path.join(directory, "config.json")
  model_type = hf.get("model_type", "t5")
  if model_types == T5_TYPES or model_type in T5_TYPES:
    try:
      return T5Config.from_hf_dict(hf, **overrides)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"{config_path}: not a usable T5 config ({e})"
                       ) from None
  if model_type not in model_types:
    raise ValueError(f"{config_path}: model_type {model_type!r} is not "
                     f"supported; expected one of {list(model_types)}")
  generation_path = os.path.join(directory, "generation_config.json")
  generation = None
  if os.path.isfile(generation_path):
    generation = fileio.read_json(generation_path,
                                "an HF generation_config.json")
  try:
    return DecoderConfig.from_hf_dict(hf, generation, **overrides)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{config_path}: not a usable {model_type} config ({e})"
                     ) from None


def check_checkpoint(directory: str, *,
                     model_types: tuple[str, ...] = T5_TYPES) -> None:
  """Checks an HF checkpoint directory without reading its tensors.

  `config.json` must be a usable config of one of `model_types` (by default
  T5 only: what the training pipeline reads today; pass `SUPPORTED` for any
  family); the weights must pass `checkpoint_files.check_weights`; and a
  decoder's safetensors headers must name and shape every parameter.

  Raises:
    ValueError: one line naming the file, what is wrong and what was
      expected.
    FileNotFoundError: no config.json or no weights.
  """
  config = config_from_dir(directory, model_types=model_types)
  check_weights(directory)
  if isinstance(config, DecoderConfig):  # T5's tying needs the values.
    shapes = tensor_shapes(directory)
    if shapes:
      _, problems = _convert(shapes, config)
      if problems:
        raise ValueError(f"{directory}: the safetensors headers do not match "
                         f"{_describe(config)}: " + "; ".join(problems))


def load_checkpoint(path_or_name: str | os.PathLike[str], *,
                    revision: str | None = None,
                    local_files_only: bool = False,
                    **config_overrides: Any) -> tuple[Config, Params]:
  """Reads config and parameters (numpy leaves) of an HF checkpoint.

  Dispatches on `model_type`: `t5` / `mt5` give a `T5Config`, `llama` /
  `qwen2` / `qwen3` a `DecoderConfig`. A tied decoder's `lm_head.weight`, if
  the files hold one, is not read.

  Args:
    path_or_name: Directory or hub name (see `resolve_path`).
    revision: Hub revision.
    local_files_only: Do not use the network.
    **config_overrides: Config fields to override (`dtype`, `param_dtype`).

  Returns:
    `(config, params)`.

  Raises:
    ValueError: an unsupported `model_type` (naming it and `SUPPORTED`), or
      tensors that do not match the config.
  """
  directory = resolve_path(path_or_name, revision=revision,
                           local_files_only=local_files_only)
  config = config_from_dir(directory, **config_overrides)
  check_weights(directory)
  if isinstance(config, DecoderConfig):
    skip = ("lm_head.weight",) if config.tie_word_embeddings else ()
    return config, hf_to_params(read_state_dict(directory, skip), config)
  state = read_state_dict(directory)
  config = resolve_tied(state, config)
  return config, hf_to_params(state, config)


def save_checkpoint(params: Params, config: Config,
                    path: str | os.PathLike[str]) -> None:
  """Writes `config.json`, `generation_config.json` and `model.safetensors`.

  The directory loads with transformers'
  `T5ForConditionalGeneration` / `AutoModelForCausalLM.from_pretrained(path)`.
  With several JAX processes, call it on every process: parameters sharded
  across hosts are all-gathered (a collective), and process 0 writes the
  files.
  """

  def to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  host_params = jax.tree.map(to_host, params)
  if jax.process_index() != 0:
    return
  state = params_to_hf(host_params, config)
  if isinstance(config, DecoderConfig):
    generation = config.generation_dict()
  else:
    generation = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  # Each file whole or not at all (a full disk leaves no half file under its
  # name); the weights first, so a config is never newer than its weights.
  with fileio.atomic_file(os.path.join(path, _SAFE)) as tmp:
    safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"})
  for name, content in (("config.json", config.to_hf_dict()),
                        ("generation_config.json", generation)):
    fileio.atomic_write(os.path.join(path, name),
                        json.dumps(content, indent=2, sort_keys=True))
