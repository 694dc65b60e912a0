"""Typed signed messages: rules that mutation testing found no test holding (issue 17).
Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/signed.py``).
"""

from __future__ import annotations

import nacl.signing
import pytest

from protocols.codec import decode, encode
from protocols.errors import DecodeError, LocalProtocolError
from protocols.identity import peer_id_from_public_key
from protocols.market import JobError
from protocols.signed import open_message, sign_message

KEY = nacl.signing.SigningKey(b"\x06" * 32)
PID = peer_id_from_public_key(bytes(KEY.verify_key))


def _error(message: str) -> bytes:
    return sign_message(
        KEY, JobError(job_id=b"\x01" * 16, executor=PID, code="internal", message=message)
    ).to_bytes()


def _size(message: str) -> int:
    try:
        return len(_error(message))
    except LocalProtocolError:  # over the cap: sign_message refuses to build it
        return JobError.MAX_BYTES + 1


def test_a_message_of_exactly_its_cap_opens() -> None:
    # 'é' is 2 bytes: the cap is reachable within the message's 1024-character limit.
    need = JobError.MAX_BYTES - _size("")
    text = next(
        t
        for k in range(0, 1025)
        for j in range(max(0, need - 2 * k - 4), need - 2 * k + 1)
        for t in ["é" * k + "a" * j]
        if len(t) <= 1024 and _size(t) == JobError.MAX_BYTES
    )
    data = _error(text)
    assert len(data) == JobError.MAX_BYTES
    assert open_message(JobError, data).message.message == text
    with pytest.raises(DecodeError):
        open_message(JobError, data + b"\0")


@pytest.mark.parametrize("field", ["k", "b", "s"])
def test_each_envelope_field_must_be_a_byte_string(field: str) -> None:
    raw = decode(_error("x"), max_size=4096)
    raw[field] = raw[field].hex()
    with pytest.raises(DecodeError, match="byte strings"):
        open_message(JobError, encode(raw))


@pytest.mark.parametrize("field", ["k", "s"])
def test_a_key_or_signature_of_the_wrong_length_alone_is_refused(field: str) -> None:
    raw = decode(_error("x"), max_size=4096)
    raw[field] = raw[field][:-1]
    with pytest.raises(DecodeError, match="key must be"):
        open_message(JobError, encode(raw))
