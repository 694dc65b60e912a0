"""Numpy tensors to and from CBOR-able values.

Wire form: ``{name: {"dtype": str, "shape": [int, ...], "data": bytes}}`` with
``data`` the row-major little-endian element bytes. Decoding trusts nothing:
the count of tensors, names, dtype, rank, element count and byte totals are
checked against ``TensorLimits`` *before* any array is built, and the array is
a zero-copy view of the received bytes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.errors import DecodeError, LocalProtocolError, ValidationError

# Every ONNX tensor element type that numpy holds natively (ONNX bfloat16,
# float8 and int4 have no numpy dtype; strings are not fixed-size).
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name)
    for name in (
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
    )
}
# Same types, explicitly little-endian, to read wire bytes on any host.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {k: v.newbyteorder("<") for k, v in DTYPES.items()}
_NATIVE_LITTLE = sys.byteorder == "little"
_MAX_NAME_CHARS = 256
_FIELDS = frozenset({"dtype", "shape", "data"})


@dataclass(frozen=True)
class TensorLimits:
    """Caps for one message's tensors; defaults suit one inference job."""

    max_tensors: int = 32
    max_rank: int = 8
    max_elements: int = 16 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_tensors", "max_rank", "max_elements", "max_total_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LocalProtocolError(
                    f"TensorLimits.{name} must be a non-negative int, got {value!r}"
                )


DEFAULT_LIMITS = TensorLimits()


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """Our wire name for a numpy dtype (any byte order), or None if unsupported."""
    name = dtype.name
    return name if name in DTYPES and dtype.kind in "biuf" else None


def encode_tensors(tensors: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """Arrays to the CBOR-able wire form (raises LocalProtocolError on unsupported dtypes)."""
    out: dict[str, Any] = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise LocalProtocolError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise LocalProtocolError(
                f"tensor {name!r} must be a numpy array, got {type(array).__name__}"
            )
        wire = dtype_name(array.dtype)
        if wire is None:
            raise LocalProtocolError(
                f"tensor {name!r} has dtype {array.dtype}; supported: {', '.join(DTYPES)}"
            )
        if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _NATIVE_LITTLE):
            array = array.astype(_WIRE_DTYPES[wire])
        out[name] = {
            "dtype": wire,
            "shape": [int(d) for d in array.shape],
            "data": np.ascontiguousarray(array).tobytes(),
        }
    return out


def decode_tensors(
    value: Any, *, limits: TensorLimits = DEFAULT_LIMITS
) -> dict[str, npt.NDArray[Any]]:
    """The wire form back to arrays, enforcing ``limits`` before building any array.

    Malformed structure raises ``DecodeError``; a well-formed value over a cap
    raises ``ValidationError``. Arrays are read-only views of the given bytes.
    """
    if not isinstance(value, dict):
        raise DecodeError(f"tensors must be a map of name to tensor, got {type(value).__name__}")
    if len(value) > limits.max_tensors:
        raise ValidationError(f"{len(value)} tensors, the limit is {limits.max_tensors}")
    # First pass: structure and caps only, so nothing is built for a rejected message.
    parsed: list[tuple[str, np.dtype[Any], tuple[int, ...], bytes]] = []
    total_elements = 0
    total_bytes = 0
    for name, item in value.items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME_CHARS:
            raise DecodeError(
                f"tensor names must be strings of 1..{_MAX_NAME_CHARS} characters, got {name!r:.80}"
            )
        if not isinstance(item, dict) or item.keys() != _FIELDS:
            got = sorted(map(str, item)) if isinstance(item, dict) else type(item).__name__
            raise DecodeError(f"tensor {name!r} must be a map with dtype, shape, data; got {got}")
        dtype_s, shape_v, data = item["dtype"], item["shape"], item["data"]
        if not isinstance(dtype_s, str) or dtype_s not in _WIRE_DTYPES:
            raise DecodeError(
                f"tensor {name!r} has dtype {dtype_s!r:.40}; supported: {', '.join(DTYPES)}"
            )
        if not isinstance(shape_v, list):
            raise DecodeError(f"tensor {name!r} shape must be a list, got {type(shape_v).__name__}")
        if len(shape_v) > limits.max_rank:
            raise ValidationError(
                f"tensor {name!r} has rank {len(shape_v)}, the limit is {limits.max_rank}"
            )
        if not all(type(d) is int and d >= 0 for d in shape_v):
            raise DecodeError(
                f"tensor {name!r} shape must be non-negative ints, got {shape_v!r:.80}"
            )
        if not isinstance(data, bytes):
            raise DecodeError(f"tensor {name!r} data must be bytes, got {type(data).__name__}")
        # Zero dims make the product 0, but numpy still rejects absurd dims: cap both.
        if math.prod(max(d, 1) for d in shape_v) > limits.max_elements:
            raise ValidationError(
                f"tensor {name!r} shape {shape_v!r:.80} exceeds {limits.max_elements} elements"
            )
        elements = math.prod(shape_v)
        total_elements += elements
        if total_elements > limits.max_elements:
            raise ValidationError(
                f"tensors hold more than {limits.max_elements} elements "
                f"(tensor {name!r} has shape {shape_v})"
            )
        wire = _WIRE_DTYPES[dtype_s]
        expected = elements * wire.itemsize
        if len(data) != expected:
            raise DecodeError(
                f"tensor {name!r} ({dtype_s}, shape {shape_v}) needs {expected} bytes of data, "
                f"got {len(data)}"
            )
        total_bytes += expected
        if total_bytes > limits.max_total_bytes:
            raise ValidationError(
                f"tensors hold more than {limits.max_total_bytes} bytes "
                f"(tensor {name!r} has {expected})"
            )
        parsed.append((name, wire, tuple(shape_v), data))

    out: dict[str, npt.NDArray[Any]] = {}
    for name, wire, shape, data in parsed:
        if wire.kind == "b" and data.translate(None, b"\x00\x01"):
            raise DecodeError(f"tensor {name!r} is bool but holds bytes other than 0 and 1")
        array: npt.NDArray[Any] = np.frombuffer(data, dtype=wire).reshape(shape)
        if not _NATIVE_LITTLE and wire.itemsize > 1:
            array = array.astype(DTYPES[wire.name])
        out[name] = array
    return out


__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "TensorLimits",
    "decode_tensors",
    "dtype_name",
    "encode_tensors",
]
