"""The witness state machine (FastPay style), sans-IO.

A witness co-signs a payer's transfer only if

1. it is a member of the payer's committee (``CommitteeRule``);
2. it has not locked a *different* transfer for this (payer, seq) — if it
   has, the two payer signatures are an ``EquivocationProof``;
3. every earlier seq is certified here, or (pipelining) the seqs from
   ``ledger.next_seq(payer)`` up to this one are locked by this witness, at most
   ``MAX_PIPELINE`` of them ("ahead" locks: transfers voted, not yet certified);
4. the receipt checks out: it verifies, its id is the one the transfer
   names, payer = requester, payee = executor, amount = price, and neither it
   nor another receipt for the same commitment is already paid, nor paid by
   an ahead lock;
5. the payer is not banned, owes no unpaid arbitrated receipt (unless this
   transfer or an ahead lock pays it), and its clock is within ``max_clock_skew_ms``;
6. ``spendable(payer) - ahead amounts - amount >= -credit_limit(payer)``.

So every seq below this one is known here, certified or locked: the spend a
witness checks is never less than what the payer can have signed before.

Durability is part of the API. ``handle_transfer`` never returns a vote for a
new lock: it returns ``PersistLock(record)``; the I/O layer must commit the
record durably (fsync'd SQLite transaction) and only then call
``lock_persisted(record)``, which releases the ``ReplyVote``. A crash between
the two loses no safety: the vote was never sent, and after restart the lock
is reloaded (``Witness(key, durable_locks=...)``) so the same transfer gets
the same vote and a different one is refused. Persisting a record twice must
be harmless (the store's primary key is (account, seq)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import nacl.signing

from protocols.certificate import Certificate, WitnessVote, sign_vote
from protocols.codec import decode, encode
from protocols.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import Transfer
from protocols.ledger_state import FactKind, LedgerState
from protocols.market_fields import check_body, want_bytes, want_int, want_str
from protocols.proofs import ArbitratedReceipt, EquivocationProof, PayableReceipt
from protocols.receipt import Receipt
from protocols.signed import Signed, open_message

REQUEST_VERSION = 1
MAX_HISTORY = 16
# Transfers of one payer a witness locks ahead of the payer's certified seqs (pipelining).
MAX_PIPELINE = 64
MAX_REQUEST_BYTES = 4096 + MAX_HISTORY * Certificate.MAX_BYTES


class Refusal(StrEnum):
    NOT_IN_COMMITTEE = "not-in-committee"
    STALE_SEQ = "stale-seq"
    MISSING_HISTORY = "missing-history"
    BAD_RECEIPT = "bad-receipt"
    ALREADY_PAID = "already-paid"
    BANNED = "banned"
    OUTSTANDING_DEBT = "outstanding-debt"
    CLOCK_SKEW = "clock-skew"
    OVER_LIMIT = "over-limit"
    EQUIVOCATION = "equivocation"


@dataclass(frozen=True)
class LockRecord:
    """What a witness must store durably before it answers: (account, seq) -> this transfer."""

    transfer: Signed[Transfer]

    @property
    def account(self) -> str:
        return self.transfer.message.payer

    @property
    def seq(self) -> int:
        return self.transfer.message.seq

    @property
    def digest(self) -> bytes:
        return self.transfer.digest

    def to_bytes(self) -> bytes:
        """The stored row's payload (the payer-signed transfer, needed for equivocation proofs)."""
        return self.transfer.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockRecord:
        return cls(open_message(Transfer, data))


# --- actions for the I/O layer --------------------------------------------------------------


@dataclass(frozen=True)
class PersistLock:
    """Commit ``record`` durably, then call ``Witness.lock_persisted(record)`` to get the vote."""

    record: LockRecord


@dataclass(frozen=True)
class ReplyVote:
    """Send ``vote`` to the requester (the lock is already durable)."""

    vote: Signed[WitnessVote]


@dataclass(frozen=True)
class Refuse:
    """Answer with a refusal; ``next_seq`` tells the payer which seq this witness expects."""

    reason: Refusal
    message: str
    next_seq: int | None = None


@dataclass(frozen=True)
class ReportEquivocation:
    """Refuse, store ``proof`` (ledger fact) and gossip it: the payer signed two transfers."""

    proof: EquivocationProof


WitnessAction = PersistLock | ReplyVote | Refuse | ReportEquivocation


