"""Hugging Face T5 checkpoints <-> our parameter tree, through one rules table.

`RULES` lists, once, how each HF tensor name maps to a path in our tree and
how its layout changes (transpose / reshape). Import matches HF keys against
the HF side, export matches our paths against our side, so both directions use
the same table. Every tensor is shape-checked against the model's expected
parameter shapes; unmatched or missing names fail with one error naming them.

Supported inputs: a directory with `config.json` and `model.safetensors`, or
sharded `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`,
or `pytorch_model.bin` (and its sharded index) when torch is installed; or a
hub name, fetched with `huggingface_hub.snapshot_download` when online.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ketchup_jax import fileio
from ketchup_jax.models import t5
from ketchup_jax.models.config import T5Config

Params = Any


@dataclasses.dataclass(frozen=True)
class Rule:
  """One mapping `HF key <-> our path`, `{i}` standing for a layer index.

  Attributes:
    hf: HF state-dict key template, e.g. `encoder.block.{i}.layer.1...`.
    ours: Our `/`-joined parameter path template, or None for HF tensors that
      are dropped on import (aliases of the shared embedding, unused biases).
    layout: How the tensor is rearranged: `copy`, `transpose` (`[out, in]` ->
      `[in, out]`), `qkv` (`[heads*kv, embed]` -> `[embed, heads, kv]`) or
      `out` (`[embed, heads*kv]` -> `[heads, kv, embed]`).
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


def _to_ours(x: np.ndarray, layout: str, config: T5Config) -> np.ndarray:
  h, d, e = config.num_heads, config.d_kv, config.d_model
  if layout == "copy":
    return x
  if layout == "transpose":
    return x.T
  if layout == "qkv":  # [heads*kv, embed] -> [embed, heads, kv]
    return x.T.reshape(e, h, d) if x.shape == (h * d, e) else x
  if layout == "out":  # [embed, heads*kv] -> [heads, kv, embed]
    return x.T.reshape(h, d, e) if x.shape == (e, h * d) else x
  raise ValueError(f"unknown layout {layout!r}")


