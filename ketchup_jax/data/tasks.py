"""Task registry: named text-to-text tasks with splits, a prompt prefix and metrics.

A task yields examples ``{"source": str, "target": str}`` per split; the model input is
``task.prefix + example["source"]`` (see :meth:`Task.model_input`). Tasks:

- ``numbers_en_nl`` — embedded, English number words → Dutch (see ``numbers.py``).
- ``arith`` — embedded, GSM8K-style word problems with calculator annotations.
- ``jsonl`` — any ``source``/``target`` JSON-lines files.
- ``europarl_en_nl`` — EN→NL parallel text from TSV or JSONL files the user points at.
- ``xsum``, ``gsm8k`` — through tensorflow-datasets (imported lazily, on first load).

Embedded tasks split by the example's key (the number; the problem's template and
parameters): a BLAKE2b/SplitMix64 hash of ``(seed, key)`` falls in [0, 1) and the split
fractions cut that interval, so splits never share a key and are the same everywhere.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

from ketchup_jax.data import hashing
from ketchup_jax.data import arith as arith_lib
from ketchup_jax.data import numbers as numbers_lib

Example = dict[str, str]
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
TRANSLATE_EN_NL = "translate English to Dutch: "


@dataclasses.dataclass(frozen=True)
class Task:
  """A text-to-text task.

  Attributes:
    name: Registry name.
    prefix: Prompt prefix prepended to every source (e.g. "summarize: ").
    metric_names: Names understood by ``ketchup_jax.metrics.compute``.
    load_split: ``split -> list of examples``; prefer :meth:`examples`, which checks the
      split name and caches.
    splits: Split names this task has.
  """
  name: str
  prefix: str
  metric_names: tuple[str, ...]
  load_split: Callable[[str], list[Example]] = dataclasses.field(repr=False)
  splits: tuple[str, ...] = SPLITS
  _cache: dict[str, tuple[Example, ...]] = dataclasses.field(
      default_factory=dict, init=False, repr=False, compare=False)

  def examples(self, split: str) -> list[Example]:
    """All examples of ``split``, loaded once per task object, as fresh dicts."""
    if split not in self.splits:
      raise ValueError(f"split must be one of {self.splits} for task {self.name!r}, "
                       f"got {split!r}")
    if split not in self._cache:
      self._cache[split] = tuple(self.load_split(split))
    return [dict(ex) for ex in self._cache[split]]

  def model_input(self, example: Mapping[str, str]) -> str:
    """The text the model reads: prefix + source."""
    return self.prefix + example["source"]

  def texts(self, split: str = "train") -> list[str]:
    """Every model input then every target of ``split`` (e.g. to train a tokenizer)."""
    examples = self.examples(split)
    return [self.model_input(ex) for ex in examples] + [ex["target"] for ex in examples]


def split_of(key: str, *, seed: int,
             fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
  """The split (train/validation/test) that the example ``key`` belongs to.

  Args:
    key: The example's identity (a number, a problem's parameters, a document id).
    seed: Split seed; a different seed gives a different partition.
    fractions: (train, validation, test) fractions, non-negative, summing to 1.

  Returns:
    One of ``SPLITS``.
  """
  _check_fractions(fractions)
  u = hashing.unit_interval(key, seed=seed)
  edge = 0.0
  for split, fraction in zip(SPLITS, fractions):
    edge += fraction
    if u < edge:
      return split
  return SPLITS[-1]


def _check_fractions(fractions: Sequence[float]) -> None:
  if (len(fractions) != 3 or any(f < 0 for f in fractions)
      or abs(sum(fractions) - 1.0) > 1e-9):
    raise ValueError("fractions must be three non-negative numbers (train, validation, "
                     f"test) summing to 1, got {tuple(fractions)!r}")


def _check_max_examples(max_examples: int | None) -> None:
  if max_examples is not None and (not isinstance(max_examples, int)
                                   or max_examples < 1):
    raise ValueError("max_examples must be None or a positive int, got "
                     f"{max_examples!r}")


# --------------------------------------------------------------------------- embedded


def numbers_en_nl(*, max_number: int = 9999, seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  prefix: str = TRANSLATE_EN_NL) -> Task:
  """English number words → Dutch number words for ``0 … max_number``.

  Args:
    max_number: Largest number, at most 999999.
    seed: Split seed.
    fractions: (train, validation, test) fractions of the numbers.
    prefix: Prompt prefix.

  Returns:
    The task; within a split the examples are in increasing numeric order.
  """
  if not isinstance(max_number, int) or not 0 <= max_number <= 999_999:
    raise ValueError(f"max_number must be an int in [0, 999999], got {max_number!r}")
  _check_fractions(fractions)
  fractions = tuple(fractions)

  def load(split: str) -> list[Example]:
    return [{"source": numbers_lib.english(n), "target": numbers_lib.dutch(n)}
            for n in range(max_number + 1)
            if split_of(str(n), seed=seed, fractions=fractions) == split]

  # No BLEU: most targets are one or two words, so corpus BLEU-4 has no
  # 4-grams to match and reads 0 whatever the quality.
  return Task("numbers_en_nl", prefix, ("chrf", "exact_match"), load)


def arith(*, num_train: int = 2000, num_validation: int = 200, num_test: int = 200,
          seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
          prefix: str = "solve: ") -> Task:
  """GSM8K-style word problems (2–4 steps) with calculator-annotated targets.

  Candidates are drawn in order from the seed's stream; each goes to the split its
  key hashes to (so splits never share a problem), duplicates are skipped, and a split
  takes the first ``num_<split>`` candidates that land in it.

  Args:
    num_train: Training examples.
    num_validation: Validation examples.
    num_test: Test examples.
    seed: Generation and split seed.
    fractions: Hash fractions deciding the splits (each must be > 0 for a split that
      asks for examples).
    prefix: Prompt prefix.

  Returns:
    The task.
  """
  sizes = {"train": num_train, "validation": num_validation, "test": num_test}
  for split, n in sizes.items():
    if not isinstance(n, int) or n < 0:
      raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
  _check_fractions(fractions)
  fractions = tuple(fractions)
  for split, fraction in zip(SPLITS, fractions):
    if sizes[split] and fraction == 0:
      raise ValueError(f"num_{split}={sizes[split]} needs a positive fraction for "
                       f"{split}, got fractions={fractions}")

  def load(split: str) -> list[Example]:
    want = sizes[split]
    out, seen = [], set()
    index = 0
    limit = 1000 + 100 * want
    while len(out) < want:
      if index >= limit:
        raise ValueError(f"arith could only generate {len(out)} unique {split} "
                         f"problems in {limit} candidates, asked for {want}")
      key, question, target, _ = arith_lib.problem(index, seed=seed)
      index += 1
      if key in seen or split_of(key, seed=seed, fractions=fractions) != split:
        continue
      seen.add(key)
      out.append({"source": question, "target": target})
    return out

  return Task("arith", prefix, ("gsm8k_accuracy",), load)


# --------------------------------------------------------------------------- files


def _resolve_paths(paths: str | Mapping[str, str], task: str) -> dict[str, str]:
  """Split → file path, from a mapping or a pattern containing "{split}"."""
  if isinstance(paths, str):
    if "{split}" not in paths:
      raise ValueError(f"{task}: a string path must contain '{{split}}' (e.g. "
                       f"'data/{{split}}.jsonl'), or pass a mapping split -> path; got "
                       f"{paths!r}")
    return {split: paths.format(split=split) for split in SPLITS}
  if not isinstance(paths, Mapping) or not paths:
    raise ValueError(f"{task}: paths must be a non-empty mapping split -> path or a "
                     f"pattern with '{{split}}', got {paths!r}")
  bad = [s for s in paths if s not in SPLITS]
  if bad:
    raise ValueError(f"{task}: split names must be in {SPLITS}, got {bad}")
  return {split: os.fspath(path) for split, path in paths.items()}


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
  """``(line number, text)`` of a UTF-8 file; bad bytes name the line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield line_no, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at "
                         f"byte {e.start})") from None


