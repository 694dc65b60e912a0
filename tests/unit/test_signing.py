"""Signed envelopes: any change breaks the signature; domains never cross."""

from __future__ import annotations

from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codec import decode, encode
from protocols.errors import DecodeError, RemoteProtocolError, SignatureError
from protocols.signing import Envelope, open_envelope, seal, sign, verify

MAX = 16 * 1024
KEY = nacl.signing.SigningKey(b"\x01" * 32)
OTHER = nacl.signing.SigningKey(b"\x02" * 32)

domains = st.sampled_from(
    ["edgeswarm/ad/v1", "edgeswarm/bid/v1", "edgeswarm/job/v1", "edgeswarm/receipt/v1"]
)
bodies = st.dictionaries(
    st.text(max_size=8), st.integers() | st.text(max_size=20) | st.binary(max_size=20), max_size=6
)


@settings(max_examples=100, deadline=None)
@given(domains, bodies)
def test_seal_then_open_round_trips(domain: str, body: dict[str, Any]) -> None:
    data = seal(KEY, domain, body).to_bytes()
    env, value = open_envelope(data, domain=domain, max_size=MAX)
    assert value == body
    assert env.signer == bytes(KEY.verify_key)


@settings(max_examples=100, deadline=None)
@given(domains, bodies, st.data())
def test_any_bit_flip_fails(domain: str, body: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(seal(KEY, domain, body).to_bytes())
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    raw[i] ^= 1 << bit
    with pytest.raises(RemoteProtocolError):
        open_envelope(bytes(raw), domain=domain, max_size=MAX)


@settings(max_examples=100, deadline=None)
@given(bodies, st.data())
def test_body_bit_flip_is_a_signature_error(body: dict[str, Any], data: st.DataObject) -> None:
    env = seal(KEY, "edgeswarm/bid/v1", body)
    b = bytearray(env.body)
    i = data.draw(st.integers(0, len(b) - 1))
    b[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(SignatureError):
        verify(env.signer, env.domain, bytes(b), env.signature)


@settings(max_examples=100, deadline=None)
@given(domains, domains, bodies)
def test_a_signature_for_one_domain_never_verifies_for_another(
    signed_for: str, checked_as: str, body: dict[str, Any]
) -> None:
    env = seal(KEY, signed_for, body)
    if signed_for == checked_as:
        verify(env.signer, checked_as, env.body, env.signature)
        return
    with pytest.raises(SignatureError):
        verify(env.signer, checked_as, env.body, env.signature)
    # Re-labelling the envelope's domain does not help either.
    relabelled = Envelope(checked_as, env.signer, env.body, env.signature).to_bytes()
    with pytest.raises(SignatureError):
        open_envelope(relabelled, domain=checked_as, max_size=MAX)


def test_domain_is_length_framed() -> None:
    # "ab" + body "c..." must not equal "a" + body "bc...": the tag length is signed too.
    sig = sign(KEY, "edgeswarm/a", b"bc")
    with pytest.raises(SignatureError):
        verify(bytes(KEY.verify_key), "edgeswarm/ab", b"c", sig)


def test_wrong_signer_fails() -> None:
    env = seal(KEY, "edgeswarm/bid/v1", {"x": 1})
    forged = Envelope(env.domain, bytes(OTHER.verify_key), env.body, env.signature)
    with pytest.raises(SignatureError):
        open_envelope(forged.to_bytes(), domain=env.domain, max_size=MAX)


def test_wrong_expected_domain_is_refused_with_a_clear_message() -> None:
    data = seal(KEY, "edgeswarm/bid/v1", {"x": 1}).to_bytes()
    with pytest.raises(SignatureError, match="expected a edgeswarm/ad/v1 message"):
        open_envelope(data, domain="edgeswarm/ad/v1", max_size=MAX)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_envelopes_give_typed_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        open_envelope(data, domain="edgeswarm/bid/v1", max_size=MAX)


def test_envelope_shape_errors() -> None:
    good = decode(seal(KEY, "d/v1", {"x": 1}).to_bytes(), max_size=MAX)
    with pytest.raises(DecodeError, match="unexpected fields"):
        open_envelope(encode({**good, "extra": 1}), domain="d/v1", max_size=MAX)
    with pytest.raises(DecodeError, match="version"):
        open_envelope(encode({**good, "v": 2}), domain="d/v1", max_size=MAX)
    with pytest.raises(DecodeError):
        open_envelope(encode([1, 2]), domain="d/v1", max_size=MAX)
    with pytest.raises(DecodeError, match="limit"):
        open_envelope(seal(KEY, "d/v1", {"x": b"y" * 500}).to_bytes(), domain="d/v1", max_size=100)
