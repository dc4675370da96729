"""Tests of the task registry, splits and file loaders."""
import json
import sys
import types

import pytest

from ketchup_jax.data import hashing, tasks


def test_splitmix64_matches_the_reference_stream():
  # First output of the reference SplitMix64 generator seeded with 0.
  assert hashing.splitmix64(0) == 0xE220A8397B1DCDAF
  assert int(hashing.splitmix64_np([0])[0]) == 0xE220A8397B1DCDAF


def test_split_and_order_are_pinned_golden_values():
  # If these change, every stored split and resumed run changes: do not update lightly.
  assert [tasks.split_of(str(n), seed=0) for n in range(12)] == [
      "test"] + ["train"] * 10 + ["test"]
  assert hashing.permutation(10, seed=0, epoch=0).tolist() == [
      0, 9, 1, 6, 3, 5, 4, 2, 8, 7]


def test_unknown_task_lists_known_ones():
  with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: arith, "
                     "europarl_en_nl, gsm8k, jsonl, numbers_en_nl, xsum"):
    tasks.get_task("nope")


def test_unknown_option_is_named():
  with pytest.raises(ValueError, match=r"unknown options \['max_nuber'\]"):
    tasks.get_task("numbers_en_nl", max_nuber=5)


def test_numbers_splits_partition_the_range_and_are_deterministic():
  task = tasks.get_task("numbers_en_nl", max_number=1999)
  assert task.prefix == "translate English to Dutch: "
  assert task.metric_names == ("chrf", "exact_match")
  by_split = {s: [ex["source"] for ex in task.examples(s)] for s in tasks.SPLITS}
  all_sources = sum(by_split.values(), [])
  assert len(all_sources) == 2000 == len(set(all_sources))
  assert 1400 < len(by_split["train"]) < 1800  # ~80 %
  assert 100 < len(by_split["test"]) < 300  # ~10 %
  again = tasks.get_task("numbers_en_nl", max_number=1999)
  assert again.examples("validation") == task.examples("validation")
  other_seed = tasks.get_task("numbers_en_nl", max_number=1999, seed=1)
  assert other_seed.examples("validation") != task.examples("validation")
  # A larger range keeps every number in the same split.
  bigger = tasks.get_task("numbers_en_nl", max_number=2999)
  assert set(by_split["test"]) <= {ex["source"] for ex in bigger.examples("test")}


def test_numbers_examples_pair_english_with_dutch():
  task = tasks.get_task("numbers_en_nl", max_number=30)
  pairs = {ex["source"]: ex["target"] for s in tasks.SPLITS for ex in task.examples(s)}
  assert pairs["twenty-two"] == "tweeëntwintig"
  assert task.model_input({"source": "five"}) == "translate English to Dutch: five"
  texts = task.texts("train")
  n = len(task.examples("train"))
  assert len(texts) == 2 * n
  assert texts[0].startswith("translate English to Dutch: ")
  assert texts[n] == task.examples("train")[0]["target"]


def test_bad_split_and_bad_fractions():
  task = tasks.get_task("numbers_en_nl", max_number=10)
  with pytest.raises(ValueError, match="split must be one of"):
    task.examples("dev")
  with pytest.raises(ValueError, match="fractions must be three non-negative"):
    tasks.get_task("numbers_en_nl", fractions=(0.5, 0.5, 0.5))


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_jsonl_reads_fields_and_skips_blank_lines(tmp_path):
  _write(tmp_path / "train.jsonl", [json.dumps({"source": "a", "target": "b"}), "",
                                    "   ", json.dumps({"source": "c", "target": ""})])
  task = tasks.get_task("jsonl", paths=str(tmp_path / "{split}.jsonl"), prefix="p: ")
  assert task.examples("train") == [{"source": "a", "target": "b"},
                                    {"source": "c", "target": ""}]
  assert task.splits == ("train", "validation", "test")
  with pytest.raises(FileNotFoundError):
    task.examples("test")


