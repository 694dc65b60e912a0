"""The KServe v2 tensor codec (peer.http.v2): JSON and binary forms, every datatype, bad input."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer.http import v2
from protocols.tensor import TensorLimits

NUMERIC = [
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
]


def _array(dtype: str) -> np.ndarray:
    if dtype == "bool":
        return np.array([[True, False, True], [False, False, True]])
    info = np.iinfo(dtype) if dtype[0] in "ui" else np.finfo(dtype)
    return np.array([[info.min, 0, 1], [2, info.max, 3]], dtype=dtype)


def _roundtrip(arrays: dict[str, Any], binary: bool) -> dict[str, Any]:
    body, headers = v2.encode_request(arrays, binary=binary)
    request = v2.decode_request(body, headers.get(v2.HEADER_LENGTH))
    assert request.binary_default is binary
    return request.arrays


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_every_numeric_datatype_round_trips(dtype: str, binary: bool) -> None:
    a = _array(dtype)
    out = _roundtrip({"t": a}, binary)["t"]
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_round_trip(binary: bool) -> None:
    a = np.array([["a", "héllo"], ["", "x" * 300]], dtype=object)
    out = _roundtrip({"s": a}, binary)["s"]
    assert out.shape == (2, 2)
    got = [v.decode() if isinstance(v, bytes) else v for v in out.flat]
    assert got == list(a.flat)


def test_binary_bytes_layout_is_length_prefixed_little_endian() -> None:
    items, blobs = v2.encode_tensor_list({"s": np.array([b"ab", b"c"], dtype=object)}, True)
    assert items[0]["datatype"] == "BYTES"
    assert blobs == [struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"]


def test_nested_json_data_and_requested_outputs() -> None:
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}
            ],
            "outputs": [{"name": "z", "parameters": {"binary_data": True}}, {"name": "w"}],
        }
    ).encode()
    request = v2.decode_request(body, None)
    np.testing.assert_array_equal(request.arrays["x"], [[1, 2], [3, 4]])
    assert request.outputs == {"z": True, "w": False}
    out, headers = v2.encode_response(
        model_name="m",
        outputs={"z": np.ones(2, np.float32), "w": np.zeros(1, np.int64), "unasked": np.ones(1)},
        request=request,
        parameters={"executor": "e"},
    )
    header, arrays = v2.decode_response(out, headers[v2.HEADER_LENGTH])
    assert header["id"] == "r1" and header["parameters"] == {"executor": "e"}
    assert set(arrays) == {"z", "w"}
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert header["outputs"][1]["data"] == [0]


def _inp(**kw: Any) -> bytes:
    base = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    return json.dumps({"inputs": [{**base, **kw}]}).encode()


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"not json", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty"),
        (_inp(datatype="BF16"), None, "datatype"),
        (_inp(shape=[3]), None, "needs 3"),
        (_inp(shape=[-1]), None, "non-negative"),
        (_inp(shape=[1] * 9), None, "dimensions"),
        (_inp(data=["a", "b"]), None, "numbers"),
        (_inp(datatype="INT32", data=[1.5, 2]), None, "integers"),
        (_inp(datatype="UINT8", data=[300, 1]), None, "does not fit"),
        (_inp(datatype="BOOL", data=[1, 0]), None, "booleans"),
        (_inp(name=""), None, "name"),
        (
            _inp(data=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]),
            None,
            "deeply|needs 2|regular",
        ),
        (_inp(parameters={"binary_data_size": 8}), "x", "integer"),
        (_inp(shape=[2**40]), None, "above the limit"),
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(
    body: bytes, header: str | None, message: str
) -> None:
    with pytest.raises(v2.V2Error, match=message):
        v2.decode_request(body, header)


def test_binary_sizes_must_match() -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    ok = head + np.ones(2, "<f4").tobytes()
    assert v2.decode_request(ok, str(len(head))).arrays["x"].tolist() == [1.0, 1.0]
    with pytest.raises(v2.V2Error, match="ends after"):
        v2.decode_request(ok[:-1], str(len(head)))
    with pytest.raises(v2.V2Error, match="not claimed"):
        v2.decode_request(ok + b"x", str(len(head)))
    with pytest.raises(v2.V2Error, match="outside the body"):
        v2.decode_request(ok, str(len(ok) + 1))


def test_limits_are_checked_before_allocation() -> None:
    limits = TensorLimits(max_elements=10, max_total_bytes=16, max_tensors=1)
    with pytest.raises(v2.V2Error, match="above the limit of 10"):
        v2.decode_request(_inp(shape=[11], data=[0.0] * 11), None, limits)
    with pytest.raises(v2.V2Error, match="more than the limit of 16 bytes"):
        v2.decode_request(_inp(shape=[5], data=[0.0] * 5), None, limits)
    two = json.dumps({"inputs": [json.loads(_inp())["inputs"][0]] * 2}).encode()
    with pytest.raises(v2.V2Error, match="above the limit of 1"):
        v2.decode_request(two, None, limits)


@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_garbage_never_raises_anything_but_v2error(body: bytes, header: str | None) -> None:
    with contextlib.suppress(v2.V2Error):
        v2.decode_request(body, header)
