"""Every model a run will read, checked before its run directory is touched.

A damaged checkpoint (a cut `model.safetensors`, a broken index or
`config.json`) fails here with one line naming the file, what is wrong and
what was expected, instead of deep in the load with nothing named, and
before `DIR` is created or changed. Tokenizers are checked as they are built
(`data.get_tokenizer`, also before `DIR` is touched).
"""

from __future__ import annotations

import os

import ml_collections

from ketchup_jax.models import gguf_io
from ketchup_jax.models import hf_io
from ketchup_jax.train import sources


def model_dirs(cfg: ml_collections.ConfigDict,
               workdir: str) -> list[tuple[str, str]]:
  """(what, path) of every existing model directory or GGUF file the run may
  load.

  The configured `init_from` paths (a missing one fails the check), and the
  exported models of the stages already finished in `workdir`. Hub names
  are checked when fetched; `scratch:` needs nothing.
  """
  found = []
  for role in ("teacher", "student"):
    init_from = cfg[role].init_from
    source = sources.Source.parse(init_from)
    if source.kind != "path" or (not os.path.isdir(source.name) and
                                 hf_io.could_be_hub_name(source.name)):
      continue
    found.append((f"config.{role}.init_from={init_from!r}", source.name))
  stages = os.path.join(workdir, "stages")
  if os.path.isdir(stages):
    for marker in sorted(os.listdir(stages)):
      name = marker[:-len(".json")]
      path = os.path.join(workdir, "models", name)
      if marker.endswith(".json") and os.path.isdir(path):
        found.append((f"the finished stage {name}'s model", path))
  return found


def check_models(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError naming the first damaged model directory."""
  for what, path in model_dirs(cfg, workdir):
    try:
      if gguf_io.is_gguf(path):
        gguf_io.check_gguf(path)
      else:
        hf_io.check_checkpoint(hf_io.resolve_path(path),
                              model_types=hf_io.SUPPORTED)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"{what}: {e}") from None
