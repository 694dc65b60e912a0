"""Equivocation proofs, fraud proofs and arbitrated receipts: real ones verify, forged ones fail."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from settlement_fixtures import (
    NOW_MS,
    WITNESS_KEYS,
    World,
    key,
    pid,
    policy,
    receipt,
    rule,
    signed_commitment,
    transfer,
)

from protocols.errors import RemoteProtocolError, ValidationError
from protocols.ledger_state import FactKind, LedgerState
from protocols.proofs import (
    ArbitratedReceipt,
    EquivocationProof,
    FraudProof,
    RefereeResult,
    Verdict,
    referee_panel,
    sign_referee_result,
)
from protocols.receipt import ResultCommitment
from protocols.signed import Signed
from protocols.signing import seal
from protocols.verification import decide
from protocols.witness import PersistLock, Refusal, Refuse

REQ, EXE, OTHER = key(1), key(2), key(3)
KEY_OF = {pid(k): k for k in WITNESS_KEYS}


def _panel_keys(c: Signed[ResultCommitment]):  # type: ignore[no-untyped-def]
    panel = referee_panel(rule(), c, 0)
    return panel, [KEY_OF[m] for m in panel.members]


def _verdicts(
    c: Signed[ResultCommitment], verdict: Verdict, n: int = 2, time_ms: int = NOW_MS
) -> tuple[Signed[RefereeResult], ...]:
    _, keys = _panel_keys(c)
    return tuple(
        sign_referee_result(k, c, output_digest=b"o" * 32, verdict=verdict, time_ms=time_ms)
        for k in keys[:n]
    )


# --- equivocation ------------------------------------------------------------------------


def test_equivocation_proof_verifies_and_round_trips() -> None:
    ra, rb = receipt(REQ, EXE, 5, 1), receipt(REQ, OTHER, 5, 2)
    proof = EquivocationProof.of(transfer(REQ, ra, 3), transfer(REQ, rb, 3))
    proof.verify()
    assert proof.offender == pid(REQ) and proof.seq == 3
    assert EquivocationProof.from_bytes(proof.to_bytes()) == proof


def test_forged_equivocation_proofs_fail() -> None:
    ra, rb = receipt(REQ, EXE, 5, 1), receipt(REQ, OTHER, 5, 2)
    ta, tb = transfer(REQ, ra, 3), transfer(REQ, rb, 3)
    with pytest.raises(ValidationError):  # same transfer twice
        EquivocationProof(ta, ta).verify()
    with pytest.raises(ValidationError):  # different seqs
        EquivocationProof.of(ta, transfer(REQ, rb, 4)).verify()
    # One of the "payer signatures" is made by someone else.
    forged = Signed(
        message=tb.message, envelope=seal(OTHER, tb.envelope.domain, tb.message.to_body())
    )
    with pytest.raises(RemoteProtocolError):
        EquivocationProof.of(ta, forged).verify()
    raw = bytearray(EquivocationProof.of(ta, tb).to_bytes())
    for i in range(0, len(raw), 11):
        flipped = bytearray(raw)
        flipped[i] ^= 0x04
        with pytest.raises(RemoteProtocolError):
            EquivocationProof.from_bytes(bytes(flipped))


# --- fraud / arbitration -----------------------------------------------------------------


def test_fraud_proof_verifies_offline() -> None:
    c = signed_commitment(REQ, EXE, 100, 7, output=b"wrong")
    panel, _ = _panel_keys(c)
    assert pid(REQ) not in panel and pid(EXE) not in panel
    proof = FraudProof.of(c, _verdicts(c, "mismatch"))
    proof.verify(panel)
    again = FraudProof.from_bytes(proof.to_bytes())
    again.verify(panel)
    assert again.offender == pid(EXE) and again.fact_id == proof.fact_id


@pytest.mark.parametrize("case", ["too_few", "match", "off_panel", "other_commitment", "party"])
def test_forged_fraud_proofs_fail(case: str) -> None:
    c = signed_commitment(REQ, EXE, 100, 7, output=b"wrong")
    panel, _ = _panel_keys(c)
    results = _verdicts(c, "mismatch")
    if case == "too_few":
        results = results[:1]
    elif case == "match":
        results = _verdicts(c, "match")
    elif case == "off_panel":
        outsider = next(k for k in WITNESS_KEYS if pid(k) not in panel)
        results = (
            results[0],
            sign_referee_result(
                outsider, c, output_digest=b"o" * 32, verdict="mismatch", time_ms=1
            ),
        )
    elif case == "other_commitment":
        other = signed_commitment(REQ, EXE, 100, 7, output=b"right")
        results = (results[0], *_verdicts(other, "mismatch")[1:])
    elif case == "party":
        results = (
            results[0],
            sign_referee_result(REQ, c, output_digest=b"o" * 32, verdict="mismatch", time_ms=1),
        )
    with pytest.raises(RemoteProtocolError):
        FraudProof.of(c, results).verify(panel)


def test_fraud_proof_with_a_forged_referee_signature_fails() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    panel, _ = _panel_keys(c)
    good = _verdicts(c, "mismatch")
    forged = Signed(
        message=good[1].message,
        envelope=seal(OTHER, good[1].envelope.domain, good[1].message.to_body()),
    )
    with pytest.raises(RemoteProtocolError):
        FraudProof.of(c, (good[0], forged)).verify(panel)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_bit_flipped_fraud_proofs_never_verify(data: st.DataObject) -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    panel, _ = _panel_keys(c)
    raw = bytearray(FraudProof.of(c, _verdicts(c, "mismatch")).to_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(RemoteProtocolError):
        FraudProof.from_bytes(bytes(raw)).verify(panel)


def test_decide_builds_the_right_evidence() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    panel, _ = _panel_keys(c)
    assert decide(c, _verdicts(c, "mismatch", 1), panel) is None
    assert isinstance(decide(c, _verdicts(c, "mismatch", 2), panel), FraudProof)
    arb = decide(c, _verdicts(c, "match", 3), panel)
    assert isinstance(arb, ArbitratedReceipt)
    assert len(arb.results) == panel.threshold
    # A split 1-1 panel decides nothing.
    split = (*_verdicts(c, "match", 1), *_verdicts(c, "mismatch", 2)[1:])
    assert decide(c, split, panel) is None


def test_fraud_proof_forfeits_escrowed_payouts_and_bans() -> None:
    pol = policy(genesis=frozenset({pid(REQ)}), fraud_window_ms=60_000, base_limit=10_000)
    world = World(pol)
    view = world.view
    assert view is not None
    old = receipt(REQ, EXE, 100, 1)  # paid long before the fraud: stays paid
    assert world.certify(transfer(REQ, old, 1, time_ms=NOW_MS - 200_000), old, NOW_MS - 200_000)
    recent = receipt(REQ, EXE, 250, 2)  # still in escrow: reversed
    assert world.certify(transfer(REQ, recent, 2), recent)
    assert view.balance(pid(EXE)) == 350
    bad = signed_commitment(REQ, EXE, 40, 3, output=b"wrong")
    proof = FraudProof.of(bad, _verdicts(bad, "mismatch", time_ms=NOW_MS + 1_000))
    assert view.ingest_fraud_proof(proof)
    assert not view.ingest_fraud_proof(FraudProof.from_bytes(proof.to_bytes()))
    assert view.balance(pid(EXE)) == 100
    assert view.forfeited() == {pid(EXE): 250}
    assert view.is_banned(pid(EXE)) and view.credit_limit(pid(EXE), NOW_MS) == 0
    assert sum(view.balances().values()) == 0
    # The same facts in another order give the same state.
    other = LedgerState(world.rul, pol)
    for fid in reversed(view.fact_ids()):
        item = view.item(fid)
        assert item is not None
        other.ingest_bytes(*item)
    assert other.state_hash() == view.state_hash() and other.balances() == view.balances()


def test_arbitrated_receipt_stands_in_for_acceptance() -> None:
    pol = policy(genesis=frozenset({pid(REQ)}))
    world = World(pol)
    c = signed_commitment(REQ, EXE, 300, 9)
    panel, _ = _panel_keys(c)
    arb = ArbitratedReceipt.of(c, _verdicts(c, "match"))
    arb.verify(panel)
    assert ArbitratedReceipt.from_bytes(arb.to_bytes()).receipt_id == arb.receipt_id
    led, w = world.ledgers[0], world.witnesses[0]
    assert led.ingest_bytes(FactKind.ARBITRATED_RECEIPT, arb.to_bytes())
    assert led.outstanding_debts(pid(REQ)) == [arb]
    # The requester cannot pay anyone else while it owes the arbitrated receipt...
    other = receipt(REQ, OTHER, 5, 10)
    action = w.handle_transfer(transfer(REQ, other, 1), other, led, NOW_MS)
    assert isinstance(action, Refuse) and action.reason is Refusal.OUTSTANDING_DEBT
    # ...but paying the debt is certified.
    for ledger in world.ledgers:
        ledger.ingest_arbitrated_receipt(arb)
    t = transfer(REQ, arb, 1)
    assert isinstance(
        world.witnesses[1].handle_transfer(t, arb, world.ledgers[1], NOW_MS), PersistLock
    )
    cert = world.certify(t, arb)
    assert cert is not None
    assert led.outstanding_debts(pid(REQ)) == []
    assert led.balance(pid(EXE)) == 300


def test_arbitrated_receipt_with_mismatch_verdicts_fails() -> None:
    c = signed_commitment(REQ, EXE, 300, 9)
    panel, _ = _panel_keys(c)
    with pytest.raises(ValidationError):
        ArbitratedReceipt.of(c, _verdicts(c, "mismatch")).verify(panel)


def test_referee_result_fields_are_validated() -> None:
    c = signed_commitment(REQ, EXE, 300, 9)
    r = _verdicts(c, "match", 1)[0].message
    with pytest.raises(ValidationError):
        dataclasses.replace(r, verdict="maybe")
