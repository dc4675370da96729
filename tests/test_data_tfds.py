"""The ``xsum`` and ``gsm8k`` tasks read through real tensorflow-datasets, offline.

``tfds.testing.mock_data`` replaces only the reading of prepared files. The records
it serves here are made by the installed TFDS builders' own code (``_split_generators``
and ``_generate_examples``) from small files in the datasets' raw formats, so the
builder names, split names and feature keys the loaders rely on are the catalog's, not
ours, and a request for a split the builder does not have fails.

Importing tensorflow takes several seconds, so it happens in a module-scoped fixture:
collecting (or deselecting) these tests stays cheap.
"""
import json
import os
from unittest import mock

import pytest

from ketchup_jax import metrics
from ketchup_jax.data import tasks

# Raw XSum: one BBC article per ``<id>.data`` file; the builder keeps the
# INTRODUCTION (the summary) and the RESTBODY (the document).
_XSUM = {
    "train": [("101", "Été à Paris: crowds return.", "Tourists came back.\nHotels filled."),
              ("102", "Rain stops play.", "The match was abandoned."),
              ("103", "A new bridge opens.", "Cars crossed it at dawn.")],
    "validation": [("201", "Markets rise.", "Shares rose 3%."),
                   ("202", "Schools reopen.", "Pupils returned on Monday.")],
    "test": [("301", "Snow in May.", "It snowed in the hills.")],
}
# Raw GSM8K: JSON lines with a question and an answer ending in "#### <number>".
_GSM8K_TRAIN = [(f"Ann has {i} apples and buys {i + 2} more. How many now?",
                 f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### "
                 f"{2 * i + 2}") for i in range(40)]
_GSM8K_TEST = [("Bo reads 5 pages a day. How many in 6 days?", "5 * 6 = 30\n#### 30"),
               ("Cy has 1,200 coins and spends 200. How many left?",
                "1200 - 200 = 1000\n#### 1,000"),
               ("A pen costs $2. What do 4 pens cost?", "2 * 4 = 8\n#### 8")]


@pytest.fixture(scope="module")
def tfds():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  return tensorflow_datasets


def _write_xsum_raw(root):
  extracts = root / "xsum-extracts-from-downloads"
  extracts.mkdir(parents=True)
  for rows in _XSUM.values():
    for doc_id, summary, document in rows:
      (extracts / f"{doc_id}.data").write_text(
          f"[XSUM]URL[XSUM]\nhttp://www.bbc.co.uk/news/{doc_id}\n\n"
          f"[XSUM]INTRODUCTION[XSUM]\n{summary}\n\n"
          f"[XSUM]RESTBODY[XSUM]\n{document}\n", encoding="utf-8")
  split_ids = root / "split_ids.json"
  split_ids.write_text(json.dumps({split: [doc_id for doc_id, _, _ in rows]
                                   for split, rows in _XSUM.items()}))
  return split_ids


def _write_gsm8k_raw(root, urls):
  files = {}
  for key in urls:  # train, test, train_socratic, test_socratic
    rows = _GSM8K_TEST if key.startswith("test") else _GSM8K_TRAIN
    path = root / f"{key}.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in rows), encoding="utf-8")
    files[key] = str(path)
  return files


@pytest.fixture(scope="module")
def generated(tfds, tmp_path_factory):
  """``{dataset: {split: [record]}}`` made by the installed builders' own code."""
  root = tmp_path_factory.mktemp("raw")
  out = {}

  xsum = tfds.builder("xsum", data_dir=str(root / "data"))
  dl = mock.MagicMock(manual_dir=str(root))
  dl.download.return_value = str(_write_xsum_raw(root))
  dl.extract.return_value = str(root)
  out["xsum"] = {gen.name: [ex for _, ex in xsum._generate_examples(**gen.gen_kwargs)]  # pylint: disable=protected-access
                 for gen in xsum._split_generators(dl)}  # pylint: disable=protected-access

  gsm8k = tfds.builder("gsm8k", data_dir=str(root / "data"))
  dl = mock.MagicMock()
  dl.download_and_extract.side_effect = lambda urls: _write_gsm8k_raw(root, urls)
  out["gsm8k"] = {split: list(ex for _, ex in examples)
                  for split, examples in gsm8k._split_generators(dl).items()}  # pylint: disable=protected-access
  return out