def _to_hf(x: np.ndarray, layout: str, config: T5Config) -> np.ndarray:
  h, d, e = config.num_heads, config.d_kv, config.d_model
  if layout == "copy":
    return x
  if layout == "transpose":
    return x.T
  if layout == "qkv":
    return x.reshape(e, h * d).T
  if layout == "out":
    return x.reshape(h * d, e).T
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
  """Decides `tie_word_embeddings` from the tensors, as transformers 5 does.

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


def hf_to_params(
    state: Mapping[str, np.ndarray],
    config: T5Config,
) -> Params:
  """Converts an HF T5 state dict to our parameter tree (numpy leaves).

  Args:
    state: HF key -> array (torch layout), e.g. from `read_state_dict`.
    config: Model config; `tie_word_embeddings` must already agree with the
      tensors (see `resolve_tied`).

  Returns:
    The parameter tree, leaves cast to `config.param_dtype` (numpy arrays).

  Raises:
    ValueError: naming every unexpected HF key, every missing parameter and
      every shape mismatch.
  """
  expected = _flatten(t5.param_shapes(config))
  params: dict[str, np.ndarray] = {}
  unexpected, bad_shapes = [], []
  for key, value in state.items():
    if (config.tie_word_embeddings and key == "lm_head.weight" and
        np.array_equal(value, state.get("shared.weight"))):
      continue  # A saved copy of the tied embedding.
    for rule in RULES:
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
    value = _to_ours(np.asarray(value), rule.layout, config)
    want = expected[path].shape
    if value.shape != want:
      bad_shapes.append(f"{key}: got {value.shape} after layout"
                        f" {rule.layout!r}, expected {want} for {path}")
      continue
    params[path] = value.astype(config.param_dtype)
  missing = sorted(set(expected) - set(params))
  problems = []
  if unexpected:
    problems.append(f"unexpected HF keys {sorted(unexpected)}")
  if missing:
    problems.append(f"missing parameters {missing}")
  if bad_shapes:
    problems.append("shape mismatches: " + "; ".join(bad_shapes))
  if problems:
    raise ValueError(
        "HF checkpoint does not match the T5 config (d_model="
        f"{config.d_model}, layers={config.num_layers}/"
        f"{config.num_decoder_layers}, gated={config.is_gated_act}, "
        f"tied={config.tie_word_embeddings}): " + "; ".join(problems))
  return _unflatten(params)


def params_to_hf(params: Params, config: T5Config) -> dict[str, np.ndarray]:
  """Converts our parameter tree to an HF T5 state dict (float32, torch layout).

  Raises:
    ValueError: if a parameter path matches no rule.
  """
  out, unknown = {}, []
  for path, value in _flatten(params).items():
    for rule in RULES:
      key = rule.match_ours(path)
      if key is not False:
        break
    else:
      unknown.append(path)
      continue
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    out[key] = np.ascontiguousarray(_to_hf(array, rule.layout, config))
  if unknown:
    raise ValueError(f"parameters with no HF name: {sorted(unknown)}")
  return out


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------

_SAFE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": jnp.bfloat16, "I64": np.int64, "I32": np.int32,
}


_SAFE_EXPECTED = ("expected a safetensors file: an 8-byte little-endian "
                  "header length, a JSON header, then the tensor bytes")


def _safetensors_header(path: str) -> tuple[int, dict[str, Any]]:
  """(header length, tensor entries) of a `.safetensors` file, checked.

  Reads only the header: every tensor's dtype, shape and byte range must be
  consistent and inside the file.

  Raises:
    ValueError: one line naming the file, what is wrong and what was
      expected (a truncated file: "tensor X needs bytes up to N, the file
      has M").
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    if size < 8:
      raise ValueError(f"{path}: the file has {size} bytes; {_SAFE_EXPECTED}")
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
      raise ValueError(f"{path}: truncated or not safetensors: the header "
                       f"length says {header_len} bytes of JSON, the file has "
                       f"{size - 8} after it; {_SAFE_EXPECTED}")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: the header is not valid JSON ({e}); "
                     f"{_SAFE_EXPECTED}") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, "
                     f"expected an object of tensor entries")
  header.pop("__metadata__", None)
  data_size = size - 8 - header_len
  past_end = []  # (start, key, end, what) of tensors beyond the file's end
  for key, info in header.items():
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
      shape = [int(n) for n in info["shape"]]
      start, end = (int(n) for n in info["data_offsets"])
    except KeyError:
      raise ValueError(
          f"{path}: tensor {key!r} has dtype {info.get('dtype')!r} or lacks "
          f"dtype/shape/data_offsets; expected dtype one of "
          f"{sorted(_SAFETENSORS_DTYPES)}") from None
    except (TypeError, ValueError, AttributeError):
      raise ValueError(f"{path}: tensor {key!r} has a malformed entry "
                       f"{info!r}; expected dtype, shape (a list of ints) and "
                       f"data_offsets [start, end]") from None
    need = int(np.prod(shape)) * dtype.itemsize
    if end - start != need or start < 0:
      raise ValueError(
          f"{path}: tensor {key!r} ({info['dtype']} {shape}) needs {need} "
          f"bytes, its data_offsets [{start}, {end}] span {end - start}")
    if end > data_size:
      past_end.append((start, key, end, f"{info['dtype']} {shape}"))
  if past_end:
    _, key, end, what = min(past_end)
    whole = 8 + header_len + max(e for _, _, e, _ in past_end)
    raise ValueError(
        f"{path}: truncated: tensor {key!r} ({what}) needs bytes up to {end} "
        f"of the data, the file has {data_size} bytes of data ({size} bytes "
        f"in all, the header expects at least {whole})")
  return header_len, header


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file into float32 numpy arrays, on the host.

  Parses the (8-byte length, JSON header, raw little-endian data) layout
  directly so that bfloat16 tensors read without torch and without a trip
  through accelerator memory.
  """
  header_len, header = _safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for key, info in header.items():
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end],
                          dtype=_SAFETENSORS_DTYPES[info["dtype"]])
    out[key] = array.reshape(info["shape"]).astype(np.float32)
  return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch pickle; reading it needs torch installed, or"
        " convert the checkpoint to model.safetensors") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def _read_json_file(path: str, expected: str) -> Any:
  """The JSON in `path`; a ValueError naming the file if it is not JSON."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}"
                     ) from None


def _weight_map(directory: str, index_name: str) -> dict[str, str]:
  """The index's `weight_map` (tensor -> shard file), checked."""
  path = os.path.join(directory, index_name)
  index = _read_json_file(path, 'an object with "weight_map": {tensor name: '
                          'shard file}')
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{path}: no \"weight_map\" of tensor name -> shard "
                     f"file; expected {{\"weight_map\": {{\"shared.weight\": "
                     f"\"model-00001-of-00002.safetensors\", ...}}}}")
  missing = sorted({v for v in weight_map.values()
                    if not os.path.isfile(os.path.join(directory, v))})
  if missing:
    raise ValueError(f"{path}: lists shard files that are not in "
                     f"{directory}: {missing}")
  return weight_map


