"""Offline stand-ins for the paper configs' downloads, for tests.

The paper configs (configs/xsum_k4.py, europarl_en_nl_k4.py, gsm8k_k8.py) read
FLAN-T5-XL / T5-base checkpoints, the T5 SentencePiece tokenizer and TFDS or
Europarl data. Here each is replaced by something small written on the spot:

* `write_tokenizer`: a tiny Unigram tokenizer saved as an HF directory, with
  T5's special ids (pad 0, eos 1, unk 2).
* `write_t5`: a random tiny `transformers.T5ForConditionalGeneration` saved
  with `save_pretrained`, either v1.1-style (gated-GELU, untied `lm_head`, as
  FLAN-T5) or v1.0-style (ReLU, tied and scaled output, as T5).
* `XSUM`, `GSM8K`, `EUROPARL`: small deterministic corpora per split, served
  through `tfds.testing.mock_data` (`mock_tfds`) or written as TSV files
  (`write_europarl_tsv`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
from typing import Iterator

VOCAB_SIZE = 128  # Both models; the tokenizer has fewer entries.

_NOUNS = ("cat", "dog", "mat", "log", "house", "city", "river", "school",
          "market", "bridge", "train", "minister", "council", "farmer")
_VERBS = ("sat", "ran", "opened", "closed", "grew", "fell", "visited",
          "crossed", "built", "sold")
_ADJS = ("old", "new", "big", "small", "red", "quiet", "busy")
# English -> Dutch, word by word (enough for a toy parallel corpus).
_EN_NL = {"the": "de", "cat": "kat", "dog": "hond", "sat": "zat", "on": "op",
          "mat": "mat", "house": "huis", "is": "is", "big": "groot",
          "small": "klein", "old": "oud", "new": "nieuw", "river": "rivier",
          "city": "stad", "and": "en", "red": "rood", "quiet": "stil"}


def _sentence(rng: random.Random) -> str:
  return (f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
          f"near the {rng.choice(_NOUNS)}.")


def _xsum_split(n: int, seed: int) -> list[dict[str, str]]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    body = " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
    summary = _sentence(rng).capitalize()
    out.append({"document": body, "summary": summary})
  return out


def _gsm8k_split(n: int, seed: int) -> list[dict[str, str]]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    noun = rng.choice(("apples", "pens", "books", "coins"))
    question = f"Ann has {a} {noun} and buys {b} more. How many {noun} now?"
    answer = f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"
    out.append({"question": question, "answer": answer,
                "annotation": "", "short_answer": str(a + b)})
  return out


def _europarl_split(n: int, seed: int) -> list[tuple[str, str]]:
  rng = random.Random(seed)
  words = [w for w in _EN_NL if w not in ("the", "and", "on", "is")]
  out = []
  for _ in range(n):
    en = " ".join(["the"] + rng.sample(words, rng.randint(2, 5)))
    out.append((en, " ".join(_EN_NL[w] for w in en.split())))
  return out


# TFDS records per builder and split (GSM8K has only train and test: the task
# carves validation out of train).
XSUM = {"train": _xsum_split(24, 0), "validation": _xsum_split(8, 1),
        "test": _xsum_split(8, 2)}
GSM8K = {"train": _gsm8k_split(40, 3), "test": _gsm8k_split(8, 4)}
EUROPARL = {"train": _europarl_split(24, 5),
            "validation": _europarl_split(8, 6),
            "test": _europarl_split(8, 7)}


def corpus() -> list[str]:
  """Every text the three tasks produce, prompts included."""
  texts = ["summarize: ", "translate English to Dutch: ", "solve: "]
  for records in XSUM.values():
    texts += [r[k] for r in records for k in ("document", "summary")]
  for records in GSM8K.values():
    texts += [r[k] for r in records for k in ("question", "answer")]
  for pairs in EUROPARL.values():
    texts += [t for pair in pairs for t in pair]
  return texts


def write_tokenizer(directory: str | os.PathLike[str]) -> str:
  """A tiny Unigram tokenizer with T5's special ids, saved as an HF directory."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import pre_tokenizers
  from tokenizers import Tokenizer
  from tokenizers import trainers
  import transformers
  # pylint: enable=g-import-not-at-top
  raw = Tokenizer(models.Unigram())
  raw.pre_tokenizer = pre_tokenizers.Metaspace()
  raw.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(
      vocab_size=VOCAB_SIZE - 8, special_tokens=["<pad>", "</s>", "<unk>"],
      unk_token="<unk>", show_progress=False)
  raw.train_from_iterator(corpus(), trainer=trainer)
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
      unk_token="<unk>")
  hf.save_pretrained(directory)
  return os.fspath(directory)


