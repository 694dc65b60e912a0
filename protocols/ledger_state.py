"""The ledger as a pure value: verified facts in, balances and a state hash out.

``LedgerState`` holds sets of facts, each verified before it is accepted:
receipts (``Receipt`` or ``ArbitratedReceipt``), certificates, fraud proofs,
equivocation proofs and identity proofs. Everything it reports is a function
of those *sets*, never of the order they arrived in, so two peers that hold
the same facts report the same balances and the same ``state_hash()``.

Rules (docs/settlement.md has the reasoning):
- Fold: balances are the sum of the canonical certified transfers, one per
  (payer, seq) (the smallest digest, should a broken quorum ever certify two),
  minus reversed ones. Balances sum to zero.
- Escrow / fraud window ``W`` (``CreditPolicy.fraud_window_ms``): a payment
  with transfer time ``t`` is in escrow until ``t + W``; the payee cannot
  spend it (``spendable``) and it does not count as earned.
- Forfeit: once a fraud proof with time ``T`` names executor ``E``, every
  payment to ``E`` with ``t >= T - W`` is reversed (the payer gets it back);
  with several proofs ``T`` is the earliest. ``E`` is banned (limit 0).
- Ban: an equivocating payer is banned too (limit 0).
- Debts: an ``ArbitratedReceipt`` whose requester has not paid it blocks that
  requester's other payments (witnesses only certify paying the debt).
"""

from __future__ import annotations

import hashlib
from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from protocols.certificate import Certificate
from protocols.codec import decode, encode
from protocols.committee import CommitteeRule
from protocols.errors import DecodeError
from protocols.ledger import CreditPolicy, IdentityProof, Transfer, fold_balances
from protocols.market_fields import check_body, want_bytes, want_int
from protocols.proofs import ArbitratedReceipt, EquivocationProof, FraudProof, PayableReceipt
from protocols.receipt import Receipt
from protocols.signing import signing_bytes

STATE_HASH_DOMAIN = "edgeswarm/ledger-state/v1"
ITEM_VERSION = 1


class FactKind(IntEnum):
    """Kinds of ledger facts, as numbered on the wire and in the state hash."""

    RECEIPT = 1
    ARBITRATED_RECEIPT = 2
    CERTIFICATE = 3
    FRAUD_PROOF = 4
    EQUIVOCATION_PROOF = 5
    IDENTITY_PROOF = 6


_MAX_ITEM_BYTES = {
    FactKind.RECEIPT: 2048,
    FactKind.ARBITRATED_RECEIPT: ArbitratedReceipt.MAX_BYTES,
    FactKind.CERTIFICATE: Certificate.MAX_BYTES,
    FactKind.FRAUD_PROOF: FraudProof.MAX_BYTES,
    FactKind.EQUIVOCATION_PROOF: EquivocationProof.MAX_BYTES,
    FactKind.IDENTITY_PROOF: IdentityProof.MAX_BYTES,
}
MAX_ITEM_BYTES = max(_MAX_ITEM_BYTES.values()) + 32


def encode_item(kind: FactKind, data: bytes) -> bytes:
    """Wire form of one fact for sync: ``{"v":1, "k": kind, "b": bytes}``."""
    return encode({"v": ITEM_VERSION, "k": int(kind), "b": data})


def decode_item(data: bytes) -> tuple[FactKind, bytes]:
    raw = decode(data, max_size=MAX_ITEM_BYTES)
    b = check_body(raw, kind="LedgerItem", version=ITEM_VERSION, fields=frozenset("kb"))
    k = want_int("LedgerItem", "k", b["k"], lo=1, hi=len(FactKind))
    kind = FactKind(k)
    return kind, want_bytes("LedgerItem", "b", b["b"], lo=1, hi=_MAX_ITEM_BYTES[kind])


@dataclass(frozen=True)
class _Fact:
    kind: FactKind
    data: bytes


