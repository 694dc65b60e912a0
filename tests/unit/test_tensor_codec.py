"""protocols.tensor: numpy arrays <-> CBOR-able values, with caps checked before allocation."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols import codec
from protocols.errors import DecodeError, LocalProtocolError, ProtocolError, ValidationError
from protocols.tensor import DTYPES, TensorLimits, decode_tensors, encode_tensors

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
)
arrays = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda dt: hnp.arrays(
        dtype=DTYPES[dt],
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
tensor_dicts = st.dictionaries(names, arrays, max_size=5)


def _wire(tensors: dict[str, np.ndarray]) -> bytes:
    return codec.encode(encode_tensors(tensors))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    # Byte equality: NaN payloads and -0.0 must survive too.
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@SETTINGS
@given(tensor_dicts)
def test_round_trip_through_cbor(tensors: dict[str, np.ndarray]) -> None:
    decoded = decode_tensors(codec.decode(_wire(tensors), max_size=1 << 24))
    assert decoded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert _same(decoded[name], array), name


@SETTINGS
@given(tensor_dicts)
def test_encoding_is_deterministic_and_canonical(tensors: dict[str, np.ndarray]) -> None:
    wire = _wire(tensors)
    assert wire == _wire({k: v.copy() for k, v in reversed(list(tensors.items()))})
    # codec.decode refuses non-canonical bytes, so this also proves canonical form.
    codec.decode(wire, max_size=1 << 24)


@SETTINGS
@given(arrays)
def test_byte_order_and_layout_do_not_change_the_wire(array: np.ndarray) -> None:
    swapped = array.astype(array.dtype.newbyteorder(">"))
    fortran = np.array(array, order="F")
    assert _wire({"t": swapped}) == _wire({"t": array}) == _wire({"t": fortran})


def test_wire_form_is_little_endian() -> None:
    wire = encode_tensors({"x": np.array([1, 256], dtype=np.uint16)})
    assert wire == {"x": {"dtype": "uint16", "shape": [2], "data": b"\x01\x00\x00\x01"}}


def test_every_numpy_onnx_dtype_is_supported() -> None:
    assert set(DTYPES) == {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }


def test_decoded_arrays_are_native_readonly_views() -> None:
    out = decode_tensors(encode_tensors({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    x = out["x"]
    assert x.dtype == np.float32 and x.dtype.isnative
    assert x.shape == (2, 3)
    assert not x.flags.writeable


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (np.array([1 + 2j]), "supported"),
        # Object arrays are string tensors: only str or bytes elements (test_tensor_strings).
        (np.array([object()]), "str or bytes"),
    ],
)
def test_encode_rejects_unsupported_dtypes(bad: np.ndarray, why: str) -> None:
    with pytest.raises(LocalProtocolError, match=why):
        encode_tensors({"x": bad})


def test_encode_rejects_bad_names_and_values() -> None:
    with pytest.raises(LocalProtocolError):
        encode_tensors({"": np.zeros(1)})
    with pytest.raises(LocalProtocolError, match="numpy array"):
        encode_tensors({"x": [1, 2]})  # type: ignore[dict-item]


# ---------------------------------------------------------------- caps


def _one(dtype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    return {"t": {"dtype": dtype, "shape": shape, "data": data}}


def test_caps_are_checked_before_allocation() -> None:
    # 2**40 float32 would be 4 TiB; the cap must trip on the shape, not on memory.
    with pytest.raises(ValidationError, match="elements"):
        decode_tensors(_one("float32", [1 << 20, 1 << 20], b""))
    with pytest.raises(ValidationError, match="elements"):
        decode_tensors(_one("float32", [0, 1 << 62], b""))


def test_element_cap() -> None:
    limits = TensorLimits(max_elements=10)
    ok = encode_tensors({"a": np.zeros(4, np.int8), "b": np.zeros(6, np.int8)})
    assert len(decode_tensors(ok, limits=limits)) == 2
    over = encode_tensors({"a": np.zeros(5, np.int8), "b": np.zeros(6, np.int8)})
    with pytest.raises(ValidationError, match="more than 10 elements"):
        decode_tensors(over, limits=limits)


def test_byte_cap() -> None:
    limits = TensorLimits(max_total_bytes=64)
    assert decode_tensors(encode_tensors({"a": np.zeros(8, np.float64)}), limits=limits)
    over = encode_tensors({"a": np.zeros(8, np.float64), "b": np.zeros(1, np.int8)})
    with pytest.raises(ValidationError, match="more than 64 bytes"):
        decode_tensors(over, limits=limits)


def test_rank_and_count_caps() -> None:
    with pytest.raises(ValidationError, match="rank 3, the limit is 2"):
        decode_tensors(encode_tensors({"a": np.zeros((1, 1, 1))}), limits=TensorLimits(max_rank=2))
    many = encode_tensors({f"t{i}": np.zeros(1) for i in range(4)})
    with pytest.raises(ValidationError, match="4 tensors, the limit is 3"):
        decode_tensors(many, limits=TensorLimits(max_tensors=3))


def test_limits_validate_themselves() -> None:
    with pytest.raises(LocalProtocolError):
        TensorLimits(max_rank=-1)


# ------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([], "map of name to tensor"),
        ({1: {}}, "names must be strings"),
        ({"t": []}, "must be a map with dtype, shape, data"),
        ({"t": {"dtype": "float32", "shape": [1]}}, "must be a map with dtype, shape, data"),
        (_one("complex64", [1], b"\x00" * 8), "dtype 'complex64'"),
        (_one("float32", [-1], b""), "non-negative ints"),
        (_one("float32", [True], b"\x00" * 4), "non-negative ints"),
        (_one("float32", [1.0], b"\x00" * 4), "non-negative ints"),
        (_one("float32", 3, b"\x00" * 12), "shape must be a list"),
        (_one("float32", [3], b"\x00" * 11), "needs 12 bytes of data, got 11"),
        (_one("float32", [3], "abc"), "data must be bytes"),
        (_one("bool", [2], b"\x01\x02"), "other than 0 and 1"),
    ],
)
def test_malformed_values_raise_decode_error(value: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_tensors(value)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16)
    | st.sampled_from(["dtype", "shape", "data", "float32", "int64", "bool"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["dtype", "shape", "data"]), children, max_size=4
        )
    ),
    max_leaves=20,
)


@SETTINGS
@given(cbor_values)
def test_garbage_gives_a_typed_error(value: Any) -> None:
    try:
        out = decode_tensors(value)
    except (DecodeError, ValidationError):
        return
    assert all(isinstance(a, np.ndarray) for a in out.values())


@SETTINGS
@given(tensor_dicts.filter(bool), st.data())
def test_bit_flips_give_valid_tensors_or_a_typed_error(
    tensors: dict[str, np.ndarray], data: st.DataObject
) -> None:
    wire = bytearray(_wire(tensors))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    try:
        out = decode_tensors(codec.decode(bytes(wire), max_size=1 << 24))
    except ProtocolError as exc:
        assert isinstance(exc, DecodeError | ValidationError)
        return
    for array in out.values():
        assert isinstance(array, np.ndarray)


def test_tags_in_tensor_messages_are_refused() -> None:
    tagged = cbor2.dumps({"t": cbor2.CBORTag(2, b"\x01")}, canonical=True)
    with pytest.raises(DecodeError):
        decode_tensors(codec.decode(tagged, max_size=1024))
