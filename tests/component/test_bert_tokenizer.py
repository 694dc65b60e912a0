"""The pure-Python BERT uncased tokenizer for the packaged all-MiniLM-L6-v2 model."""

from __future__ import annotations

import numpy as np
import pytest

from edge_models.errors import InvalidInput
from edge_models.text import BertTokenizer, minilm_tokenizer, tokenizer_for

CLS, SEP, PAD, UNK = 101, 102, 0, 100


@pytest.fixture(scope="module")
def tok() -> BertTokenizer:
    return minilm_tokenizer()


def test_vocab_is_bert_uncased(tok: BertTokenizer) -> None:
    assert len(tok.vocab) == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (PAD, UNK, CLS, SEP)
    assert tokenizer_for("bert-uncased") is tok


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello, world!", [7592, 1010, 2088, 999]),
        (
            "The quick brown fox jumps over the lazy dog.",
            [1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012],
        ),
        ("GPU-accelerated inference", [14246, 2226, 1011, 14613, 28937]),
    ],
)
def test_known_token_ids(tok: BertTokenizer, text: str, ids: list[int]) -> None:
    assert tok.token_ids(text) == ids


def test_normalisation(tok: BertTokenizer) -> None:
    assert tok.basic_tokens("Café  CRÈME\tbrûlée") == ["cafe", "creme", "brulee"]
    assert tok.basic_tokens("Don't stop!") == ["don", "'", "t", "stop", "!"]
    assert tok.basic_tokens("a\x00b\u200bc\ufffd d") == ["abc", "d"]  # controls dropped
    assert tok.basic_tokens("東京x") == ["東", "京", "x"]  # CJK chars stand alone
    assert tok.basic_tokens("  ") == []


def test_wordpiece(tok: BertTokenizer) -> None:
    assert tok.tokens("GPUs") == ["gp", "##us"]
    assert tok.token_ids("🙂") == [UNK]
    assert tok.token_ids("x" * 101) == [UNK]  # over-long words are unknown


def test_encode_pads_and_masks(tok: BertTokenizer) -> None:
    enc = tok.encode(["Hello, world!", "hi", ""])
    assert enc["input_ids"].dtype == np.int64
    assert enc["input_ids"].tolist() == [
        [CLS, 7592, 1010, 2088, 999, SEP],
        [CLS, 7632, SEP, PAD, PAD, PAD],
        [CLS, SEP, PAD, PAD, PAD, PAD],
    ]
    assert enc["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert (enc["token_type_ids"] == 0).all()
    assert tok.encode("Hello")["input_ids"].shape == (1, 3)


def test_encode_truncates(tok: BertTokenizer) -> None:
    enc = tok.encode(["word " * 50], max_length=8)
    assert enc["input_ids"].shape == (1, 8)
    assert enc["input_ids"][0, 0] == CLS and enc["input_ids"][0, -1] == SEP


def test_encode_errors(tok: BertTokenizer) -> None:
    with pytest.raises(InvalidInput, match="at least one sentence"):
        tok.encode([])
    with pytest.raises(InvalidInput, match="max_length"):
        tok.encode(["x"], max_length=1)
    with pytest.raises(InvalidInput, match="no tokenizer named 'gpt'"):
        tokenizer_for("gpt")


def test_vocab_needs_special_tokens() -> None:
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        BertTokenizer.from_vocab_text("[PAD]\n[UNK]\n[SEP]\nhello\n")
