"""Rules of the ledger state (protocols/ledger_state.py, after #11's rewrite) that no test held.

The ledger decides balances, escrow, credit limits and what a checkpoint covers: every rule
here guards money. Found by mutation testing (issue 17, docs/testing.md; ``python
bench/mutation.py --paths protocols/ledger_state.py``): each test fails when its rule is
removed. Expected values are written out by hand, not recomputed by the ledger's own code,
so a change every peer would make alike (a checkpoint's account rows, its covered digest)
still fails here.
"""

from __future__ import annotations

from typing import Any

import nacl.signing
import pytest
from settlement_fixtures import (
    NOW_MS,
    WITNESS_KEYS,
    key,
    pid,
    policy,
    receipt,
    rule,
    signed_commitment,
    transfer,
)
from test_checkpoint import NET, sign

from protocols.certificate import Certificate, make_certificate, sign_vote
from protocols.checkpoint import AccountSummary, Checkpoint
from protocols.epochs import EpochRules
from protocols.errors import LocalProtocolError, ProtocolError, ValidationError
from protocols.ledger import IdentityProof, solve_pow
from protocols.ledger_state import (
    FactKind,
    IrrelevantFact,
    LedgerState,
    MemoryBlobs,
    digest_of,
    state_hash_of,
)
from protocols.proofs import (
    ArbitratedReceipt,
    EquivocationProof,
    FraudProof,
    referee_panel,
    sign_referee_result,
)
from protocols.receipt import Receipt, ResultCommitment
from protocols.signed import Signed

W = 60_000  # the fraud window of every policy here
RULE = rule()
KEY_OF = {pid(k): k for k in WITNESS_KEYS}
# Payers and payees: P, X and B hold identities (genesis), Q and R do not.
P, Q, R, X, B, E, E2 = (key(n) for n in range(301, 308))
POL = policy(genesis=frozenset({pid(P), pid(X), pid(B)}), fraud_window_ms=W, base_limit=10**9)
CUT = NOW_MS + 100_000

_jobs = iter(range(10_000, 1_000_000))


@pytest.fixture(autouse=True)
def _fixed_jobs() -> None:
    """Each test numbers its jobs from the same start, whichever tests ran before it."""
    global _jobs
    _jobs = iter(range(10_000, 1_000_000))


def _cert(t: Signed[object]) -> Certificate:
    return make_certificate(t, [sign_vote(k, t) for k in WITNESS_KEYS])  # type: ignore[arg-type]


def pay(
    led: LedgerState,
    payer: nacl.signing.SigningKey,
    payee: nacl.signing.SigningKey,
    amount: int,
    seq: int,
    time_ms: int = NOW_MS,
    *,
    hold_receipt: bool = True,
) -> tuple[Receipt, Certificate]:
    r = receipt(payer, payee, amount, next(_jobs))
    c = _cert(transfer(payer, r, seq, time_ms=time_ms))
    if hold_receipt:
        assert led.ingest_receipt(r)
    assert led.ingest_certificate(c)
    return r, c


def verdicts(c: Signed[ResultCommitment], verdict: Any, time_ms: int) -> tuple[Signed[Any], ...]:
    panel = referee_panel(RULE, c, 0)
    return tuple(
        sign_referee_result(KEY_OF[m], c, output_digest=b"o" * 32, verdict=verdict, time_ms=time_ms)
        for m in panel.members[:2]
    )


def fraud(offender: nacl.signing.SigningKey, time_ms: int) -> FraudProof:
    bad = signed_commitment(Q, offender, 1, next(_jobs), output=b"wrong")
    return FraudProof.of(bad, verdicts(bad, "mismatch", time_ms))  # type: ignore[arg-type]


def arbitrated(c: Signed[ResultCommitment]) -> ArbitratedReceipt:
    return ArbitratedReceipt.of(c, verdicts(c, "match", NOW_MS))  # type: ignore[arg-type]


def equivocation(payer: nacl.signing.SigningKey) -> EquivocationProof:
    ra, rb = receipt(payer, B, 1, next(_jobs)), receipt(payer, Q, 1, next(_jobs))
    return EquivocationProof.of(transfer(payer, ra, 900), transfer(payer, rb, 900))


