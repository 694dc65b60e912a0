"""Verified signatures are remembered (a repeat is a lookup); nothing else is."""

from __future__ import annotations

import hashlib

import nacl.signing
import pytest

from protocols import signing
from protocols.errors import SignatureError

KEY = nacl.signing.SigningKey(hashlib.sha256(b"cache-key").digest())
PUB = bytes(KEY.verify_key)


def test_a_repeat_is_not_verified_again_and_a_changed_byte_always_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = nacl.signing.VerifyKey.verify

    def counting(self: nacl.signing.VerifyKey, *args: object, **kw: object) -> object:
        calls.append(1)
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(nacl.signing.VerifyKey, "verify", counting)
    body = b"cache test body %d" % len(signing._verified)
    sig = signing.sign(KEY, "edgeswarm/test/v1", body)
    for _ in range(3):
        signing.verify(PUB, "edgeswarm/test/v1", body, sig)
    assert len(calls) == 1
    # Any change to what is verified misses the cache and fails the real check.
    bad_sig = bytes([sig[0] ^ 1]) + sig[1:]
    for args in (
        (PUB, "edgeswarm/test/v1", body + b"x", sig),
        (PUB, "edgeswarm/test/v2", body, sig),
        (PUB, "edgeswarm/test/v1", body, bad_sig),
        (bytes(nacl.signing.SigningKey.generate().verify_key), "edgeswarm/test/v1", body, sig),
    ):
        with pytest.raises(SignatureError):
            signing.verify(*args)
    assert len(calls) == 5
    # A failure is never remembered as a success.
    with pytest.raises(SignatureError):
        signing.verify(PUB, "edgeswarm/test/v1", body, bad_sig)
    assert len(calls) == 6


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "VERIFIED_CACHE_SIZE", 8)
    monkeypatch.setattr(signing, "_verified", {})
    for n in range(20):
        body = b"bounded %d" % n
        signing.verify(PUB, "edgeswarm/test/v1", body, signing.sign(KEY, "edgeswarm/test/v1", body))
    assert len(signing._verified) == 8
