"""Deterministic CBOR and length-prefixed framing.

Everything that is signed or hashed is encoded with canonical CBOR
(RFC 8949 §4.2: shortest forms, map keys sorted), so two peers that hold the
same value produce the same bytes. Decoding is strict: the bytes must be
exactly the canonical encoding of what they decode to, which rules out
malleable encodings of signed data.

Frames on streams are ``uvarint(length) || payload``. ``FrameDecoder`` is a
sans-IO receive buffer: feed it bytes in any chunking, take whole frames out;
the announced length is checked against the cap *before* any payload is
buffered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2

from protocols.errors import DecodeError, FrameTooLarge, LocalProtocolError

# A varint of more than 10 bytes cannot encode a 64-bit length.
_MAX_VARINT_BYTES = 10
# Nesting deeper than this is never produced by us and only costs the decoder.
_MAX_DEPTH = 16


def encode(value: Any) -> bytes:
    """Canonical CBOR encoding of plain values (dict, list, str, bytes, int, float, bool, None)."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode value as CBOR: {exc}") from exc


def decode(data: bytes, *, max_size: int, canonical: bool = True) -> Any:
    """Decode canonical CBOR of at most ``max_size`` bytes.

    Raises ``DecodeError`` for oversize, malformed, trailing or non-canonical
    input, and for any CBOR tag (we never send tags; they would let a sender
    make the decoder build arbitrary objects).

    ``canonical=False`` skips only the canonical-form check (a full re-encode,
    ~15x the cost of decoding a large tensor). Use it only for bytes that are
    neither signed nor hashed as received: e.g. job payload frames, which a
    signed commitment binds by ``content_digest`` of the *decoded* value.
    Size, tag and depth checks still apply.
    """
    if len(data) > max_size:
        raise DecodeError(f"message is {len(data)} bytes, the limit is {max_size}")
    try:
        value = cbor2.loads(data, tag_hook=_reject_tag)
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises a variety of types on garbage
        raise DecodeError(f"malformed CBOR: {exc}") from exc
    _check_depth(value, 0)
    if not canonical:
        return value
    try:
        encoded = cbor2.dumps(value, canonical=True)
    except Exception as exc:
        raise DecodeError(f"CBOR value cannot be re-encoded: {exc}") from exc
    if encoded != data:
        raise DecodeError("CBOR is not in canonical form (RFC 8949 §4.2)")
    return value


def _reject_tag(_decoder: object, tag: object) -> object:
    raise DecodeError(f"CBOR tags are not allowed (got tag {getattr(tag, 'tag', '?')})")


def _check_depth(value: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise DecodeError(f"CBOR nesting deeper than {_MAX_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_depth(k, depth + 1)
            _check_depth(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_depth(v, depth + 1)


def encode_uvarint(n: int) -> bytes:
    if n < 0:
        raise LocalProtocolError(f"uvarint must be non-negative, got {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(buf: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """Return ``(value, bytes_used)``, or ``None`` if more bytes are needed.

    Raises ``DecodeError`` for a varint longer than 10 bytes or a non-minimal
    encoding (a trailing zero continuation byte), so lengths are unambiguous.
    """
    value = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        pos = start + i
        if pos >= len(buf):
            return None
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise DecodeError("varint is not minimally encoded")
            return value, i + 1
        shift += 7
    raise DecodeError(f"varint longer than {_MAX_VARINT_BYTES} bytes")


def frame(payload: bytes, *, max_size: int) -> bytes:
    """``uvarint(len) || payload``; refuses to build a frame the receiver would reject."""
    if len(payload) > max_size:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds the cap of {max_size}")
    return encode_uvarint(len(payload)) + payload


class FrameDecoder:
    """Bounded, sans-IO receive buffer for length-prefixed frames.

    >>> d = FrameDecoder(max_size=1024)
    >>> d.feed(frame(b"hi", max_size=1024))
    >>> list(d.frames())
    [b'hi']
    """

    def __init__(self, *, max_size: int) -> None:
        if max_size <= 0:
            raise LocalProtocolError("max_size must be positive")
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        # Fail fast on an oversize announcement: no need to wait for the body.
        header = decode_uvarint(self._buf)
        if header is not None and header[0] > self.max_size:
            length = header[0]
            self._buf.clear()
            raise FrameTooLarge(f"frame announces {length} bytes, the cap is {self.max_size}")
        if header is None and len(self._buf) > _MAX_VARINT_BYTES:
            raise DecodeError("frame header is not a valid varint")

    def next_frame(self) -> bytes | None:
        header = decode_uvarint(self._buf)
        if header is None:
            return None
        length, used = header
        if length > self.max_size:
            self._buf.clear()
            raise FrameTooLarge(f"frame announces {length} bytes, the cap is {self.max_size}")
        end = used + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[used:end])
        del self._buf[:end]
        return payload

    def frames(self) -> Iterator[bytes]:
        while (f := self.next_frame()) is not None:
            yield f

    @property
    def buffered(self) -> int:
        return len(self._buf)
