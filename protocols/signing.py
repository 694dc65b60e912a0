"""Signed envelopes: Ed25519 over ``domain_tag || canonical_cbor(body)``.

Each message kind has its own domain tag (``edgeswarm/ad/v1``,
``edgeswarm/bid/v1`` ...), so a signature made for one kind can never be
replayed as another. Keys are raw 32-byte Ed25519 keys (PyNaCl); the same key
is the peer's libp2p identity and its ledger account.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from protocols.codec import decode, encode
from protocols.errors import DecodeError, LocalProtocolError, SignatureError
from protocols.identity import peer_id_from_public_key

ENVELOPE_VERSION = 1
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def signing_bytes(domain: str, body_bytes: bytes) -> bytes:
    """The exact bytes that are signed: a length-framed domain tag, then the body."""
    tag = domain.encode()
    if not tag or len(tag) > 255:
        raise LocalProtocolError(f"domain tag must be 1..255 bytes, got {len(tag)}")
    return bytes([len(tag)]) + tag + body_bytes


def sign(key: nacl.signing.SigningKey, domain: str, body_bytes: bytes) -> bytes:
    return bytes(key.sign(signing_bytes(domain, body_bytes)).signature)


# Signatures that verified, by sha256(key || signature || signed bytes): one message is
# checked several times on its way (a witness checks a transfer, then stores its lock; a
# payer checks each vote, then stores the certificate), and a repeat is a lookup. Only
# successes are kept, and the key covers every verified byte. Bounded (oldest dropped).
VERIFIED_CACHE_SIZE = 16_384
_verified: dict[bytes, None] = {}


def verify(public_key: bytes, domain: str, body_bytes: bytes, signature: bytes) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``public_key``'s over (domain, body)."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"public key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    signed = signing_bytes(domain, body_bytes)
    seen = hashlib.sha256(public_key + signature + signed).digest()
    if seen in _verified:
        return
    try:
        nacl.signing.VerifyKey(public_key).verify(signed, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as exc:
        raise SignatureError(
            f"bad {domain} signature from {peer_id_from_public_key(public_key)}"
        ) from exc
    _verified[seen] = None
    if len(_verified) > VERIFIED_CACHE_SIZE:
        del _verified[next(iter(_verified))]


@dataclass(frozen=True)
class Envelope:
    """A signed message as it travels: who signed, for which domain, what, and the signature.

    ``body`` is the canonical CBOR of the message body; the typed message is
    parsed from it by the caller after ``open_envelope`` verified it.
    """

    domain: str
    signer: bytes
    body: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signer) != PUBLIC_KEY_SIZE:
            raise LocalProtocolError("signer must be a 32-byte Ed25519 public key")
        if len(self.signature) != SIGNATURE_SIZE:
            raise LocalProtocolError("signature must be 64 bytes")

    def to_bytes(self) -> bytes:
        # Encoded once per envelope: every field is immutable, so are its bytes (a message
        # is stored, spread and answered many times on its way; each encode cost ~3 us).
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:
            wire = encode(
                {
                    "v": ENVELOPE_VERSION,
                    "d": self.domain,
                    "k": self.signer,
                    "b": self.body,
                    "s": self.signature,
                }
            )
            self.__dict__["_wire"] = wire
        return wire

    @property
    def signer_id(self) -> str:
        return peer_id_from_public_key(self.signer)


def parsed_from(envelope: Envelope, wire: bytes) -> Envelope:
    """``envelope``, made from ``wire``: the caller checked that ``wire`` is exactly the
    canonical encoding of its five fields (``decode`` is strict, and each field had its
    exact type), so ``to_bytes`` returns ``wire`` instead of encoding it again."""
    envelope.__dict__["_wire"] = bytes(wire)  # (a copy only if a caller passed a view)
    return envelope


def seal(key: nacl.signing.SigningKey, domain: str, body: Any) -> Envelope:
    """Encode ``body`` canonically, sign it for ``domain``, and wrap it."""
    body_bytes = encode(body)
    return Envelope(
        domain=domain,
        signer=bytes(key.verify_key),
        body=body_bytes,
        signature=sign(key, domain, body_bytes),
    )


def open_envelope(data: bytes, *, domain: str, max_size: int) -> tuple[Envelope, Any]:
    """Decode, check the domain and verify the signature; return the envelope and its body value.

    Every failure is a ``RemoteProtocolError`` subclass with a readable message.
    """
    raw = decode(data, max_size=max_size)
    if not isinstance(raw, dict):
        raise DecodeError("envelope must be a CBOR map")
    if set(raw) != {"v", "d", "k", "b", "s"}:
        raise DecodeError(f"envelope has unexpected fields: {sorted(map(str, raw))}")
    if raw["v"] != ENVELOPE_VERSION:
        raise DecodeError(f"unsupported envelope version {raw['v']!r}, expected {ENVELOPE_VERSION}")
    if raw["d"] != domain:
        raise SignatureError(f"expected a {domain} message, got {raw['d']!r}")
    signer, body, sig = raw["k"], raw["b"], raw["s"]
    if not (isinstance(signer, bytes) and isinstance(body, bytes) and isinstance(sig, bytes)):
        raise DecodeError("envelope fields k, b, s must be byte strings")
    if len(signer) != PUBLIC_KEY_SIZE or len(sig) != SIGNATURE_SIZE:
        raise DecodeError("envelope key or signature has the wrong length")
    verify(signer, domain, body, sig)
    value = decode(body, max_size=max_size)
    return Envelope(domain=domain, signer=signer, body=body, signature=sig), value
