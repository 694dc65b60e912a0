"""Properties of the canonical CBOR codec and the length-prefixed framing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codec import (
    FrameDecoder,
    decode,
    decode_uvarint,
    encode,
    encode_uvarint,
    frame,
)
from protocols.errors import DecodeError, FrameTooLarge, LocalProtocolError, RemoteProtocolError

MAX = 64 * 1024

# Plain values the codec promises to round-trip (floats: finite, and NaN-free so == holds).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.integers(-100, 100), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(values)
def test_round_trip(value: Any) -> None:
    assert decode(encode(value), max_size=MAX) == value


@settings(max_examples=100)
@given(st.dictionaries(st.text(max_size=8), st.integers(), max_size=8))
def test_encoding_is_deterministic_whatever_the_insertion_order(d: dict[str, int]) -> None:
    reordered = dict(reversed(list(d.items())))
    assert encode(d) == encode(reordered)


@settings(max_examples=100)
@given(values)
def test_encoding_is_stable(value: Any) -> None:
    assert encode(value) == encode(decode(encode(value), max_size=MAX))


def test_non_canonical_encodings_are_rejected() -> None:
    # 1 encoded in the 1-byte-argument form instead of inline: same value, not canonical.
    with pytest.raises(DecodeError, match="canonical"):
        decode(b"\x18\x01", max_size=MAX)
    # Map keys out of order.
    with pytest.raises(DecodeError, match="canonical"):
        decode(b"\xa2\x61b\x01\x61a\x02", max_size=MAX)


def test_tags_trailing_bytes_and_oversize_are_rejected() -> None:
    with pytest.raises(DecodeError, match="tag"):
        decode(b"\xd9\x9c\x40\x01", max_size=MAX)  # tag 40000 (unassigned)
    # cbor2 decodes some tags itself (1 = epoch time) before the hook sees them;
    # the canonical re-encoding check still refuses the result.
    with pytest.raises(DecodeError):
        decode(b"\xc1\x1a\x00\x00\x00\x00", max_size=MAX)
    with pytest.raises(DecodeError):
        decode(encode(1) + b"\x00", max_size=MAX)
    with pytest.raises(DecodeError, match="limit"):
        decode(encode(b"x" * 100), max_size=50)


def test_deep_nesting_is_rejected() -> None:
    deep: Any = 0
    for _ in range(40):
        deep = [deep]
    with pytest.raises(DecodeError, match="nesting"):
        decode(encode(deep), max_size=MAX)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_gives_a_typed_error_or_a_value(data: bytes) -> None:
    try:
        value = decode(data, max_size=MAX)
    except DecodeError:
        return
    assert encode(value) == data  # anything accepted is canonical


@settings(max_examples=200)
@given(values)
def test_truncated_encodings_give_decode_error(value: Any) -> None:
    data = encode(value)
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:cut], max_size=MAX)


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_uvarint_round_trip(n: int) -> None:
    data = encode_uvarint(n)
    assert decode_uvarint(data) == (n, len(data))
    assert decode_uvarint(data[:-1]) is None  # incomplete, not wrong


def test_uvarint_rejects_non_minimal_and_overlong() -> None:
    with pytest.raises(DecodeError, match="minimal"):
        decode_uvarint(b"\x81\x00")
    with pytest.raises(DecodeError, match="longer"):
        decode_uvarint(b"\xff" * 11)
    with pytest.raises(LocalProtocolError):
        encode_uvarint(-1)


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=7))
def test_frames_survive_any_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(frame(p, max_size=1024) for p in payloads)
    dec = FrameDecoder(max_size=1024)
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        dec.feed(stream[i : i + chunk])
        out.extend(dec.frames())
    assert out == payloads
    assert dec.buffered == 0


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=100), min_size=1, max_size=5))
def test_byte_at_a_time(payloads: list[bytes]) -> None:
    stream = b"".join(frame(p, max_size=128) for p in payloads)
    dec = FrameDecoder(max_size=128)
    out: list[bytes] = []
    for b in stream:
        dec.feed(bytes([b]))
        out.extend(dec.frames())
    assert out == payloads


@settings(max_examples=100)
@given(st.binary(min_size=1, max_size=200))
def test_truncated_frame_is_never_delivered(payload: bytes) -> None:
    data = frame(payload, max_size=1024)
    dec = FrameDecoder(max_size=1024)
    dec.feed(data[:-1])
    assert list(dec.frames()) == []
    dec.feed(data[-1:])
    assert list(dec.frames()) == [payload]


@settings(max_examples=100)
@given(st.integers(min_value=101, max_value=2**40))
def test_oversize_announcement_fails_before_the_body_arrives(length: int) -> None:
    dec = FrameDecoder(max_size=100)
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_uvarint(length))  # header alone: nothing buffered for the body
    assert dec.buffered == 0


@settings(max_examples=200)
@given(st.binary(max_size=40))
def test_garbage_frames_give_typed_errors(data: bytes) -> None:
    dec = FrameDecoder(max_size=16)
    try:
        dec.feed(data)
        list(dec.frames())
    except RemoteProtocolError:
        pass


def test_frame_refuses_to_build_what_the_receiver_rejects() -> None:
    with pytest.raises(LocalProtocolError):
        frame(b"x" * 11, max_size=10)
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_size=0)