def verify_payable(receipt: PayableReceipt, ledger: LedgerState) -> None:
    """Check a ``Receipt`` or an ``ArbitratedReceipt`` (the latter against its referee panel)."""
    if isinstance(receipt, Receipt):
        receipt.verify()
    elif isinstance(receipt, ArbitratedReceipt):
        receipt.verify_under(ledger.rule)
    else:
        raise LocalProtocolError(f"not a receipt: {type(receipt).__name__}")


class Witness:
    """One witness's lock table and decision rules; the ledger is read, never written, here."""

    def __init__(
        self, key: nacl.signing.SigningKey, *, durable_locks: Iterable[LockRecord] = ()
    ) -> None:
        self._key = key
        self.peer_id = peer_id_from_public_key(bytes(key.verify_key))
        self._locks: dict[tuple[str, int], LockRecord] = {}
        self._durable: set[tuple[str, int]] = set()
        # The checkpoint each lock taken since start was voted under (epoch committees).
        self._lock_cp: dict[tuple[str, int], int] = {}
        # Commitment digest of the receipt each lock taken since start pays (ahead locks).
        self._lock_pays: dict[tuple[str, int], bytes] = {}
        for record in durable_locks:
            key_ = (record.account, record.seq)
            if key_ in self._locks and self._locks[key_].digest != record.digest:
                raise LocalProtocolError(f"stored locks conflict at {key_}")
            self._locks[key_] = record
            self._durable.add(key_)

    def lock_for(self, account: str, seq: int) -> LockRecord | None:
        return self._locks.get((account, seq))

    def handle_transfer(
        self,
        transfer: Signed[Transfer],
        receipt: PayableReceipt,
        ledger: LedgerState,
        now_ms: int,
    ) -> WitnessAction:
        """Decide on one transfer request. Raises ``RemoteProtocolError`` on bad signatures."""
        transfer.verify()
        t = transfer.message
        key = (t.payer, t.seq)
        cp = self._lock_cp.get(key, ledger.rule.cp_for(t.time_ms))
        if self.peer_id not in ledger.rule.committee_at(t.payer, cp, t.time_ms):
            return Refuse(
                Refusal.NOT_IN_COMMITTEE,
                f"{self.peer_id} is not a witness of {t.payer} under checkpoint {cp}",
            )

        locked = self._locks.get(key)
        if locked is not None:
            if locked.digest == transfer.digest:
                if key in self._durable:
                    return ReplyVote(sign_vote(self._key, transfer, cp))
                return PersistLock(locked)  # still in flight: persisting twice is harmless
            return ReportEquivocation(EquivocationProof.of(locked.transfer, transfer))

        expected = ledger.next_seq(t.payer)
        if t.seq < expected:
            return Refuse(Refusal.STALE_SEQ, f"seq {t.seq} of {t.payer} is certified", expected)
        ahead = self._ahead(t.payer, expected, t.seq)
        if ahead is None:
            return Refuse(
                Refusal.MISSING_HISTORY,
                f"seq {t.seq} of {t.payer}: certificates from seq {expected} are missing here",
                expected,
            )

        refusal = self._check_receipt(t, receipt, ledger, ahead)
        if refusal is None:
            refusal = self._check_payer(t, receipt, ledger, now_ms, ahead)
        if refusal is not None:
            return refusal

        record = LockRecord(transfer)
        self._locks[key] = record
        self._lock_cp[key] = cp
        self._lock_pays[key] = receipt.commitment.digest
        return PersistLock(record)

    def _ahead(self, account: str, expected: int, seq: int) -> list[LockRecord] | None:
        """This witness's locks of ``account`` for seqs ``expected..seq-1`` (not certified
        here yet), or None if one is missing or there are more than ``MAX_PIPELINE``."""
        if seq - expected > MAX_PIPELINE:
            return None
        out = []
        for s in range(expected, seq):
            record = self._locks.get((account, s))
            if record is None:
                return None
            out.append(record)
        return out

    def _pays(self, record: LockRecord, ledger: LedgerState) -> tuple[bytes | None, ...]:
        """(receipt id, commitment digest) an ahead lock pays (the commitment from the
        stored receipt for locks reloaded at start; None if that is not held)."""
        rid = record.transfer.message.receipt_id
        commitment = self._lock_pays.get((record.account, record.seq))
        if commitment is None:
            stored = ledger.receipt(rid)
            commitment = None if stored is None else stored.commitment.digest
        return rid, commitment

    def _check_receipt(
        self, t: Transfer, receipt: PayableReceipt, ledger: LedgerState, ahead: list[LockRecord]
    ) -> Refuse | None:
        try:
            verify_payable(receipt, ledger)
        except RemoteProtocolError as exc:
            return Refuse(Refusal.BAD_RECEIPT, f"receipt does not verify: {exc}")
        if receipt.receipt_id != t.receipt_id:
            return Refuse(Refusal.BAD_RECEIPT, "the transfer names another receipt")
        if (t.payer, t.payee, t.amount) != (receipt.requester, receipt.executor, receipt.price):
            return Refuse(
                Refusal.BAD_RECEIPT,
                f"transfer {t.payer}->{t.payee} {t.amount} does not match receipt "
                f"{receipt.requester}->{receipt.executor} {receipt.price}",
            )
        if ledger.is_paid(receipt):
            return Refuse(Refusal.ALREADY_PAID, "this receipt (or its commitment) is already paid")
        mine = {receipt.receipt_id, receipt.commitment.digest}
        for record in ahead:
            if mine & set(self._pays(record, ledger)):
                return Refuse(
                    Refusal.ALREADY_PAID,
                    f"seq {record.seq}, not certified yet, pays this receipt (or its commitment)",
                )
        return None

    def _check_payer(
        self,
        t: Transfer,
        receipt: PayableReceipt,
        ledger: LedgerState,
        now_ms: int,
        ahead: list[LockRecord],
    ) -> Refuse | None:
        if ledger.is_banned(t.payer):
            return Refuse(Refusal.BANNED, f"{t.payer} is a proven cheater or equivocator")
        ahead_rids = {r.transfer.message.receipt_id for r in ahead}
        debts = [d for d in ledger.outstanding_debts(t.payer) if d.receipt_id not in ahead_rids]
        if debts and receipt.receipt_id not in {d.receipt_id for d in debts}:
            return Refuse(
                Refusal.OUTSTANDING_DEBT,
                f"{t.payer} must first pay {len(debts)} arbitrated receipt(s)",
            )
        skew = abs(t.time_ms - now_ms)
        if skew > ledger.policy.max_clock_skew_ms:
            return Refuse(
                Refusal.CLOCK_SKEW,
                f"transfer time is {skew} ms from ours, "
                f"the limit is {ledger.policy.max_clock_skew_ms}",
            )
        # Ahead locks are spent: the payer signed them, and they may still be certified.
        locked = sum(r.transfer.message.amount for r in ahead)
        spendable = ledger.spendable(t.payer, now_ms) - locked
        limit = ledger.credit_limit(t.payer, now_ms)
        if spendable - t.amount < -limit:
            return Refuse(
                Refusal.OVER_LIMIT,
                f"{t.payer} can spend {spendable + limit} (spendable {spendable} after "
                f"{len(ahead)} transfer(s) not certified yet, credit limit {limit}), "
                f"the transfer is {t.amount}",
            )
        return None

    def lock_persisted(self, record: LockRecord) -> ReplyVote:
        """The I/O layer committed ``record``: mark it durable and release the vote."""
        key = (record.account, record.seq)
        held = self._locks.get(key)
        if held is None or held.digest != record.digest:
            raise LocalProtocolError(f"no pending lock for {key} with this digest")
        self._durable.add(key)
        return ReplyVote(sign_vote(self._key, record.transfer, self._lock_cp.get(key, 0)))

    def lock_failed(self, record: LockRecord) -> None:
        """Persisting failed (no vote was released): drop the pending lock."""
        key = (record.account, record.seq)
        held = self._locks.get(key)
        if key not in self._durable and held is not None and held.digest == record.digest:
            del self._locks[key]
            self._lock_cp.pop(key, None)
            self._lock_pays.pop(key, None)


