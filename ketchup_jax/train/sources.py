"""Where a run's models come from: `init_from` specs, parsed once.

`config.teacher.init_from` and `config.student.init_from` are one of

    scratch:<size>   a random model of a `models.SIZES` size (+ overrides);
    stage:<stage>    the model a finished stage of this run exported
                     (`DIR/models/<stage>/`);
    <path or hub>    an HF directory, or a hub name.

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
from ketchup_jax.models import hf_io

KINDS = ("scratch", "stage", "path")


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed `init_from`.

  Attributes:
    kind: "scratch", "stage" or "path" (a directory or a hub name).
    name: The size name, the stage name, or the path / hub name.
  """
  kind: str
  name: str

  @classmethod
  def parse(cls, init_from: str) -> Source:
    for kind in ("scratch", "stage"):
      if init_from.startswith(f"{kind}:"):
        return cls(kind, init_from[len(kind) + 1:])
    return cls("path", init_from)

  def __str__(self) -> str:
    return self.name if self.kind == "path" else f"{self.kind}:{self.name}"


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


def check_same_tokenizer(tokenizer: data_lib.Tokenizer, teacher: str,
                         student: str) -> None:
  """Refuses a teacher and student whose tokenizers differ.

  Compares the HF tokenizers among the run's (`config.tokenizer`) and those
  the teacher's and student's HF directories ship. Their embeddings may have
  different row counts (`steps.StepModels.logits_vocab`): the ids must mean
  the same tokens.
  """
  named = []
  if isinstance(tokenizer, data_lib.HFTokenizer):
    named.append(("the run's tokenizer (config.tokenizer.path)", tokenizer))
  for role, init_from in (("teacher", teacher), ("student", student)):
    source = Source.parse(init_from)
    own = (data_lib.model_tokenizer(source.name) if source.kind == "path"
           else None)
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
