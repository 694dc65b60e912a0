"""A network's genesis: its name, beacon seed and initial settlement rule.

The genesis *is* the network's identity: ``Genesis.network_id`` (sha256 of its
canonical encoding) names it, and a peer keeps one ledger per network id. It
never contains bootstrap addresses, so adding or losing a bootstrap node splits
nothing. It fixes, for every peer of the network alike:

* ``witnesses``: the genesis witnesses (usually the founding bootstrap nodes),
  the committee fallback while the eligible pool is smaller than ``3f+1``;
  they need no identity proof-of-work;
* ``beacon_seed``: the public randomness committees are first drawn with;
* ``f``: byzantine witnesses tolerated per committee (``3f+1`` members);
* ``pow_bits``: the identity cost (leading zero bits of the proof-of-work);
* ``base_limit``: micro-credits a new identity may owe before it earned any;
* ``epoch_ms``, ``eligible_age``, ``eligible_earned``, ``beacon_lag``: the
  eligible pool (identities at least ``eligible_age`` epochs old that earned
  at least ``eligible_earned`` from others) and the lag of the epoch beacon;
* ``referee_panel_size``: referees per disputed job.

The wire of ``/edgeswarm/genesis/1`` is here too: the asker sends
``{"v": 1}``, the peer answers ``{"v": 1, "genesis": <Genesis bytes>}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from protocols.codec import decode, encode
from protocols.committee import MAX_COMMITTEE, CommitteeRule
from protocols.errors import ValidationError
from protocols.ledger import CreditPolicy
from protocols.market_fields import (
    check_body,
    want_bytes,
    want_int,
    want_peer_id,
    want_str,
)
from protocols.signing import signing_bytes

GENESIS_DOMAIN = "edgeswarm/genesis/v1"
GENESIS_VERSION = 1
BEACON_SEED_SIZE = 32
MAX_POW_BITS = 40
MIN_EPOCH_MS = 100
MAX_EPOCH_MS = 30 * 24 * 3600 * 1000
MICRO = 1_000_000
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class Genesis:
    """The founding parameters of one network (see the module docstring)."""

    MAX_BYTES: ClassVar[int] = 8192
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "name",
            "beacon_seed",
            "witnesses",
            "f",
            "pow_bits",
            "base_limit",
            "epoch_ms",
            "eligible_age",
            "eligible_earned",
            "beacon_lag",
            "referee_panel_size",
        }
    )

    name: str
    beacon_seed: bytes
    witnesses: tuple[str, ...]
    f: int = 1
    pow_bits: int = 27
    base_limit: int = 1 * MICRO
    epoch_ms: int = 600_000
    eligible_age: int = 6
    eligible_earned: int = 10 * MICRO
    beacon_lag: int = 2
    referee_panel_size: int = 3

    def __post_init__(self) -> None:
        k = "Genesis"
        want_str(k, "name", self.name, hi=64)
        if not set(self.name) <= _NAME_CHARS:
            raise ValidationError("Genesis.name may hold only letters, digits, '-', '_' and '.'")
        want_bytes(k, "beacon_seed", self.beacon_seed, lo=BEACON_SEED_SIZE, hi=BEACON_SEED_SIZE)
        if not isinstance(self.witnesses, tuple) or not 1 <= len(self.witnesses) <= MAX_COMMITTEE:
            raise ValidationError(f"Genesis.witnesses must list 1..{MAX_COMMITTEE} peer ids")
        for w in self.witnesses:
            want_peer_id(k, "witnesses[]", w)
        if list(self.witnesses) != sorted(set(self.witnesses)):
            raise ValidationError("Genesis.witnesses must be sorted and distinct")
        want_int(k, "f", self.f, hi=(MAX_COMMITTEE - 1) // 3)
        want_int(k, "pow_bits", self.pow_bits, hi=MAX_POW_BITS)
        want_int(k, "base_limit", self.base_limit, hi=10**15)
        want_int(k, "epoch_ms", self.epoch_ms, lo=MIN_EPOCH_MS, hi=MAX_EPOCH_MS)
        want_int(k, "eligible_age", self.eligible_age, hi=10_000)
        want_int(k, "eligible_earned", self.eligible_earned, hi=10**15)
        want_int(k, "beacon_lag", self.beacon_lag, lo=1, hi=10_000)
        want_int(k, "referee_panel_size", self.referee_panel_size, lo=1, hi=MAX_COMMITTEE)

    @classmethod
    def create(
        cls, name: str, beacon_seed: bytes, witnesses: Iterable[str], **params: Any
    ) -> Genesis:
        """A genesis with ``witnesses`` in canonical (sorted) order."""
        return cls(name, beacon_seed, tuple(sorted(set(witnesses))), **params)

    # --- encoding -------------------------------------------------------------------------

    def to_body(self) -> dict[str, Any]:
        body = {name: getattr(self, name) for name in self._FIELDS}
        body["witnesses"] = list(self.witnesses)
        return {"v": GENESIS_VERSION, **body}

    def to_bytes(self) -> bytes:
        return encode(self.to_body())

    @classmethod
    def from_bytes(cls, data: bytes) -> Genesis:
        """Parse untrusted bytes (canonical CBOR, at most ``MAX_BYTES``)."""
        raw = decode(data, max_size=cls.MAX_BYTES)
        b = check_body(raw, kind="Genesis", version=GENESIS_VERSION, fields=cls._FIELDS)
        witnesses = b["witnesses"]
        if type(witnesses) is not list:
            raise ValidationError("Genesis.witnesses must be a list of peer ids")
        fields = {name: b[name] for name in cls._FIELDS}
        fields["witnesses"] = tuple(witnesses)
        return cls(**fields)

    # --- identity and rules ---------------------------------------------------------------

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(signing_bytes(GENESIS_DOMAIN, self.to_bytes())).digest()

    @property
    def network_id(self) -> str:
        """The network's name for people and paths: 64 hex digits of ``digest``."""
        return self.digest.hex()

    def rule(self, pool: Iterable[str] = ()) -> CommitteeRule:
        """The committee rule with the genesis witnesses as fallback (and ``pool``, if any)."""
        return CommitteeRule(
            beacon=self.beacon_seed,
            pool=frozenset(pool),
            fallback=frozenset(self.witnesses),
            f=self.f,
            referee_panel_size=self.referee_panel_size,
        )

    def policy(self) -> CreditPolicy:
        """The credit policy: identity cost, base limit; genesis witnesses need no work."""
        return CreditPolicy(
            base_limit=self.base_limit,
            pow_bits=self.pow_bits,
            genesis=frozenset(self.witnesses),
        )

    def describe(self) -> dict[str, Any]:
        """Plain JSON-friendly view (for ``edgeswarm ledger status --json``)."""
        body = self.to_body()
        body.pop("v")
        body["beacon_seed"] = self.beacon_seed.hex()
        body["network_id"] = self.network_id
        return body