@pytest.mark.parametrize("line,message", [
    ('{"source": "a", "target": ', r"bad\.jsonl:2: not valid JSON"),
    ('["a", "b"]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"source": "a"}', r"bad\.jsonl:2: field 'target' must be a string"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "bad.jsonl", [json.dumps({"source": "x", "target": "y"}),
                                         line])
  task = tasks.get_task("jsonl", paths={"test": str(path)})
  assert task.splits == ("test",)
  with pytest.raises(ValueError, match=message):
    task.examples("test")


def test_jsonl_paths_must_name_the_split():
  with pytest.raises(ValueError, match="must contain '{split}'"):
    tasks.get_task("jsonl", paths="data.jsonl")
  with pytest.raises(ValueError, match="split names must be in"):
    tasks.get_task("jsonl", paths={"dev": "x.jsonl"})


def test_europarl_tsv_and_jsonl(tmp_path):
  tsv = _write(tmp_path / "train.tsv", ["Good morning\tGoedemorgen", "",
                                        "Thank you\tDank u"])
  jl = _write(tmp_path / "test.jsonl", [json.dumps({"en": "Yes", "nl": "Ja"})])
  task = tasks.get_task("europarl_en_nl", paths={"train": str(tsv), "test": str(jl)},
                        max_examples=5)
  assert task.metric_names == ("bleu", "chrf")
  assert task.examples("train") == [{"source": "Good morning", "target": "Goedemorgen"},
                                    {"source": "Thank you", "target": "Dank u"}]
  assert task.examples("test") == [{"source": "Yes", "target": "Ja"}]
  bad = _write(tmp_path / "bad.tsv", ["a\tb", "only one column"])
  with pytest.raises(ValueError, match=r"bad\.tsv:2: expected 2 tab-separated"):
    tasks.get_task("europarl_en_nl", paths={"train": str(bad)}).examples("train")
  with pytest.raises(ValueError, match="must end in .tsv or .jsonl"):
    tasks.get_task("europarl_en_nl", paths={"train": "x.csv"})


def test_max_examples_caps_reading(tmp_path):
  path = _write(tmp_path / "t.jsonl", [json.dumps({"source": str(i), "target": "t"})
                                       for i in range(10)])
  task = tasks.get_task("jsonl", paths={"train": str(path)}, max_examples=3)
  assert [ex["source"] for ex in task.examples("train")] == ["0", "1", "2"]
  with pytest.raises(ValueError, match="max_examples must be None or a positive int"):
    tasks.get_task("jsonl", paths={"train": str(path)}, max_examples=0)


def test_tfds_tasks_are_built_without_tensorflow_datasets():
  xsum = tasks.get_task("xsum")
  gsm = tasks.get_task("gsm8k")
  assert xsum.prefix == "summarize: "
  assert xsum.metric_names == ("rouge1", "rouge2", "rougeL")
  assert gsm.metric_names == ("gsm8k_accuracy",)


def _fake_tfds(records):
  """A stand-in tensorflow_datasets module serving ``records[(name, split)]``."""
  module = types.ModuleType("tensorflow_datasets")
  calls = []

  def load(name, *, split, data_dir, shuffle_files):
    calls.append((name, split, data_dir, shuffle_files))
    return records[(name, split)]

  module.load = load
  module.as_numpy = lambda ds: iter(ds)
  module.calls = calls
  return module


def test_xsum_loader_through_a_fake_tfds(monkeypatch):
  records = {("xsum", "validation"): [{"document": "Doc é.".encode(),
                                        "summary": b"Sum."}] * 3}
  fake = _fake_tfds(records)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  task = tasks.get_task("xsum", data_dir="/d", max_examples=2)
  assert task.examples("validation") == [{"source": "Doc é.", "target": "Sum."}] * 2
  assert fake.calls == [("xsum", "validation", "/d", False)]


def test_gsm8k_validation_is_carved_from_train(monkeypatch):
  train = [{"question": f"q{i}".encode(), "answer": f"a #### {i}".encode()}
           for i in range(200)]
  test = [{"question": b"t", "answer": b"#### 1"}]
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      _fake_tfds({("gsm8k", "train"): train, ("gsm8k", "test"): test}))
  task = tasks.get_task("gsm8k", validation_fraction=0.2)
  tr = [ex["source"] for ex in task.examples("train")]
  va = [ex["source"] for ex in task.examples("validation")]
  assert len(tr) + len(va) == 200 and not set(tr) & set(va)
  assert 20 < len(va) < 60
  assert task.examples("test") == [{"source": "t", "target": "#### 1"}]


def test_tfds_missing_gives_an_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="needs tensorflow-datasets"):
    tasks.get_task("xsum").examples("test")


def test_real_tfds_import_when_installed():
  tfds = pytest.importorskip("tensorflow_datasets")
  assert callable(tfds.load) and callable(tfds.as_numpy)