def write_t5(directory: str | os.PathLike[str], *, v1_1: bool, d_model: int,
             d_ff: int, num_layers: int, num_heads: int = 4, d_kv: int = 8,
             eos_bonus: float = 0.0, seed: int = 0) -> str:
  """Saves a random tiny HF T5 (v1.1 gated-GELU untied, or v1.0 ReLU tied).

  Args:
    directory: Where `save_pretrained` writes.
    v1_1: T5 v1.1 (gated-GELU, untied `lm_head`, as FLAN-T5) if True, else
      v1.0 (ReLU, tied output scaled by d_model**-0.5, as T5).
    d_model: Model width.
    d_ff: Feed-forward width.
    num_layers: Encoder and decoder layers.
    num_heads: Attention heads.
    d_kv: Width per head.
    eos_bonus: Makes EOS more likely at every decoder position: every token
      embedding gets a shared positive offset in dimension 0 (so the decoder's
      normalised state is positive there), and EOS's output row gets
      `eos_bonus` more in that dimension. A random model otherwise almost
      never ends a sequence, and the configs drop unfinished rollouts from
      the RL loss.
    seed: Torch seed of the initialisation.

  Returns:
    `directory`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.T5Config(
      vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=d_kv, d_ff=d_ff,
      num_layers=num_layers, num_decoder_layers=num_layers,
      num_heads=num_heads,
      feed_forward_proj="gated-gelu" if v1_1 else "relu",
      tie_word_embeddings=not v1_1, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
      relative_attention_max_distance=20)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if eos_bonus:
    with torch.no_grad():
      model.shared.weight[:, 0] = 4.0
      out = model.shared if not v1_1 else model.lm_head
      out.weight[cfg.eos_token_id, 0] += eos_bonus
  model.save_pretrained(directory)
  return os.fspath(directory)


def write_europarl_tsv(directory: str | os.PathLike[str]) -> str:
  """Writes `europarl_{split}.tsv` (en<TAB>nl); returns the `{split}` pattern."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for split, pairs in EUROPARL.items():
    (directory / f"europarl_{split}.tsv").write_text(
        "".join(f"{en}\t{nl}\n" for en, nl in pairs), encoding="utf-8")
  return str(directory / "europarl_{split}.tsv")


@contextlib.contextmanager
def mock_tfds() -> Iterator[list[tuple[str, str]]]:
  """Serves `XSUM` and `GSM8K` through `tfds.testing.mock_data`.

  Yields:
    The (dataset, split) pairs read, in order.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  import tensorflow_datasets as tfds
  # pylint: enable=g-import-not-at-top
  served = {"xsum": XSUM, "gsm8k": GSM8K}
  reads = []

  def as_dataset(self, split, shuffle_files=False, **unused_kwargs):
    del shuffle_files
    split = str(split)
    if split not in served.get(self.name, {}):
      raise ValueError(f"TFDS {self.name!r}: no mocked split {split!r}")
    reads.append((self.name, split))
    records = served[self.name][split]
    return tf.data.Dataset.from_tensor_slices(
        {key: [r[key] for r in records] for key in self.info.features})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield reads