def forged_receipt() -> Receipt:
    """P's acceptance of one commitment glued to another of P's commitments."""
    r1, r2 = receipt(P, B, 10, next(_jobs)), receipt(P, B, 10, next(_jobs))
    return Receipt(commitment=r2.commitment, acceptance=r1.acceptance)


def checkpoint_at(led: LedgerState, cut_ms: int) -> tuple[Checkpoint, list[AccountSummary]]:
    header, rows = led.checkpoint_draft(cut_ms, NET)
    return sign(header), rows


def adopt(led: LedgerState, cut_ms: int) -> Checkpoint:
    cp, _ = checkpoint_at(led, cut_ms)
    led.ingest_checkpoint(cp)
    led.adopt_checkpoint(cp)
    return cp


def row(k: nacl.signing.SigningKey, balance: int, next_seq: int, received: int, earned: int):  # type: ignore[no-untyped-def]
    return AccountSummary(pid(k), balance, next_seq, received, earned)


def rows(*rs: AccountSummary) -> list[AccountSummary]:
    return sorted(rs, key=lambda r: r.account)


class RecordingBlobs(MemoryBlobs):
    """MemoryBlobs that lists the ids it was asked to store."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: list[bytes] = []

    def put(self, fact_id: bytes, kind: FactKind, data: bytes) -> None:
        self.puts.append(fact_id)
        super().put(fact_id, kind, data)


def ledger(pol: object = POL) -> LedgerState:
    return LedgerState(RULE, pol)  # type: ignore[arg-type]


# --- a checkpoint's account rows and covered digest -------------------------------------------


def _mixed_history() -> tuple[LedgerState, list[Certificate]]:
    """Covered payments from an identity, a stranger, a banned payer, reversed ones (to a
    proven cheater), a payee that pays on, and a payer whose only payment was reversed."""
    led = ledger()
    t = NOW_MS
    certs = [
        pay(led, P, B, 100, 1, t)[1],
        pay(led, P, B, 30, 2, t)[1],
        pay(led, P, E, 5, 3, t)[1],  # reversed by E's fraud
        pay(led, P, B, 1, 4, t)[1],  # after a reversed one in P's run
        pay(led, Q, B, 7, 1, t)[1],  # Q has no identity
        pay(led, X, B, 11, 1, t)[1],  # X is banned below
        pay(led, R, E, 9, 1, t)[1],  # R's only payment, reversed
        pay(led, B, Q, 3, 1, t)[1],  # B received 149 before paying seq 1
    ]
    assert led.ingest_fraud_proof(fraud(E, t + 1_000))
    assert led.ingest_equivocation_proof(equivocation(X))
    return led, certs


EXPECTED_ROWS = rows(
    row(P, -131, 5, 0, 0),
    row(Q, -4, 2, 3, 3),
    row(X, -11, 2, 0, 0),
    row(B, 146, 2, 149, 131),
    row(R, 0, 2, 0, 0),
)


def test_a_checkpoints_rows_hold_each_accounts_balance_seq_received_and_earned() -> None:
    """Received counts every unreversed covered payment; earned only those from other proven,
    unbanned identities; a payer's next seq follows its own seqs; a reversed payment moves
    nothing but still uses its payer's seq (so R keeps a row of balance 0, next seq 2)."""
    led, certs = _mixed_history()
    header, accounts = led.checkpoint_draft(CUT, NET)
    assert accounts == EXPECTED_ROWS
    assert header.n_accounts == 5
    # The covered digest is the set digest of the covered certificates, as little-endian bytes.
    assert header.covered == digest_of(c.digest for c in certs)
    assert header.covered_sum == digest_of(c.digest for c in certs)[0].to_bytes(256, "little")


def test_a_second_checkpoint_covers_the_first_ones_certificates_too() -> None:
    led, certs = _mixed_history()
    cp1 = adopt(led, CUT)
    later = [pay(led, P, B, 2, 5, CUT + 10)[1], pay(led, Q, P, 1, 2, CUT + 10)[1]]
    header, accounts = led.checkpoint_draft(CUT + 20_000, NET)
    assert header.epoch == 2 and header.prev == cp1.digest
    assert header.covered == digest_of(c.digest for c in certs + later)
    assert accounts == rows(
        row(P, -132, 6, 1, 0),  # P received 1 from Q: no identity, not earned
        row(Q, -5, 3, 3, 3),
        row(X, -11, 2, 0, 0),
        row(B, 148, 2, 151, 133),
        row(R, 0, 2, 0, 0),
    )