@dataclass
class _Derived:
    """Views folded from the facts; rebuilt after a fraud proof or a certificate conflict,
    updated in place for the common case (a new certificate for a fresh (payer, seq))."""

    effective: list[Transfer]
    balances: dict[str, int]
    incoming: dict[str, list[Transfer]]


class LedgerState:
    """All verified facts one peer holds, and what follows from them.

    ``ingest_*`` verify and add a fact; they return ``True`` if it was new
    and raise a ``RemoteProtocolError`` if it is invalid (nothing is added).
    The I/O layer persists a fact after ``ingest`` accepted it (or before, in
    the same transaction; a restart replays the stored facts through
    ``ingest_*`` with the same result).
    """

    def __init__(self, rule: CommitteeRule, policy: CreditPolicy | None = None) -> None:
        self.rule = rule
        self.policy = policy or CreditPolicy()
        self._facts: dict[bytes, _Fact] = {}
        self._receipts: dict[bytes, PayableReceipt] = {}
        self._by_commitment: dict[bytes, set[bytes]] = {}
        self._arbitrated_by_requester: dict[str, list[ArbitratedReceipt]] = {}
        self._certs: dict[bytes, Certificate] = {}
        self._by_seq: dict[tuple[str, int], set[bytes]] = {}
        self._next_seq: dict[str, int] = {}
        self._paid_receipts: set[bytes] = set()
        self._fraud_time: dict[str, int] = {}
        self._banned: set[str] = set()
        self._identities: set[str] = set()
        self._ids: list[bytes] | None = None
        self._derived: _Derived | None = None

    # --- ingest ---------------------------------------------------------------------------

    def _add(self, fact_id: bytes, kind: FactKind, data: bytes) -> bool:
        if fact_id in self._facts:
            return False
        self._facts[fact_id] = _Fact(kind, data)
        if self._ids is not None:
            insort(self._ids, fact_id)
        return True

    def _add_receipt(self, receipt: PayableReceipt, kind: FactKind, data: bytes) -> bool:
        rid = receipt.receipt_id
        if rid in self._facts:
            return False
        self._receipts[rid] = receipt
        self._by_commitment.setdefault(receipt.commitment.digest, set()).add(rid)
        if isinstance(receipt, ArbitratedReceipt):
            self._arbitrated_by_requester.setdefault(receipt.requester, []).append(receipt)
        return self._add(rid, kind, data)

    def ingest_receipt(self, receipt: Receipt) -> bool:
        receipt.verify()
        return self._add_receipt(receipt, FactKind.RECEIPT, receipt.to_bytes())

    def ingest_arbitrated_receipt(self, receipt: ArbitratedReceipt) -> bool:
        receipt.verify(
            self.rule.referees_for(receipt.job_id, (receipt.requester, receipt.executor))
        )
        return self._add_receipt(receipt, FactKind.ARBITRATED_RECEIPT, receipt.to_bytes())

    def ingest_payable(self, receipt: PayableReceipt) -> bool:
        """``ingest_receipt`` or ``ingest_arbitrated_receipt``, whichever ``receipt`` is."""
        if isinstance(receipt, Receipt):
            return self.ingest_receipt(receipt)
        if isinstance(receipt, ArbitratedReceipt):
            return self.ingest_arbitrated_receipt(receipt)
        raise TypeError(f"not a receipt: {type(receipt).__name__}")

    def ingest_certificate(self, cert: Certificate) -> bool:
        cert.verify(self.rule.committee_for(cert.account))
        if cert.digest in self._facts:
            return False
        t = cert.transfer.message
        self._certs[cert.digest] = cert
        digests = self._by_seq.setdefault((t.payer, t.seq), set())
        first = not digests
        digests.add(cert.digest)
        self._paid_receipts.add(t.receipt_id)
        nxt = self._next_seq.get(t.payer, 1)
        while (t.payer, nxt) in self._by_seq:
            nxt += 1
        self._next_seq[t.payer] = nxt
        d = self._derived
        if d is not None:
            if not first:
                self._derived = None  # a conflict may change the canonical transfer
            elif not self.is_reversed(t):
                d.effective.append(t)
                for account, delta in ((t.payer, -t.amount), (t.payee, t.amount)):
                    value = d.balances.get(account, 0) + delta
                    if value:
                        d.balances[account] = value
                    else:
                        d.balances.pop(account, None)
                d.incoming.setdefault(t.payee, []).append(t)
        return self._add(cert.digest, FactKind.CERTIFICATE, cert.to_bytes())

    def ingest_fraud_proof(self, proof: FraudProof) -> bool:
        c = proof.commitment.message
        proof.verify(self.rule.referees_for(c.job_id, (c.requester, c.executor)))
        if proof.fact_id in self._facts:
            return False
        old = self._fraud_time.get(proof.offender)
        self._fraud_time[proof.offender] = proof.time_ms if old is None else min(old, proof.time_ms)
        self._banned.add(proof.offender)
        self._derived = None
        return self._add(proof.fact_id, FactKind.FRAUD_PROOF, proof.to_bytes())

    def ingest_equivocation_proof(self, proof: EquivocationProof) -> bool:
        proof.verify()
        if proof.fact_id in self._facts:
            return False
        self._banned.add(proof.offender)
        return self._add(proof.fact_id, FactKind.EQUIVOCATION_PROOF, proof.to_bytes())

    def ingest_identity_proof(self, proof: IdentityProof) -> bool:
        proof.verify(self.policy.pow_bits)
        if proof.fact_id in self._facts:
            return False
        self._identities.add(proof.peer_id)
        return self._add(proof.fact_id, FactKind.IDENTITY_PROOF, proof.to_bytes())

    def ingest_bytes(self, kind: FactKind, data: bytes) -> bool:
        """Parse, verify and add one fact received from sync (see ``decode_item``)."""
        if len(data) > _MAX_ITEM_BYTES[kind]:
            raise DecodeError(f"{kind.name} is {len(data)} bytes, cap {_MAX_ITEM_BYTES[kind]}")
        if kind is FactKind.RECEIPT:
            return self.ingest_receipt(Receipt.from_bytes(data))
        if kind is FactKind.ARBITRATED_RECEIPT:
            return self.ingest_arbitrated_receipt(ArbitratedReceipt.from_bytes(data))
        if kind is FactKind.CERTIFICATE:
            return self.ingest_certificate(Certificate.from_bytes(data))
        if kind is FactKind.FRAUD_PROOF:
            return self.ingest_fraud_proof(FraudProof.from_bytes(data))
        if kind is FactKind.EQUIVOCATION_PROOF:
            return self.ingest_equivocation_proof(EquivocationProof.from_bytes(data))
        return self.ingest_identity_proof(IdentityProof.from_bytes(data))

    # --- sync -----------------------------------------------------------------------------

    def fact_ids(self) -> list[bytes]:
        """Sorted ids of every fact held: the set that ``reconcile`` works on (do not mutate)."""
        if self._ids is None:
            self._ids = sorted(self._facts)
        return self._ids

    def item(self, fact_id: bytes) -> tuple[FactKind, bytes] | None:
        fact = self._facts.get(fact_id)
        return None if fact is None else (fact.kind, fact.data)

    def __len__(self) -> int:
        return len(self._facts)

    def state_hash(self) -> bytes:
        """sha256 over the sorted fact ids: equal fact sets give equal hashes, in any order."""
        h = hashlib.sha256(signing_bytes(STATE_HASH_DOMAIN, len(self._facts).to_bytes(8, "big")))
        for fid in self.fact_ids():
            h.update(fid)
        return h.digest()

    # --- derived views --------------------------------------------------------------------

    def canonical_transfers(self) -> list[Transfer]:
        """One certified transfer per (payer, seq): the smallest digest wins a (broken) tie."""
        return [self._certs[min(ds)].transfer.message for ds in self._by_seq.values()]

    def conflicts(self) -> list[tuple[str, int]]:
        """(payer, seq) with more than one certificate: evidence of > f byzantine witnesses."""
        return sorted(k for k, ds in self._by_seq.items() if len(ds) > 1)

    def is_reversed(self, t: Transfer) -> bool:
        T = self._fraud_time.get(t.payee)
        return T is not None and t.time_ms >= T - self.policy.fraud_window_ms

    def _view(self) -> _Derived:
        if self._derived is None:
            effective = [t for t in self.canonical_transfers() if not self.is_reversed(t)]
            incoming: dict[str, list[Transfer]] = {}
            for t in effective:
                incoming.setdefault(t.payee, []).append(t)
            self._derived = _Derived(effective, fold_balances(effective), incoming)
        return self._derived

    def balances(self) -> dict[str, int]:
        """Account -> balance (micro-credits), zero balances omitted; the values sum to 0."""
        return dict(self._view().balances)

    def balance(self, account: str) -> int:
        return self._view().balances.get(account, 0)

    def forfeited(self) -> dict[str, int]:
        """Proven cheater -> total of its reversed payouts."""
        out: dict[str, int] = {}
        for t in self.canonical_transfers():
            if self.is_reversed(t):
                out[t.payee] = out.get(t.payee, 0) + t.amount
        return out

    def next_seq(self, account: str) -> int:
        """1 + the highest seq s such that seqs 1..s of ``account`` are all certified here."""
        return self._next_seq.get(account, 1)

    def escrowed(self, account: str, now_ms: int) -> int:
        """Incoming payments still inside the fraud window at ``now_ms``."""
        w = self.policy.fraud_window_ms
        incoming = self._view().incoming.get(account, [])
        return sum(t.amount for t in incoming if t.time_ms + w > now_ms)

    def earned(self, account: str, now_ms: int) -> int:
        """Incoming payments out of escrow at ``now_ms`` (what grows the credit limit)."""
        w = self.policy.fraud_window_ms
        incoming = self._view().incoming.get(account, [])
        return sum(t.amount for t in incoming if t.time_ms + w <= now_ms)

    def spendable(self, account: str, now_ms: int) -> int:
        return self.balance(account) - self.escrowed(account, now_ms)

    def has_identity(self, account: str) -> bool:
        return account in self._identities or account in self.policy.genesis

    def is_banned(self, account: str) -> bool:
        return account in self._banned

    def credit_limit(self, account: str, now_ms: int) -> int:
        return self.policy.limit(
            earned=self.earned(account, now_ms),
            has_identity=self.has_identity(account),
            banned=self.is_banned(account),
        )

    def receipt(self, receipt_id: bytes) -> PayableReceipt | None:
        return self._receipts.get(receipt_id)

    def is_paid(self, receipt: PayableReceipt) -> bool:
        """Paid if this receipt, or any receipt for the same commitment, has a certificate."""
        if receipt.receipt_id in self._paid_receipts:
            return True
        same = self._by_commitment.get(receipt.commitment.digest, set())
        return any(rid in self._paid_receipts for rid in same)

    def outstanding_debts(self, account: str) -> list[ArbitratedReceipt]:
        """Arbitrated receipts ``account`` owes and has not paid (they block its other payments)."""
        return [r for r in self._arbitrated_by_requester.get(account, []) if not self.is_paid(r)]

    def eligible_pool(self, now_ms: int, min_earned: int) -> frozenset[str]:
        """Accounts with a proven identity, not banned, and ``earned >= min_earned``."""
        return frozenset(
            a
            for a in self._view().incoming
            if self.has_identity(a)
            and not self.is_banned(a)
            and self.earned(a, now_ms) >= min_earned
        )


def replay(state: LedgerState, items: Iterable[tuple[FactKind, bytes]]) -> int:
    """Ingest stored facts (e.g. at start-up); returns how many were new."""
    return sum(1 for kind, data in items if state.ingest_bytes(kind, data))


__all__ = [
    "STATE_HASH_DOMAIN",
    "FactKind",
    "LedgerState",
    "decode_item",
    "encode_item",
    "replay",
]
