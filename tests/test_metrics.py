"""Tests of the evaluation metrics against hand-computed values."""
import math

import pytest

from ketchup_jax import metrics


def test_identical_texts_score_100():
  texts = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
  scores = metrics.compute(["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf",
                            "exact_match"], texts, texts)
  for name, value in scores.items():
    assert value == pytest.approx(100.0), name


def test_rouge_counts_by_hand():
  # Prediction "the cat sat" vs reference "the cat sat on the mat":
  # unigram overlap 3, P = 3/3, R = 3/6 -> F = 2/3; bigram overlap 2, P = 2/2,
  # R = 2/5 -> F = 4/7; LCS = 3 -> as ROUGE-1.
  scores = metrics.compute(["rouge1", "rouge2", "rougeL"], ["the cat sat"],
                           ["the cat sat on the mat"])
  assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
  assert scores["rouge2"] == pytest.approx(100 * 4 / 7)
  assert scores["rougeL"] == pytest.approx(100 * 2 / 3)


def test_rouge_stems_and_averages_over_examples():
  # Porter stemming: cats -> cat, sitting -> sit; "were"/"was" differ: 3 of 4 match.
  one = metrics.compute(["rouge1"], ["the cats were sitting"], ["the cat was sitting"])
  assert one["rouge1"] == pytest.approx(75.0)
  two = metrics.compute(["rouge1"], ["the cats were sitting", "x"],
                        ["the cat was sitting", "y"])
  assert two["rouge1"] == pytest.approx(37.5)  # mean of 75 and 0


def test_bleu_by_hand():
  # hyp "the cat sat on the mat" (6 tokens), ref "the cat sat on the red mat" (7):
  # n-gram precisions 6/6, 4/5, 3/4, 2/3; brevity penalty exp(1 - 7/6).
  expected = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
  got = metrics.compute(["bleu"], ["the cat sat on the mat"],
                        ["the cat sat on the red mat"])["bleu"]
  assert got == pytest.approx(expected, abs=1e-6)  # 67.318...
  assert got == pytest.approx(67.3182, abs=1e-3)


def test_bleu_is_corpus_level_not_a_mean():
  # Corpus BLEU pools n-gram counts and lengths over the corpus before combining.
  preds = ["the cat sat on the mat", "a b c d e f"]
  refs = ["the cat sat on the mat", "a b c d e f"]
  assert metrics.bleu(preds, refs) == pytest.approx(100.0)
  pooled = metrics.bleu([preds[0], "a b c"], refs)
  # 9 of 9 unigrams, 7/7 bigrams, 5/5 trigrams, 3/3 4-grams; BP = exp(1 - 12/9).
  assert pooled == pytest.approx(100 * math.exp(1 - 12 / 9), abs=1e-6)


def test_chrf_orders_closer_outputs_higher():
  ref = ["tweeëntwintig"]
  close = metrics.chrf(["tweeentwintig"], ref)
  far = metrics.chrf(["negentig"], ref)
  assert 0.0 < far < close < 100.0
  assert metrics.chrf(ref, ref) == pytest.approx(100.0)
  assert metrics.chrf(["xyz"], ref) == pytest.approx(0.0)


@pytest.mark.parametrize("text,number", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The answer is 5.0", "5"),
    ("It costs $1,000,000.00 in total.", "1000000"),
    ("#### -3.50 dollars", "-3.5"),
    ("first 3, then 4.", "4"),
    ("#### 7 but later 9", "7"),
    ("12 apples #### 0.5", "0.5"),
    ("no digits here", None),
    ("#### none", None),
])
def test_extract_final_number(text, number):
  assert metrics.extract_final_number(text) == number


def test_gsm8k_accuracy_and_exact_match():
  refs = ["a <<2*3=6>>6\n#### 6", "#### 1,000", "#### -2", "#### 4"]
  preds = ["so the answer is 6.0", "#### 1000", "#### 2", "nothing"]
  assert metrics.gsm8k_accuracy(preds, refs) == pytest.approx(50.0)
  assert metrics.exact_match(["a  b\n", "c"], ["a b", "d"]) == pytest.approx(50.0)


def test_compute_keeps_order_and_validates():
  scores = metrics.compute(["exact_match", "gsm8k_accuracy"], ["#### 3"], ["#### 3"])
  assert list(scores) == ["exact_match", "gsm8k_accuracy"]
  assert scores == {"exact_match": 100.0, "gsm8k_accuracy": 100.0}
  with pytest.raises(ValueError, match=r"unknown metrics \['bleu4'\]; known: bleu, "):
    metrics.compute(["bleu4"], ["a"], ["a"])
  with pytest.raises(ValueError, match="same length, got 2 and 1"):
    metrics.compute(["bleu"], ["a", "b"], ["a"])
  with pytest.raises(ValueError, match="at least one prediction"):
    metrics.compute(["bleu"], [], [])
  with pytest.raises(ValueError, match="predictions must be strings, got int"):
    metrics.compute(["bleu"], [3], ["a"])