def test_a_checkpoint_may_keep_its_predecessors_cut_but_not_go_back() -> None:
    led, _ = _mixed_history()
    adopt(led, CUT)
    header, _ = led.checkpoint_draft(CUT, NET)
    assert header.epoch == 2 and header.cut_ms == CUT
    with pytest.raises(LocalProtocolError):
        led.checkpoint_draft(CUT - 1, NET)


# --- adopting a checkpoint ------------------------------------------------------------------


def test_an_adopted_checkpoint_is_the_base_of_every_view() -> None:
    """Balances, seqs, earned, net earned and take_changes() carry the checkpoint's rows."""
    led, _ = _mixed_history()
    led.take_changes()
    cp = adopt(led, CUT)
    later = CUT + 10 * W
    assert led.balances() == {r.account: r.balance for r in EXPECTED_ROWS if r.balance}
    # Every account with a balance is reported to the store, moved or not.
    changes = led.take_changes()
    assert {a: b for a, b in changes.items() if b} == led.balances()
    assert led.next_seq(pid(P)) == 5 and led.next_seq(pid(R)) == 2 and led.next_seq(pid(B)) == 2
    assert led.earned(pid(B), later) == 149
    assert led.net_earned(pid(B), later) == 131 - 3  # earned from identities, less paid out
    assert led.earned(pid(Q), later) == 3 and led.net_earned(pid(Q), later) == 0
    assert led.state_hash() == state_hash_of(*led.digest(), cp.digest)
    assert led.state_hash() != state_hash_of(*led.digest())
    # A payer with exactly one covered payment goes on at seq 2.
    pay(led, R, B, 4, 2, CUT + 10)
    assert led.next_seq(pid(R)) == 3
    assert led.earned(pid(B), later) == 153


def test_adoption_re_indexes_held_facts_without_storing_them_again() -> None:
    blobs = RecordingBlobs()
    puts = blobs.puts
    led = LedgerState(RULE, POL, blobs=blobs)
    pay(led, P, B, 10, 1, NOW_MS)
    pay(led, P, B, 10, 2, CUT + 10)
    cp, _ = checkpoint_at(led, CUT)
    led.ingest_checkpoint(cp)
    before = len(puts)
    led.adopt_checkpoint(cp)
    assert len(puts) == before  # the kept facts' bytes are stored already


def test_a_payer_without_a_row_does_not_stop_the_pruning_of_the_others() -> None:
    """Q's first payment is after the cut (no row); P's covered facts are pruned anyway."""
    led = ledger()
    pay(led, Q, B, 3, 1, CUT + 10)
    r, c = pay(led, P, B, 10, 1, NOW_MS)
    cp, _ = checkpoint_at(led, CUT)
    led.ingest_checkpoint(cp)
    adoption = led.adopt_checkpoint(cp)
    assert sorted(adoption.pruned) == sorted([r.receipt_id, c.digest])
    assert not led.has(c.digest) and not led.has(r.receipt_id)


def test_adopting_with_rows_checks_them_against_exactly_the_covered_certificates() -> None:
    """A ledger holding every covered certificate (and later ones, and a payer with no row)
    adopts a true checkpoint with its rows: the covered digest it recomputes stops at each
    row's next seq and skips payers without a row."""
    src = ledger()
    pay(src, Q, B, 3, 1, CUT + 10)  # no row: its payments are all after the cut
    pay(src, P, B, 10, 1, NOW_MS)
    pay(src, P, B, 10, 2, CUT + 10)  # P's next seq (2) is held, after the cut
    cp, accounts = checkpoint_at(src, CUT)
    src.ingest_checkpoint(cp)
    src.adopt_checkpoint(cp, accounts)
    assert src.checkpoint == cp
    assert src.balances() == {pid(Q): -3, pid(P): -20, pid(B): 23}
    assert src.next_seq(pid(P)) == 3