def _nonempty(path: str, examples: list[Example]) -> list[Example]:
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty or has only "
                     f"blank lines)")
  return examples


def _read_jsonl(path: str, *, source_field: str, target_field: str,
                max_examples: int | None) -> list[Example]:
  """Reads ``{source_field, target_field}`` records; skips blank lines."""
  out = []
  for line_no, line in _text_lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{line_no}: expected a JSON object with fields "
                       f"{source_field!r} and {target_field!r}, got "
                       f"{type(record).__name__}")
    for field in (source_field, target_field):
      if not isinstance(record.get(field), str):
        raise ValueError(f"{path}:{line_no}: field {field!r} must be a string, got "
                         f"{record.get(field)!r}")
    out.append({"source": record[source_field], "target": record[target_field]})
    if max_examples is not None and len(out) >= max_examples:
      break
  return _nonempty(path, out)


def _read_tsv(path: str, *, max_examples: int | None) -> list[Example]:
  """Reads ``source<TAB>target`` lines; skips blank lines."""
  out = []
  for line_no, line in _text_lines(path):
    line = line.rstrip("\r\n")
    if not line.strip():
      continue
    columns = line.split("\t")
    if len(columns) != 2:
      raise ValueError(f"{path}:{line_no}: expected 2 tab-separated columns "
                       f"(source, target), got {len(columns)}")
    out.append({"source": columns[0], "target": columns[1]})
    if max_examples is not None and len(out) >= max_examples:
      break
  return _nonempty(path, out)