def _read_index(directory: str, index_name: str,
                reader: Callable[[str], dict[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
  weight_map = _weight_map(directory, index_name)
  out = {}
  for shard in sorted(set(weight_map.values())):
    out.update(reader(os.path.join(directory, shard)))
  return out


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """Reads all tensors of an HF checkpoint directory as float32 numpy arrays.

  Looks for, in order: `model.safetensors`, `model.safetensors.index.json`,
  `pytorch_model.bin`, `pytorch_model.bin.index.json`.

  Raises:
    FileNotFoundError: if the directory holds none of them.
  """
  if os.path.exists(os.path.join(directory, _SAFE)):
    return _read_safetensors(os.path.join(directory, _SAFE))
  if os.path.exists(os.path.join(directory, _SAFE_INDEX)):
    return _read_index(directory, _SAFE_INDEX, _read_safetensors)
  if os.path.exists(os.path.join(directory, _BIN)):
    return _read_torch_bin(os.path.join(directory, _BIN))
  if os.path.exists(os.path.join(directory, _BIN_INDEX)):
    return _read_index(directory, _BIN_INDEX, _read_torch_bin)
  raise FileNotFoundError(
      f"no weights in {directory!r}: expected one of {_SAFE}, {_SAFE_INDEX},"
      f" {_BIN}, {_BIN_INDEX}")


def check_checkpoint(directory: str) -> None:
  """Checks an HF checkpoint directory without reading its tensors.

  `config.json` must be a valid T5 config; safetensors weights (one file, or
  an index and its shards) must have sound headers, hold every tensor the
  index lists and be as long as their headers say. PyTorch `.bin` files are
  only checked to exist.

  Raises:
    ValueError: one line naming the file, what is wrong and what was
      expected.
    FileNotFoundError: no config.json or no weights.
  """
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in {directory!r}")
  config = _read_json_file(config_path, "the model's HF config.json")
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: a JSON {type(config).__name__}, "
                     f"expected an object of HF config fields")
  try:
    T5Config.from_hf_dict(config)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{config_path}: not a usable T5 config ({e})") from None
  if os.path.exists(os.path.join(directory, _SAFE)):
    _safetensors_header(os.path.join(directory, _SAFE))
  elif os.path.exists(os.path.join(directory, _SAFE_INDEX)):
    weight_map = _weight_map(directory, _SAFE_INDEX)
    for shard in sorted(set(weight_map.values())):
      path = os.path.join(directory, shard)
      _, header = _safetensors_header(path)
      absent = sorted(k for k, v in weight_map.items()
                      if v == shard and k not in header)
      if absent:
        raise ValueError(
            f"{path}: lacks tensors that {_SAFE_INDEX} places in it: "
            f"{absent[:5]}{' ...' if len(absent) > 5 else ''}")
  elif not any(os.path.exists(os.path.join(directory, name))
               for name in (_BIN, _BIN_INDEX)):
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected one of {_SAFE}, {_SAFE_INDEX},"
        f" {_BIN}, {_BIN_INDEX}")


def could_be_hub_name(path: str) -> bool:
  """False for what can only be a local path: an existing file, `./x`,
  `a/b/c`; True for a directory-less `owner/name` or `name`."""
  return not (os.path.exists(path) or path.count("/") > 1 or
              path.startswith((".", "/", "~")))


def resolve_path(path_or_name: str | os.PathLike[str], *,
                 revision: str | None = None,
                 local_files_only: bool = False) -> str:
  """A local checkpoint directory for a directory or an HF hub name.

  Args:
    path_or_name: A directory, or a hub repo id such as `google/flan-t5-small`.
    revision: Hub revision (branch, tag or commit).
    local_files_only: Use only the local hub cache, never the network.

  Returns:
    The directory.

  Raises:
    FileNotFoundError: if it is neither an existing directory nor a hub repo
      that could be fetched (offline, unknown name, gated repo).
  """
  path = os.fspath(path_or_name)
  if os.path.isdir(path):
    return path
  if not could_be_hub_name(path):
    raise FileNotFoundError(f"{path!r} is not a checkpoint directory")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(
        path, revision=revision, local_files_only=local_files_only,
        allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"])
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"{path!r} is not a local directory and could not be fetched from the"
        f" Hugging Face hub ({type(e).__name__}: {e}). Offline, pass the path"
        " of a directory holding config.json and model.safetensors.") from e


def load_checkpoint(path_or_name: str | os.PathLike[str], *,
                    revision: str | None = None,
                    local_files_only: bool = False,
                    **config_overrides: Any) -> tuple[T5Config, Params]:
  """Reads config and parameters (numpy leaves) of an HF T5 checkpoint.

  Args:
    path_or_name: Directory or hub name (see `resolve_path`).
    revision: Hub revision.
    local_files_only: Do not use the network.
    **config_overrides: T5Config fields to override (`dtype`, `param_dtype`).

  Returns:
    `(config, params)`.
  """
  directory = resolve_path(path_or_name, revision=revision,
                           local_files_only=local_files_only)
  check_checkpoint(directory)
  config = T5Config.from_json_file(os.path.join(directory, "config.json"),
                                   **config_overrides)
  state = read_state_dict(directory)
  config = resolve_tied(state, config)
  return config, hf_to_params(state, config)


def save_checkpoint(params: Params, config: T5Config,
                    path: str | os.PathLike[str]) -> None:
  """Writes `config.json`, `generation_config.json` and `model.safetensors`.

  The directory loads with
  `transformers.T5ForConditionalGeneration.from_pretrained(path)`. With
  several JAX processes, call it on every process: parameters sharded across
  hosts are all-gathered (a collective), and process 0 writes the files.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  host_params = jax.tree.map(to_host, params)
  if jax.process_index() != 0:
    return
  state = params_to_hf(host_params, config)
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
