"""Pipelined seqs: a witness votes a payer's seq n+1 ahead of n's certificate only on its own
lock of n, and counts every transfer it locked ahead as spent (protocols/witness.py, rule 3)."""

from __future__ import annotations

from settlement_fixtures import NOW_MS, WITNESS_KEYS, key, pid, policy, receipt, rule, transfer
from test_proofs import _verdicts

from protocols.ledger_state import LedgerState
from protocols.proofs import ArbitratedReceipt, PayableReceipt
from protocols.witness import (
    MAX_PIPELINE,
    PersistLock,
    Refusal,
    Refuse,
    ReplyVote,
    Witness,
)

P, X, Y = key(1), key(2), key(3)


def _witness(base_limit: int = 1_000) -> tuple[Witness, LedgerState]:
    ledger = LedgerState(rule(), policy(genesis=frozenset({pid(P)}), base_limit=base_limit))
    return Witness(WITNESS_KEYS[0]), ledger


def _lock(w: Witness, ledger: LedgerState, r: PayableReceipt, seq: int) -> object:
    """Ask ``w`` for ``seq`` paying ``r``; persist the lock at once. The vote or the refusal."""
    ledger.ingest_payable(r)
    action = w.handle_transfer(transfer(P, r, seq), r, ledger, NOW_MS)
    if isinstance(action, PersistLock):
        return w.lock_persisted(action.record)
    return action


def _refusal(action: object) -> Refusal:
    assert isinstance(action, Refuse), action
    return action.reason


def test_a_witness_votes_ahead_on_its_own_locks_only() -> None:
    w, ledger = _witness()
    assert isinstance(_lock(w, ledger, receipt(P, X, 10, 1), 1), ReplyVote)
    # Seq 1 is locked here, not certified: seq 2 is voted ahead of its certificate.
    assert isinstance(_lock(w, ledger, receipt(P, X, 10, 2), 2), ReplyVote)
    assert ledger.next_seq(pid(P)) == 1
    # A gap (no lock on seq 3 here) is missing history, from the first uncertified seq.
    gap = _lock(w, ledger, receipt(P, X, 10, 4), 4)
    assert _refusal(gap) is Refusal.MISSING_HISTORY
    assert isinstance(gap, Refuse) and gap.next_seq == 1
    # Another witness that locked nothing votes no seq beyond the certified ones.
    other = Witness(WITNESS_KEYS[1])
    r3 = receipt(P, X, 10, 3)
    refused = other.handle_transfer(transfer(P, r3, 2), r3, ledger, NOW_MS)
    assert _refusal(refused) is Refusal.MISSING_HISTORY


def test_the_pipeline_is_at_most_max_pipeline_deep() -> None:
    w, ledger = _witness()
    for seq in range(1, MAX_PIPELINE + 2):
        assert isinstance(_lock(w, ledger, receipt(P, X, 1, seq), seq), ReplyVote), seq
    # MAX_PIPELINE + 1 locks ahead of the certified seqs: the next one waits for certificates.
    nxt = MAX_PIPELINE + 2
    assert _refusal(_lock(w, ledger, receipt(P, X, 1, nxt), nxt)) is Refusal.MISSING_HISTORY


def test_transfers_locked_ahead_count_against_the_credit_limit() -> None:
    w, ledger = _witness(base_limit=50)
    assert isinstance(_lock(w, ledger, receipt(P, X, 30, 1), 1), ReplyVote)
    # 30 is signed and locked, not certified: 30 more would owe 60 > 50.
    assert _refusal(_lock(w, ledger, receipt(P, X, 30, 2), 2)) is Refusal.OVER_LIMIT
    assert isinstance(_lock(w, ledger, receipt(P, X, 20, 3), 2), ReplyVote)  # 50 is the limit


def test_a_receipt_paid_by_a_lock_ahead_is_not_paid_again() -> None:
    w, ledger = _witness()
    r = receipt(P, X, 10, 1)
    assert isinstance(_lock(w, ledger, r, 1), ReplyVote)
    assert _refusal(_lock(w, ledger, r, 2)) is Refusal.ALREADY_PAID
    # Also after a restart: the lock is reloaded, the receipt read back from the ledger.
    again = Witness(WITNESS_KEYS[0], durable_locks=[w.lock_for(pid(P), 1)])  # type: ignore[list-item]
    assert _refusal(_lock(again, ledger, r, 2)) is Refusal.ALREADY_PAID


def test_an_arbitrated_receipt_for_a_commitment_paid_ahead_is_not_paid_again() -> None:
    """Another receipt (another id) for the same commitment: refused by its commitment."""
    for restart in (False, True):
        w, ledger = _witness()
        r = receipt(P, X, 10, 1)
        assert isinstance(_lock(w, ledger, r, 1), ReplyVote)
        if restart:
            w = Witness(WITNESS_KEYS[0], durable_locks=[w.lock_for(pid(P), 1)])  # type: ignore[list-item]
        arb = ArbitratedReceipt.of(r.commitment, _verdicts(r.commitment, "match", 2))
        assert arb.receipt_id != r.receipt_id
        assert _refusal(_lock(w, ledger, arb, 2)) is Refusal.ALREADY_PAID, restart


def test_an_arbitrated_debt_paid_ahead_unblocks_the_next_seq() -> None:
    w, ledger = _witness()
    c = receipt(P, X, 10, 1).commitment
    debt = ArbitratedReceipt.of(c, _verdicts(c, "match", 2))
    ledger.ingest_payable(debt)
    # While the debt is unpaid nothing else is voted...
    assert _refusal(_lock(w, ledger, receipt(P, Y, 10, 2), 1)) is Refusal.OUTSTANDING_DEBT
    assert isinstance(_lock(w, ledger, debt, 1), ReplyVote)
    # ...and once seq 1 pays it (locked ahead), seq 2 may pay something else.
    assert isinstance(_lock(w, ledger, receipt(P, Y, 10, 2), 2), ReplyVote)
