"""Evaluation metrics (SPEC §4): ROUGE, BLEU-4, chrF, GSM8K accuracy, exact match.

All scores are percentages (0–100), as the paper reports them:

- ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``: mean over examples of the
  rouge-score F-measure with Porter stemming (``rougeLsum`` splits sentences on
  newlines).
- ``bleu``: sacrebleu corpus BLEU-4 (13a tokenisation, exponential brevity penalty).
- ``chrf``: sacrebleu corpus chrF (character 6-grams, β = 2).
- ``gsm8k_accuracy``: share of predictions whose final number equals the reference's
  (:func:`extract_final_number`: the number after the last ``####``, else the last
  number in the text; commas and "5.0" == "5" handled).
- ``exact_match``: share of predictions equal to the reference up to whitespace.

This module imports nothing else from ``ketchup_jax``.
"""
from __future__ import annotations

import decimal
import re
from collections.abc import Callable, Sequence

_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def extract_final_number(text: str) -> str | None:
  """The answer number of a GSM8K-style text, normalised, or None if there is none.

  The first number after the last ``####`` if present, else the last number in the text.
  Thousands commas are removed and the value is normalised, so "1,000", "1000.00" and
  "1000" all give "1000", and "-3.50" gives "-3.5".
  """
  if "####" in text:
    matches = _NUMBER_RE.findall(text.rsplit("####", 1)[1])
    found = matches[0] if matches else None
  else:
    matches = _NUMBER_RE.findall(text)
    found = matches[-1] if matches else None
  if found is None:
    return None
  value = decimal.Decimal(found.replace(",", ""))
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def _rouge(names: Sequence[str], predictions: Sequence[str],
           references: Sequence[str]) -> dict[str, float]:
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
  totals = dict.fromkeys(names, 0.0)
  for pred, ref in zip(predictions, references):
    scores = scorer.score(ref, pred)  # (target, prediction)
    for name in names:
      totals[name] += scores[name].fmeasure
  return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU-4 (sacrebleu defaults), 0–100."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Corpus chrF (sacrebleu defaults), 0–100."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Percentage of predictions whose final number equals the reference's."""
  hits = 0
  for pred, ref in zip(predictions, references):
    answer = extract_final_number(ref)
    hits += answer is not None and extract_final_number(pred) == answer
  return 100.0 * hits / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Percentage of predictions equal to the reference after collapsing whitespace."""
  hits = sum(" ".join(p.split()) == " ".join(r.split())
             for p, r in zip(predictions, references))
  return 100.0 * hits / len(predictions)


_CORPUS_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "bleu": bleu,
    "chrf": chrf,
    "gsm8k_accuracy": gsm8k_accuracy,
    "exact_match": exact_match,
}
METRIC_NAMES = tuple(sorted(_ROUGE_TYPES + tuple(_CORPUS_METRICS)))


def compute(metric_names: Sequence[str], predictions: Sequence[str],
            references: Sequence[str]) -> dict[str, float]:
  """Computes each named metric (0–100) on aligned predictions and references.

  Args:
    metric_names: Names from ``METRIC_NAMES``.
    predictions: Model outputs, one string per example.
    references: Gold texts, aligned with ``predictions``.

  Returns:
    ``{name: score}`` for every requested name.

  Raises:
    ValueError: unknown name, mismatched lengths, or no examples.
  """
  if isinstance(metric_names, str):
    metric_names = (metric_names,)
  unknown = [m for m in metric_names if m not in METRIC_NAMES]
  if unknown:
    raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRIC_NAMES)}")
  if len(predictions) != len(references):
    raise ValueError(f"predictions and references must have the same length, got "
                     f"{len(predictions)} and {len(references)}")
  if not predictions:
    raise ValueError("need at least one prediction, got none")
  for name, texts in (("predictions", predictions), ("references", references)):
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
      raise ValueError(f"{name} must be strings, got {type(bad).__name__}: {bad!r}")
  results = {}
  rouge_names = [m for m in metric_names if m in _ROUGE_TYPES]
  if rouge_names:
    results.update(_rouge(rouge_names, predictions, references))
  for name in metric_names:
    if name in _CORPUS_METRICS:
      results[name] = _CORPUS_METRICS[name](predictions, references)
  return {name: results[name] for name in metric_names}
