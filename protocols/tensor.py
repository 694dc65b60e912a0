"""Numpy tensors to and from CBOR-able values.

Wire form: ``{name: {"dtype": str, "shape": [int, ...], "data": bytes}}`` with
``data`` the row-major little-endian element bytes. Decoding trusts nothing:
the count of tensors, names, dtype, rank, element count and byte totals are
checked against ``TensorLimits`` *before* any array is built, and the array is
a zero-copy view of the received bytes.

String tensors (ONNX ``tensor(string)``, KServe v2 ``BYTES``) have dtype
``"string"``: in memory a numpy object array of Python ``str`` (what ONNX
Runtime takes and gives), on the wire each element in row-major order as a
4-byte little-endian length and its UTF-8 bytes (the v2 binary form). Caps:
``max_string_elements`` elements, ``max_string_bytes`` per element, and the
data bytes count against ``max_total_bytes``; a non-UTF-8 element is refused.
"""

from __future__ import annotations

import math
import struct
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
STRING = "string"  # string tensors: object arrays of str (see the module docstring)
# Every dtype name the wire carries.
WIRE_DTYPE_NAMES = frozenset({*DTYPES, STRING})
_OBJECT = np.dtype(object)
_LEN = struct.Struct("<I")
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
    # String tensors: elements in one message (each becomes a Python object), and the
    # UTF-8 bytes of one element.
    max_string_elements: int = 1024 * 1024
    max_string_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_tensors",
            "max_rank",
            "max_elements",
            "max_total_bytes",
            "max_string_elements",
            "max_string_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LocalProtocolError(
                    f"TensorLimits.{name} must be a non-negative int, got {value!r}"
                )


DEFAULT_LIMITS = TensorLimits()


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """Our wire name for a numpy dtype (any byte order), or None if unsupported. Object,
    str and bytes arrays are ``"string"`` (``as_strings`` checks their elements)."""
    if dtype.kind in "OSU":
        return STRING
    name = dtype.name
    return name if name in DTYPES and dtype.kind in "biuf" else None


def numpy_dtype(name: str) -> np.dtype[Any] | None:
    """The numpy dtype of arrays of wire dtype ``name`` (object for strings), or None."""
    return _OBJECT if name == STRING else DTYPES.get(name)


def as_strings(array: npt.NDArray[Any], what: str = "tensor") -> npt.NDArray[Any]:
    """A string tensor as an object array of ``str``: ``str``/``bytes`` elements (bytes
    must be UTF-8), numpy ``U``/``S`` arrays. Raises ``LocalProtocolError`` otherwise."""
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(array.flat):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise LocalProtocolError(
                    f"{what}: string element {i} is not UTF-8 (string tensors hold text)"
                ) from None
        elif not isinstance(v, str):
            raise LocalProtocolError(
                f"{what}: a string tensor holds str or bytes, element {i} is {type(v).__name__}"
            )
        flat[i] = str(v)
    return out


def _encode_strings(array: npt.NDArray[Any], what: str) -> bytes:
    parts: list[bytes] = []
    for v in as_strings(array, what).flat:
        raw = v.encode("utf-8")
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _decode_strings(
    data: bytes, shape: tuple[int, ...], name: str, limits: TensorLimits
) -> npt.NDArray[Any]:
    """Length-prefixed UTF-8 elements to an object array of str; every length is checked
    against what is left and ``max_string_bytes`` before the element is read."""
    count = math.prod(shape)
    out = np.empty(count, dtype=object)
    view = memoryview(data)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise DecodeError(f"tensor {name!r}: string data ends inside element {i}")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if n > limits.max_string_bytes:
            raise ValidationError(
                f"tensor {name!r}: string element {i} has {n} bytes, "
                f"the limit is {limits.max_string_bytes}"
            )
        if pos + n > len(data):
            raise DecodeError(f"tensor {name!r}: string element {i} runs past the data")
        try:
            out[i] = str(view[pos : pos + n], "utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"tensor {name!r}: string element {i} is not UTF-8") from None
        pos += n
    if pos != len(data):
        raise DecodeError(
            f"tensor {name!r}: {len(data) - pos} bytes left after {count} string elements"
        )
    return out.reshape(shape)


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
                f"tensor {name!r} has dtype {array.dtype}; supported: "
                f"{', '.join(sorted(WIRE_DTYPE_NAMES))}"
            )
        if wire == STRING:
            out[name] = {
                "dtype": STRING,
                "shape": [int(d) for d in array.shape],
                "data": _encode_strings(array, f"tensor {name!r}"),
            }
            continue
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
    parsed: list[tuple[str, np.dtype[Any] | None, tuple[int, ...], bytes]] = []
    total_elements = 0
    total_bytes = 0
    strings = 0
    for name, item in value.items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME_CHARS:
            raise DecodeError(
                f"tensor names must be strings of 1..{_MAX_NAME_CHARS} characters, got {name!r:.80}"
            )
        if not isinstance(item, dict) or item.keys() != _FIELDS:
            got = sorted(map(str, item)) if isinstance(item, dict) else type(item).__name__
            raise DecodeError(f"tensor {name!r} must be a map with dtype, shape, data; got {got}")
        dtype_s, shape_v, data = item["dtype"], item["shape"], item["data"]
        if not isinstance(dtype_s, str) or dtype_s not in WIRE_DTYPE_NAMES:
            raise DecodeError(
                f"tensor {name!r} has dtype {dtype_s!r:.40}; supported: "
                f"{', '.join(sorted(WIRE_DTYPE_NAMES))}"
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
        if dtype_s == STRING:
            strings += elements
            if strings > limits.max_string_elements:
                raise ValidationError(
                    f"tensors hold more than {limits.max_string_elements} string elements "
                    f"(tensor {name!r} has {elements})"
                )
            if len(data) < 4 * elements:  # each element has its 4-byte length
                raise DecodeError(
                    f"tensor {name!r}: {len(data)} bytes cannot hold {elements} strings"
                )
            total_bytes += len(data)
            if total_bytes > limits.max_total_bytes:
                raise ValidationError(
                    f"tensors hold more than {limits.max_total_bytes} bytes "
                    f"(tensor {name!r} has {len(data)})"
                )
            parsed.append((name, None, tuple(shape_v), data))
            continue
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
    for name, dt, shape, data in parsed:
        if dt is None:
            out[name] = _decode_strings(data, shape, name, limits)
            continue
        if dt.kind == "b" and data.translate(None, b"\x00\x01"):
            raise DecodeError(f"tensor {name!r} is bool but holds bytes other than 0 and 1")
        array: npt.NDArray[Any] = np.frombuffer(data, dtype=dt).reshape(shape)
        if not _NATIVE_LITTLE and dt.itemsize > 1:
            array = array.astype(DTYPES[dt.name])
        out[name] = array
    return out


__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "STRING",
    "WIRE_DTYPE_NAMES",
    "TensorLimits",
    "as_strings",
    "decode_tensors",
    "dtype_name",
    "encode_tensors",
    "numpy_dtype",
]
