"""Capability ads: what a peer can run, signed by the peer, stored in the DHT.

An ad lives under the DHT key ``/edgeswarm-ad/<peer id>``. Its value is a
signed envelope (domain ``edgeswarm/ad/v1``) whose body is the canonical CBOR
of ``CapabilityAd.to_body()``. Anyone can check a record offline with
``parse_ad_record``: the envelope must verify, its signer must be the peer
named in the body *and* in the key, the whole value must fit ``AD_MAX_SIZE``,
and it must not be expired (nor claim to live longer than ``AD_MAX_TTL``).
An ad carries only its own peer's addresses: an address that names a peer
(``/p2p/<id>``) must name the ad's own peer id, except a relay's id before
``/p2p-circuit`` (``addr_peer``), so nobody can plant addresses for another peer.
Between two valid records for one key the higher ``seq`` wins
(``better_record``); publishers use a clock-derived seq, so a restarted peer
still outranks its own older ad.

Pure: the clock is passed in as ``now`` (unix seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nacl.signing

from protocols.codec import encode
from protocols.errors import (
    DecodeError,
    LocalProtocolError,
    ProtocolError,
    SignatureError,
    ValidationError,
)
from protocols.identity import peer_id_from_public_key, public_key_from_peer_id
from protocols.signing import open_envelope, seal

AD_DOMAIN = "edgeswarm/ad/v1"
AD_NAMESPACE = "edgeswarm-ad"
AD_KEY_PREFIX = f"/{AD_NAMESPACE}/"
# A whole signed record (envelope included); checked before decoding.
AD_MAX_SIZE = 8 * 1024
# An ad may not claim to stay valid longer than this (a day), so a leaked or
# stale record cannot be pinned in the network for ever.
AD_MAX_TTL = 24 * 3600.0

MAX_ADDRS = 16
MAX_DEVICES = 16
MAX_PROVIDERS = 16
MAX_MODELS = 64
MAX_TEXT = 256
MAX_SEQ = 2**63 - 1
REACHABILITY = frozenset({"", "public", "private"})

_BODY_FIELDS = frozenset(
    {
        "peer_id",
        "addrs",
        "devices",
        "providers",
        "models",
        "price",
        "load",
        "queue",
        "seq",
        "expires_at",
    }
)


def ad_key(peer_id: str) -> str:
    """The DHT key of ``peer_id``'s ad."""
    public_key_from_peer_id(peer_id)  # raises ValidationError for a bad id
    return AD_KEY_PREFIX + peer_id


def peer_id_from_ad_key(key: str) -> str:
    """Inverse of ``ad_key``; ``ValidationError`` for keys outside the namespace."""
    if not key.startswith(AD_KEY_PREFIX):
        raise ValidationError(f"ad key must start with {AD_KEY_PREFIX!r}, got {key[:80]!r}")
    peer_id = key[len(AD_KEY_PREFIX) :]
    public_key_from_peer_id(peer_id)
    return peer_id


# Multiaddr protocols that take no value (the others take exactly one; ``unix`` takes the rest).
_NO_VALUE = frozenset(
    {
        "p2p-circuit",
        "quic",
        "quic-v1",
        "ws",
        "wss",
        "tls",
        "noise",
        "http",
        "https",
        "webtransport",
        "webrtc",
        "webrtc-direct",
        "p2p-webrtc-direct",
        "p2p-websocket-star",
        "p2p-webrtc-star",
        "udt",
        "utp",
    }
)


def addr_peer(addr: str) -> str | None:
    """The peer id a multiaddr dials: its ``/p2p/<id>`` after the last ``/p2p-circuit``.

    None when that part names no peer (a plain transport address, or a relay
    address ``.../p2p/<relay>/p2p-circuit`` the dialer completes with the target).
    ``ValidationError`` when the part names two different peers.
    """
    parts = addr.split("/")[1:]
    target: str | None = None
    i = 0
    while i < len(parts):
        proto = parts[i]
        if proto == "unix":
            break
        if proto == "p2p-circuit":
            target = None  # what came before was the relay
            i += 1
            continue
        if proto in _NO_VALUE:
            i += 1
            continue
        value = parts[i + 1] if i + 1 < len(parts) else ""
        if proto in ("p2p", "ipfs"):
            if target is not None and value != target:
                raise ValidationError(f"address {addr[:120]!r} names two peers")
            target = value
        i += 2
    return target


