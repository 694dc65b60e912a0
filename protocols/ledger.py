"""Transfers, credit limits, identity proof-of-work and the balance fold.

Money is mutual credit in integer micro-credits: every account starts at 0, a
certified ``Transfer`` moves ``amount`` from payer to payee, so balances always
sum to zero. An account may go negative only down to its credit limit.

A ``Transfer`` is signed by the payer with its next sequence number and names
the receipt it pays; it becomes final once a quorum of the payer's witnesses
co-signed it into a ``Certificate`` (protocols.certificate). This module holds
only the pure pieces: the message, the limit formula, the identity PoW and
the fold. ``protocols.ledger_state`` ties them together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import nacl.signing

from protocols.codec import decode, encode
from protocols.errors import LocalProtocolError, ValidationError
from protocols.identity import public_key_from_peer_id
from protocols.market_fields import (
    FlatBody,
    check_body,
    want_digest,
    want_int,
    want_peer_id,
)
from protocols.signed import Signed, open_message, sign_message
from protocols.signing import signing_bytes

TRANSFER_DOMAIN = "edgeswarm/transfer/v1"
IDENTITY_POW_DOMAIN = "edgeswarm/identity-pow/v1"
# 10^15 micro-credits = 10^9 credits: far above any real payment, fits int64.
MAX_AMOUNT = 10**15
# Sequence numbers start at 1; seq 0 means "nothing certified yet".
MAX_SEQ = 2**62
# Transfer timestamps are integer milliseconds since the epoch (year <= 2286).
MAX_TIME_MS = 10**13


@dataclass(frozen=True)
class Transfer(FlatBody):
    """Payer-signed: "move ``amount`` to ``payee`` as my ``seq``-th payment, for ``receipt_id``".

    ``time_ms`` is the payer's clock; witnesses refuse a transfer whose time is
    more than ``CreditPolicy.max_clock_skew_ms`` from their own, so a
    certified transfer carries a time that a quorum found plausible. It
    drives the escrow (fraud window) rules.
    """

    DOMAIN: ClassVar[str] = TRANSFER_DOMAIN
    MAX_BYTES: ClassVar[int] = 512
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"payer", "payee", "amount", "seq", "receipt_id", "time_ms"}
    )

    payer: str
    payee: str
    amount: int
    seq: int
    receipt_id: bytes
    time_ms: int

    def __post_init__(self) -> None:
        k = "Transfer"
        want_peer_id(k, "payer", self.payer)
        want_peer_id(k, "payee", self.payee)
        if self.payer == self.payee:
            raise ValidationError("Transfer: payer and payee are the same account")
        want_int(k, "amount", self.amount, lo=1, hi=MAX_AMOUNT)
        want_int(k, "seq", self.seq, lo=1, hi=MAX_SEQ)
        want_digest(k, "receipt_id", self.receipt_id)
        want_int(k, "time_ms", self.time_ms, hi=MAX_TIME_MS)

    @property
    def signer(self) -> str:
        return self.payer

    def check_time(self, now: float) -> None:
        """Transfers do not expire; witnesses check skew with ``CreditPolicy``."""


def sign_transfer(key: nacl.signing.SigningKey, transfer: Transfer) -> Signed[Transfer]:
    """Payer side: sign ``transfer`` (``key`` must be the payer's)."""
    return sign_message(key, transfer)


def open_transfer(data: bytes, *, verify: bool = True) -> Signed[Transfer]:
    """Parse (and by default verify) a payer-signed transfer from untrusted bytes."""
    return open_message(Transfer, data, verify=verify)


# --- credit limits -------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditPolicy:
    """How far below zero an account may go, and the escrow rules.

    ``limit = 0`` for a proven cheater or equivocator; otherwise
    ``min(max_limit, base + earned * earn_num // earn_den)`` where ``base``
    is ``base_limit`` for an identity with a valid proof-of-work of
    ``pow_bits`` (or listed in ``genesis``), else 0, and ``earned`` is what the
    account has been paid in transfers older than the fraud window.

    ``fraud_window_ms``: a payment stays in escrow this long after its
    transfer time: the payee cannot spend it, and a fraud proof against the
    payee that lands within the window reverses it (see ledger_state).
    """

    base_limit: int = 1_000_000  # 1 credit
    earn_num: int = 1
    earn_den: int = 2
    max_limit: int = 1_000_000_000  # 1000 credits
    pow_bits: int = 12
    fraud_window_ms: int = 600_000  # 10 minutes
    max_clock_skew_ms: int = 120_000
    genesis: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("base_limit", "max_limit", "fraud_window_ms", "max_clock_skew_ms"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                raise LocalProtocolError(f"CreditPolicy.{name} must be a non-negative int")
        if self.earn_den <= 0 or self.earn_num < 0:
            raise LocalProtocolError("CreditPolicy.earn_num/earn_den must be >= 0 / > 0")
        if not 0 <= self.pow_bits <= 64:
            raise LocalProtocolError(f"CreditPolicy.pow_bits must be 0..64, got {self.pow_bits}")

    def limit(self, *, earned: int, has_identity: bool, banned: bool) -> int:
        """Credit limit (a non-negative number: the balance may go down to ``-limit``)."""
        if banned:
            return 0
        base = self.base_limit if has_identity else 0
        return min(self.max_limit, base + earned * self.earn_num // self.earn_den)


def fold_balances(transfers: Iterable[Transfer]) -> dict[str, int]:
    """Sum transfers into balances. Addition commutes, so order never matters; sum is 0."""
    balances: dict[str, int] = {}
    for t in transfers:
        balances[t.payer] = balances.get(t.payer, 0) - t.amount
        balances[t.payee] = balances.get(t.payee, 0) + t.amount
    return {a: b for a, b in balances.items() if b != 0}


# --- identity proof-of-work ----------------------------------------------------------------


def pow_digest(peer_id: str, nonce: int) -> bytes:
    """sha256 over the domain tag, the identity's public key and the nonce."""
    key = public_key_from_peer_id(peer_id)
    return hashlib.sha256(
        signing_bytes(IDENTITY_POW_DOMAIN, key + nonce.to_bytes(8, "big"))
    ).digest()


def leading_zero_bits(digest: bytes) -> int:
    n = int.from_bytes(digest, "big")
    return len(digest) * 8 - n.bit_length()


def solve_pow(peer_id: str, bits: int, *, start: int = 0, max_tries: int = 1 << 32) -> int | None:
    """Search nonces ``start .. start+max_tries-1``; expected 2**bits tries. None if not found."""
    key = public_key_from_peer_id(peer_id)
    prefix = signing_bytes(IDENTITY_POW_DOMAIN, key)
    for nonce in range(start, min(start + max_tries, 1 << 64)):
        d = hashlib.sha256(prefix + nonce.to_bytes(8, "big")).digest()
        if leading_zero_bits(d) >= bits:
            return nonce
    return None


@dataclass(frozen=True)
class IdentityProof:
    """A nonce that makes ``pow_digest(peer_id, nonce)`` start with enough zero bits.

    Not signed: the work is bound to the public key inside the peer id, so
    anyone may relay it. It is a ledger fact (reconciled like the others).
    """

    VERSION: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = 256

    peer_id: str
    nonce: int

    def __post_init__(self) -> None:
        want_peer_id("IdentityProof", "peer_id", self.peer_id)
        want_int("IdentityProof", "nonce", self.nonce, hi=2**64 - 1)

    @property
    def bits(self) -> int:
        return leading_zero_bits(pow_digest(self.peer_id, self.nonce))

    def verify(self, required_bits: int) -> None:
        if self.bits < required_bits:
            raise ValidationError(
                f"identity proof for {self.peer_id} has {self.bits} leading zero bits, "
                f"the network requires {required_bits}"
            )

    @property
    def fact_id(self) -> bytes:
        """One identity fact per account, whichever nonce proves it."""
        return hashlib.sha256(signing_bytes(IDENTITY_POW_DOMAIN, self.peer_id.encode())).digest()

    def to_bytes(self) -> bytes:
        return encode({"v": self.VERSION, "peer_id": self.peer_id, "nonce": self.nonce})

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityProof:
        b = check_body(
            decode(data, max_size=cls.MAX_BYTES),
            kind="IdentityProof",
            version=cls.VERSION,
            fields=frozenset({"peer_id", "nonce"}),
        )
        return cls(peer_id=b["peer_id"], nonce=b["nonce"])


__all__ = [
    "MAX_AMOUNT",
    "TRANSFER_DOMAIN",
    "CreditPolicy",
    "IdentityProof",
    "Transfer",
    "fold_balances",
    "leading_zero_bits",
    "open_transfer",
    "pow_digest",
    "sign_transfer",
    "solve_pow",
]
