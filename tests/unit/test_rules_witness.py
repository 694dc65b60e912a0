"""Rules of the witness and its wire that mutation testing found no test holding
(issue 17). Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/witness.py``).
"""

from __future__ import annotations

import pytest
from settlement_fixtures import NOW_MS, key, pid, receipt, transfer
from test_proofs import _verdicts
from test_witness import P, X, Y, _world

from protocols.codec import encode
from protocols.errors import RemoteProtocolError
from protocols.proofs import ArbitratedReceipt
from protocols.receipt import Receipt
from protocols.signed import Signed
from protocols.signing import seal
from protocols.witness import (
    MAX_HISTORY,
    REQUEST_VERSION,
    PersistLock,
    Refusal,
    Refuse,
    TransferRequest,
    decode_reply,
    encode_reply,
)

OTHER = key(9)


def test_a_refusal_without_a_next_seq_stays_without_one_on_the_wire() -> None:
    refuse = Refuse(Refusal.BANNED, "banned")
    assert decode_reply(encode_reply(refuse)).next_seq is None  # type: ignore[union-attr]


def test_a_refusal_may_have_an_empty_message() -> None:
    refuse = Refuse(Refusal.STALE_SEQ, "", 4)
    assert decode_reply(encode_reply(refuse)) == refuse


def test_a_refusal_message_is_cut_to_400_characters_and_a_longer_one_is_refused() -> None:
    long = Refuse(Refusal.OVER_LIMIT, "x" * 1000, 2)
    assert decode_reply(encode_reply(long)) == Refuse(Refusal.OVER_LIMIT, "x" * 400, 2)
    raw = {"v": REQUEST_VERSION, "no": "over-limit", "msg": "x" * 401, "next": 2}
    with pytest.raises(RemoteProtocolError):
        decode_reply(encode(raw))


def test_a_transfer_request_carries_an_arbitrated_receipt_as_one() -> None:
    """rk on the wire says which kind of receipt follows; an arbitrated one stays arbitrated."""
    c = receipt(P, X, 10, 5).commitment
    arb = ArbitratedReceipt.of(c, _verdicts(c, "match", 2))
    req = TransferRequest(transfer(P, arb, 1), arb, ())
    back = TransferRequest.from_bytes(req.to_bytes())
    assert isinstance(back.receipt, ArbitratedReceipt)
    assert back.receipt.receipt_id == arb.receipt_id


def test_a_transfer_request_carries_at_most_max_history_certificates() -> None:
    world = _world()
    r = receipt(P, X, 10, 1)
    cert = world.certify(transfer(P, r, 1), r)
    assert cert is not None
    r2 = receipt(P, Y, 20, 2)
    full = TransferRequest(transfer(P, r2, 2), r2, (cert,) * MAX_HISTORY)
    assert len(TransferRequest.from_bytes(full.to_bytes()).history) == MAX_HISTORY
    over = TransferRequest(transfer(P, r2, 2), r2, (cert,) * (MAX_HISTORY + 1))
    with pytest.raises(RemoteProtocolError, match="at most"):
        TransferRequest.from_bytes(over.to_bytes())


def test_a_badly_signed_receipt_reaches_the_witness_and_is_refused_as_bad_receipt() -> None:
    """Parsing a request checks its shape, not the receipt: the witness answers the payer
    with a BAD_RECEIPT refusal it can read instead of an undecodable request."""
    r = receipt(P, X, 10, 1)
    forged_acceptance = Receipt(commitment=r.commitment, acceptance=_resealed(r.acceptance))
    forged_commitment = Receipt(commitment=_resealed(r.commitment), acceptance=r.acceptance)
    for forged in (forged_acceptance, forged_commitment):
        world = _world()
        req = TransferRequest(transfer(P, forged, 1), forged, ())
        back = TransferRequest.from_bytes(req.to_bytes())
        w, led = world.witnesses[0], world.ledgers[0]
        answer = w.handle_transfer(back.transfer, back.receipt, led, NOW_MS)
        assert isinstance(answer, Refuse) and answer.reason is Refusal.BAD_RECEIPT


def _resealed(s: Signed) -> Signed:  # type: ignore[type-arg]
    return Signed(message=s.message, envelope=seal(OTHER, s.envelope.domain, s.message.to_body()))


def test_a_witness_finds_its_durable_lock_by_account_and_seq() -> None:
    world = _world()
    w, led = world.witnesses[0], world.ledgers[0]
    r = receipt(P, X, 10, 1)
    t = transfer(P, r, 1)
    led.ingest_payable(r)
    first = w.handle_transfer(t, r, led, NOW_MS)
    assert isinstance(first, PersistLock)
    w.lock_persisted(first.record)
    assert w.lock_for(t.message.payer, 1) == first.record
    assert w.lock_for(t.message.payer, 2) is None


def test_a_late_persist_failure_never_drops_a_durable_lock() -> None:
    """Once a lock is durable (and its vote may be out), no failure report releases it: a
    second transfer for that seq is still refused."""
    world = _world()
    w, led = world.witnesses[0], world.ledgers[0]
    ra, rb = receipt(P, X, 10, 1), receipt(P, Y, 10, 2)
    first = w.handle_transfer(transfer(P, ra, 1), ra, led, NOW_MS)
    assert isinstance(first, PersistLock)
    w.lock_persisted(first.record)
    w.lock_failed(first.record)
    assert w.lock_for(pid(P), 1) == first.record
    assert not isinstance(w.handle_transfer(transfer(P, rb, 1), rb, led, NOW_MS), PersistLock)


def test_a_transfer_exactly_max_clock_skew_away_is_accepted_and_one_ms_more_is_not() -> None:
    world = _world()
    w, led = world.witnesses[0], world.ledgers[0]
    skew = led.policy.max_clock_skew_ms
    r1 = receipt(P, X, 10, 1)
    led.ingest_payable(r1)
    edge = w.handle_transfer(transfer(P, r1, 1, time_ms=NOW_MS + skew), r1, led, NOW_MS)
    assert isinstance(edge, PersistLock)
    w2, led2 = world.witnesses[1], world.ledgers[1]  # a witness that saw nothing yet
    led2.ingest_payable(r1)
    far = w2.handle_transfer(transfer(P, r1, 1, time_ms=NOW_MS - skew - 1), r1, led2, NOW_MS)
    assert isinstance(far, Refuse) and far.reason is Refusal.CLOCK_SKEW