def test_a_covered_conflict_is_pruned_whole_and_an_uncovered_one_is_kept() -> None:
    """Two certificates for seq 1 (covered) and for seq 2 (not): both of seq 1 go, both of
    seq 2 stay."""
    led = ledger()
    c1 = [pay(led, P, B, 5, 1, NOW_MS)[1], pay(led, P, B, 6, 1, NOW_MS)[1]]
    c2 = [pay(led, P, B, 7, 2, CUT + 10)[1], pay(led, P, B, 8, 2, CUT + 10)[1]]
    cp, _ = checkpoint_at(led, CUT)
    led.ingest_checkpoint(cp)
    adoption = led.adopt_checkpoint(cp)
    assert {c.digest for c in c1} <= set(adoption.pruned)
    assert not {c.digest for c in c2} & set(adoption.pruned)
    assert all(led.has(c.digest) for c in c2)
    assert led.conflicts() == [(pid(P), 2)]


def test_a_receipt_kept_unpaid_through_an_adoption_is_still_owed() -> None:
    led = ledger()
    pay(led, P, B, 10, 1, NOW_MS)
    owed = receipt(Q, B, 4, next(_jobs))
    led.ingest_receipt(owed)
    adopt(led, CUT)
    assert led.unpaid_for(pid(Q)) == [owed.receipt_id]
    assert not led.is_paid(owed)
    assert led.payers_owing() == [pid(Q)]


def test_a_commitment_paid_before_the_checkpoint_stays_paid_whatever_receipt_names_it() -> None:
    """An arbitrated receipt for a commitment that a covered certificate paid is known paid:
    not held again, not owed, kept or not when the checkpoint came."""
    led = ledger()
    r, _ = pay(led, P, B, 10, 1, NOW_MS)
    arb = arbitrated(r.commitment)
    adopt(led, CUT)
    assert led.is_paid(arb)
    assert led.ingest_arbitrated_receipt(arb) is False
    assert led.outstanding_debts(pid(P)) == []
    # Kept through the adoption: the arbitrated receipt was held, its twin was paid and pruned.
    led2 = ledger()
    r2, _ = pay(led2, P, B, 10, 1, NOW_MS)
    arb2 = arbitrated(r2.commitment)
    assert led2.ingest_arbitrated_receipt(arb2)
    adopt(led2, CUT)
    assert led2.is_paid(arb2) and led2.unpaid_for(pid(P)) == []


def test_checkpoints_two_epochs_ahead_are_adopted_through_the_held_one_between() -> None:
    led = ledger()
    pay(led, P, B, 10, 1, NOW_MS)
    pay(led, P, B, 10, 2, CUT + 10)
    pay(led, P, B, 10, 3, CUT + 20_010)
    src = ledger()
    for fid in led.fact_ids():
        item = led.item(fid)
        assert item is not None
        src.ingest_bytes(*item)
    cp1 = adopt(src, CUT)
    cp2 = adopt(src, CUT + 20_000)
    cp3, accounts = checkpoint_at(src, CUT + 40_000)
    for cp in (cp1, cp2, cp3):
        assert led.ingest_checkpoint(cp)
    led.adopt_checkpoint(cp3, accounts)  # through 1 and 2, held here
    assert led.checkpoint == cp3 and led.next_seq(pid(P)) == 4
    assert led.latest_checkpoint_epoch() == 3


def test_restoring_a_checkpoint_starts_an_empty_ledger_from_its_rows() -> None:
    led, _ = _mixed_history()
    cp, accounts = checkpoint_at(led, CUT)
    fresh = ledger()
    fresh.restore_checkpoint(cp, accounts)
    assert fresh.checkpoint == cp
    assert fresh.balances() == {r.account: r.balance for r in EXPECTED_ROWS if r.balance}
    assert fresh.next_seq(pid(P)) == 5 and fresh.next_seq(pid(R)) == 2
    assert fresh.earned(pid(B), CUT) == 149
    assert fresh.checkpoint_accounts() == EXPECTED_ROWS
    with pytest.raises(LocalProtocolError):  # only into an empty ledger ...
        led.restore_checkpoint(cp, accounts)
    with pytest.raises(LocalProtocolError):  # ... that holds no checkpoint either
        fresh.restore_checkpoint(cp, accounts)


