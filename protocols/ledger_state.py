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

import dataclasses
import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from sortedcontainers import SortedList

from protocols.certificate import Certificate
from protocols.checkpoint import (
    GENESIS_PREV,
    SUM_BYTES,
    AccountSummary,
    Checkpoint,
    CheckpointHeader,
    accounts_hash,
    check_accounts,
    follows,
)
from protocols.codec import decode, encode
from protocols.committee import CommitteeRule
from protocols.errors import DecodeError, LocalProtocolError, ValidationError
from protocols.ledger import CreditPolicy, IdentityProof, Transfer, open_transfer
from protocols.market_fields import check_body, want_bytes, want_int
from protocols.proofs import ArbitratedReceipt, EquivocationProof, FraudProof, PayableReceipt
from protocols.receipt import Receipt
from protocols.signing import signing_bytes

STATE_HASH_DOMAIN = "edgeswarm/ledger-state/v2"
CHECKPOINT_STATE_DOMAIN = "edgeswarm/ledger-state/v3"
ITEM_VERSION = 1


class FactKind(IntEnum):
    """Kinds of ledger facts, as numbered on the wire and in the state hash."""

    RECEIPT = 1
    ARBITRATED_RECEIPT = 2
    CERTIFICATE = 3
    FRAUD_PROOF = 4
    EQUIVOCATION_PROOF = 5
    IDENTITY_PROOF = 6
    CHECKPOINT = 7