# --- wire: /edgeswarm/ledger/1 certify request ------------------------------------------------


@dataclass(frozen=True)
class TransferRequest:
    """Payer -> witness: the signed transfer, the receipt it pays, and optional history.

    ``history`` carries certificates for the payer's earlier seqs the witness
    may lack (answer to ``Refusal.MISSING_HISTORY``); the I/O layer ingests
    them (and the receipt) into its ledger before calling ``handle_transfer``.
    """

    transfer: Signed[Transfer]
    receipt: PayableReceipt
    history: tuple[Certificate, ...] = ()

    def to_bytes(self) -> bytes:
        kind = (
            FactKind.RECEIPT if isinstance(self.receipt, Receipt) else FactKind.ARBITRATED_RECEIPT
        )
        assert isinstance(self.receipt, Receipt | ArbitratedReceipt)
        return encode(
            {
                "v": REQUEST_VERSION,
                "t": self.transfer.to_bytes(),
                "rk": int(kind),
                "r": self.receipt.to_bytes(),
                "h": [c.to_bytes() for c in self.history],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferRequest:
        """Parse the shape and the transfer's signature; the receipt is checked by the witness."""
        b = check_body(
            decode(data, max_size=MAX_REQUEST_BYTES),
            kind="TransferRequest",
            version=REQUEST_VERSION,
            fields=frozenset({"t", "rk", "r", "h"}),
        )
        transfer = open_message(Transfer, want_bytes("TransferRequest", "t", b["t"], lo=1, hi=512))
        rk = want_int("TransferRequest", "rk", b["rk"], lo=1, hi=2)
        r_bytes = want_bytes("TransferRequest", "r", b["r"], lo=1, hi=ArbitratedReceipt.MAX_BYTES)
        receipt: PayableReceipt = (
            Receipt.from_bytes(r_bytes, verify=False)
            if rk == FactKind.RECEIPT
            else ArbitratedReceipt.from_bytes(r_bytes)
        )
        if type(b["h"]) is not list or len(b["h"]) > MAX_HISTORY:
            raise ValidationError(f"TransferRequest.h must be a list of at most {MAX_HISTORY}")
        history = tuple(
            Certificate.from_bytes(
                want_bytes("TransferRequest", "h[]", c, lo=1, hi=Certificate.MAX_BYTES)
            )
            for c in b["h"]
        )
        return cls(transfer=transfer, receipt=receipt, history=history)


def encode_reply(action: ReplyVote | Refuse | ReportEquivocation) -> bytes:
    """Witness -> payer answer: a vote, a refusal, or an equivocation proof."""
    if isinstance(action, ReplyVote):
        return encode({"v": REQUEST_VERSION, "ok": action.vote.to_bytes()})
    if isinstance(action, ReportEquivocation):
        return encode({"v": REQUEST_VERSION, "eq": action.proof.to_bytes()})
    return encode(
        {
            "v": REQUEST_VERSION,
            "no": str(action.reason),
            "msg": action.message[:400],
            "next": action.next_seq if action.next_seq is not None else 0,
        }
    )


def decode_reply(data: bytes) -> Signed[WitnessVote] | Refuse | EquivocationProof:
    raw = decode(data, max_size=EquivocationProof.MAX_BYTES + 64)
    if isinstance(raw, dict) and "ok" in raw:
        b = check_body(raw, kind="WitnessReply", version=REQUEST_VERSION, fields=frozenset({"ok"}))
        return open_message(WitnessVote, want_bytes("WitnessReply", "ok", b["ok"], lo=1, hi=512))
    if isinstance(raw, dict) and "eq" in raw:
        b = check_body(raw, kind="WitnessReply", version=REQUEST_VERSION, fields=frozenset({"eq"}))
        return EquivocationProof.from_bytes(
            want_bytes("WitnessReply", "eq", b["eq"], lo=1, hi=EquivocationProof.MAX_BYTES)
        )
    b = check_body(
        raw, kind="WitnessReply", version=REQUEST_VERSION, fields=frozenset({"no", "msg", "next"})
    )
    reason = want_str("WitnessReply", "no", b["no"], hi=32)
    if reason not in {r.value for r in Refusal}:
        raise ValidationError(f"unknown refusal reason {reason!r}")
    nxt = want_int("WitnessReply", "next", b["next"])
    return Refuse(
        Refusal(reason), want_str("WitnessReply", "msg", b["msg"], lo=0, hi=400), nxt or None
    )


__all__ = [
    "MAX_PIPELINE",
    "LockRecord",
    "PersistLock",
    "Refusal",
    "Refuse",
    "ReplyVote",
    "ReportEquivocation",
    "TransferRequest",
    "Witness",
    "WitnessAction",
    "decode_reply",
    "encode_reply",
    "verify_payable",
]