def test_restoring_refuses_rows_or_votes_that_do_not_match() -> None:
    led, _ = _mixed_history()
    cp, accounts = checkpoint_at(led, CUT)
    fewer = [a for a in accounts if a.account != pid(R)]  # still sums to zero
    changed = [AccountSummary(a.account, a.balance, a.next_seq, a.received, 0) for a in accounts]
    for bad in (fewer, changed):
        with pytest.raises(ValidationError):
            ledger().restore_checkpoint(cp, bad)
    with pytest.raises(ValidationError):  # not sorted
        ledger().restore_checkpoint(cp, list(reversed(accounts)))
    unsigned = Checkpoint(header=cp.header, votes=cp.votes[:1])
    with pytest.raises(ProtocolError):
        ledger().restore_checkpoint(unsigned, accounts)


# --- receipts and what pays them --------------------------------------------------------------


def test_a_receipt_is_new_once_and_a_certificate_takes_it_off_the_owing_list() -> None:
    led = ledger()
    r = receipt(P, B, 10, next(_jobs))
    assert led.ingest_receipt(r) is True
    assert led.ingest_receipt(r) is False
    arb = arbitrated(receipt(P, B, 3, next(_jobs)).commitment)
    assert led.ingest_arbitrated_receipt(arb) is True
    assert led.ingest_arbitrated_receipt(arb) is False
    assert led.payers_owing() == [pid(P)]
    led.ingest_certificate(_cert(transfer(P, r, 1)))
    led.ingest_certificate(_cert(transfer(P, arb, 2)))  # type: ignore[arg-type]
    assert led.payers_owing() == [] and led.unpaid_for(pid(P)) == []


def test_a_certificate_pays_the_held_receipt_it_names_whoever_its_payer_is() -> None:
    """A certificate (only a broken quorum would sign one) whose payer is not the receipt's
    requester still pays that receipt: its commitment is never owed again."""
    led = ledger()
    r = receipt(Q, B, 10, next(_jobs))
    led.ingest_receipt(r)
    assert led.unpaid_for(pid(Q)) == [r.receipt_id]
    t = transfer(P, r, 1)
    assert t.message.payer == pid(P)
    led.ingest_certificate(_cert(t))
    assert led.is_paid(r) and led.unpaid_for(pid(Q)) == []


def test_a_paid_receipt_is_relevant_only_until_it_is_held() -> None:
    """check_relevant: a receipt a certificate here pays is wanted from anyone, until it
    arrives; then the index of paid-but-missing receipts lets it go."""
    led = ledger()
    stranger = pid(key(399))
    r = receipt(P, B, 10, next(_jobs))
    led.ingest_certificate(_cert(transfer(P, r, 1)))
    led.check_relevant(r, stranger)
    led.ingest_receipt(r)
    assert led.is_paid(r)
    with pytest.raises(IrrelevantFact):
        led.check_relevant(r, stranger)


def test_a_receipt_is_relevant_to_its_parties_and_its_requesters_committee_only() -> None:
    led = ledger()
    r = receipt(P, B, 10, next(_jobs))
    arb = arbitrated(r.commitment)
    member = sorted(RULE.committee_for(pid(P)).members)[0]
    outsider = pid(key(399))
    assert outsider not in RULE.committee_for(pid(P)).members
    for fact in (r, arb):
        for me in (pid(P), pid(B), member):
            led.check_relevant(fact, me)
        with pytest.raises(IrrelevantFact):
            led.check_relevant(fact, outsider)
    for fact in (fraud(E, NOW_MS), equivocation(X)):  # network-wide: always
        led.check_relevant(fact, outsider)


def test_a_receipt_is_read_back_as_its_kind_and_nothing_else_is_a_receipt() -> None:
    led = ledger()
    r, c = pay(led, P, B, 10, 1)
    arb = arbitrated(receipt(P, B, 3, next(_jobs)).commitment)
    led.ingest_arbitrated_receipt(arb)
    assert led.receipt(r.receipt_id) == r
    assert led.receipt(arb.receipt_id) == arb
    assert led.receipt(c.digest) is None
    assert led.receipt(b"\x01" * 32) is None


# --- forged facts ------------------------------------------------------------------------------


