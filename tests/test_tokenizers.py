"""Tests of the byte, Hugging Face and word tokenisers."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ketchup_jax.data import tokenizers


def test_byte_ids_follow_byt5():
  tok = tokenizers.ByteTokenizer()
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode("Ab") == [65 + 3, 98 + 3]
  assert tok.encode("ë") == [0xC3 + 3, 0xAB + 3]
  assert tok.encode("") == []


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trips_any_text(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert all(3 <= i < 259 for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_id] + tok.encode("junk") + [0, 0]) == text


def test_byte_decode_skips_specials_and_padding_ids():
  tok = tokenizers.ByteTokenizer(vocab_size=384)
  assert tok.vocab_size == 384
  ids = [0, 2] + tok.encode("hi") + [300, 383] + tok.encode("!") + [1, 104]
  assert tok.decode(ids) == "hi!"
  assert tok.decode_batch(np.array([tok.encode("ab") + [1], [0, 0, 0]])) == ["ab", ""]
  with pytest.raises(ValueError, match="vocab_size must be an int >= 259"):
    tokenizers.ByteTokenizer(vocab_size=100)


def _tiny_hf_tokenizer(tmp_path, *, t5_ids=True):
  """Trains a tiny WordPiece-free Unigram tokenizer and saves it as an HF directory."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  import transformers

  specials = ["<pad>", "</s>", "<unk>"] if t5_ids else ["<unk>", "<pad>", "</s>"]
  raw = Tokenizer(models.Unigram())
  raw.pre_tokenizer = pre_tokenizers.Metaspace()
  raw.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=specials,
                                    unk_token="<unk>", show_progress=False)
  corpus = ["the cat sat on the mat", "a dog sat on a log", "the dog and the cat"] * 20
  raw.train_from_iterator(corpus, trainer=trainer)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>",
                                            eos_token="</s>", unk_token="<unk>")
  out = tmp_path / ("t5" if t5_ids else "other")
  hf.save_pretrained(out)
  return out


def test_hf_wrapper_loads_a_local_directory_and_round_trips(tmp_path):
  tok = tokenizers.HFTokenizer.from_pretrained(_tiny_hf_tokenizer(tmp_path))
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok.vocab_size == len(tok.hf_tokenizer) <= 60
  ids = tok.encode("the cat sat")
  assert ids and tok.eos_id not in ids and tok.pad_id not in ids
  assert tok.decode(ids) == "the cat sat"
  assert tok.decode(ids + [1] + tok.encode("dog")) == "the cat sat"
  assert tok.decode([0] + ids + [0]) == "the cat sat"
  assert tok.encode_batch(["the cat sat", "a dog"]) == [ids, tok.encode("a dog")]
  assert tok.decode_batch([ids + [1, 0]]) == ["the cat sat"]
  assert tokenizers.get_tokenizer("hf", path=tmp_path / "t5").encode("the cat") == (
      tok.encode("the cat"))


def test_hf_wrapper_rejects_non_t5_ids_unless_asked(tmp_path):
  path = _tiny_hf_tokenizer(tmp_path, t5_ids=False)
  with pytest.raises(ValueError, match="expected T5 ids pad_token_id=0, "
                     "eos_token_id=1, got pad_token_id=1, eos_token_id=2"):
    tokenizers.HFTokenizer.from_pretrained(path)
  tok = tokenizers.HFTokenizer.from_pretrained(path, require_t5_ids=False)
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
  assert tok.decode(tok.encode("a dog") + [2, 5]) == "a dog"
  with pytest.raises(ValueError, match="must be a local tokenizer directory"):
    tokenizers.HFTokenizer.from_pretrained(tmp_path / "missing")


CORPUS = ["translate English to Dutch: twenty-two", "tweeëntwintig",
          "translate English to Dutch: thirty-three", "drieëndertig",
          "Tom buys 3 pens. Tom pays 3 * 2 = <<3*2=6>>6 dollars.\n#### 6"]


def test_word_tokenizer_is_deterministic_and_round_trips(tmp_path):
  tok = tokenizers.WordTokenizer.train(CORPUS, max_vocab=80)
  assert tok.vocab == tokenizers.WordTokenizer.train(list(CORPUS), max_vocab=80).vocab
  assert tok.vocab_size == 80
  assert tok.vocab[:4] == ["<pad>", "</s>", "<unk>", "▁"]
  for text in CORPUS[:4]:
    assert tok.decode(tok.encode(text)) == text
  # Whitespace other than single spaces is normalised to one space.
  assert tok.decode(tok.encode(CORPUS[4])) == CORPUS[4].replace("\n", " ")
  # Unseen words decompose into known pieces; unseen characters become unk.
  assert tok.decode(tok.encode("tweeëndertig")) == "tweeëndertig"
  # With room for every substring, words are whole pieces and an unseen compound
  # splits into the two parts seen in training.
  big = tokenizers.WordTokenizer.train(CORPUS, max_vocab=400)
  assert big.vocab_size == 365  # all substrings of <= 12 characters fit
  pieces = lambda text: [big.vocab[i] for i in big.encode(text)]
  assert pieces("translate English to Dutch:") == [
      "translate", "▁English", "▁to", "▁Dutch", ":"]
  assert pieces("tweeëndertig") == ["tweeën", "dertig"]
  assert tok.encode("q")[0] == tok.unk_id
  tok.save(tmp_path / "vocab.json")
  loaded = tokenizers.get_tokenizer("word", path=tmp_path / "vocab.json")
  assert loaded.vocab == tok.vocab


def test_word_segmentation_uses_fewest_pieces():
  tok = tokenizers.WordTokenizer(["a", "b", "c", "ab", "abc", "bcd", "d"])
  # "abcd": "abc"+"d" and "a"+"bcd" both need 2; the longer first token wins.
  assert [tok.vocab[i] for i in tok.encode("abcd")] == ["abc", "d"]
  assert [tok.vocab[i] for i in tok.encode("ab")] == ["ab"]


def test_get_tokenizer_errors():
  with pytest.raises(ValueError, match="tokenizer kind must be one of"):
    tokenizers.get_tokenizer("bpe")
  with pytest.raises(ValueError, match="needs path"):
    tokenizers.get_tokenizer("hf")
  with pytest.raises(ValueError, match="max_vocab must be >="):
    tokenizers.WordTokenizer.train(CORPUS, max_vocab=10)
  assert tokenizers.get_tokenizer("byte", vocab_size=512).vocab_size == 512