def jsonl(*, paths: str | Mapping[str, str], source_field: str = "source",
          target_field: str = "target", prefix: str = "",
          metrics: Sequence[str] = ("exact_match",),
          max_examples: int | None = None) -> Task:
  """Generic JSON-lines task: one ``{"source": …, "target": …}`` object per line.

  Args:
    paths: Mapping split -> file, or a pattern such as ``"data/{split}.jsonl"``.
    source_field: Field holding the source text.
    target_field: Field holding the target text.
    prefix: Prompt prefix.
    metrics: Metric names for evaluation.
    max_examples: Read at most this many examples per split.

  Returns:
    The task; its splits are the keys of ``paths``.
  """
  resolved = _resolve_paths(paths, "jsonl")
  _check_max_examples(max_examples)

  def load(split: str) -> list[Example]:
    return _read_jsonl(resolved[split], source_field=source_field,
                       target_field=target_field, max_examples=max_examples)

  return Task("jsonl", prefix, tuple(metrics), load, splits=tuple(resolved))


def europarl_en_nl(*, paths: str | Mapping[str, str], prefix: str = TRANSLATE_EN_NL,
                   source_field: str = "en", target_field: str = "nl",
                   max_examples: int | None = None) -> Task:
  """Europarl EN→NL from files: ``.tsv`` (``en<TAB>nl``) or ``.jsonl`` (``en``/``nl``).

  Args:
    paths: Mapping split -> file, or a pattern with ``{split}``. The format is chosen
      by each file's extension.
    prefix: Prompt prefix.
    source_field: JSONL field of the English side.
    target_field: JSONL field of the Dutch side.
    max_examples: Read at most this many examples per split.

  Returns:
    The task, evaluated with BLEU-4 and chrF (SPEC §4).
  """
  resolved = _resolve_paths(paths, "europarl_en_nl")
  _check_max_examples(max_examples)
  for path in resolved.values():
    if not path.endswith((".tsv", ".jsonl")):
      raise ValueError(f"europarl_en_nl: file must end in .tsv or .jsonl, got {path!r}")

  def load(split: str) -> list[Example]:
    path = resolved[split]
    if path.endswith(".tsv"):
      return _read_tsv(path, max_examples=max_examples)
    return _read_jsonl(path, source_field=source_field, target_field=target_field,
                       max_examples=max_examples)

  return Task("europarl_en_nl", prefix, ("bleu", "chrf"), load,
              splits=tuple(resolved))