def test_every_ingest_checks_its_facts_signatures() -> None:
    led = ledger()
    c = signed_commitment(P, B, 10, next(_jobs))
    with pytest.raises(ProtocolError):  # an acceptance of another commitment
        led.ingest_receipt(forged_receipt())
    with pytest.raises(ProtocolError):  # a panel that found the output wrong
        led.ingest_arbitrated_receipt(
            ArbitratedReceipt.of(c, verdicts(c, "mismatch", NOW_MS))  # type: ignore[arg-type]
        )
    bad = signed_commitment(Q, E, 1, next(_jobs), output=b"wrong")
    with pytest.raises(ProtocolError):  # a panel that found the output right
        led.ingest_fraud_proof(FraudProof.of(bad, verdicts(bad, "match", NOW_MS)))  # type: ignore[arg-type]
    t = transfer(X, receipt(X, B, 1, next(_jobs)), 5)
    with pytest.raises(ProtocolError):  # the same transfer twice
        led.ingest_equivocation_proof(EquivocationProof(t, t))
    assert len(led) == 0 and not led.is_banned(pid(E)) and not led.is_banned(pid(X))


def test_verify_fact_checks_each_kind_under_this_ledgers_rules_without_adding_it() -> None:
    for rul in (RULE, EpochRules(beacon=RULE.beacon, fallback=RULE.fallback, referee_panel_size=3)):
        led = LedgerState(rul, POL)
        r = receipt(P, B, 10, next(_jobs))
        cp, _ = checkpoint_at(ledger(), CUT)
        nonce = solve_pow(pid(Q), POL.pow_bits, max_tries=100_000)
        assert nonce is not None
        good = [
            r,
            arbitrated(r.commitment),
            _cert(transfer(P, r, 1)),
            fraud(E, NOW_MS),
            equivocation(X),
            IdentityProof(pid(Q), nonce),
            cp,
        ]
        for fact in good:
            led.verify_fact(fact)
        assert len(led) == 0
        c = r.commitment
        t = transfer(P, r, 1)
        weak = next(n for n in range(1000) if IdentityProof(pid(Q), n).bits < POL.pow_bits)
        forged = [
            forged_receipt(),
            ArbitratedReceipt.of(c, verdicts(c, "mismatch", NOW_MS)),  # type: ignore[arg-type]
            make_certificate(t, [sign_vote(k, t) for k in WITNESS_KEYS[:1]]),
            FraudProof.of(c, verdicts(c, "match", NOW_MS)),  # type: ignore[arg-type]
            EquivocationProof(t, t),
            IdentityProof(pid(Q), weak),
            Checkpoint(header=cp.header, votes=cp.votes[:1]),
        ]
        for fact in forged:
            with pytest.raises(ProtocolError):
                led.verify_fact(fact)
        with pytest.raises(TypeError):
            led.verify_fact(b"not a fact")


def test_the_identity_proof_held_for_an_account_is_given_back() -> None:
    led = ledger()
    nonce = solve_pow(pid(Q), POL.pow_bits, max_tries=100_000)
    assert nonce is not None
    proof = IdentityProof(pid(Q), nonce)
    assert led.identity_proof(pid(Q)) is None
    led.ingest_identity_proof(proof)
    assert led.identity_proof(pid(Q)) == proof
    assert led.identity_proof(pid(R)) is None


# --- checkpoints held --------------------------------------------------------------------------


def test_a_checkpoint_is_new_once_and_another_for_its_epoch_is_refused() -> None:
    led = ledger()
    assert led.latest_checkpoint_epoch() == 0
    src = ledger()
    pay(src, P, B, 10, 1, NOW_MS)
    cp, _ = checkpoint_at(src, CUT)
    other, _ = checkpoint_at(src, CUT + 1)
    assert led.ingest_checkpoint(cp) is True
    assert led.ingest_checkpoint(cp) is False
    with pytest.raises(ValidationError):
        led.ingest_checkpoint(other)
    assert led.latest_checkpoint_epoch() == 1
    assert led.held_checkpoint(1) == cp


# --- escrow, fraud and reversals ---------------------------------------------------------------


def test_a_payment_is_in_escrow_until_exactly_one_window_after_it() -> None:
    led = ledger()
    pay(led, P, B, 10, 1, NOW_MS)
    assert led.escrowed(pid(B), NOW_MS + W - 1) == 10
    assert led.escrowed(pid(B), NOW_MS + W) == 0
    assert led.earned(pid(B), NOW_MS + W - 1) == 0
    assert led.earned(pid(B), NOW_MS + W) == 10


