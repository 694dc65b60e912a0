"""Rules of the market's field checks (protocols/market_fields.py) that no other test held.

Found by mutation testing (issue 17, docs/testing.md): each test fails when its rule is
removed from the code.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ValidationError
from protocols.market_fields import want_cid, want_int, want_str


def _error(value: object) -> str:
    with pytest.raises(ValidationError) as info:
        want_int("Bid", "price", value)
    return str(info.value)


def test_error_text_quotes_an_untrusted_value_whole_up_to_80_characters() -> None:
    value = "a" * 78  # repr adds the quotes: 80 characters
    assert _error(value).endswith(" got " + repr(value))


def test_error_text_cuts_a_longer_untrusted_value_to_80_characters() -> None:
    """A peer's garbage never makes a log line or a one-line CLI error unbounded."""
    for value in ("a" * 79, "b" * 10_000):
        assert _error(value).endswith(" got " + repr(value)[:77] + "...")


@given(st.text(alphabet="0123456789abcdef", min_size=0, max_size=80))
def test_a_model_cid_is_exactly_64_lowercase_hex_digits(text: str) -> None:
    if len(text) == 64:
        assert want_cid("JobRequest", "model_cid", text) == text
    else:
        with pytest.raises(ValidationError):
            want_cid("JobRequest", "model_cid", text)


def test_a_model_cid_of_64_hex_digits_is_taken_and_of_65_or_uppercase_refused() -> None:
    assert want_cid("JobRequest", "model_cid", "0" * 64) == "0" * 64
    with pytest.raises(ValidationError):
        want_cid("JobRequest", "model_cid", "a" * 65)
    with pytest.raises(ValidationError):
        want_cid("JobRequest", "model_cid", "A" * 64)


def test_a_text_field_is_1_to_64_characters_by_default() -> None:
    assert want_str("Ad", "name", "x") == "x"
    assert want_str("Ad", "name", "x" * 64) == "x" * 64
    for bad in ("", "x" * 65):
        with pytest.raises(ValidationError):
            want_str("Ad", "name", bad)
