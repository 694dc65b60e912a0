"""Rules of the ledger state that mutation testing found no test holding (issue 17).
Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/ledger_state.py``).
"""

from __future__ import annotations

import pytest
from settlement_fixtures import (
    NOW_MS,
    WITNESS_KEYS,
    World,
    pid,
    policy,
    receipt,
    signed_commitment,
    transfer,
)
from test_ledger import A, B
from test_proofs import EXE, REQ, _verdicts

from protocols.certificate import make_certificate, sign_vote
from protocols.codec import encode
from protocols.errors import RemoteProtocolError
from protocols.ledger import IdentityProof, solve_pow
from protocols.ledger_state import ITEM_VERSION, FactKind, decode_item, encode_item
from protocols.proofs import EquivocationProof, FraudProof


def test_ledger_items_round_trip_and_an_unknown_kind_is_a_protocol_error() -> None:
    for kind in FactKind:
        assert decode_item(encode_item(kind, b"fact")) == (kind, b"fact")
    for k in (0, len(FactKind) + 1):
        with pytest.raises(RemoteProtocolError):
            decode_item(encode({"v": ITEM_VERSION, "k": k, "b": b"fact"}))


def test_two_certificates_for_one_seq_are_a_conflict() -> None:
    """Byzantine witnesses certifying two transfers for one (payer, seq) show in conflicts()."""
    world = World(policy(genesis=frozenset({pid(REQ)})))
    view = world.view
    assert view is not None
    r1, r2 = receipt(REQ, EXE, 5, 1), receipt(REQ, EXE, 5, 2)
    t1, t2 = transfer(REQ, r1, 1), transfer(REQ, r2, 1)
    assert view.conflicts() == []
    certs = [make_certificate(t, [sign_vote(k, t) for k in WITNESS_KEYS]) for t in (t1, t2)]
    for r, cert in zip((r1, r2), certs, strict=True):
        view.ingest_payable(r)
        view.ingest_certificate(cert)
        view.balances()  # a reader between the two must not make the conflict count twice
    assert view.conflicts() == [(pid(REQ), 1)]
    r3 = receipt(REQ, EXE, 5, 3)
    t3 = transfer(REQ, r3, 2)
    view.ingest_payable(r3)
    view.ingest_certificate(make_certificate(t3, [sign_vote(k, t3) for k in WITNESS_KEYS]))
    assert view.conflicts() == [(pid(REQ), 1)]  # seq 2 has one certificate: no conflict
    fresh = World(policy(genesis=frozenset({pid(REQ)}))).view
    assert fresh is not None
    for r, cert in zip((r2, r1), reversed(certs), strict=True):
        fresh.ingest_payable(r)
        fresh.ingest_certificate(cert)
    fresh.ingest_payable(r3)
    fresh.ingest_certificate(make_certificate(t3, [sign_vote(k, t3) for k in WITNESS_KEYS]))
    assert view.balances() == fresh.balances()
    assert sum(view.balances().values()) == 0 and view.balance(pid(EXE)) == 10


def test_next_seq_stays_at_the_first_gap() -> None:
    """A certificate for seq 2 arriving before seq 1 does not move the payer's next seq."""
    view = World(policy(genesis=frozenset({pid(REQ)}))).view
    assert view is not None
    r = receipt(REQ, EXE, 5, 2)
    t = transfer(REQ, r, 2)
    view.ingest_payable(r)
    assert view.ingest_certificate(make_certificate(t, [sign_vote(k, t) for k in WITNESS_KEYS]))
    assert view.next_seq(pid(REQ)) == 1


def test_an_equivocation_proof_is_new_once() -> None:
    view = World(policy()).view
    assert view is not None
    ra, rb = receipt(REQ, EXE, 5, 1), receipt(REQ, EXE, 5, 2)
    proof = EquivocationProof.of(transfer(REQ, ra, 3), transfer(REQ, rb, 3))
    assert view.ingest_equivocation_proof(proof)
    assert not view.ingest_equivocation_proof(proof)
    assert view.is_banned(pid(REQ))


