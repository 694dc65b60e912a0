"""The payer's session driven against real witnesses through the wire forms."""

from __future__ import annotations

import pytest
from settlement_fixtures import NOW_MS, WITNESS_KEYS, key, pid, policy, receipt, rule, transfer

from protocols.certificate import Certificate
from protocols.errors import LocalProtocolError
from protocols.ledger_state import LedgerState
from protocols.payment import Certified, Failed, PaymentSession, PersistTransfer, SendRequest
from protocols.witness import PersistLock, Refusal, TransferRequest, Witness, encode_reply

P, X = key(1), key(2)


class Node:
    """What peer/ does for a witness: parse, ingest, decide, persist, then answer."""

    def __init__(self, n: int, ledger: LedgerState) -> None:
        self.witness = Witness(WITNESS_KEYS[n])
        self.ledger = ledger
        self.store: list[bytes] = []

    def serve(self, data: bytes) -> bytes:
        req = TransferRequest.from_bytes(data)
        for cert in req.history:
            self.ledger.ingest_certificate(cert)
        self.ledger.ingest_payable(req.receipt)
        action = self.witness.handle_transfer(req.transfer, req.receipt, self.ledger, NOW_MS)
        if isinstance(action, PersistLock):
            self.store.append(action.record.to_bytes())  # the durable commit
            action = self.witness.lock_persisted(action.record)
        return encode_reply(action)


def _setup(**pol: object) -> tuple[LedgerState, dict[str, Node]]:
    p = policy(genesis=frozenset({pid(P)}), **pol)
    payer_ledger = LedgerState(rule(), p)
    nodes = {pid(k): Node(i, LedgerState(rule(), p)) for i, k in enumerate(WITNESS_KEYS)}
    return payer_ledger, nodes


def _pay(
    session: PaymentSession,
    sends: list[SendRequest],
    nodes: dict[str, Node],
    down: frozenset[str] | set[str] = frozenset(),
) -> Certified | Failed | None:
    queue = list(sends)
    for _ in range(20):
        if not queue:
            return None
        send = queue.pop(0)
        if send.witness in down:
            continue
        for action in session.on_reply(send.witness, nodes[send.witness].serve(send.data)):
            if isinstance(action, Certified | Failed):
                return action
            queue.append(action)
    raise AssertionError("payment did not finish")


def test_payment_is_persisted_first_then_certified() -> None:
    ledger, nodes = _setup()
    r = receipt(P, X, 100, 1)
    session, first = PaymentSession.start(P, r, ledger, NOW_MS)
    assert isinstance(first, PersistTransfer) and first.transfer.message.seq == 1
    with pytest.raises(LocalProtocolError):
        session.on_reply(pid(WITNESS_KEYS[0]), b"")
    sends = session.persisted()
    assert sorted(s.witness for s in sends) == sorted(nodes)
    done = _pay(session, sends, nodes)
    assert isinstance(done, Certified)
    done.certificate.verify(rule().committee_for(pid(P)))
    assert ledger.ingest_certificate(done.certificate)
    assert ledger.balance(pid(X)) == 100


def test_missing_history_is_sent_on_request() -> None:
    ledger, nodes = _setup()
    certs: dict[int, Certificate] = {}
    lagging, down = pid(WITNESS_KEYS[0]), frozenset({pid(WITNESS_KEYS[1])})
    for job in (1, 2):
        r = receipt(P, X, 10, job)
        session, _ = PaymentSession.start(
            P, r, ledger, NOW_MS, history_for=lambda a, s: [certs[s]] if s in certs else []
        )
        # The lagging witness never sees seq 1 (so it holds no lock on it either); with
        # another witness down it is needed for the quorum of 3 on seq 2.
        done = _pay(session, session.persisted(), nodes, down if job == 2 else {lagging})
        assert isinstance(done, Certified)
        certs[done.certificate.seq] = done.certificate
        ledger.ingest_certificate(done.certificate)
        for w, node in nodes.items():
            if w != lagging:  # witness 0 never hears the gossip
                node.ledger.ingest_certificate(done.certificate)
    assert nodes[lagging].ledger.next_seq(pid(P)) == 2  # it caught up from the request


def test_over_limit_fails_once_no_quorum_is_possible() -> None:
    ledger, nodes = _setup(base_limit=50)
    r = receipt(P, X, 100, 1)
    session, _ = PaymentSession.start(P, r, ledger, NOW_MS)
    done = _pay(session, session.persisted(), nodes)
    assert isinstance(done, Failed)
    assert len(done.refusals) == 2
    assert {x.reason for x in done.refusals.values()} == {Refusal.OVER_LIMIT}


def test_resending_a_different_transfer_for_the_same_seq_is_caught() -> None:
    ledger, nodes = _setup()
    r1, r2 = receipt(P, X, 10, 1), receipt(P, X, 10, 2)
    session, _ = PaymentSession.start(P, r1, ledger, NOW_MS)
    assert isinstance(_pay(session, session.persisted(), nodes), Certified)
    # A payer that forgot its transfer and signs a new one for seq 1 equivocates.
    other, sends = PaymentSession.resume(transfer(P, r2, 1), r2, ledger)
    done = _pay(other, sends, nodes)
    assert isinstance(done, Failed)
    assert other.equivocation is not None
    other.equivocation.verify()


def test_only_the_requester_can_pay() -> None:
    ledger, _ = _setup()
    with pytest.raises(LocalProtocolError):
        PaymentSession.start(X, receipt(P, X, 10, 1), ledger, NOW_MS)
