"""Tests of the embedded arith task: annotation arithmetic, answers, splits."""
import collections
import re

from ketchup_jax.data import arith, tasks

_ANNOTATION = re.compile(r"<<([0-9+\-*/]+)=(-?\d+)>>(-?\d+)")
_EXPR = re.compile(r"^(\d+)([+\-*/])(\d+)$")


def _evaluate(expr: str) -> int:
  a, op, b = _EXPR.match(expr).groups()
  a, b = int(a), int(b)
  if op == "/":
    assert a % b == 0, expr
    return a // b
  return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_every_annotation_is_right_and_the_answer_is_the_last_value():
  task = tasks.get_task("arith", num_train=400, num_validation=100, num_test=100)
  count = 0
  for split in tasks.SPLITS:
    for ex in task.examples(split):
      target = ex["target"]
      body, answer = target.rsplit("\n#### ", 1)
      annotations = _ANNOTATION.findall(body)
      assert 2 <= len(annotations) <= 4, target
      assert len(annotations) == len(body.split("\n")), target
      for expr, value, shown in annotations:
        assert _evaluate(expr) == int(value) == int(shown), (expr, value, shown)
        assert int(value) >= 0
      assert int(answer) == int(annotations[-1][1])
      # Every annotation "<<a op b=c>>" is preceded by the plain "a op b = ".
      for expr, value, _ in annotations:
        a, op, b = _EXPR.match(expr).groups()
        assert f"{a} {op} {b} = <<{expr}={value}>>" in body
      count += 1
  assert count == 600


def test_problem_is_deterministic_and_seed_dependent():
  assert arith.problem(5, seed=0) == arith.problem(5, seed=0)
  assert arith.problem(5, seed=0) != arith.problem(5, seed=1)
  # A golden example: the stream must not change across machines or versions.
  ex = tasks.get_task("arith").examples("test")[0]
  assert ex["source"] == ("Omar is 13 years old. Omar's brother is 2 years older, and "
                          "their aunt is 2 times as old as the brother. How old will "
                          "the aunt be in 2 years?")
  assert ex["target"].endswith("\n#### 32")


def test_splits_are_disjoint_sized_and_varied():
  task = tasks.get_task("arith", num_train=500, num_validation=60, num_test=60)
  texts = {s: [ex["source"] for ex in task.examples(s)] for s in tasks.SPLITS}
  assert [len(texts[s]) for s in tasks.SPLITS] == [500, 60, 60]
  for s in tasks.SPLITS:
    assert len(set(texts[s])) == len(texts[s])
  assert not set(texts["train"]) & set(texts["validation"])
  assert not set(texts["train"]) & set(texts["test"])
  assert not set(texts["validation"]) & set(texts["test"])
  kinds = collections.Counter(t.split(" ")[1] for t in texts["train"])
  assert len(kinds) >= 5  # buys, bakes, is, saves, drives, plants
  steps = collections.Counter(ex["target"].count("<<") for ex in task.examples("train"))
  assert set(steps) == {2, 3, 4}


def test_a_smaller_request_is_a_prefix_of_a_larger_one():
  small = tasks.get_task("arith", num_train=50, num_validation=5, num_test=5)
  large = tasks.get_task("arith", num_train=80, num_validation=9, num_test=9)
  for split in tasks.SPLITS:
    n = len(small.examples(split))
    assert small.examples(split) == large.examples(split)[:n]
