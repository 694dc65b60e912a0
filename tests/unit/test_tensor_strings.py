"""String tensors on the wire (ONNX tensor(string), KServe v2 BYTES): round trips, caps,
garbage. Each element is a 4-byte little-endian length and its UTF-8 bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import codec
from protocols.errors import DecodeError, LocalProtocolError, ProtocolError, ValidationError
from protocols.market import TensorMeta
from protocols.tensor import STRING, TensorLimits, as_strings, decode_tensors, encode_tensors

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)


def _wire(n: int, *parts: bytes) -> dict:
    return {"s": {"dtype": STRING, "shape": [n], "data": b"".join(parts)}}


def _el(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw)) + raw


@settings(max_examples=100, deadline=None)
@given(st.lists(texts, max_size=12), st.sampled_from(["flat", "pairs", "nested"]))
def test_round_trip_through_cbor(values: list[str], layout: str) -> None:
    values = values[: len(values) // 2 * 2]
    shape = {"flat": (-1,), "pairs": (-1, 2), "nested": (1, -1, 1)}[layout]
    arr = np.array(values, dtype=object).reshape(shape)
    wire = encode_tensors({"s": arr})
    assert wire["s"]["dtype"] == "string"
    back = decode_tensors(codec.decode(codec.encode(wire), max_size=1 << 20))["s"]
    assert back.dtype == object and back.shape == arr.shape
    assert back.reshape(-1).tolist() == values
    assert all(type(v) is str for v in back.flat)
    # Deterministic: the same strings give the same bytes (digests in commitments).
    assert encode_tensors({"s": back}) == wire


def test_str_bytes_and_numpy_string_arrays_encode_alike() -> None:
    want = encode_tensors({"s": np.array(["héllo", ""], dtype=object)})
    assert encode_tensors({"s": np.array([b"h\xc3\xa9llo", b""], dtype=object)}) == want
    assert encode_tensors({"s": np.array(["héllo", ""])}) == want  # numpy <U5
    assert want["s"]["data"] == _el("héllo".encode()) + _el(b"")


def test_non_utf8_or_non_string_elements_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="not UTF-8"):
        encode_tensors({"s": np.array([b"\xff"], dtype=object)})
    with pytest.raises(LocalProtocolError, match="str or bytes"):
        as_strings(np.array(["a", 3], dtype=object))
    with pytest.raises(DecodeError, match="not UTF-8"):
        decode_tensors(_wire(1, _el(b"\xff\xfe")))


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (_wire(2, _el(b"a")), "cannot hold 2 strings"),
        (_wire(1, struct.pack("<I", 10), b"abc"), "runs past the data"),
        (_wire(1, _el(b"a"), b"x"), "bytes left after"),
        (_wire(2, _el(b"a"), b"\x01\x00\x00"), "ends inside element 1"),
    ],
)
def test_malformed_string_data_is_a_decode_error(wire: dict, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode_tensors(wire)


def test_caps_per_element_count_and_total() -> None:
    """Each cap is checked before the element is read (remove one and its line fails)."""
    big = _wire(1, _el(b"x" * 101))
    with pytest.raises(ValidationError, match="string element 0 has 101 bytes"):
        decode_tensors(big, limits=TensorLimits(max_string_bytes=100))
    assert decode_tensors(big, limits=TensorLimits(max_string_bytes=101))["s"][0] == "x" * 101
    many = _wire(3, _el(b""), _el(b""), _el(b""))
    with pytest.raises(ValidationError, match="more than 2 string elements"):
        decode_tensors(many, limits=TensorLimits(max_string_elements=2))
    with pytest.raises(ValidationError, match="more than 20 bytes"):
        decode_tensors(
            _wire(2, _el(b"x" * 8), _el(b"y" * 8)), limits=TensorLimits(max_total_bytes=20)
        )
    assert decode_tensors(
        _wire(2, _el(b"x" * 6), _el(b"y" * 6)), limits=TensorLimits(max_total_bytes=20)
    )
    # A huge shape with little data is refused before any element is built.
    with pytest.raises(ValidationError):
        decode_tensors(_wire(10**9, b""))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 8))
def test_garbage_string_data_gives_a_typed_error_or_strings(data: bytes, n: int) -> None:
    try:
        out = decode_tensors(_wire(n, data))
    except ProtocolError:
        return
    assert out["s"].shape == (n,) and all(type(v) is str for v in out["s"].flat)


def test_job_request_metas_may_name_string_inputs() -> None:
    assert TensorMeta(name="text", dtype="string", shape=(2,)).dtype == "string"