def test_a_payment_at_time_zero_is_in_escrow_for_a_window() -> None:
    led = ledger()
    pay(led, P, B, 10, 1, 0)
    assert led.escrowed(pid(B), W - 1) == 10
    assert led.spendable(pid(B), W - 1) == 0


def test_reversed_payments_are_not_in_escrow() -> None:
    """A payment reversed by its payee's fraud leaves escrow (it is gone): only payments
    before the cut T - W stay, and they still wait out their window."""
    led = ledger()
    pay(led, P, E, 10, 1, NOW_MS)  # before the cut: kept
    pay(led, P, E, 20, 2, NOW_MS + 50_000)  # at or after the cut: reversed
    pay(led, P, E, 40, 3, NOW_MS + 150_000)  # after T, inside T + W: reversed
    T = NOW_MS + 110_000
    led.ingest_fraud_proof(fraud(E, T))
    assert led.escrowed(pid(E), NOW_MS + 1) == 10
    assert led.escrowed(pid(E), NOW_MS + 100_000) == 0
    assert led.balance(pid(E)) == 10 and led.forfeited() == {pid(E): 60}


def test_forfeits_are_listed_for_every_cheater_with_payouts() -> None:
    led = ledger()
    led.ingest_fraud_proof(fraud(E2, NOW_MS))  # proven first, never paid
    pay(led, P, E, 10, 1, NOW_MS)
    led.ingest_fraud_proof(fraud(E, NOW_MS))
    assert led.forfeited() == {pid(E): 10}


def test_an_earlier_fraud_proof_reverses_only_what_the_later_one_had_not() -> None:
    """Proofs at T1, then at T0 < T1: payments from T0 - W on are reversed once each;
    earned and earned_from count what is left."""
    led = ledger()
    t = NOW_MS
    pay(led, P, E, 1, 1, t)  # before both cuts
    pay(led, P, E, 2, 2, t + 100_000)  # reversed by T0 only
    pay(led, Q, E, 4, 1, t + 100_000)  # reversed by T0 only
    pay(led, P, E, 8, 3, t + 200_000)  # reversed by both
    T1, T0 = t + 200_000 + W // 2, t + 100_000 + W // 2
    led.ingest_fraud_proof(fraud(E, T1))
    assert led.balance(pid(E)) == 7
    assert led.earned_from(pid(E), t + 10**6) == {pid(P): 3, pid(Q): 4}
    led.ingest_fraud_proof(fraud(E, T0))
    assert led.balances() == {pid(P): -1, pid(E): 1}
    assert led.forfeited() == {pid(E): 14}
    assert led.earned(pid(E), t + 10**6) == 1
    assert led.earned_from(pid(E), t + 10**6) == {pid(P): 1}


