"""Rules of the payer's session that mutation testing found no test holding (issue 17).

Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/payment.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from settlement_fixtures import NOW_MS, WITNESS_KEYS, pid, receipt, transfer
from test_payment import Node, P, X, _pay, _setup

from protocols.certificate import Certificate
from protocols.ledger_state import LedgerState
from protocols.payment import Certified, Failed, PaymentSession

GARBAGE = b"\xff\x00 not a reply"


def test_a_reply_from_outside_the_committee_is_ignored_unread() -> None:
    """Only committee members are heard: an outsider's bytes are not even decoded."""
    ledger, _ = _setup()
    session, _ = PaymentSession.start(P, receipt(P, X, 10, 1), ledger, NOW_MS)
    session.persisted()
    assert session.on_reply(pid(X), GARBAGE) == []


def test_once_certified_later_replies_are_ignored() -> None:
    """A finished session never acts again (no second certificate, no failure after it)."""
    ledger, nodes = _setup()
    session, _ = PaymentSession.start(P, receipt(P, X, 10, 1), ledger, NOW_MS)
    sends = session.persisted()
    done = _pay(session, sends, nodes)
    assert isinstance(done, Certified)
    for w in nodes:
        assert session.on_reply(w, GARBAGE) == []
        assert session.on_reply(w, nodes[w].serve(sends[0].data)) == []


def test_once_failed_later_replies_are_ignored() -> None:
    ledger, nodes = _setup(base_limit=50)
    session, _ = PaymentSession.start(P, receipt(P, X, 100, 1), ledger, NOW_MS)
    sends = session.persisted()
    done = _pay(session, sends, nodes)
    assert isinstance(done, Failed)
    for w in nodes:
        assert session.on_reply(w, GARBAGE) == []


def test_a_resumed_session_still_sends_missing_history() -> None:
    """After a restart the stored transfer is asked again, and a lagging witness that asks
    for the payer's history gets it (the session keeps its ``history_for``)."""
    ledger, nodes = _setup()
    lagging, down = pid(WITNESS_KEYS[0]), frozenset({pid(WITNESS_KEYS[1])})
    history_for = _paid_once_with_a_lagging_witness(ledger, nodes, lagging)
    r2 = receipt(P, X, 10, 2)
    session, sends = PaymentSession.resume(transfer(P, r2, 2), r2, ledger, history_for=history_for)
    # With one witness down the lagging one is needed for the quorum of 3.
    assert isinstance(_pay(session, sends, nodes, down), Certified)
    assert nodes[lagging].ledger.next_seq(pid(P)) == 2  # it caught up from the request


def test_a_witness_that_refuses_after_getting_the_history_counts_as_a_final_refusal() -> None:
    """A witness asked again with the missing history is no longer waited for once it answers:
    its refusal counts, so a payment over the limit fails instead of hanging."""
    ledger, nodes = _setup(base_limit=50)
    lagging = pid(WITNESS_KEYS[0])
    history_for = _paid_once_with_a_lagging_witness(ledger, nodes, lagging)
    # Only the lagging witness and one other answer; both refuse (over the limit).
    down = frozenset(pid(k) for k in WITNESS_KEYS[2:])
    session, _ = PaymentSession.start(
        P,
        receipt(P, X, 100, 2),
        ledger,
        NOW_MS,
        history_for=history_for,
    )
    failed = _pay(session, session.persisted(), nodes, down)
    assert isinstance(failed, Failed)
    assert set(failed.refusals) == {lagging, pid(WITNESS_KEYS[1])}


def _paid_once_with_a_lagging_witness(
    ledger: LedgerState, nodes: dict[str, Node], lagging: str
) -> Callable[[str, int], list[Certificate]]:
    """Pay seq 1 and let every witness but ``lagging`` hear of it; the payer's history."""
    first, _ = PaymentSession.start(P, receipt(P, X, 10, 1), ledger, NOW_MS)
    # ``lagging`` never sees seq 1 (a witness holding its lock would vote seq 2 ahead).
    done = _pay(first, first.persisted(), nodes, frozenset({lagging}))
    assert isinstance(done, Certified)
    certs: dict[int, Certificate] = {1: done.certificate}
    ledger.ingest_certificate(done.certificate)
    for w, node in nodes.items():
        if w != lagging:
            node.ledger.ingest_certificate(done.certificate)
    return lambda account, seq: [certs[seq]] if seq in certs else []
