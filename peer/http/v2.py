"""The Open Inference Protocol (KServe v2) tensor forms: JSON and the binary tensor extension.

Pure functions over bytes and numpy arrays, used by the server (requests in,
responses out) and by our own clients (``edgeswarm infer`` through a running
peer, ``bench/http.py``): one codec for both directions, because a v2 request
and a v2 response carry tensors the same way.

A tensor is ``{"name", "datatype", "shape", "data"}`` (JSON: ``data`` is a
flat or nested list in row-major order) or, with the binary extension,
``{"name", "datatype", "shape", "parameters": {"binary_data_size": N}}`` and
its N raw little-endian bytes after the JSON header; the JSON header's length
is in the ``Inference-Header-Content-Length`` HTTP header. BYTES elements are
each a 4-byte little-endian length and the bytes, in binary form; strings in
JSON; decoded, a BYTES tensor is an object array of ``bytes`` (JSON strings as
UTF-8), at most ``max_string_elements`` elements of ``max_string_bytes`` each,
and 4 + len bytes per element count against ``max_total_bytes``. Every size
is checked against ``TensorLimits`` before anything is allocated; any violation
is a ``V2Error`` (HTTP 400) with a clear message.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.tensor import DEFAULT_LIMITS, TensorLimits

HEADER_LENGTH = "inference-header-content-length"
MAX_NAME = 256
MAX_PARAMETERS = 32

# v2 datatype -> numpy dtype (little-endian on the wire). BF16 has no numpy type.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_NAME = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
ONNX_TO_V2 = {**_BY_NAME, "string": "BYTES"}


class V2Error(ValueError):
    """A malformed or over-limit v2 request (HTTP 400)."""


def datatype_of(array: npt.NDArray[Any]) -> str:
    """The v2 datatype of an array (object, str and bytes arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = _BY_NAME.get(array.dtype.name)
    if name is None:
        raise V2Error(f"dtype {array.dtype} has no v2 datatype")
    return name


@dataclass
class Tensors:
    """Decoded tensors plus the request-level fields that travel with them."""

    arrays: dict[str, npt.NDArray[Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    # Requested outputs: name -> binary? (empty = every output, in ``binary_default`` form).
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    id: str | None = None


# --------------------------------------------------------------------------- decoding


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise V2Error(f"{what} must be a non-empty string of at most {MAX_NAME} characters")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PARAMETERS:
        raise V2Error(f"{what} parameters must be an object with at most {MAX_PARAMETERS} keys")
    for v in value.values():
        if not isinstance(v, str | int | float | bool) or (isinstance(v, str) and len(v) > 4096):
            raise V2Error(f"{what} parameters must be strings, numbers or booleans")
    return value


def _shape(value: Any, what: str, limits: TensorLimits) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limits.max_rank:
        raise V2Error(f"{what}: shape must be a list of at most {limits.max_rank} dimensions")
    for d in value:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise V2Error(f"{what}: shape must hold non-negative integers, got {value!r:.80}")
    count = math.prod(value)
    if count > limits.max_elements:
        raise V2Error(f"{what}: {count} elements, above the limit of {limits.max_elements}")
    return tuple(value)


def _flatten(data: Any, limit: int, what: str) -> list[Any]:
    """A nested JSON list to a flat one, bounded by ``limit`` elements (no recursion)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 32:
                raise V2Error(f"{what}: data is nested too deeply")
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > limit:
                raise V2Error(f"{what}: data holds more elements than its shape")
    return out


_END = object()


def _check_strings(count: int, what: str, limits: TensorLimits) -> None:
    if count > limits.max_string_elements:
        raise V2Error(
            f"{what}: {count} BYTES elements, above the limit of {limits.max_string_elements}"
        )


def _check_element(i: int, n: int, what: str, limits: TensorLimits) -> None:
    if n > limits.max_string_bytes:
        raise V2Error(
            f"{what}: BYTES element {i} has {n} bytes, above the limit of {limits.max_string_bytes}"
        )


def _from_json(
    data: Any, dtype_name: str, shape: tuple[int, ...], what: str, limits: TensorLimits
) -> npt.NDArray[Any]:
    count = math.prod(shape)
    if dtype_name == "BYTES":
        _check_strings(count, what, limits)
        flat = _flatten(data, count, what)
        if len(flat) != count:
            raise V2Error(
                f"{what}: data holds {len(flat)} elements, shape {list(shape)} needs {count}"
            )
        out = np.empty(count, dtype=object)
        for i, v in enumerate(flat):
            if not isinstance(v, str):
                raise V2Error(f"{what}: BYTES data must be strings in JSON")
            try:
                raw = v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
                raise V2Error(f"{what}: BYTES element {i} is not valid text") from None
            _check_element(i, len(raw), what, limits)
            out[i] = raw
        return out.reshape(shape)
    try:  # nested lists -> one array, at C speed (ragged or mixed data raise)
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise V2Error(f"{what}: data must be a regular (not ragged) list of values") from None
    if array.size != count:
        raise V2Error(
            f"{what}: data holds {array.size} elements, shape {list(shape)} needs {count}"
        )
    target = DATATYPES[dtype_name].newbyteorder("=")
    kind = array.dtype.kind
    if dtype_name == "BOOL":
        if kind != "b" and count:
            raise V2Error(f"{what}: BOOL data must be booleans")
    elif dtype_name[0] in "UI":
        if kind not in "iu" and count:
            # numpy turns ints beyond int64 (UINT64's upper half) into floats: check the
            # values themselves, then convert exactly.
            flat = _flatten(data, count, what)
            if not all(type(v) is int for v in flat):
                raise V2Error(f"{what}: {dtype_name} data must be integers")
            try:
                return np.array(flat, dtype=target).reshape(shape)
            except (OverflowError, ValueError):
                raise V2Error(f"{what}: a value does not fit {dtype_name}") from None
        if count:
            info = np.iinfo(target)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise V2Error(f"{what}: a value does not fit {dtype_name}")
    elif kind not in "iuf" and count:
        raise V2Error(f"{what}: {dtype_name} data must be numbers")
    return array.astype(target).reshape(shape)


def _bytes_elements(
    raw: memoryview, count: int, what: str, limits: TensorLimits
) -> npt.NDArray[Any]:
    _check_strings(count, what, limits)
    if len(raw) < 4 * count:  # each element has its 4-byte length
        raise V2Error(f"{what}: {len(raw)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise V2Error(f"{what}: BYTES data ends inside element {i}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        _check_element(i, n, what, limits)
        if pos + n > len(raw):
            raise V2Error(f"{what}: BYTES element {i} runs past the tensor's data")
        out[i] = bytes(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise V2Error(f"{what}: {len(raw) - pos} bytes left over after {count} BYTES elements")
    return out


def _from_binary(
    raw: memoryview, dtype_name: str, shape: tuple[int, ...], what: str, limits: TensorLimits
) -> Any:
    count = math.prod(shape)
    if dtype_name == "BYTES":
        return _bytes_elements(raw, count, what, limits).reshape(shape)
    dtype = DATATYPES[dtype_name]
    if len(raw) != count * dtype.itemsize:
        raise V2Error(
            f"{what}: binary_data_size is {len(raw)} bytes, {dtype_name}{list(shape)} needs "
            f"{count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def decode_tensor_list(
    items: Any,
    blob: memoryview,
    *,
    what: str,
    limits: TensorLimits = DEFAULT_LIMITS,
) -> dict[str, npt.NDArray[Any]]:
    """A v2 ``inputs`` or ``outputs`` list (+ the binary bytes after the JSON) to arrays."""
    if not isinstance(items, list) or not items:
        raise V2Error(f"{what} must be a non-empty list")
    if len(items) > limits.max_tensors:
        raise V2Error(f"{len(items)} {what}, above the limit of {limits.max_tensors}")
    arrays: dict[str, npt.NDArray[Any]] = {}
    offset = total = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise V2Error(f"{what}[{i}] must be an object")
        name = _check_name(item.get("name"), f"{what}[{i}].name")
        label = f"{what} {name!r}"
        if name in arrays:
            raise V2Error(f"{label} is given twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise V2Error(
                f"{label}: datatype {datatype!r:.40} is not one of {', '.join(DATATYPES)}"
            )
        shape = _shape(item.get("shape"), label, limits)
        params = _parameters(item.get("parameters"), label)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise V2Error(f"{label}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise V2Error(f"{label}: give data or binary_data_size, not both")
            if offset + size > len(blob):
                raise V2Error(
                    f"{label}: binary data ends after {len(blob) - offset} of {size} bytes"
                )
            array = _from_binary(blob[offset : offset + size], datatype, shape, label, limits)
            offset += size
        elif "data" in item:
            array = _from_json(item["data"], datatype, shape, label, limits)
        else:
            raise V2Error(f"{label} has neither data nor binary_data_size")
        # BYTES count as they travel: 4 bytes of length and the bytes, per element.
        total += array.nbytes if array.dtype != object else sum(4 + len(v) for v in array.flat)
        if total > limits.max_total_bytes:
            raise V2Error(f"{what} take more than the limit of {limits.max_total_bytes} bytes")
        arrays[name] = array
    if offset != len(blob):
        raise V2Error(f"{len(blob) - offset} bytes of binary data are not claimed by any tensor")
    return arrays


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header (parsed) and the binary part of a v2 message body."""
    if header_length is None:
        json_part, blob = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise V2Error("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise V2Error(
                f"Inference-Header-Content-Length {n} is outside the body ({len(body)} bytes)"
            )
        json_part, blob = body[:n], memoryview(body)[n:]
    try:
        header = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(f"the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise V2Error("the request must be a JSON object")
    return header, blob


def decode_request(
    body: bytes, header_length: str | None, limits: TensorLimits = DEFAULT_LIMITS
) -> Tensors:
    """A ``POST /v2/models/{model}/infer`` body to inputs, requested outputs and parameters."""
    header, blob = split_body(body, header_length)
    arrays = decode_tensor_list(header.get("inputs"), blob, what="inputs", limits=limits)
    params = _parameters(header.get("parameters"), "request")
    request_id = header.get("id")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= MAX_NAME):
        raise V2Error(f"id must be a string of at most {MAX_NAME} characters")
    outputs: dict[str, bool] = {}
    requested = header.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or len(requested) > limits.max_tensors:
            raise V2Error(f"outputs must be a list of at most {limits.max_tensors} objects")
        for i, item in enumerate(requested):
            if not isinstance(item, dict):
                raise V2Error(f"outputs[{i}] must be an object")
            name = _check_name(item.get("name"), f"outputs[{i}].name")
            out_params = _parameters(item.get("parameters"), f"output {name!r}")
            outputs[name] = bool(out_params.get("binary_data", False))
    return Tensors(
        arrays=arrays,
        parameters=params,
        outputs=outputs,
        binary_default=bool(params.get("binary_data_output", False)),
        id=request_id,
    )


def decode_response(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A v2 infer response to (JSON header, output arrays): for our clients."""
    header, blob = split_body(body, header_length)
    if "error" in header:
        raise V2Error(str(header["error"]))
    return header, decode_tensor_list(header.get("outputs"), blob, what="outputs")


# --------------------------------------------------------------------------- encoding


def _json_data(array: npt.NDArray[Any]) -> list[Any]:
    if array.dtype.kind in "OSU":
        return [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.flat
        ]
    flat: list[Any] = array.ravel().tolist()
    return flat


def _binary_data(array: npt.NDArray[Any]) -> bytes:
    if array.dtype.kind in "OSU":
        parts = []
        for v in array.flat:
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    dtype = DATATYPES[datatype_of(array)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def encode_tensor_list(
    arrays: Mapping[str, npt.NDArray[Any]], binary: Mapping[str, bool] | bool
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Arrays to a v2 tensor list; ``binary`` (all, or per name) picks the binary form."""
    items: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in arrays.items():
        array = np.asarray(array)
        item: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if binary if isinstance(binary, bool) else binary.get(name, False):
            raw = _binary_data(array)
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = _json_data(array)
        items.append(item)
    return items, blobs


def encode_message(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A JSON header plus binary parts to a body and its HTTP headers."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }


def encode_request(
    inputs: Mapping[str, npt.NDArray[Any]],
    *,
    binary: bool,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An infer request (for our clients): inputs and outputs both in ``binary`` form."""
    items, blobs = encode_tensor_list(inputs, binary)
    header: dict[str, Any] = {"inputs": items}
    params = dict(parameters or {})
    if binary:
        params["binary_data_output"] = True
    if params:
        header["parameters"] = params
    return encode_message(header, blobs)


def encode_response(
    *,
    model_name: str,
    outputs: Mapping[str, npt.NDArray[Any]],
    request: Tensors,
    parameters: Mapping[str, Any],
) -> tuple[bytes, dict[str, str]]:
    """An infer response with the outputs the request asked for, each in the form it asked."""
    if request.outputs:
        missing = sorted(set(request.outputs) - set(outputs))
        if missing:
            raise V2Error(
                f"requested output(s) {', '.join(missing)} not produced by the model "
                f"(outputs: {', '.join(outputs)})"
            )
        chosen = {name: outputs[name] for name in request.outputs}
        binary: Mapping[str, bool] | bool = request.outputs
    else:
        chosen, binary = dict(outputs), request.binary_default
    items, blobs = encode_tensor_list(chosen, binary)
    header: dict[str, Any] = {
        "model_name": model_name,
        "model_version": "1",
        "outputs": items,
        "parameters": dict(parameters),
    }
    if request.id is not None:
        header["id"] = request.id
    return encode_message(header, blobs)
