"""HF checkpoint files: safetensors (one file or sharded with an index) and
PyTorch `.bin` read into float32 numpy arrays on the host, with checks that
name the file; local directories or hub names.
"""

from __future__ import annotations

from collections.abc import Collection
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ketchup_jax import fileio

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


def _read_safetensors(path: str, skip: Collection[str] = ()
                      ) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file into float32 numpy arrays, on the host.

  Parses the (8-byte length, JSON header, raw little-endian data) layout
  directly so that bfloat16 tensors read without torch and without a trip
  through accelerator memory.
  """
  header_len, header = _safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for key, info in header.items():
    if key in skip:
      continue
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end],
                          dtype=_SAFETENSORS_DTYPES[info["dtype"]])
    out[key] = array.reshape(info["shape"]).astype(np.float32)
  return out


def _read_torch_bin(path: str, skip: Collection[str] = ()
                    ) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch pickle; reading it needs torch installed, or"
        " convert the checkpoint to model.safetensors") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items() if k not in skip}


def _weight_map(directory: str, index_name: str) -> dict[str, str]:
  """The index's `weight_map` (tensor -> shard file), checked."""
  path = os.path.join(directory, index_name)
  index = fileio.read_json(path, 'an object with "weight_map": {tensor name: '
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
                reader: Callable[..., dict[str, np.ndarray]],
                skip: Collection[str]) -> dict[str, np.ndarray]:
  weight_map = _weight_map(directory, index_name)
  out = {}
  for shard in sorted(set(weight_map.values())):
    out.update(reader(os.path.join(directory, shard), skip))
  return out


def read_state_dict(directory: str, skip: Collection[str] = ()
                    ) -> dict[str, np.ndarray]:
  """Reads the tensors of an HF checkpoint directory as float32 numpy arrays.

  Tensors named in `skip` are not read (a tied `lm_head.weight`).

  Looks for, in order: `model.safetensors`, `model.safetensors.index.json`,
  `pytorch_model.bin`, `pytorch_model.bin.index.json`.

  Raises:
    FileNotFoundError: if the directory holds none of them.
  """
  if os.path.exists(os.path.join(directory, _SAFE)):
    return _read_safetensors(os.path.join(directory, _SAFE), skip)
  if os.path.exists(os.path.join(directory, _SAFE_INDEX)):
    return _read_index(directory, _SAFE_INDEX, _read_safetensors, skip)
  if os.path.exists(os.path.join(directory, _BIN)):
    return _read_torch_bin(os.path.join(directory, _BIN), skip)
  if os.path.exists(os.path.join(directory, _BIN_INDEX)):
    return _read_index(directory, _BIN_INDEX, _read_torch_bin, skip)
  raise FileNotFoundError(
      f"no weights in {directory!r}: expected one of {_SAFE}, {_SAFE_INDEX},"
      f" {_BIN}, {_BIN_INDEX}")


def check_weights(directory: str) -> None:
  """Checks the weight files of a directory without reading the tensors.

  Safetensors weights (one file, or an index and its shards) must have sound
  headers, hold every tensor the index lists and be as long as their headers
  say. PyTorch `.bin` files are only checked to exist.

  Raises:
    ValueError: one line naming the file, what is wrong and what was
      expected.
    FileNotFoundError: no weights.
  """
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


def tensor_shapes(directory: str) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every tensor of a safetensors checkpoint, from the
  headers only (empty for PyTorch `.bin` weights, which have no header)."""
  if os.path.exists(os.path.join(directory, _SAFE)):
    paths = [os.path.join(directory, _SAFE)]
  elif os.path.exists(os.path.join(directory, _SAFE_INDEX)):
    paths = [os.path.join(directory, shard) for shard in
             sorted(set(_weight_map(directory, _SAFE_INDEX).values()))]
  else:
    return {}
  out = {}
  for path in paths:
    for key, info in _safetensors_header(path)[1].items():
      out[key] = tuple(int(n) for n in info["shape"])
  return out


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
