"""Sentences to BERT inputs, and token states back to sentence embeddings.

A small pure-Python BERT tokenizer (basic tokenization + WordPiece, uncased),
equivalent to Hugging Face's ``BertTokenizer(do_lower_case=True)`` for the
all-MiniLM-L6-v2 vocabulary shipped in ``edge_models/data/minilm-vocab.txt``
(Apache-2.0, from sentence-transformers/all-MiniLM-L6-v2). No network, no
extra dependency.
"""

from __future__ import annotations

import functools
import importlib.resources
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_models.errors import InvalidInput

_MAX_WORD_CHARS = 100  # longer words become [UNK], as in BERT


class BertTokenizer:
    def __init__(self, vocab: Mapping[str, int], *, lowercase: bool = True) -> None:
        self.vocab = dict(vocab)
        self.lowercase = lowercase
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"vocabulary lacks the special token {special}")
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    @classmethod
    def from_vocab_text(cls, text: str, *, lowercase: bool = True) -> BertTokenizer:
        vocab: dict[str, int] = {}
        for i, line in enumerate(text.splitlines()):
            vocab.setdefault(line.rstrip("\n"), i)
        return cls(vocab, lowercase=lowercase)

    # -- basic tokenization ------------------------------------------------

    def basic_tokens(self, text: str) -> list[str]:
        text = _clean(text)
        text = _space_cjk(text)
        out: list[str] = []
        for word in text.split():
            if self.lowercase:
                word = _strip_accents(word.lower())
            out.extend(_split_punct(word))
        return out

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > _MAX_WORD_CHARS:
            return [self.unk_id]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found: int | None = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def token_ids(self, text: str) -> list[int]:
        return [i for word in self.basic_tokens(text) for i in self.wordpiece(word)]

    def tokens(self, text: str) -> list[str]:
        inv = {v: k for k, v in self.vocab.items()}
        return [inv[i] for i in self.token_ids(text)]

    def encode(self, sentences: Sequence[str], *, max_length: int = 128) -> dict[str, Any]:
        """BERT inputs for a batch: [CLS] tokens [SEP], right-padded to the longest."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise InvalidInput("expected at least one sentence, got none")
        if max_length < 2:
            raise InvalidInput(f"max_length must be at least 2, got {max_length}")
        rows = [[self.cls_id, *self.token_ids(s)[: max_length - 2], self.sep_id] for s in sentences]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids),
        }


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    # As in BERT: every "C*" category (control, format, private use, unassigned).
    return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    # BERT treats all non-alphanumeric ASCII as punctuation (e.g. "$", "^", "`").
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _clean(text: str) -> str:
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        out.append(" " if _is_whitespace(ch) else ch)
    return "".join(out)


def _space_cjk(text: str) -> str:
    return "".join(f" {ch} " if _is_cjk(ord(ch)) else ch for ch in text)


def _strip_accents(text: str) -> str:
    return "".join(
        ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn"
    )


def _split_punct(word: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    for ch in word:
        if _is_punct(ch):
            if current:
                out.append("".join(current))
                current = []
            out.append(ch)
        else:
            current.append(ch)
    if current:
        out.append("".join(current))
    return out


@functools.cache
def minilm_tokenizer() -> BertTokenizer:
    """The tokenizer for the packaged all-MiniLM-L6-v2 model (vocab loaded once)."""
    text = (
        importlib.resources.files("edge_models")
        .joinpath("data/minilm-vocab.txt")
        .read_text(encoding="utf-8")
    )
    return BertTokenizer.from_vocab_text(text)


TOKENIZERS = {"bert-uncased": minilm_tokenizer}


def tokenizer_for(kind: str) -> BertTokenizer:
    try:
        return TOKENIZERS[kind]()
    except KeyError:
        raise InvalidInput(
            f"no tokenizer named {kind!r}; known: {', '.join(sorted(TOKENIZERS))}"
        ) from None


def mean_pool(
    last_hidden_state: npt.NDArray[Any], attention_mask: npt.NDArray[Any]
) -> npt.NDArray[np.float32]:
    """Average token states over real (unmasked) tokens: (batch, seq, dim) -> (batch, dim)."""
    mask = attention_mask.astype(np.float32)[..., None]
    summed = (last_hidden_state.astype(np.float32) * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    pooled: npt.NDArray[np.float32] = (summed / counts).astype(np.float32)
    return pooled


def normalize(vectors: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Scale each row to unit length (so dot product = cosine similarity)."""
    v = vectors.astype(np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    unit: npt.NDArray[np.float32] = (v / np.clip(norms, 1e-12, None)).astype(np.float32)
    return unit


def sentence_embeddings(
    outputs: Mapping[str, npt.NDArray[Any]], inputs: Mapping[str, npt.NDArray[Any]]
) -> npt.NDArray[np.float32]:
    """Unit sentence vectors from a BERT model's ``last_hidden_state`` and the inputs' mask."""
    return normalize(mean_pool(outputs["last_hidden_state"], inputs["attention_mask"]))
