"""Where a run's models come from: `init_from` specs, parsed once.

`config.teacher.init_from` and `config.student.init_from` are one of

    scratch:<size>   a random model of a `models.SIZES` size (+ overrides);
    stage:<stage>    the model a finished stage of this run exported
                     (`DIR/models/<stage>/`);
    <path or hub>    an HF directory, a `.gguf` file, or a hub name;

and a loaded one (`stage:` or a path) may end in `#layers=<which>` to keep
only some of its blocks (layer dropping, `models.family.keep_layers`), e.g.
`stage:teacher_sft#layers=0,3,6` or `<teacher dir>#layers=::3` (every third
block: 10 of 30). `<which>` is a comma list of block indices or a Python
slice `start:stop:step`; the embedding, norms and LM head are kept.

`Source.parse` reads one; `load_model` builds or loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ketchup_jax import data as data_lib
from ketchup_jax import distributed
from ketchup_jax import models
from ketchup_jax.models import gguf_io
from ketchup_jax.models import hf_io

KINDS = ("scratch", "stage", "path")


_LAYERS = "#layers="
_LAYERS_FORM = ("#layers=<i,j,...> (block indices) or #layers=<start:stop:step> "
                "(a Python slice), e.g. #layers=0,3,6 or #layers=::3")


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed `init_from`.

  Attributes:
    kind: "scratch", "stage" or "path" (a directory, GGUF file or hub name).
    name: The size name, the stage name, or the path / hub name.
    layers: The `#layers=` spec (blocks to keep), or None for all.
  """
  kind: str
  name: str
  layers: str | None = None

  @classmethod
  def parse(cls, init_from: str) -> Source:
    """Reads an `init_from`.

    Raises:
      ValueError: a malformed `#layers=` suffix, or one on a `scratch:`
        model, naming the value and the right form.
    """
    base, layers = init_from, None
    if "#" in init_from:
      base, _, suffix = init_from.partition("#")
      if not suffix.startswith(_LAYERS[1:]):
        raise ValueError(f"init_from {init_from!r}: after '#' expected "
                         f"{_LAYERS_FORM}")
      layers = suffix[len(_LAYERS) - 1:]
    kind, name = "path", base
    for prefix in ("scratch", "stage"):
      if base.startswith(f"{prefix}:"):
        kind, name = prefix, base[len(prefix) + 1:]
    source = cls(kind, name, layers)
    if layers is not None:
      if kind == "scratch":
        raise ValueError(f"init_from {init_from!r}: #layers= keeps blocks of "
                         f"a loaded model (stage: or a path); a scratch: "
                         f"model's depth is set with overrides")
      source.layer_indices(None, init_from)  # the syntax, before any load
    return source

  def layer_indices(self, depth: int | None, init_from: str
                    ) -> tuple[int, ...] | None:
    """The blocks to keep of a `depth`-layer model (None: all).

    With `depth` None only the syntax is checked (and a slice is not
    resolved: returns ()).
    """
    if self.layers is None:
      return None
    spec = self.layers.strip()
    try:
      if ":" in spec:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) > 3 or parts[2:] == [0]:
          raise ValueError
        return () if depth is None else tuple(range(depth)[slice(*parts)])
      return tuple(int(p) for p in spec.split(","))
    except ValueError:
      raise ValueError(f"init_from {init_from!r}: #layers={self.layers!r} is "
                       f"not {_LAYERS_FORM}") from None

  def __str__(self) -> str:
    base = self.name if self.kind == "path" else f"{self.kind}:{self.name}"
    return base if self.layers is None else f"{base}{_LAYERS}{self.layers}"


def stage_source(stage: str) -> str:
  """The `init_from` of the model stage `stage` exported."""
  return str(Source("stage", stage))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def declared_kind(model_cfg: ml_collections.ConfigDict) -> str | None:
  """"encoder-decoder" or "decoder-only", read without loading the model.

  None where it cannot be known before loading (a hub name, a stage output).
  """
  source = Source.parse(model_cfg.init_from)
  if source.kind == "scratch":
    return ("decoder-only" if source.name in models.DECODER_SIZES else
            "encoder-decoder")
  if source.kind == "path" and gguf_io.is_gguf(source.name):
    return "decoder-only"  # every GGUF architecture `models.load` reads
  config_json = os.path.join(source.name, "config.json")
  if source.kind == "path" and os.path.isfile(config_json):
    with open(config_json, encoding="utf-8") as f:
      model_type = json.load(f).get("model_type")
    return "encoder-decoder" if model_type in hf_io.T5_TYPES else (
        "decoder-only")
  return None