def test_a_later_fraud_proof_never_reverses_a_payment_twice() -> None:
    """The earliest fraud time of an offender counts; a later proof changes no balance."""
    pol = policy(genesis=frozenset({pid(REQ)}), fraud_window_ms=60_000, base_limit=10_000)
    world = World(pol)
    view = world.view
    assert view is not None
    paid = receipt(REQ, EXE, 250, 2)
    assert world.certify(transfer(REQ, paid, 1), paid)
    first = signed_commitment(REQ, EXE, 40, 3, output=b"wrong")
    assert view.ingest_fraud_proof(
        FraudProof.of(first, _verdicts(first, "mismatch", time_ms=NOW_MS + 1_000))
    )
    after_first = view.balances()
    assert view.balance(pid(EXE)) == 0 and view.forfeited() == {pid(EXE): 250}
    # Its cut (time - window) falls after the payment: were it to count, the payment would
    # stand again.
    later = signed_commitment(REQ, EXE, 40, 4, output=b"wrong")
    assert view.ingest_fraud_proof(
        FraudProof.of(later, _verdicts(later, "mismatch", time_ms=NOW_MS + 100_000))
    )
    assert view.balances() == after_first
    assert view.forfeited() == {pid(EXE): 250}


def test_a_receipt_is_found_by_its_id() -> None:
    view = World(policy()).view
    assert view is not None
    r = receipt(REQ, EXE, 5, 1)
    assert view.receipt(r.receipt_id) is None
    view.ingest_payable(r)
    assert view.receipt(r.receipt_id) == r


def test_earning_exactly_the_minimum_makes_an_identity_eligible() -> None:
    pol = policy(genesis=frozenset({pid(A), pid(B)}), fraud_window_ms=1_000)
    world = World(pol)
    r = receipt(A, B, 500, 1)
    assert world.certify(transfer(A, r, 1), r) is not None
    view = world.view
    assert view is not None
    assert view.eligible_pool(NOW_MS + 1_000, 500) == {pid(B)}
    assert view.eligible_pool(NOW_MS + 1_000, 501) == frozenset()


def test_stored_fact_bytes_are_ingested_as_their_kind() -> None:
    """ingest_bytes routes by kind: an equivocation proof's bytes ban the payer, a receipt's
    bytes make a receipt."""
    view = World(policy()).view
    assert view is not None
    ra, rb = receipt(REQ, EXE, 5, 1), receipt(REQ, EXE, 5, 2)
    proof = EquivocationProof.of(transfer(REQ, ra, 3), transfer(REQ, rb, 3))
    assert view.ingest_bytes(FactKind.EQUIVOCATION_PROOF, proof.to_bytes())
    assert view.is_banned(pid(REQ))
    assert view.ingest_bytes(FactKind.RECEIPT, ra.to_bytes())
    assert view.receipt(ra.receipt_id) == ra


def test_a_certificate_or_identity_proof_is_new_once() -> None:
    pol = policy(genesis=frozenset({pid(REQ)}), pow_bits=4)
    world = World(pol)
    view = world.view
    assert view is not None
    r = receipt(REQ, EXE, 5, 1)
    cert = world.certify(transfer(REQ, r, 1), r)  # the view ingested it already
    assert cert is not None
    assert not view.ingest_certificate(cert)
    nonce = solve_pow(pid(A), 4, max_tries=100_000)
    assert nonce is not None
    proof = IdentityProof(pid(A), nonce)
    assert view.ingest_identity_proof(proof)
    assert not view.ingest_identity_proof(proof)


def test_a_payment_made_exactly_one_window_before_the_fraud_is_reversed() -> None:
    """Payments at or after (fraud time - window) are reversed; one ms earlier stands."""
    window = 60_000
    pol = policy(genesis=frozenset({pid(REQ)}), fraud_window_ms=window, base_limit=10_000)
    world = World(pol)
    view = world.view
    assert view is not None
    fraud_at = NOW_MS + 1_000
    edge = receipt(REQ, EXE, 100, 1)
    t_edge = transfer(REQ, edge, 1, time_ms=fraud_at - window)
    before = receipt(REQ, EXE, 30, 2)
    t_before = transfer(REQ, before, 2, time_ms=fraud_at - window - 1)
    assert world.certify(t_edge, edge, fraud_at - window)
    assert world.certify(t_before, before, fraud_at - window - 1)
    bad = signed_commitment(REQ, EXE, 40, 3, output=b"wrong")
    assert view.ingest_fraud_proof(FraudProof.of(bad, _verdicts(bad, "mismatch", time_ms=fraud_at)))
    assert view.is_reversed(t_edge.message)
    assert not view.is_reversed(t_before.message)
    assert view.balance(pid(EXE)) == 30


def test_an_account_never_seen_has_balance_zero() -> None:
    view = World(policy()).view
    assert view is not None
    assert view.balance(pid(A)) == 0
