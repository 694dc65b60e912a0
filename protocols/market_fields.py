"""Field checks shared by the market's signed messages.

Every check raises ``ValidationError`` (a ``RemoteProtocolError``) whose
message names the message kind, the field, what was expected and what came,
because the same checks run on bytes from the network and on values built
locally. ``bool`` is rejected where an ``int`` is expected (Python treats
``True`` as ``1``; the wire must not).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Self

from protocols.errors import DecodeError, ValidationError
from protocols.identity import public_key_from_peer_id

# Money and counters are CBOR unsigned ints that fit an SQLite INTEGER.
MAX_INT = 2**63 - 1
# Absolute times are POSIX seconds; anything past year ~2286 is garbage.
MAX_TIME = 1e10
DIGEST_SIZE = 32
JOB_ID_MIN = 16
JOB_ID_MAX = 32
_HEX = frozenset("0123456789abcdef")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_body(value: Any, *, kind: str, version: int, fields: frozenset[str]) -> dict[str, Any]:
    """Check that ``value`` is a map with exactly ``fields`` plus ``v == version``."""
    if not isinstance(value, dict):
        raise DecodeError(f"{kind} must be a CBOR map, got {type(value).__name__}")
    v = value.get("v")
    if type(v) is not int or v != version:
        raise DecodeError(f"unsupported {kind} version {_show(v)}, expected {version}")
    keys = set(value) - {"v"}
    missing = fields - keys
    if missing:
        raise DecodeError(f"{kind} is missing fields {sorted(missing)}")
    extra = keys - fields
    if extra:
        raise DecodeError(f"{kind} has unknown fields {sorted(map(str, extra))}")
    return value


class FlatBody:
    """Body codec of messages whose body is ``{"v": VERSION, field: value ...}`` over ``_FIELDS``.

    Decoding goes through ``check_body`` (exact field set, version) and then the
    dataclass constructor, so the message validates itself like any local value.
    """

    VERSION: ClassVar[int]
    _FIELDS: ClassVar[frozenset[str]]

    if TYPE_CHECKING:

        def __init__(self, **fields: Any) -> None: ...

    def to_body(self) -> dict[str, Any]:
        return {"v": self.VERSION, **{name: getattr(self, name) for name in self._FIELDS}}

    @classmethod
    def from_body(cls, body: Any) -> Self:
        b = check_body(body, kind=cls.__name__, version=cls.VERSION, fields=cls._FIELDS)
        return cls(**{name: b[name] for name in cls._FIELDS})


def want_int(kind: str, name: str, value: Any, *, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int:
        raise ValidationError(f"{kind}.{name} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise ValidationError(f"{kind}.{name} must be in [{lo}, {hi}], got {value}")
    return value


def want_float(kind: str, name: str, value: Any, *, lo: float = 0.0, hi: float = MAX_TIME) -> float:
    """A finite number in ``[lo, hi]``; ints are accepted (CBOR may carry 10.0 as 10)."""
    if type(value) not in (int, float):
        raise ValidationError(f"{kind}.{name} must be a number, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise ValidationError(f"{kind}.{name} must be a finite number in [{lo}, {hi}], got {value}")
    return number


def want_bytes(kind: str, name: str, value: Any, *, lo: int, hi: int) -> bytes:
    if type(value) is not bytes:
        raise ValidationError(f"{kind}.{name} must be a byte string, got {_show(value)}")
    if not lo <= len(value) <= hi:
        expected = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise ValidationError(f"{kind}.{name} must be {expected} bytes, got {len(value)}")
    return value


def want_str(kind: str, name: str, value: Any, *, lo: int = 1, hi: int = 64) -> str:
    if type(value) is not str:
        raise ValidationError(f"{kind}.{name} must be a text string, got {_show(value)}")
    if not lo <= len(value) <= hi:
        raise ValidationError(f"{kind}.{name} must be {lo}..{hi} characters, got {len(value)}")
    return value


def want_digest(kind: str, name: str, value: Any) -> bytes:
    return want_bytes(kind, name, value, lo=DIGEST_SIZE, hi=DIGEST_SIZE)


def want_job_id(kind: str, value: Any) -> bytes:
    return want_bytes(kind, "job_id", value, lo=JOB_ID_MIN, hi=JOB_ID_MAX)


def want_peer_id(kind: str, name: str, value: Any) -> str:
    text = want_str(kind, name, value, hi=64)
    try:
        public_key_from_peer_id(text)
    except ValidationError as exc:
        raise ValidationError(f"{kind}.{name}: {exc}") from None
    return text


def want_cid(kind: str, name: str, value: Any) -> str:
    """A model cid: the sha256 of the model bytes as 64 lowercase hex digits."""
    text = want_str(kind, name, value, lo=64, hi=64)
    if not set(text) <= _HEX:
        raise ValidationError(f"{kind}.{name} must be lowercase sha256 hex, got {_show(text)}")
    return text