def _text(value: Any, what: str, *, max_len: int = MAX_TEXT, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValidationError(f"{what} is {len(value)} characters, the limit is {max_len}")
    if not value and not allow_empty:
        raise ValidationError(f"{what} must not be empty")
    return value


def _number(value: Any, what: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{what} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or out < minimum:
        raise ValidationError(f"{what} must be a finite number >= {minimum}, got {value!r}")
    return out


def _integer(value: Any, what: str, *, maximum: int = MAX_SEQ) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValidationError(f"{what} must be in 0..{maximum}, got {value}")
    return value


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ValidationError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise ValidationError(f"{what} has {len(value)} entries, the limit is {limit}")
    return list(value)


def _map(value: Any, what: str, fields: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a map, got {type(value).__name__}")
    keys = set(value)
    if keys != fields:
        missing = sorted(fields - keys)
        extra = sorted(map(str, keys - fields))
        raise ValidationError(f"{what} fields are wrong: missing {missing}, unexpected {extra}")
    return value


@dataclass(frozen=True)
class Device:
    """One compute device: ``kind`` (cpu, gpu, npu ...), a name, memory in bytes (None: unknown)."""

    kind: str
    name: str
    memory: int | None = None

    def __post_init__(self) -> None:
        _text(self.kind, "device kind")
        _text(self.name, "device name", allow_empty=True)
        if self.memory is not None:
            _integer(self.memory, "device memory")

    def to_body(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "memory": self.memory}

    @classmethod
    def from_body(cls, value: Any) -> Device:
        raw = _map(value, "device", frozenset({"kind", "name", "memory"}))
        return cls(kind=raw["kind"], name=raw["name"], memory=raw["memory"])


@dataclass(frozen=True)
class ModelOffer:
    """A model this peer serves: its content id, a name, and its measured p50 latency."""

    cid: str
    name: str
    p50_ms: float = 0.0
    # The IPFS CIDv1 of the same bytes (kubo's), so IPFS users can seed it; "" = not given.
    ipfs: str = ""

    def __post_init__(self) -> None:
        _text(self.cid, "model cid", max_len=128)
        _text(self.name, "model name", allow_empty=True)
        _number(self.p50_ms, "model p50_ms")
        _text(self.ipfs, "model ipfs cid", max_len=128, allow_empty=True)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"cid": self.cid, "name": self.name, "p50_ms": float(self.p50_ms)}
        if self.ipfs:  # absent rather than empty: ads without it keep their old encoding
            body["ipfs"] = self.ipfs
        return body

    @classmethod
    def from_body(cls, value: Any) -> ModelOffer:
        base = frozenset({"cid", "name", "p50_ms"})
        fields = base | {"ipfs"} if isinstance(value, dict) and "ipfs" in value else base
        raw = _map(value, "model", fields)
        return cls(
            cid=raw["cid"],
            name=raw["name"],
            p50_ms=_number(raw["p50_ms"], "p50_ms"),
            ipfs=raw.get("ipfs", ""),
        )


@dataclass(frozen=True)
class CapabilityAd:
    """What a peer offers, valid until ``expires_at`` (unix seconds)."""

    peer_id: str
    addrs: tuple[str, ...]
    devices: tuple[Device, ...]
    providers: tuple[str, ...]
    models: tuple[ModelOffer, ...]
    price: float
    load: float
    queue: int
    seq: int
    expires_at: float
    # What AutoNAT told the peer: "public" (others can dial it), "private" (reach it
    # through the relay circuits in `addrs`), "" = not known (absent from the body).
    reachability: str = ""

    def __post_init__(self) -> None:
        public_key_from_peer_id(self.peer_id)
        if self.reachability not in REACHABILITY:
            raise ValidationError(
                f"reachability must be one of {sorted(REACHABILITY)}, got {self.reachability!r}"
            )
        for field_name, limit in (("addrs", MAX_ADDRS), ("providers", MAX_PROVIDERS)):
            values = getattr(self, field_name)
            if not isinstance(values, tuple):
                raise ValidationError(f"{field_name} must be a tuple")
            _list(values, field_name, limit)
            for v in values:
                _text(v, f"an entry of {field_name}")
        for a in self.addrs:
            if not a.startswith("/"):
                raise ValidationError(f"address {a!r} is not a multiaddr (must start with '/')")
            target = addr_peer(a)
            if target is not None and target != self.peer_id:
                raise ValidationError(
                    f"address {a!r} is for peer {target}, not the ad's own peer "
                    f"{self.peer_id}: an ad may carry only its own addresses"
                )
        _list(self.devices, "devices", MAX_DEVICES)
        _list(self.models, "models", MAX_MODELS)
        if not all(isinstance(d, Device) for d in self.devices):
            raise ValidationError("devices must be Device values")
        if not all(isinstance(m, ModelOffer) for m in self.models):
            raise ValidationError("models must be ModelOffer values")
        if len({m.cid for m in self.models}) != len(self.models):
            raise ValidationError("models lists the same cid twice")
        _number(self.price, "price")
        _number(self.load, "load")
        _integer(self.queue, "queue", maximum=2**31 - 1)
        _integer(self.seq, "seq")
        _number(self.expires_at, "expires_at")

    def to_body(self) -> dict[str, Any]:
        body = {
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "devices": [d.to_body() for d in self.devices],
            "providers": list(self.providers),
            "models": [m.to_body() for m in self.models],
            "price": float(self.price),
            "load": float(self.load),
            "queue": self.queue,
            "seq": self.seq,
            "expires_at": float(self.expires_at),
        }
        if self.reachability:  # absent when unknown: ads without it keep their old encoding
            body["reachability"] = self.reachability
        return body

    @classmethod
    def from_body(cls, value: Any) -> CapabilityAd:
        has = isinstance(value, dict) and "reachability" in value
        raw = _map(value, "capability ad", _BODY_FIELDS | {"reachability"} if has else _BODY_FIELDS)
        return cls(
            peer_id=_text(raw["peer_id"], "peer_id", max_len=64),
            addrs=tuple(_list(raw["addrs"], "addrs", MAX_ADDRS)),
            devices=tuple(
                Device.from_body(d) for d in _list(raw["devices"], "devices", MAX_DEVICES)
            ),
            providers=tuple(_list(raw["providers"], "providers", MAX_PROVIDERS)),
            models=tuple(
                ModelOffer.from_body(m) for m in _list(raw["models"], "models", MAX_MODELS)
            ),
            price=_number(raw["price"], "price"),
            load=_number(raw["load"], "load"),
            queue=raw["queue"],
            seq=raw["seq"],
            expires_at=_number(raw["expires_at"], "expires_at"),
            reachability=_text(
                raw.get("reachability", ""), "reachability", max_len=16, allow_empty=True
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly form (what ``edgeswarm peers --json`` prints)."""
        return self.to_body()

    def sort_key(self) -> tuple[int, float, bytes]:
        """Order used by ``better_record``: seq, then expiry, then the canonical bytes."""
        return (self.seq, float(self.expires_at), encode(self.to_body()))


def build_ad(key: nacl.signing.SigningKey, ad: CapabilityAd) -> bytes:
    """Sign ``ad`` with ``key`` and return the DHT record value.

    Raises ``LocalProtocolError`` if ``key`` is not ``ad.peer_id``'s key or the
    record would exceed ``AD_MAX_SIZE`` (drop models/addrs to make it fit).
    """
    signer = peer_id_from_public_key(bytes(key.verify_key))
    if signer != ad.peer_id:
        raise LocalProtocolError(f"ad for {ad.peer_id} cannot be signed by {signer}")
    data = seal(key, AD_DOMAIN, ad.to_body()).to_bytes()
    if len(data) > AD_MAX_SIZE:
        raise LocalProtocolError(
            f"signed ad is {len(data)} bytes, the limit is {AD_MAX_SIZE}: "
            "advertise fewer models or addresses"
        )
    return data


def parse_ad(value: bytes, now: float) -> CapabilityAd:
    """Verify and decode one signed ad; every failure is a ``RemoteProtocolError``."""
    if not isinstance(value, bytes | bytearray):
        raise DecodeError(f"ad record must be bytes, got {type(value).__name__}")
    if len(value) > AD_MAX_SIZE:
        raise ValidationError(f"ad record is {len(value)} bytes, the limit is {AD_MAX_SIZE}")
    envelope, body = open_envelope(bytes(value), domain=AD_DOMAIN, max_size=AD_MAX_SIZE)
    try:
        ad = CapabilityAd.from_body(body)
    except ValidationError:
        raise
    except (TypeError, ValueError) as exc:  # defensive: a shape we did not foresee
        raise ValidationError(f"malformed capability ad: {exc}") from exc
    if envelope.signer_id != ad.peer_id:
        raise SignatureError(f"ad for {ad.peer_id} is signed by another key ({envelope.signer_id})")
    if ad.expires_at <= now:
        raise ValidationError(
            f"ad of {ad.peer_id} expired {now - ad.expires_at:.1f} s ago (seq {ad.seq})"
        )
    if ad.expires_at > now + AD_MAX_TTL:
        raise ValidationError(
            f"ad of {ad.peer_id} claims to be valid for {ad.expires_at - now:.0f} s, "
            f"the limit is {AD_MAX_TTL:.0f} s"
        )
    return ad


def parse_ad_record(key: str, value: bytes, now: float) -> CapabilityAd:
    """``parse_ad`` plus: the record must be stored under its own peer's key."""
    owner = peer_id_from_ad_key(key)
    ad = parse_ad(value, now)
    if ad.peer_id != owner:
        raise ValidationError(f"ad of {ad.peer_id} stored under the key of {owner}")
    return ad


def better_record(a: CapabilityAd, b: CapabilityAd) -> CapabilityAd:
    """The record to keep between two valid ads of one peer: higher seq wins.

    Ties (the same seq signed twice) go to the later expiry, then to the
    larger canonical encoding, so every node picks the same one.
    """
    return a if a.sort_key() >= b.sort_key() else b


def select_best(key: str, values: Sequence[bytes], now: float) -> int:
    """Index of the best valid record among ``values`` (the DHT's ``select``).

    Invalid records always lose; if none is valid, index 0 is returned (the
    DHT then keeps what it had, which its ``validate`` already checked).
    """
    best: tuple[int, CapabilityAd] | None = None
    for i, value in enumerate(values):
        try:
            ad = parse_ad_record(key, value, now)
        except ProtocolError:
            continue
        if best is None or ad.sort_key() > best[1].sort_key():
            best = (i, ad)
    return 0 if best is None else best[0]