def load_model(init_from: str, model_cfg: ml_collections.ConfigDict,
               seed: int, *, role: str, mesh: jax.sharding.Mesh,
               tokenizer_vocab: int, tokenizer_eos: int,
               models_dir: str) -> models.LM:
  """Builds or loads the model `init_from` names, on `mesh`.

  Args:
    init_from: The spec (module docstring).
    model_cfg: `config.teacher` or `config.student` (dtypes, overrides,
      remat).
    seed: Initialisation seed of a `scratch:` model.
    role: What the model is, for errors ("teacher", "student", a row label).
    mesh: The mesh its parameters are sharded over.
    tokenizer_vocab: The tokenizer's vocabulary size; the model's must be at
      least that.
    tokenizer_eos: The tokenizer's EOS id; the model must stop on it.
    models_dir: `DIR/models`, where `stage:` models are.
  """
  source = Source.parse(init_from)
  kw = dict(dtype=jnp.dtype(model_cfg.dtype),
            param_dtype=jnp.dtype(model_cfg.param_dtype))
  if source.kind == "scratch":
    overrides = dict(model_cfg.overrides.to_dict())
    overrides.setdefault("vocab_size", _round_up(tokenizer_vocab, 8))
    lm = models.init(source.name, jax.random.PRNGKey(seed), mesh=mesh,
                     **overrides, **kw)
  elif source.kind == "stage":
    path = os.path.join(models_dir, source.name)
    if not os.path.isdir(path):
      raise ValueError(f"{role}.init_from={init_from!r}: no model at {path}; "
                       f"run that stage first")
    lm = models.load(path, mesh=mesh, **kw)
  else:
    lm = models.load(source.name, mesh=mesh, **kw)
  keep = source.layer_indices(models.family.num_layers(lm.config), init_from)
  if keep is not None:
    try:
      params, config = models.family.keep_layers(lm.params, lm.config, keep)
    except ValueError as e:
      raise ValueError(f"{role}.init_from={init_from!r}: {e}") from None
    lm = dataclasses.replace(lm, params=params, config=config)
  if lm.config.vocab_size < tokenizer_vocab:
    raise ValueError(
        f"{role} vocabulary has {lm.config.vocab_size} entries but the "
        f"tokenizer produces ids up to {tokenizer_vocab - 1}")
  if tokenizer_eos not in models.family.eos_ids(lm.config):
    raise ValueError(
        f"{role} ({init_from}) ends a completion at ids "
        f"{models.family.eos_ids(lm.config)} but the tokenizer's EOS is "
        f"{tokenizer_eos}; use the model's own tokenizer")
  remat = model_cfg.get("remat", "none")
  if remat != lm.config.remat:  # a compute choice: the parameters are alike
    lm = dataclasses.replace(lm, config=lm.config.replace(remat=remat))
  return lm


def check_same_tokenizer(tokenizer: data_lib.Tokenizer, tokenizer_path: str,
                         teacher: str, student: str) -> None:
  """Refuses a teacher and student whose tokenizers differ.

  Compares the HF tokenizers among the run's (`config.tokenizer`, read from
  `tokenizer_path`) and those the teacher's and student's HF directories
  ship; a directory already compared (the run's tokenizer directory, or the
  teacher's when the student is the same) is not read again. Their
  embeddings may have different row counts (`steps.StepModels.logits_vocab`):
  the ids must mean the same tokens.
  """
  named, seen = [], set()
  if isinstance(tokenizer, data_lib.HFTokenizer):
    named.append(("the run's tokenizer (config.tokenizer.path)", tokenizer))
    seen.add(os.path.realpath(tokenizer_path))
  for role, init_from in (("teacher", teacher), ("student", student)):
    source = Source.parse(init_from)
    if source.kind != "path" or os.path.realpath(source.name) in seen:
      continue
    seen.add(os.path.realpath(source.name))
    own = data_lib.model_tokenizer(source.name)
    if own is not None:
      named.append((f"the {role}'s tokenizer ({source.name})", own))
  for (name_a, a), (name_b, b) in itertools.combinations(named, 2):
    why = data_lib.vocabulary_difference(a, b)
    if why is not None:
      raise ValueError(f"{name_a} and {name_b} differ: {why}; the teacher "
                       f"and student must share one tokenizer")


def check_loaded_kinds(teacher: models.LM, student: models.LM) -> None:
  """`check_same_kind` on loaded models."""
  kinds = {role: "encoder-decoder" if models.family.is_encoder_decoder(
      lm.config) else "decoder-only" for role, lm in (("teacher", teacher),
                                                       ("student", student))}
  check_same_kind(kinds["teacher"], kinds["student"])


def check_same_kind(teacher: str | None, student: str | None) -> None:
  """Refuses an encoder-decoder teacher with a decoder-only student or back.

  Both read the same batches, and a decoder-only model's prompt has no EOS.
  """
  if None not in (teacher, student) and teacher != student:
    raise ValueError(
        f"the teacher is {teacher} and the student {student}; both must be "
        f"encoder-decoder (T5) or both decoder-only (Llama, Qwen)")


def params_checksum(params: Any) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = distributed.to_host(leaf)  # gathered across processes
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()