@pytest.fixture
def serve(tfds, generated):
  """``tfds.testing.mock_data`` serving ``generated``; yields (reads, tfds.load spy).

  (mock_data points every builder at its own metadata folder, so the ``data_dir``
  a loader passes is checked on the ``tfds.load`` call.)
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reads = []

  def as_dataset(self, split, shuffle_files=False, **unused_kwargs):
    split = str(split)
    if split not in generated[self.name]:
      raise ValueError(f"TFDS {self.name!r} has no split {split!r}; it has "
                       f"{sorted(generated[self.name])}")
    reads.append((self.name, split, shuffle_files))
    records = generated[self.name][split]
    return tf.data.Dataset.from_tensor_slices(
        {key: [r[key] for r in records] for key in self.info.features})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset), mock.patch.object(
      tfds, "load", wraps=tfds.load) as load:
    yield reads, load


def test_catalog_has_the_builders_and_feature_keys_the_loaders_read(tfds, tmp_path):
  for name, keys in (("xsum", {"document", "summary"}),
                     ("gsm8k", {"question", "answer"})):
    assert tfds.builder_cls(name).name == name
    features = tfds.builder(name, data_dir=str(tmp_path)).info.features
    assert keys <= set(features)
    for key in keys:
      assert isinstance(features[key], tfds.features.Text)


def test_builder_split_names(generated):
  # XSum has all three of our splits; GSM8K has train and test only (plus the
  # *_socratic variants), so the task carves validation out of train.
  assert tuple(generated["xsum"]) == tasks.SPLITS
  assert set(generated["gsm8k"]) == {"train", "test", "train_socratic",
                                     "test_socratic"}
  # The records really come from the builders' parsers.
  assert generated["xsum"]["train"][0] == {
      "document": "Tourists came back.\nHotels filled.",
      "summary": "Été à Paris: crowds return."}
  assert generated["gsm8k"]["test"][0]["answer"] == "5 * 6 = 30\n#### 30"
  assert generated["gsm8k"]["test"][0]["short_answer"] == "30"


def test_xsum_maps_document_and_summary_per_split(serve, tmp_path):
  task = tasks.get_task("xsum", data_dir=str(tmp_path))
  for split in tasks.SPLITS:
    expected = [{"source": document, "target": summary}
                for _, summary, document in _XSUM[split]]
    assert task.examples(split) == expected
  assert [len(task.examples(s)) for s in tasks.SPLITS] == [3, 2, 1]
  example = task.examples("test")[0]
  assert task.model_input(example) == "summarize: It snowed in the hills."
  assert example["target"] == "Snow in May."
  # One TFDS read per split (the task caches), from the given data_dir, unshuffled.
  reads, load = serve
  assert reads == [("xsum", "train", False), ("xsum", "validation", False),
                   ("xsum", "test", False)]
  assert load.call_args_list == [
      mock.call("xsum", split=split, data_dir=str(tmp_path), shuffle_files=False)
      for split in tasks.SPLITS]

  capped = tasks.get_task("xsum", data_dir=str(tmp_path), max_examples=2,
                          prefix="tl;dr: ")
  assert [ex["source"] for ex in capped.examples("train")] == [
      "Tourists came back.\nHotels filled.", "The match was abandoned."]
  assert capped.texts("validation") == [
      "tl;dr: Shares rose 3%.", "tl;dr: Pupils returned on Monday.",
      "Markets rise.", "Schools reopen."]


def test_gsm8k_carves_a_disjoint_validation_out_of_train(serve, tmp_path):
  task = tasks.get_task("gsm8k", data_dir=str(tmp_path), validation_fraction=0.25)
  train = task.examples("train")
  validation = task.examples("validation")
  test = task.examples("test")
  questions = [q for q, _ in _GSM8K_TRAIN]

  train_q = [ex["source"] for ex in train]
  validation_q = [ex["source"] for ex in validation]
  assert not set(train_q) & set(validation_q)
  assert sorted(train_q + validation_q) == sorted(questions)
  assert 4 <= len(validation_q) <= 16  # ~25 % of 40
  # Both keep the file order, and the cut is the hash of each question.
  assert train_q == [q for q in questions if q in set(train_q)]
  fractions = (0.75, 0.25, 0.0)
  assert validation_q == [q for q in questions
                          if tasks.split_of(q, seed=0, fractions=fractions)
                          == "validation"]
  # Targets are the full answers, with the "#### <number>" the metric reads.
  answers = dict(_GSM8K_TRAIN)
  assert all(ex["target"] == answers[ex["source"]] for ex in train + validation)
  assert test == [{"source": q, "target": a} for q, a in _GSM8K_TEST]
  assert task.model_input(test[0]) == ("solve: Bo reads 5 pages a day. How many in 6 "
                                       "days?")
  assert metrics.gsm8k_accuracy(["That is 30.", "It is 1000.", "9"],
                                [ex["target"] for ex in test]) == pytest.approx(
                                    200 / 3)
  # TFDS is asked for train (once, shared by train and validation) and test only.
  reads, load = serve
  assert sorted(split for _, split, _ in reads) == ["test", "train", "train"]
  assert {c.kwargs["data_dir"] for c in load.call_args_list} == {str(tmp_path)}

  other_seed = tasks.get_task("gsm8k", data_dir=str(tmp_path), seed=1,
                              validation_fraction=0.25)
  assert [ex["source"] for ex in other_seed.examples("validation")] != validation_q
  capped = tasks.get_task("gsm8k", data_dir=str(tmp_path), validation_fraction=0.25,
                          max_examples=3)
  assert capped.examples("validation") == validation[:3]
  assert capped.examples("train") == train[:3]


def test_stock_random_mock_data(tfds, tmp_path):
  # tfds's own random examples (no dataset_info.json: the builder's code gives the
  # features) decode to strings and are counted per split.
  with tfds.testing.mock_data(num_examples=5):
    xsum = tasks.get_task("xsum", data_dir=str(tmp_path))
    gsm8k = tasks.get_task("gsm8k", data_dir=str(tmp_path), validation_fraction=0.5)
    for split in tasks.SPLITS:
      examples = xsum.examples(split)
      assert len(examples) == 5
      assert all(isinstance(ex["source"], str) and isinstance(ex["target"], str)
                 for ex in examples)
    assert len(gsm8k.examples("test")) == 5
    carved = gsm8k.examples("train") + gsm8k.examples("validation")
    assert len(carved) == 5