def test_a_fraud_proof_keeps_the_cheaters_earlier_payments_from_each_payer() -> None:
    led = ledger()
    pay(led, P, E, 5, 1, NOW_MS)
    pay(led, P, E, 7, 2, NOW_MS + 100_000)
    led.ingest_fraud_proof(fraud(E, NOW_MS + 100_000 + W // 2))
    assert led.earned_from(pid(E), NOW_MS + 10**6) == {pid(P): 5}
    assert led.earned(pid(E), NOW_MS + 10**6) == 5


# --- a seq certified twice --------------------------------------------------------------------


def _conflict(payee2: nacl.signing.SigningKey) -> tuple[LedgerState, int, int]:
    """P's seq 1 certified twice (7 to B, 9 to payee2); P also pays B 3 as seq 2. The
    larger digest arrives first: the smaller one replaces it."""
    led = ledger()
    pay(led, P, B, 3, 2, NOW_MS)
    r7, r9 = receipt(P, B, 7, next(_jobs)), receipt(P, payee2, 9, next(_jobs))
    c7, c9 = _cert(transfer(P, r7, 1)), _cert(transfer(P, r9, 1))
    small, large = sorted([(c7, 7), (c9, 9)], key=lambda x: x[0].digest)
    for c, _ in (large, small):
        led.ingest_certificate(c)
    return led, small[1], large[1]


@pytest.mark.parametrize("payee2", [B, Q], ids=["same payee", "other payee"])
def test_the_replaced_certificate_leaves_every_view(payee2: nacl.signing.SigningKey) -> None:
    led, kept, _ = _conflict(payee2)
    assert led.conflicts() == [(pid(P), 1)]
    later = NOW_MS + 10 * W
    to_b = 3 + (kept if kept == 7 or payee2 == B else 0)
    assert led.balance(pid(B)) == to_b and led.balance(pid(P)) == -(3 + kept)
    assert sum(led.balances().values()) == 0
    assert led.escrowed(pid(B), NOW_MS) == to_b
    assert led.earned(pid(B), later) == to_b
    assert led.earned_from(pid(B), later) == {pid(P): to_b}
    led.ingest_fraud_proof(fraud(B, NOW_MS))
    assert led.forfeited() == {pid(B): to_b}
    assert led.balance(pid(B)) == 0


# --- small things the store and the CLI read ---------------------------------------------------


def test_an_account_paid_down_to_zero_is_reported_as_zero() -> None:
    led = ledger()
    pay(led, P, B, 5, 1)
    pay(led, B, Q, 5, 1)
    assert led.take_changes() == {pid(P): -5, pid(B): 0, pid(Q): 5}
    assert led.take_changes() == {}


def test_net_earned_counts_only_other_proven_unbanned_payers() -> None:
    later = NOW_MS + 10 * W
    led = ledger()
    pay(led, Q, B, 10, 1)  # Q: no identity
    assert led.net_earned(pid(B), later) == 0
    pay(led, X, B, 10, 1)  # X: proven, then banned
    led.ingest_equivocation_proof(equivocation(X))
    assert led.net_earned(pid(B), later) == 0
    pay(led, P, B, 10, 1)
    assert led.net_earned(pid(B), later) == 10


def test_memory_blobs_forget_ids_they_never_held() -> None:
    blobs = MemoryBlobs()
    blobs.put(b"a" * 32, FactKind.RECEIPT, b"x")
    blobs.forget([b"a" * 32, b"b" * 32])
    assert blobs.get(b"a" * 32) is None


# --- adopting in a copy (peer.ledger_store adopts off the event loop) -----------------------


def test_a_journal_records_each_new_fact_and_nothing_a_copy_re_indexes() -> None:
    led = ledger()
    assert led.journal is None
    led.journal = []
    r, c = pay(led, P, B, 10, 1, NOW_MS)
    pay(led, P, B, 10, 2, CUT + 10)
    assert led.journal[:2] == [
        (FactKind.RECEIPT, r.to_bytes()),
        (FactKind.CERTIFICATE, c.to_bytes()),
    ]
    assert len(led.journal) == 4
    cp, _ = checkpoint_at(led, CUT)
    led.ingest_checkpoint(cp)
    led.journal = []
    led.adopt_checkpoint(cp)  # re-ingests the kept facts: not new, not journaled
    assert led.journal == []


def test_replayed_facts_are_neither_verified_nor_stored_again() -> None:
    forged = forged_receipt()  # its signatures were "checked" by the owner before
    blobs = RecordingBlobs()
    puts = blobs.puts
    led = LedgerState(RULE, POL, blobs=blobs)
    led.replay_verified([(FactKind.RECEIPT, forged.to_bytes())])
    assert led.has(forged.receipt_id) and puts == []
    # Back to untrusted afterwards, also when a replayed item fails.
    with pytest.raises(ProtocolError):
        led.replay_verified([(FactKind.RECEIPT, b"\xff")])
    with pytest.raises(ProtocolError):
        led.ingest_receipt(forged_receipt())
    r = receipt(P, B, 10, next(_jobs))
    assert led.ingest_receipt(r) and puts == [r.receipt_id]


def test_a_ledger_takes_the_state_of_a_copy_of_the_same_rule_and_policy_only() -> None:
    live_blobs = MemoryBlobs()
    live = LedgerState(RULE, POL, blobs=live_blobs)
    live.journal = []
    copy = ledger()
    pay(copy, P, B, 10, 1, NOW_MS)
    for other in (LedgerState(rule(referee_panel_size=5), POL), ledger(policy())):
        with pytest.raises(LocalProtocolError):
            live.take_state(other)
    live.take_state(copy)
    assert live.balances() == {pid(P): -10, pid(B): 10}
    assert live.blobs is live_blobs and live.journal is None
