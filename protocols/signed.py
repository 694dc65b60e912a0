"""Typed signed messages: a validated message plus the envelope that signs it.

``Signed[M]`` pairs a message (a frozen dataclass that knows its domain tag,
size cap and which peer must sign it) with the ``Envelope`` that carries its
exact signed bytes. ``sign_message`` makes one; ``open_message`` parses one
from untrusted bytes, checks the signature, that the signer's key *is* the
peer id the message names as its signer, and (given ``now``) its expiry.

``digest`` is sha256 of the signed bytes (length-framed domain tag || body),
so it is fixed by the message alone, can be computed before the envelope
exists, and never collides across message kinds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

import nacl.signing

from protocols.codec import decode, encode
from protocols.errors import DecodeError, LocalProtocolError, SignatureError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.signing import (
    ENVELOPE_VERSION,
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Envelope,
    parsed_from,
    seal,
    signing_bytes,
    verify,
)


class Message(Protocol):
    """What a message class provides to be signed and opened."""

    DOMAIN: ClassVar[str]
    MAX_BYTES: ClassVar[int]

    @property
    def signer(self) -> str:
        """The peer id that must have signed this message."""
        ...

    def to_body(self) -> dict[str, Any]: ...

    @classmethod
    def from_body(cls, body: Any) -> Self: ...

    def check_time(self, now: float) -> None:
        """Raise ``ValidationError`` if the message is stale at ``now``."""
        ...


M = TypeVar("M", bound=Message)


def message_digest(message: Message) -> bytes:
    """sha256 over exactly what the signer signs for ``message``."""
    return hashlib.sha256(signing_bytes(message.DOMAIN, encode(message.to_body()))).digest()


@dataclass(frozen=True)
class Signed(Generic[M]):
    """A message and its envelope. Built by ``sign_message`` or ``open_message``."""

    message: M
    envelope: Envelope

    def to_bytes(self) -> bytes:
        return self.envelope.to_bytes()

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(signing_bytes(self.envelope.domain, self.envelope.body)).digest()

    @property
    def signer_id(self) -> str:
        return self.envelope.signer_id

    def verify(self) -> None:
        """Check the signature, the signer, and that the envelope carries this message.

        ``open_message`` already did this; call it for objects assembled by hand
        or parsed with ``verify=False``. The signature is checked over the envelope's
        bytes, and the message must re-encode to exactly those bytes (one message, one
        digest: ``message_digest`` and ``digest`` never disagree). Once this passed, a
        repeat is free: both fields are frozen, so the outcome cannot change.
        """
        if self.__dict__.get("_verified"):
            return
        kind = type(self.message).__name__
        if self.envelope.domain != self.message.DOMAIN:
            raise SignatureError(
                f"{kind} must be signed for {self.message.DOMAIN!r}, got {self.envelope.domain!r}"
            )
        verify(
            self.envelope.signer, self.envelope.domain, self.envelope.body, self.envelope.signature
        )
        if self.envelope.signer_id != self.message.signer:
            raise SignatureError(
                f"{kind} names {self.message.signer} as its signer "
                f"but was signed by {self.envelope.signer_id}"
            )
        if encode(self.message.to_body()) != self.envelope.body:
            raise ValidationError(f"{kind} does not match the bytes its envelope signs")
        self.__dict__["_verified"] = True


def sign_message(key: nacl.signing.SigningKey, message: M) -> Signed[M]:
    """Sign ``message`` with ``key``; the key must be the message's named signer."""
    signer = peer_id_from_public_key(bytes(key.verify_key))
    if signer != message.signer:
        raise LocalProtocolError(
            f"{type(message).__name__} must be signed by {message.signer}, not by {signer}"
        )
    envelope = seal(key, message.DOMAIN, message.to_body())
    if len(envelope.to_bytes()) > message.MAX_BYTES:
        raise LocalProtocolError(
            f"{type(message).__name__} is {len(envelope.to_bytes())} bytes signed, "
            f"the cap is {message.MAX_BYTES}"
        )
    return Signed(message=message, envelope=envelope)


def parse_envelope(data: bytes, *, domain: str, max_size: int) -> Envelope:
    """Decode and shape-check an envelope *without* checking its signature."""
    raw = decode(data, max_size=max_size)
    if not isinstance(raw, dict):
        raise DecodeError(f"{domain} envelope must be a CBOR map, got {type(raw).__name__}")
    if set(raw) != {"v", "d", "k", "b", "s"}:
        raise DecodeError(f"{domain} envelope has unexpected fields {sorted(map(str, raw))}")
    if type(raw["v"]) is not int or raw["v"] != ENVELOPE_VERSION:
        raise DecodeError(f"unsupported envelope version {raw['v']!r}, expected {ENVELOPE_VERSION}")
    if raw["d"] != domain:
        raise SignatureError(f"expected a {domain} message, got {str(raw['d'])[:80]!r}")
    signer, body, sig = raw["k"], raw["b"], raw["s"]
    if not (type(signer) is bytes and type(body) is bytes and type(sig) is bytes):
        raise DecodeError(f"{domain} envelope fields k, b, s must be byte strings")
    if len(signer) != PUBLIC_KEY_SIZE or len(sig) != SIGNATURE_SIZE:
        raise DecodeError(
            f"{domain} envelope key must be {PUBLIC_KEY_SIZE} bytes and signature "
            f"{SIGNATURE_SIZE}, got {len(signer)} and {len(sig)}"
        )
    # ``data`` decoded strictly (canonical) to exactly these typed fields: it is their encoding.
    return parsed_from(Envelope(domain=domain, signer=signer, body=body, signature=sig), data)


def open_message(
    cls: type[M], data: bytes, *, now: float | None = None, verify: bool = True
) -> Signed[M]:
    """Parse a signed ``cls`` from untrusted ``data``.

    Checks the size cap before decoding, the shape, version and fields, and
    (unless ``verify=False``, for bytes this peer stored after checking them)
    the signature and that the signer is the peer the message names. With
    ``now`` it also rejects expired messages. Every failure is a
    ``RemoteProtocolError`` subclass.
    """
    if len(data) > cls.MAX_BYTES:
        raise DecodeError(f"{cls.__name__} is {len(data)} bytes, the cap is {cls.MAX_BYTES}")
    envelope = parse_envelope(data, domain=cls.DOMAIN, max_size=cls.MAX_BYTES)
    message = cls.from_body(decode(envelope.body, max_size=cls.MAX_BYTES))
    signed = Signed(message=message, envelope=envelope)
    if verify:
        signed.verify()
    if now is not None:
        message.check_time(now)
    return signed
