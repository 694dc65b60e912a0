"""KServe v2 BYTES tensors in peer.http.v2: JSON strings and 4-byte little-endian
length-prefixed binary elements, with the string caps of ``TensorLimits``."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from peer.http import v2
from protocols.tensor import TensorLimits


def _binary(elements: list[bytes], shape: list[int] | None = None) -> tuple[bytes, str]:
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": shape or [len(elements)],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, str(len(header))


def _json(values: list[str]) -> bytes:
    item = {"name": "text", "datatype": "BYTES", "shape": [len(values)], "data": values}
    return json.dumps({"inputs": [item]}).encode()


def test_binary_and_json_bytes_decode_to_the_same_bytes_elements() -> None:
    body, n = _binary([b"cat", "héllo".encode(), b""])
    a = v2.decode_request(body, n).arrays["text"]
    b = v2.decode_request(_json(["cat", "héllo", ""]), None).arrays["text"]
    assert a.dtype == b.dtype == object
    assert a.tolist() == b.tolist() == [b"cat", "héllo".encode(), b""]


def test_bytes_round_trip_through_responses_in_both_forms() -> None:
    out = {"shout": np.array(["cat!", "é!"], dtype=object)}
    request = v2.Tensors(arrays={})
    for binary in (False, True):
        request.binary_default = binary
        body, headers = v2.encode_response(
            model_name="m", outputs=out, request=request, parameters={}
        )
        _, back = v2.decode_response(body, headers.get(v2.HEADER_LENGTH))
        assert back["shout"].tolist() == [b"cat!", "é!".encode()]


def test_per_element_cap() -> None:
    limits = TensorLimits(max_string_bytes=4)
    body, n = _binary([b"abcd"])
    assert v2.decode_request(body, n, limits).arrays["text"].tolist() == [b"abcd"]
    body, n = _binary([b"abcde"])
    with pytest.raises(v2.V2Error, match="element 0 has 5 bytes"):
        v2.decode_request(body, n, limits)
    with pytest.raises(v2.V2Error, match="element 1 has 5 bytes"):
        v2.decode_request(_json(["ab", "abcde"]), None, limits)


def test_element_count_and_total_caps() -> None:
    with pytest.raises(v2.V2Error, match="3 BYTES elements, above the limit of 2"):
        v2.decode_request(_json(["a", "b", "c"]), None, TensorLimits(max_string_elements=2))
    # Total: 4 bytes of length + the bytes, per element.
    body, n = _binary([b"x" * 6, b"y" * 6])
    assert v2.decode_request(body, n, TensorLimits(max_total_bytes=20)).arrays
    with pytest.raises(v2.V2Error, match="limit of 19 bytes"):
        v2.decode_request(body, n, TensorLimits(max_total_bytes=19))
    # A big shape with little data is refused before any element is built.
    body, n = _binary([b"a"], shape=[1000])
    with pytest.raises(v2.V2Error, match="cannot hold 1000 BYTES elements"):
        v2.decode_request(body, n)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (struct.pack("<I", 9) + b"abc", "runs past"),
        (struct.pack("<I", 1) + b"ab", "left over"),
    ],
)
def test_malformed_binary_bytes(raw: bytes, why: str) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "t",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    with pytest.raises(v2.V2Error, match=why):
        v2.decode_request(header + raw, str(len(header)))


def test_json_bytes_must_be_text() -> None:
    with pytest.raises(v2.V2Error, match="strings in JSON"):
        v2.decode_request(_json([3]), None)  # type: ignore[list-item]
    body = b'{"inputs":[{"name":"t","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}'
    with pytest.raises(v2.V2Error, match="not valid text"):
        v2.decode_request(body, None)
