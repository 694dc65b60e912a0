"""Rules of signed envelopes that mutation testing found no test holding (issue 17).

Each test names one rule; each was checked to fail when that rule is broken
(``python bench/mutation.py --paths protocols/signing.py``).
"""

from __future__ import annotations

import nacl.signing
import pytest

from protocols.codec import decode, encode
from protocols.errors import DecodeError, LocalProtocolError, SignatureError
from protocols.signing import Envelope, open_envelope, seal, sign, signing_bytes, verify

MAX = 16 * 1024
KEY = nacl.signing.SigningKey(b"\x05" * 32)
PUB = bytes(KEY.verify_key)


def test_a_domain_tag_is_1_to_255_bytes_and_framed_by_its_length() -> None:
    assert signing_bytes("a" * 255, b"body") == bytes([255]) + b"a" * 255 + b"body"
    assert signing_bytes("d", b"") == b"\x01d"
    for bad in ("", "a" * 256):
        with pytest.raises(LocalProtocolError, match="domain tag"):
            signing_bytes(bad, b"body")


def test_verify_refuses_a_key_or_signature_of_the_wrong_length_with_a_signature_error() -> None:
    sig = sign(KEY, "d/v1", b"x")
    verify(PUB, "d/v1", b"x", sig)
    for key, s in ((PUB[:31], sig), (PUB + b"\0", sig), (PUB, sig[:63]), (PUB, sig + b"\0")):
        with pytest.raises(SignatureError, match="must be"):
            verify(key, "d/v1", b"x", s)


def test_an_envelope_is_built_only_with_a_32_byte_signer_and_a_64_byte_signature() -> None:
    good = seal(KEY, "d/v1", {"x": 1})
    with pytest.raises(LocalProtocolError, match="signer"):
        Envelope(good.domain, good.signer[:31], good.body, good.signature)
    with pytest.raises(LocalProtocolError, match="signature"):
        Envelope(good.domain, good.signer, good.body, good.signature[:63])


@pytest.mark.parametrize("field", ["k", "b", "s"])
def test_each_of_signer_body_and_signature_must_be_a_byte_string(field: str) -> None:
    """One non-bytes field is enough to refuse the envelope with a DecodeError."""
    raw = decode(seal(KEY, "d/v1", {"x": 1}).to_bytes(), max_size=MAX)
    raw[field] = raw[field].hex()  # same content, as text
    with pytest.raises(DecodeError, match="byte strings"):
        open_envelope(encode(raw), domain="d/v1", max_size=MAX)


@pytest.mark.parametrize(("field", "cut"), [("k", 1), ("s", 1), ("k", -1), ("s", -1)])
def test_a_wire_envelope_with_a_key_or_signature_of_the_wrong_length_is_a_decode_error(
    field: str, cut: int
) -> None:
    """Either length alone being wrong refuses it (not the other one too)."""
    raw = decode(seal(KEY, "d/v1", {"x": 1}).to_bytes(), max_size=MAX)
    raw[field] = raw[field][:-1] if cut == 1 else raw[field] + b"\0"
    with pytest.raises(DecodeError, match="wrong length"):
        open_envelope(encode(raw), domain="d/v1", max_size=MAX)


def test_open_envelope_returns_exactly_what_was_signed() -> None:
    sealed = seal(KEY, "d/v1", {"x": 1})
    env, value = open_envelope(sealed.to_bytes(), domain="d/v1", max_size=MAX)
    assert env == sealed
    assert value == {"x": 1}
