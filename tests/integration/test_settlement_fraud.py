"""A fraud proof spreads to every ledger: the cheater's escrowed payouts are reversed and it
can no longer pay (its witnesses refuse it)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from settlement_helpers import (
    Node,
    key,
    make_receipt,
    now_ms,
    pid,
    policy,
    rule_for,
    settlement_node,
    wait_for,
)

from peer.ledger_store import read_snapshot, verify_snapshot
from peer.settlement import PaymentFailed, SettlementConfig
from protocols.proofs import FraudProof, referee_panel, sign_referee_result
from protocols.receipt import content_digest

WITNESS_KEYS = [key(500 + i) for i in range(4)]
RULE = rule_for(WITNESS_KEYS)
POLICY = policy(genesis=frozenset())
PAYER, CHEATER, OTHER = key(1), key(2), key(3)


def _shared(n: Node) -> set[bytes]:
    """The facts every peer holds: all but receipts that no certificate pays."""
    ledger = n.svc.ledger
    out = set()
    for fid in ledger.fact_ids():
        r = ledger.receipt(fid)
        if r is None or ledger.is_paid(r):
            out.add(fid)
    return out


async def test_fraud_proof_spreads_reverses_payouts_and_bans(tmp_path: Path) -> None:
    config = SettlementConfig(sync_interval=0.2, gossip=True)
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"n{i}", k, RULE, POLICY, config)
            )
            for i, k in enumerate([*WITNESS_KEYS, PAYER, CHEATER, OTHER])
        ]
        *witnesses, payer, cheater, _other = nodes
        for i, a in enumerate(nodes):  # a ring: facts must travel by anti-entropy/gossip
            await a.peer.connect(nodes[(i + 1) % len(nodes)].addr)
        for w in witnesses:
            for n in (payer, cheater):
                await n.peer.connect(w.addr)
        good = make_receipt(PAYER, CHEATER, 300_000, 1)
        faked = make_receipt(PAYER, CHEATER, 200_000, 2, output=b"made up")
        for r in (good, faked):
            await cheater.svc.ingest_receipt(r)
            await payer.svc.pay(r)
        # The cheater got paid; everyone holds the certificates.
        await wait_for(
            "everyone to see the payments",
            lambda n: n.svc.balances().get(pid(CHEATER)) == 500_000,
            nodes,
        )
        # A spot check found job 2 wrong: the job's referee panel signs "mismatch".
        panel = referee_panel(RULE, faked.commitment, 0)
        referees = [k for k in WITNESS_KEYS if pid(k) in panel]
        results = tuple(
            sign_referee_result(
                k,
                faked.commitment,
                output_digest=content_digest({"y": b"the right answer"}),
                verdict="mismatch",
                time_ms=now_ms(),
            )
            for k in referees
        )
        proof = FraudProof.of(faked.commitment, results)
        assert await payer.svc.ingest_fraud_proof(proof)
        # Every ledger learns it; both payouts were still in escrow: both are reversed.
        await wait_for(
            "every ledger to reverse the cheater's escrowed payouts",
            lambda n: n.svc.ledger.is_banned(pid(CHEATER)) and n.svc.balances() == {},
            nodes,
        )
        for n in nodes:
            assert n.svc.ledger.forfeited() == {pid(CHEATER): 500_000}
        # Its witnesses refuse to certify anything it pays now.
        with pytest.raises(PaymentFailed, match="banned"):
            await cheater.svc.pay(make_receipt(CHEATER, OTHER, 1, 3))
        # And the ledgers still converge to one state (anti-entropy runs every 0.2 s) on the
        # facts every peer holds: the refused payment's receipt stays with its parties and
        # the payer's committee (it is nobody else's business).
        union = set().union(*(_shared(n) for n in nodes))
        await wait_for("one state", lambda n: _shared(n) >= union, nodes)
        assert all(n.svc.balances() == nodes[0].svc.balances() for n in nodes)
        assert all(_shared(n) == union for n in nodes)
    for i in range(len(nodes)):
        assert verify_snapshot(read_snapshot(tmp_path / f"n{i}")).ok