# --- /edgeswarm/genesis/1 ------------------------------------------------------------------

GENESIS_REQUEST_MAX = 64
GENESIS_REPLY_MAX = Genesis.MAX_BYTES + 64


def genesis_request() -> bytes:
    return encode({"v": GENESIS_VERSION})


def check_genesis_request(data: bytes) -> None:
    raw = decode(data, max_size=GENESIS_REQUEST_MAX)
    check_body(raw, kind="GenesisRequest", version=GENESIS_VERSION, fields=frozenset())


def genesis_reply(genesis: Genesis) -> bytes:
    return encode({"v": GENESIS_VERSION, "genesis": genesis.to_bytes()})


def parse_genesis_reply(data: bytes) -> Genesis:
    raw = decode(data, max_size=GENESIS_REPLY_MAX)
    b = check_body(raw, kind="GenesisReply", version=GENESIS_VERSION, fields=frozenset({"genesis"}))
    blob = want_bytes("GenesisReply", "genesis", b["genesis"], lo=1, hi=Genesis.MAX_BYTES)
    return Genesis.from_bytes(blob)


__all__ = [
    "GENESIS_DOMAIN",
    "Genesis",
    "check_genesis_request",
    "genesis_reply",
    "genesis_request",
    "parse_genesis_reply",
]