# --------------------------------------------------------------------------- TFDS


def _tfds_examples(dataset: str, split: str, *, data_dir: str | None,
                   source_key: str, target_key: str) -> list[tuple[str, str]]:
  """Reads a TFDS split as (source, target) strings; imports TFDS lazily."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"task {dataset!r} needs tensorflow-datasets (pip install "
                      "tensorflow-datasets tensorflow-cpu)") from e
  ds = tfds.load(dataset, split=split, data_dir=data_dir, shuffle_files=False)
  return [(r[source_key].decode("utf-8"), r[target_key].decode("utf-8"))
          for r in tfds.as_numpy(ds)]


def xsum(*, data_dir: str | None = None, prefix: str = "summarize: ",
         max_examples: int | None = None) -> Task:
  """XSum (TFDS ``xsum``: ``document`` → ``summary``), evaluated with ROUGE-1/2/L.

  Args:
    data_dir: TFDS data directory (the prepared dataset must already be there).
    prefix: Prompt prefix.
    max_examples: Keep at most this many examples per split.

  Returns:
    The task.
  """
  _check_max_examples(max_examples)

  def load(split: str) -> list[Example]:
    pairs = _tfds_examples("xsum", split, data_dir=data_dir, source_key="document",
                           target_key="summary")
    return [{"source": s, "target": t} for s, t in pairs[:max_examples]]

  return Task("xsum", prefix, ("rouge1", "rouge2", "rougeL"), load)


def gsm8k(*, data_dir: str | None = None, prefix: str = "solve: ", seed: int = 0,
          validation_fraction: float = 0.05, max_examples: int | None = None) -> Task:
  """GSM8K (TFDS ``gsm8k``: ``question`` → ``answer``), scored by final-number accuracy.

  GSM8K has only train and test; ``validation`` is carved from train by hashing each
  question with ``seed`` (``validation_fraction`` of it), and ``train`` excludes it.

  Args:
    data_dir: TFDS data directory (the prepared dataset must already be there).
    prefix: Prompt prefix.
    seed: Seed of the train/validation cut.
    validation_fraction: Share of train questions held out as validation, in (0, 1).
    max_examples: Keep at most this many examples per split.

  Returns:
    The task.
  """
  _check_max_examples(max_examples)
  if not 0 < validation_fraction < 1:
    raise ValueError("validation_fraction must be in (0, 1), got "
                     f"{validation_fraction!r}")
  fractions = (1 - validation_fraction, validation_fraction, 0.0)

  def load(split: str) -> list[Example]:
    pairs = _tfds_examples("gsm8k", "test" if split == "test" else "train",
                           data_dir=data_dir, source_key="question",
                           target_key="answer")
    if split != "test":
      pairs = [(q, a) for q, a in pairs
               if split_of(q, seed=seed, fractions=fractions) == split]
    return [{"source": s, "target": t} for s, t in pairs[:max_examples]]

  return Task("gsm8k", prefix, ("gsm8k_accuracy",), load)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Task]] = {
    "numbers_en_nl": numbers_en_nl,
    "arith": arith,
    "jsonl": jsonl,
    "europarl_en_nl": europarl_en_nl,
    "xsum": xsum,
    "gsm8k": gsm8k,
}


def task_names() -> tuple[str, ...]:
  """Names accepted by :func:`get_task`, sorted."""
  return tuple(sorted(_REGISTRY))


def get_task(name: str, **options) -> Task:
  """Builds the task ``name`` with keyword ``options`` (see each builder's arguments).

  Raises:
    ValueError: unknown task name, unknown option, or a bad option value.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
  builder = _REGISTRY[name]
  accepted = tuple(inspect.signature(builder).parameters)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"task {name!r} got unknown options {unknown}; it accepts "
                     f"{list(accepted)}")
  return builder(**options)