_MAX_ITEM_BYTES = {
    FactKind.RECEIPT: 2048,
    FactKind.ARBITRATED_RECEIPT: ArbitratedReceipt.MAX_BYTES,
    FactKind.CERTIFICATE: Certificate.MAX_BYTES,
    FactKind.FRAUD_PROOF: FraudProof.MAX_BYTES,
    FactKind.EQUIVOCATION_PROOF: EquivocationProof.MAX_BYTES,
    FactKind.IDENTITY_PROOF: IdentityProof.MAX_BYTES,
    FactKind.CHECKPOINT: Checkpoint.MAX_BYTES,
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


class IrrelevantFact(ValidationError):
    """A fact this peer has no reason to hold (e.g. a receipt between strangers that no
    certificate here pays): refused before any signature is checked."""


# Facts every peer holds (they change balances, bans or committees everywhere); the ledger
# gossip topic carries only these.
NETWORK_WIDE = frozenset(
    {
        FactKind.CERTIFICATE,
        FactKind.FRAUD_PROOF,
        FactKind.EQUIVOCATION_PROOF,
        FactKind.CHECKPOINT,
    }
)


class NeedAccounts(ValidationError):
    """A checkpoint whose summary this ledger cannot compute from the facts it holds (it
    lacks some): adopt it with its account rows (``adopt_checkpoint(cp, accounts)``)."""


@dataclass(frozen=True)
class Adoption:
    """What adopting a checkpoint changed: facts dropped, receipts remembered as paid."""

    checkpoint: Checkpoint
    accounts: list[AccountSummary]
    pruned: list[bytes]  # fact ids no longer held
    tombstones: list[bytes]  # receipt ids / commitment digests paid by pruned certificates


class FactBlobs(Protocol):
    """Where a ``LedgerState`` keeps the bytes of its facts.

    The state itself keeps only ids and small per-account indexes in memory;
    the bytes (what sync serves and ``verify`` re-checks) may live on disk.
    ``MemoryBlobs`` is the default; the ledger store passes one backed by its
    database (facts not yet committed stay in memory until their commit).
    """

    def get(self, fact_id: bytes) -> tuple[FactKind, bytes] | None: ...

    def put(self, fact_id: bytes, kind: FactKind, data: bytes) -> None: ...

    def forget(self, fact_ids: Iterable[bytes]) -> None:
        """These facts are covered by a checkpoint: drop them (the store deletes the rows)."""

    def mark_paid(self, keys: Iterable[bytes]) -> None:
        """Remember receipt ids / commitment digests paid by pruned certificates."""

    def was_paid(self, key: bytes) -> bool:
        """Whether ``mark_paid`` was given ``key`` (read only once a checkpoint is held)."""
        ...


class MemoryBlobs:
    """``FactBlobs`` in a dict (tests, ``verify``, short-lived ledgers)."""

    def __init__(self) -> None:
        self._data: dict[bytes, tuple[FactKind, bytes]] = {}
        self._paid: set[bytes] = set()

    def get(self, fact_id: bytes) -> tuple[FactKind, bytes] | None:
        return self._data.get(fact_id)

    def put(self, fact_id: bytes, kind: FactKind, data: bytes) -> None:
        self._data[fact_id] = (kind, data)

    def forget(self, fact_ids: Iterable[bytes]) -> None:
        for fid in fact_ids:
            self._data.pop(fid, None)

    def mark_paid(self, keys: Iterable[bytes]) -> None:
        self._paid.update(keys)

    def was_paid(self, key: bytes) -> bool:
        return key in self._paid


# --- the incremental state digest ----------------------------------------------------------

DIGEST_ELEMENT_DOMAIN = b"edgeswarm/ledger-fact/v2"
DIGEST_BITS = 2048
_DIGEST_MOD = 1 << DIGEST_BITS


def digest_element(fact_id: bytes) -> int:
    """One fact's term of the set digest: SHAKE-256(domain || id), 2048 bits."""
    return int.from_bytes(
        hashlib.shake_256(DIGEST_ELEMENT_DOMAIN + fact_id).digest(DIGEST_BITS // 8), "little"
    )


def digest_of(fact_ids: Iterable[bytes]) -> tuple[int, int]:
    """(sum of elements mod 2^2048, count) of a set of ids, from scratch."""
    total, count = 0, 0
    for fid in set(fact_ids):
        total += digest_element(fid)
        count += 1
    return total % _DIGEST_MOD, count


def state_hash_of(total: int, count: int, checkpoint: bytes | None = None) -> bytes:
    """The state hash of a set with digest ``(total, count)`` (see ``LedgerState.state_hash``),
    on top of the adopted checkpoint with this digest, if any."""
    body = count.to_bytes(8, "big") + total.to_bytes(DIGEST_BITS // 8, "little")
    if checkpoint is None:
        return hashlib.sha256(signing_bytes(STATE_HASH_DOMAIN, body)).digest()
    return hashlib.sha256(signing_bytes(CHECKPOINT_STATE_DOMAIN, checkpoint + body)).digest()


# --- per-account indexes -------------------------------------------------------------------

# Incoming payments are ordered by (time_ms, slot): a key packs both in one int.
_SLOT_BITS = 40


class _Incoming:
    """Canonical certified payments *to* one account, ordered by transfer time.

    Slots are append-only (amount, payer, digest); ``order`` holds
    ``time_ms << 40 | slot`` sorted, so the escrow window (the newest entries)
    and a fraud reversal cut (entries at or after a time) are a bisect away.
    ``effective`` and ``from_payer`` exclude reversed payments.
    """

    __slots__ = ("amounts", "digests", "effective", "from_payer", "order", "payers")

    def __init__(self) -> None:
        self.amounts = array("q")
        self.payers: list[str] = []
        self.digests: list[bytes] = []
        self.order: Any = SortedList()
        self.effective = 0
        self.from_payer: dict[str, int] = {}

    def add(self, time_ms: int, amount: int, payer: str, digest: bytes) -> int:
        slot = len(self.amounts)
        self.amounts.append(amount)
        self.payers.append(payer)
        self.digests.append(digest)
        key = time_ms << _SLOT_BITS | slot
        self.order.add(key)
        return key

    def remove(self, digest: bytes, time_ms: int) -> None:
        lo = self.order.bisect_left(time_ms << _SLOT_BITS)
        hi = self.order.bisect_left((time_ms + 1) << _SLOT_BITS)
        for key in list(self.order.islice(lo, hi)):
            if self.digests[key & _SLOT_MASK] == digest:
                self.order.remove(key)
                return

    def entries(self, from_time: int, to_time: int | None = None) -> Iterator[tuple[int, int]]:
        """(time_ms, slot) with ``from_time <= time_ms < to_time``, oldest first."""
        lo = self.order.bisect_left(max(from_time, 0) << _SLOT_BITS)
        hi = len(self.order) if to_time is None else self.order.bisect_left(to_time << _SLOT_BITS)
        for key in self.order.islice(lo, hi):
            yield key >> _SLOT_BITS, key & _SLOT_MASK


_SLOT_MASK = (1 << _SLOT_BITS) - 1
# Facts re-ingested after a checkpoint: checkpoints and identities, then payments, then the
# rest (the fold does not depend on the order; this one keeps the indexes' work small).
_REBUILD_ORDER = {
    FactKind.CHECKPOINT: 0,
    FactKind.IDENTITY_PROOF: 1,
    FactKind.CERTIFICATE: 2,
    FactKind.FRAUD_PROOF: 3,
    FactKind.EQUIVOCATION_PROOF: 3,
    FactKind.RECEIPT: 4,
    FactKind.ARBITRATED_RECEIPT: 4,
}


class LedgerState:
    """All verified facts one peer holds, and what follows from them.

    ``ingest_*`` verify and add a fact; they return ``True`` if it was new
    and raise a ``RemoteProtocolError`` if it is invalid (nothing is added).
    The I/O layer persists a fact after ``ingest`` accepted it (or before, in
    the same transaction; a restart replays the stored facts through
    ``ingest_*`` with the same result).

    Cost: every ingest is O(log n) (no step walks history); the state digest,
    balances and per-account indexes are updated in place. Memory holds the
    fact ids and small per-account indexes; the facts' bytes live in ``blobs``.
    Only evidence of more than f byzantine witnesses (two certificates for
    one seq, where the smaller digest must replace the larger) reads an old
    fact back.
    """

    def __init__(
        self,
        rule: CommitteeRule,
        policy: CreditPolicy | None = None,
        *,
        blobs: FactBlobs | None = None,
    ) -> None:
        self.rule = rule
        self.policy = policy or CreditPolicy()
        self.blobs: FactBlobs = blobs if blobs is not None else MemoryBlobs()
        # The adopted checkpoint (None: none yet) and its per-account summary (the base that
        # the facts still held fold onto), and every checkpoint held, by epoch -> digest.
        self._checkpoint: Checkpoint | None = None
        self._base: dict[str, AccountSummary] = {}
        self._base_rows: list[AccountSummary] = []  # the same, sorted by account
        self._checkpoints: dict[int, bytes] = {}
        self._trusted = False  # re-ingesting facts verified before (adopting a checkpoint)
        # Facts added while a copy of this ledger adopts a checkpoint elsewhere (a thread):
        # replayed into the copy before it takes this one's place (``take_state``).
        self.journal: list[tuple[FactKind, bytes]] | None = None
        self._reset()

    def _reset(self) -> None:
        """Empty every index (the base and the adopted checkpoint are set by the caller)."""
        self._ids: Any = SortedList()  # every fact id held, sorted (what reconcile works on)
        self._acc = 0  # sum of digest_element(id) mod 2^2048
        # Certificates: canonical digest per (payer, seq); more than one only in _conflicts.
        self._seqs: dict[str, dict[int, bytes]] = {}
        self._conflicts: dict[tuple[str, int], set[bytes]] = {}
        self._next_seq: dict[str, int] = {}
        # Paid: receipt ids of certificates whose receipt we did not hold when they came,
        # and commitment digests of paid receipts we hold (one entry per certificate).
        self._paid_receipts: set[bytes] = set()
        self._paid_commitments: set[bytes] = set()
        # Receipts not paid yet, per requester: receipt id -> commitment digest (arrival order).
        self._unpaid: dict[str, dict[bytes, bytes]] = {}
        self._arbitrated_by_requester: dict[str, list[ArbitratedReceipt]] = {}
        self._incoming: dict[str, _Incoming] = {}
        self._balances: dict[str, int] = {}
        self._changed: set[str] = set()  # accounts whose balance moved since take_changes
        self._fraud_time: dict[str, int] = {}
        self._banned: set[str] = set()
        self._identities: set[str] = set()
        self._names: dict[str, str] = {}
        self._checkpoints = {}

    # --- ingest ---------------------------------------------------------------------------

    def has(self, fact_id: bytes) -> bool:
        """Whether a fact with this id is held (O(log n), no read of its bytes)."""
        return fact_id in self._ids

    def _add(self, fact_id: bytes, kind: FactKind, data: bytes) -> bool:
        if fact_id in self._ids:
            return False
        self._ids.add(fact_id)
        self._acc = (self._acc + digest_element(fact_id)) % _DIGEST_MOD
        if not self._trusted:  # (re-ingesting held facts: their bytes are stored already)
            self.blobs.put(fact_id, kind, data)
            if self.journal is not None:
                self.journal.append((kind, data))
        return True

    def replay_verified(self, items: Iterable[tuple[FactKind, bytes]]) -> None:
        """Add facts this ledger's owner verified before (a copy rebuilt from the stored
        rows): their signatures are not checked again, nor their bytes stored again."""
        self._trusted = True
        try:
            for kind, data in items:
                self.ingest_bytes(kind, data)
        finally:
            self._trusted = False

    def take_state(self, other: LedgerState) -> None:
        """Become ``other`` (same rule and policy), keeping this object's identity and
        blobs: every holder of this ledger sees the state ``other`` built. For a copy that
        adopted a checkpoint off the event loop (``peer.ledger_store``)."""
        if other.rule != self.rule or other.policy != self.policy:
            raise LocalProtocolError("take_state needs a ledger of the same rule and policy")
        blobs = self.blobs
        self.__dict__.update(other.__dict__)
        self.blobs = blobs
        self.journal = None

    def _add_receipt(self, receipt: PayableReceipt, kind: FactKind, data: bytes) -> bool:
        rid = receipt.receipt_id
        if rid in self._ids:
            return False
        c = receipt.commitment.digest
        if self._checkpoint is not None and (self.blobs.was_paid(rid) or self.blobs.was_paid(c)):
            return False  # paid by a certificate a checkpoint covers: known, not held again
        if rid in self._paid_receipts:  # its certificate came first
            self._paid_receipts.discard(rid)
            self._paid_commitments.add(c)
        elif c not in self._paid_commitments:
            self._unpaid.setdefault(self._name(receipt.requester), {})[rid] = c
        if isinstance(receipt, ArbitratedReceipt):
            self._arbitrated_by_requester.setdefault(receipt.requester, []).append(receipt)
        return self._add(rid, kind, data)

    def ingest_receipt(self, receipt: Receipt) -> bool:
        if not self._trusted:
            receipt.verify()
        return self._add_receipt(receipt, FactKind.RECEIPT, receipt.to_bytes())

    def ingest_arbitrated_receipt(self, receipt: ArbitratedReceipt) -> bool:
        if not self._trusted:
            receipt.verify_under(self.rule)
        return self._add_receipt(receipt, FactKind.ARBITRATED_RECEIPT, receipt.to_bytes())

    def ingest_payable(self, receipt: PayableReceipt) -> bool:
        """``ingest_receipt`` or ``ingest_arbitrated_receipt``, whichever ``receipt`` is."""
        if isinstance(receipt, Receipt):
            return self.ingest_receipt(receipt)
        if isinstance(receipt, ArbitratedReceipt):
            return self.ingest_arbitrated_receipt(receipt)
        raise TypeError(f"not a receipt: {type(receipt).__name__}")

    def ingest_certificate(self, cert: Certificate) -> bool:
        if not self._trusted:
            cert.verify(self.rule.committee_at(cert.account, cert.cp, cert.time_ms))
        digest = cert.digest  # one object, shared by every index below
        if digest in self._ids:
            return False
        t = cert.transfer.message
        base = self._base.get(t.payer)
        if base is not None and t.seq < base.next_seq:
            return False  # covered by the adopted checkpoint: known, not held again
        payer = self._name(t.payer)
        self._mark_paid(t)
        seqs = self._seqs.setdefault(payer, {})
        held = seqs.get(t.seq)
        if held is None:
            seqs[t.seq] = digest
            nxt = self._next_seq.get(payer, 1)
            while nxt in seqs:
                nxt += 1
            self._next_seq[payer] = nxt
            self._apply(t, digest)
        else:
            # Two certificates for one seq: more than f witnesses broke the rules. The
            # smaller digest counts everywhere, whatever arrived first.
            self._conflicts.setdefault((payer, t.seq), {held}).add(digest)
            if digest < held:
                old = self._certificate(held)
                self._unapply(old.transfer.message, held)
                seqs[t.seq] = digest
                self._apply(t, digest)
        return self._add(digest, FactKind.CERTIFICATE, cert.to_bytes())

    def _name(self, account: str) -> str:
        """One string object per account, however many facts name it (memory)."""
        return self._names.setdefault(account, account)

    def _mark_paid(self, t: Transfer) -> None:
        c = self._unpaid.get(t.payer, {}).pop(t.receipt_id, None)
        if c is not None:
            self._paid_commitments.add(c)
        elif t.receipt_id not in self._ids:
            self._paid_receipts.add(t.receipt_id)
        else:
            # A receipt we hold that was already paid by commitment, or that names
            # another requester (a certificate only a broken quorum would sign).
            r = self.receipt(t.receipt_id)
            if r is not None:
                self._paid_commitments.add(r.commitment.digest)

    def _flow(self, src: str, dst: str, amount: int) -> None:
        """Move ``amount`` from ``src``'s balance to ``dst``'s."""
        for account, delta in ((self._name(src), -amount), (self._name(dst), amount)):
            value = self._balances.get(account, 0) + delta
            if value:
                self._balances[account] = value
            else:
                self._balances.pop(account, None)
            self._changed.add(account)

    def _apply(self, t: Transfer, digest: bytes) -> None:
        """A canonical transfer joins the fold (unless a fraud proof reverses it)."""
        inc = self._incoming.get(t.payee)
        if inc is None:
            inc = self._incoming[self._name(t.payee)] = _Incoming()
        payer = self._name(t.payer)
        inc.add(t.time_ms, t.amount, payer, digest)
        if not self.is_reversed(t):
            self._flow(payer, t.payee, t.amount)
            inc.effective += t.amount
            inc.from_payer[payer] = inc.from_payer.get(payer, 0) + t.amount

    def _unapply(self, t: Transfer, digest: bytes) -> None:
        inc = self._incoming[t.payee]
        inc.remove(digest, t.time_ms)
        if not self.is_reversed(t):
            self._flow(t.payee, t.payer, t.amount)
            inc.effective -= t.amount
            left = inc.from_payer.get(t.payer, 0) - t.amount
            if left:
                inc.from_payer[t.payer] = left
            else:
                inc.from_payer.pop(t.payer, None)

    def _certificate(self, digest: bytes) -> Certificate:
        item = self.blobs.get(digest)
        if item is None or item[0] is not FactKind.CERTIFICATE:
            raise LocalProtocolError(f"certificate {digest.hex()[:16]} is held but not stored")
        return Certificate.from_bytes(item[1])

    def ingest_fraud_proof(self, proof: FraudProof) -> bool:
        if not self._trusted:
            proof.verify_under(self.rule)
        if proof.fact_id in self._ids:
            return False
        e = proof.offender
        w = self.policy.fraud_window_ms
        old = self._fraud_time.get(e)
        if old is None or proof.time_ms < old:
            # Payments to e from the new cut up to the old one (or all later ones) reverse.
            inc = self._incoming.get(e)
            if inc is not None:
                upto = None if old is None else old - w
                for _time, slot in list(inc.entries(proof.time_ms - w, upto)):
                    amount, payer = inc.amounts[slot], inc.payers[slot]
                    self._flow(e, payer, amount)
                    inc.effective -= amount
                    left = inc.from_payer.get(payer, 0) - amount
                    if left:
                        inc.from_payer[payer] = left
                    else:
                        inc.from_payer.pop(payer, None)
            self._fraud_time[e] = proof.time_ms
        self._banned.add(e)
        return self._add(proof.fact_id, FactKind.FRAUD_PROOF, proof.to_bytes())

    def ingest_equivocation_proof(self, proof: EquivocationProof) -> bool:
        if not self._trusted:
            proof.verify()
        if proof.fact_id in self._ids:
            return False
        self._banned.add(proof.offender)
        return self._add(proof.fact_id, FactKind.EQUIVOCATION_PROOF, proof.to_bytes())

    def ingest_identity_proof(self, proof: IdentityProof) -> bool:
        if not self._trusted:
            proof.verify(self.policy.pow_bits)
        if proof.fact_id in self._ids:
            return False
        self._identities.add(proof.peer_id)
        return self._add(proof.fact_id, FactKind.IDENTITY_PROOF, proof.to_bytes())

    def ingest_bytes(self, kind: FactKind, data: bytes) -> bool:
        """Parse, verify and add one fact received from sync (see ``decode_item``)."""
        if len(data) > _MAX_ITEM_BYTES[kind]:
            raise DecodeError(f"{kind.name} is {len(data)} bytes, cap {_MAX_ITEM_BYTES[kind]}")
        if kind is FactKind.RECEIPT:
            # Re-ingesting held facts (trusted, adopting a checkpoint): their signatures
            # were checked when they came.
            return self.ingest_receipt(Receipt.from_bytes(data, verify=not self._trusted))
        if kind is FactKind.ARBITRATED_RECEIPT:
            return self.ingest_arbitrated_receipt(ArbitratedReceipt.from_bytes(data))
        if kind is FactKind.CERTIFICATE:
            return self.ingest_certificate(Certificate.from_bytes(data))
        if kind is FactKind.FRAUD_PROOF:
            return self.ingest_fraud_proof(FraudProof.from_bytes(data))
        if kind is FactKind.EQUIVOCATION_PROOF:
            return self.ingest_equivocation_proof(EquivocationProof.from_bytes(data))
        if kind is FactKind.CHECKPOINT:
            return self.ingest_checkpoint(Checkpoint.from_bytes(data))
        return self.ingest_identity_proof(IdentityProof.from_bytes(data))

    def verify_fact(self, fact: object) -> None:
        """Check ``fact``'s signatures, quorum or work under this ledger's rules without
        adding it (what a gossip validator needs); raises the ``ProtocolError``."""
        if isinstance(fact, Receipt):
            fact.verify()
        elif isinstance(fact, ArbitratedReceipt):
            fact.verify_under(self.rule)
        elif isinstance(fact, Certificate):
            fact.verify(self.rule.committee_at(fact.account, fact.cp, fact.time_ms))
        elif isinstance(fact, FraudProof):
            fact.verify_under(self.rule)
        elif isinstance(fact, EquivocationProof):
            fact.verify()
        elif isinstance(fact, IdentityProof):
            fact.verify(self.policy.pow_bits)
        elif isinstance(fact, Checkpoint):
            fact.verify(self.rule)
        else:
            raise TypeError(f"not a ledger fact: {type(fact).__name__}")

    def check_relevant(self, fact: object, me: str) -> None:
        """Raise ``IrrelevantFact`` unless ``me`` has a reason to hold ``fact`` (a parsed,
        not yet verified fact from another peer). Reads fields only: cheap, so it runs
        before any signature check.

        - certificates, fraud and equivocation proofs: always (network-wide facts: their
          signatures need a committee quorum or a referee panel);
        - a receipt: ``me`` is a party to it or in its requester's committee, or a
          certificate here pays it;
        - identity proofs: always (every peer computes the eligible pool from them; each
          costs its maker ``pow_bits`` of work, and the per-peer budget bounds the rate).
        """
        if isinstance(fact, Receipt | ArbitratedReceipt):
            if me in (fact.requester, fact.executor) or fact.receipt_id in self._paid_receipts:
                return
            if me in self.rule.committee_for(fact.requester):
                return
            raise IrrelevantFact(
                f"receipt {fact.receipt_id.hex()[:12]} between {fact.requester[-8:]} and "
                f"{fact.executor[-8:]}: not ours, not paid here, not our committee's"
            )

    # --- checkpoints (protocols/checkpoint.py) ----------------------------------------------

    def ingest_checkpoint(self, cp: Checkpoint) -> bool:
        """Hold a checkpoint signed by a quorum of its epoch's committee (a network-wide
        fact; it is *adopted*, and facts pruned, by ``adopt_checkpoint``)."""
        if not self._trusted:
            cp.verify(self.rule)
        held = self._checkpoints.get(cp.epoch)
        if held is not None and held != cp.digest:
            # Two quorums signed different checkpoints for one epoch: more than f byzantine
            # members. Keep the first (the one a chain here already builds on).
            raise ValidationError(f"another checkpoint {cp.epoch} is held here")
        if cp.digest in self._ids:
            return False
        self._checkpoints[cp.epoch] = cp.digest
        return self._add(cp.digest, FactKind.CHECKPOINT, cp.to_bytes())

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The adopted checkpoint (what the facts held fold onto), if any."""
        return self._checkpoint

    def checkpoint_accounts(self) -> list[AccountSummary]:
        """The adopted checkpoint's account rows, sorted (what a syncing peer fetches)."""
        return self._base_rows

    def held_checkpoint(self, epoch: int) -> Checkpoint | None:
        digest = self._checkpoints.get(epoch)
        item = None if digest is None else self.blobs.get(digest)
        return None if item is None else Checkpoint.from_bytes(item[1])

    def latest_checkpoint_epoch(self) -> int:
        return max(self._checkpoints, default=0)

    def _transfer(self, digest: bytes) -> Transfer:
        """The transfer of a held certificate, parsed alone (its votes are not opened)."""
        item = self.blobs.get(digest)
        if item is None or item[0] is not FactKind.CERTIFICATE:
            raise LocalProtocolError(f"certificate {digest.hex()[:16]} is held but not stored")
        raw = decode(item[1], max_size=Certificate.MAX_BYTES)
        return open_transfer(raw["t"], verify=False).message

    def _covered(
        self, cut_ms: int | None, upto: dict[str, int] | None
    ) -> list[tuple[bytes, Transfer]]:
        """(digest, transfer) of the canonical certificates past the base that a checkpoint
        covers: per payer the run of seqs from its base with transfer time before
        ``cut_ms`` (or below ``upto[payer]``). Cost: the certificates covered (their
        transfers read back), plus one step per payer."""
        out: list[tuple[bytes, Transfer]] = []
        for payer, seqs in self._seqs.items():
            base = self._base.get(payer)
            s = 1 if base is None else base.next_seq
            stop = None if upto is None else upto.get(payer, 1)
            while s in seqs and (stop is None or s < stop):
                t = self._transfer(seqs[s])
                if cut_ms is not None and t.time_ms >= cut_ms:
                    break
                out.append((seqs[s], t))
                s += 1
        return out

    def _summarize(
        self, covered: Sequence[tuple[bytes, Transfer]]
    ) -> tuple[tuple[int, int], list[AccountSummary]]:
        """The base plus ``covered`` folded: (covered digest, account rows)."""
        rows = {a: [b.balance, b.next_seq, b.received, b.earned] for a, b in self._base.items()}
        total, count = (0, 0) if self._checkpoint is None else self._checkpoint.header.covered
        for digest, t in covered:
            total += digest_element(digest)
            count += 1
            payer = rows.setdefault(t.payer, [0, 1, 0, 0])
            payer[1] = max(payer[1], t.seq + 1)
            if self.is_reversed(t):
                continue
            payee = rows.setdefault(t.payee, [0, 1, 0, 0])
            payer[0] -= t.amount
            payee[0] += t.amount
            payee[2] += t.amount
            if self.has_identity(t.payer) and not self.is_banned(t.payer):
                payee[3] += t.amount
        accounts = [AccountSummary(a, *r) for a, r in sorted(rows.items()) if r != [0, 1, 0, 0]]
        return (total % _DIGEST_MOD, count), accounts

    def _draft(
        self, cut_ms: int, network: bytes
    ) -> tuple[CheckpointHeader, list[AccountSummary], list[tuple[bytes, Transfer]]]:
        prev = self._checkpoint
        if prev is not None and cut_ms < prev.header.cut_ms:
            raise LocalProtocolError("a checkpoint's cut cannot go back")
        covered = self._covered(cut_ms, None)
        (total, count), accounts = self._summarize(covered)
        header = CheckpointHeader(
            network=network,
            epoch=1 if prev is None else prev.epoch + 1,
            prev=GENESIS_PREV if prev is None else prev.digest,
            cut_ms=cut_ms,
            covered_sum=total.to_bytes(SUM_BYTES, "little"),
            covered_count=count,
            accounts=accounts_hash(accounts),
            n_accounts=len(accounts),
        )
        return header, accounts, covered

    def checkpoint_draft(
        self, cut_ms: int, network: bytes
    ) -> tuple[CheckpointHeader, list[AccountSummary]]:
        """The next checkpoint as this ledger sees it: it covers, per payer, the certified
        seqs after the adopted checkpoint whose transfer time is before ``cut_ms``. Every
        honest member computes the same header from the same facts (and signs only that).
        Cost: the certificates it covers are read back (their transfers only)."""
        header, accounts, _ = self._draft(cut_ms, network)
        return header, accounts

    def adopt_checkpoint(
        self, cp: Checkpoint, accounts: Sequence[AccountSummary] | None = None
    ) -> Adoption:
        """Make ``cp`` the base of this ledger and drop the facts it covers.

        ``cp`` must verify (a quorum of its epoch's committee) and follow the adopted
        checkpoint (or, for a ledger that adopted none, every earlier checkpoint must be
        held, linked back to the first). Without ``accounts`` the summary is computed from
        the facts held and must equal the header (else ``NeedAccounts``); with them, the
        rows must hash to the header, and if every covered certificate is held their set
        digest must equal the header's (a quorum cannot make a ledger that holds the facts
        accept another history). Cost: the covered transfers and the facts still held are
        read once; pruned receipts are not parsed."""
        cp.verify(self.rule)
        self._check_chain(cp)
        h = cp.header
        covered: dict[bytes, Transfer] = {}
        if accounts is None:
            own, rows, pairs = self._draft(h.cut_ms, h.network)
            if dataclasses.replace(own, pool=h.pool).digest != h.digest:
                raise NeedAccounts(
                    f"checkpoint {cp.epoch} does not match the facts held here: fetch its accounts"
                )
            covered = dict(pairs)
        else:
            rows = list(accounts)
            check_accounts(rows)
            if len(rows) != h.n_accounts or accounts_hash(rows) != h.accounts:
                raise ValidationError(f"checkpoint {cp.epoch}: account rows do not match it")
            upto = {r.account: r.next_seq for r in rows}
            if all(self.next_seq(a) >= n for a, n in upto.items()):
                # Every covered certificate is held: their digest must be the header's.
                pairs = self._covered(None, upto)
                digest, _ = self._summarize(pairs)
                if digest != h.covered:
                    raise ValidationError(
                        f"checkpoint {cp.epoch}: its covered digest differs from the "
                        "certificates held here"
                    )
                covered = dict(pairs)
        return self._rebuild(cp, rows, covered)

    def _check_chain(self, cp: Checkpoint) -> None:
        """``cp`` follows the adopted checkpoint (or the first), through the held ones between."""
        prev = self._checkpoint
        start = 1 if prev is None else prev.epoch + 1
        if cp.epoch < start:
            raise ValidationError(
                f"checkpoint {cp.epoch} does not follow checkpoint {start - 1} held here"
            )
        for epoch in range(start, cp.epoch):
            held = self.held_checkpoint(epoch)
            if held is None:
                raise ValidationError(
                    f"checkpoint {cp.epoch} needs checkpoint {epoch} (not held here)"
                )
            follows(held, prev)
            prev = held
        follows(cp, prev)

    def _set_base(self, cp: Checkpoint, rows: Sequence[AccountSummary]) -> None:
        self._checkpoint = cp
        self._base = {self._name(r.account): r for r in rows}
        self._base_rows = sorted(rows)
        for r in rows:
            if r.balance:
                self._balances[self._name(r.account)] = r.balance
            if r.next_seq > 1:
                self._next_seq[self._name(r.account)] = r.next_seq

    def restore_checkpoint(self, cp: Checkpoint, rows: Sequence[AccountSummary]) -> None:
        """Start an empty ledger from a checkpoint it adopted before (a store reopening:
        the facts it covers were deleted when it was adopted). The checkpoint's votes and
        rows are checked; its chain is checked by ``verify``."""
        if len(self._ids) or self._checkpoint is not None:
            raise LocalProtocolError("restore_checkpoint needs an empty ledger")
        cp.verify(self.rule)
        check_accounts(rows)
        if len(rows) != cp.header.n_accounts or accounts_hash(rows) != cp.header.accounts:
            raise ValidationError(f"checkpoint {cp.epoch}: account rows do not match it")
        self._set_base(cp, rows)

    def _rebuild(
        self, cp: Checkpoint, rows: Sequence[AccountSummary], covered: dict[bytes, Transfer]
    ) -> Adoption:
        """Drop what ``rows`` cover and re-index the rest on them (read, not re-verified)."""
        base = {r.account: r for r in rows}
        pruned: set[bytes] = set()
        paid_ids: set[bytes] = set()
        for payer, seqs in self._seqs.items():
            row = base.get(payer)
            if row is None:
                continue
            for s, digest in seqs.items():
                if s < row.next_seq:
                    pruned.add(digest)
                    t = covered.get(digest) or self._transfer(digest)
                    paid_ids.add(t.receipt_id)
        for (payer, s), digests in self._conflicts.items():  # > f byzantine: rare
            row = base.get(payer)
            if row is not None and s < row.next_seq:
                pruned.update(digests)
        pruned_receipts = [rid for rid in paid_ids if rid in self._ids]
        pruned.update(pruned_receipts)
        was_paid = set(self._paid_commitments)
        kept: list[tuple[int, FactKind, bytes]] = []
        for fid in self._ids:
            if fid in pruned:
                continue
            item = self.blobs.get(fid)
            if item is None:
                raise LocalProtocolError(f"fact {fid.hex()[:16]} is held but not stored")
            kind, data = item
            kept.append((_REBUILD_ORDER[kind], kind, data))
        kept.sort(key=lambda k: k[0])
        self._reset()
        self._set_base(cp, rows)
        self.blobs.forget(pruned)
        self.blobs.mark_paid(paid_ids)  # before re-ingesting: a held receipt may be one
        self._trusted = True
        try:
            for _order, kind, data in kept:
                self.ingest_bytes(kind, data)
        finally:
            self._trusted = False
        # Commitments whose payment left with the pruned facts: never paid again, through
        # any receipt (those still paid by a held certificate stay in memory).
        gone = was_paid - self._paid_commitments
        self.blobs.mark_paid(gone)
        for pending in self._unpaid.values():  # a kept receipt for such a commitment
            for rid in [r for r, c in pending.items() if c in gone]:
                self._paid_commitments.add(pending.pop(rid))
        tombstones = sorted(paid_ids) + sorted(gone)
        self._changed = set(self._balances) | set(self._changed)
        return Adoption(cp, list(rows), sorted(pruned), tombstones)

    # --- sync -----------------------------------------------------------------------------

    def fact_ids(self) -> Sequence[bytes]:
        """Sorted ids of every fact held: the set that ``reconcile`` works on (do not mutate)."""
        ids: Sequence[bytes] = self._ids
        return ids

    def item(self, fact_id: bytes) -> tuple[FactKind, bytes] | None:
        if fact_id not in self._ids:
            return None
        return self.blobs.get(fact_id)

    def __len__(self) -> int:
        return len(self._ids)

    def digest(self) -> tuple[int, int]:
        """(sum of ``digest_element(id)`` mod 2^2048, count): the set digest, kept in place."""
        return self._acc, len(self._ids)

    def state_hash(self) -> bytes:
        """sha256(tag || count || set digest): equal fact sets give equal hashes, in any
        order; O(1) (the digest is a sum kept up to date by every ingest). Once a checkpoint
        is adopted the hash also names it (v3 tag): equal checkpoint and equal facts after
        it give equal hashes, whoever pruned what."""
        if self._checkpoint is None:
            return state_hash_of(self._acc, len(self._ids))
        return state_hash_of(self._acc, len(self._ids), self._checkpoint.digest)

    # --- derived views --------------------------------------------------------------------

    def take_changes(self) -> dict[str, int]:
        """Accounts whose balance changed since the last call -> balance now (0 = none)."""
        out = {a: self._balances.get(a, 0) for a in self._changed}
        self._changed = set()
        return out

    def canonical_transfers(self) -> list[Transfer]:
        """One certified transfer per (payer, seq): the smallest digest wins a (broken) tie.

        Reads every certificate back (O(history)): for checks and tests, not hot paths."""
        return [
            self._certificate(d).transfer.message
            for seqs in self._seqs.values()
            for d in seqs.values()
        ]

    def cert_digest(self, account: str, seq: int) -> bytes | None:
        """Digest of the canonical certificate for ``account``'s ``seq``, if held."""
        return self._seqs.get(account, {}).get(seq)

    def conflicts(self) -> list[tuple[str, int]]:
        """(payer, seq) with more than one certificate: evidence of > f byzantine witnesses."""
        return sorted(self._conflicts)

    def is_reversed(self, t: Transfer) -> bool:
        T = self._fraud_time.get(t.payee)
        return T is not None and t.time_ms >= T - self.policy.fraud_window_ms

    def _cut(self, account: str) -> int | None:
        """Payments to ``account`` at or after this time are reversed (None: none are)."""
        T = self._fraud_time.get(account)
        return None if T is None else T - self.policy.fraud_window_ms

    def balances(self) -> dict[str, int]:
        """Account -> balance (micro-credits), zero balances omitted; the values sum to 0."""
        return dict(self._balances)

    def balance(self, account: str) -> int:
        return self._balances.get(account, 0)

    def forfeited(self) -> dict[str, int]:
        """Proven cheater -> total of its reversed payouts."""
        out: dict[str, int] = {}
        for e, T in self._fraud_time.items():
            inc = self._incoming.get(e)
            if inc is None:
                continue
            total = sum(inc.amounts[s] for _t, s in inc.entries(T - self.policy.fraud_window_ms))
            if total:
                out[e] = total
        return out

    def next_seq(self, account: str) -> int:
        """1 + the highest seq s such that seqs 1..s of ``account`` are all certified here."""
        return self._next_seq.get(account, 1)

    def _escrow_window(self, account: str, now_ms: int) -> Iterator[int]:
        """Slots of unreversed incoming payments still in escrow at ``now_ms``."""
        inc = self._incoming.get(account)
        if inc is None:
            return iter(())
        # In escrow: t + W > now, i.e. t >= now - W + 1.
        return (
            s for _t, s in inc.entries(now_ms - self.policy.fraud_window_ms + 1, self._cut(account))
        )

    def escrowed(self, account: str, now_ms: int) -> int:
        """Incoming payments still inside the fraud window at ``now_ms``."""
        inc = self._incoming.get(account)
        if inc is None:
            return 0
        return sum(inc.amounts[s] for s in self._escrow_window(account, now_ms))

    def earned(self, account: str, now_ms: int) -> int:
        """Incoming payments out of escrow at ``now_ms`` (what grows the credit limit)."""
        base = self._base.get(account)
        covered = 0 if base is None else base.received  # out of escrow by construction
        inc = self._incoming.get(account)
        if inc is None:
            return covered
        return covered + inc.effective - self.escrowed(account, now_ms)

    def earned_from(self, account: str, now_ms: int) -> dict[str, int]:
        """Payer -> what ``account`` earned from it, out of escrow at ``now_ms`` (reversed
        payments excluded). Cost: the account's payers plus its payments in escrow."""
        inc = self._incoming.get(account)
        if inc is None:
            return {}
        out = dict(inc.from_payer)
        for s in self._escrow_window(account, now_ms):
            payer = inc.payers[s]
            left = out[payer] - inc.amounts[s]
            if left:
                out[payer] = left
            else:
                del out[payer]
        return out

    def spendable(self, account: str, now_ms: int) -> int:
        return self.balance(account) - self.escrowed(account, now_ms)

    def has_identity(self, account: str) -> bool:
        return account in self._identities or account in self.policy.genesis

    def identity_proof(self, account: str) -> IdentityProof | None:
        """The identity proof held for ``account`` (one per account), if any."""
        if account not in self._identities:
            return None
        item = self.item(IdentityProof(account, 0).fact_id)
        return None if item is None else IdentityProof.from_bytes(item[1])

    def is_banned(self, account: str) -> bool:
        return account in self._banned

    def net_earned(self, account: str, now_ms: int) -> int:
        """What grows the credit limit: out of escrow, earned from *other proven identities*
        (not banned), minus everything ``account`` paid out. A ring of Sybils paying each
        other round nets zero, so its limits stay at the base (docs/settlement.md)."""
        base = self._base.get(account)
        from_others = (0 if base is None else base.earned) + sum(
            amount
            for payer, amount in self.earned_from(account, now_ms).items()
            if payer != account and self.has_identity(payer) and not self.is_banned(payer)
        )
        received = self.earned(account, now_ms) + self.escrowed(account, now_ms)
        paid_out = received - self.balance(account)
        return max(0, from_others - paid_out)

    def credit_limit(self, account: str, now_ms: int) -> int:
        return self.policy.limit(
            earned=self.net_earned(account, now_ms),
            has_identity=self.has_identity(account),
            banned=self.is_banned(account),
        )

    def receipt(self, receipt_id: bytes) -> PayableReceipt | None:
        """The receipt with this id, read back from ``blobs`` (None if not held)."""
        item = self.item(receipt_id)
        if item is None:
            return None
        kind, data = item
        if kind is FactKind.RECEIPT:
            return Receipt.from_bytes(data, verify=False)
        if kind is FactKind.ARBITRATED_RECEIPT:
            return ArbitratedReceipt.from_bytes(data)
        return None

    def is_paid(self, receipt: PayableReceipt) -> bool:
        """Paid if this receipt, or any receipt for the same commitment, has a certificate."""
        if (
            receipt.receipt_id in self._paid_receipts
            or receipt.commitment.digest in self._paid_commitments
        ):
            return True
        # Paid by a certificate a checkpoint covers (remembered on disk, not in memory).
        return self._checkpoint is not None and (
            self.blobs.was_paid(receipt.receipt_id)
            or self.blobs.was_paid(receipt.commitment.digest)
        )

    def unpaid_for(self, payer: str) -> list[bytes]:
        """Ids of the receipts ``payer`` owes that no certificate pays, in arrival order.

        Cost: that payer's unpaid receipts only (paid ones leave the index)."""
        pending = self._unpaid.get(payer)
        if not pending:
            return []
        for rid in [r for r, c in pending.items() if c in self._paid_commitments]:
            del pending[rid]  # paid through another receipt for the same commitment
        return list(pending)

    def payers_owing(self) -> list[str]:
        """Accounts that may owe unpaid receipts (``unpaid_for`` says which)."""
        return [p for p, pending in self._unpaid.items() if pending]

    def outstanding_debts(self, account: str) -> list[ArbitratedReceipt]:
        """Arbitrated receipts ``account`` owes and has not paid (they block its other payments)."""
        return [r for r in self._arbitrated_by_requester.get(account, []) if not self.is_paid(r)]

    def eligible_pool(self, now_ms: int, min_earned: int) -> frozenset[str]:
        """Accounts with a proven identity, not banned, and ``earned >= min_earned``."""
        return frozenset(
            a
            for a in set(self._incoming) | {a for a, b in self._base.items() if b.received}
            if self.has_identity(a)
            and not self.is_banned(a)
            and self.earned(a, now_ms) >= min_earned
        )


def replay(state: LedgerState, items: Iterable[tuple[FactKind, bytes]]) -> int:
    """Ingest stored facts (e.g. at start-up); returns how many were new."""
    return sum(1 for kind, data in items if state.ingest_bytes(kind, data))


__all__ = [
    "DIGEST_BITS",
    "NETWORK_WIDE",
    "STATE_HASH_DOMAIN",
    "Adoption",
    "FactBlobs",
    "FactKind",
    "IrrelevantFact",
    "LedgerState",
    "MemoryBlobs",
    "NeedAccounts",
    "decode_item",
    "digest_element",
    "digest_of",
    "encode_item",
    "replay",
    "state_hash_of",
]
