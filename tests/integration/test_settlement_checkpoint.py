"""Checkpoints over the network: the committee makes one, the ledger prunes, peers that
were offline or are new sync from it (real libp2p hosts on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from settlement_helpers import (
    Node,
    connect_all,
    key,
    make_receipt,
    policy,
    rule_for,
    settlement_node,
    wait_for,
)

from peer.ledger_store import read_snapshot, verify_snapshot
from peer.settlement import SettlementError
from protocols.checkpoint import checkpoint_committee
from protocols.ledger_rpc import CheckpointReply, GetCheckpoint
from protocols.ledger_state import FactKind

WITNESS_KEYS = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESS_KEYS)
POLICY = policy()  # keys 1..9 are genesis accounts: no proof-of-work needed
PAYER, PAYEE, FRESH = key(1), key(2), key(5)
INTERVAL_MS = 1000


class Clock:
    """One wall clock for every node, moved forward by the test."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def proposer(nodes: list[Node], clock: Clock, epoch: int) -> Node:
    committee = checkpoint_committee(RULE, epoch)
    turn = committee.members[int(clock() * 1000) // INTERVAL_MS % committee.size]
    return next(n for n in nodes if n.id == turn)


async def test_committee_checkpoints_prunes_and_a_new_peer_syncs_from_it(tmp_path: Path) -> None:
    clock = Clock()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"n{n}", k, RULE, POLICY, clock=clock)
            )
            for n, k in enumerate([*WITNESS_KEYS, PAYER, PAYEE])
        ]
        # A new peer, started now but connected (and told anything) only at the end.
        fresh = await stack.enter_async_context(
            settlement_node(tmp_path / "fresh", FRESH, RULE, POLICY, clock=clock)
        )
        witnesses, payer, payee = nodes[:4], nodes[4], nodes[5]
        for n in [*nodes, fresh]:
            n.svc.checkpointer.interval_ms = INTERVAL_MS
        await connect_all(nodes)
        with trio.fail_after(60):
            for job in range(6):
                await payer.svc.pay(make_receipt(PAYER, PAYEE, 1000 + job, job))
            await wait_for("certificates", lambda n: n.svc.ledger.next_seq(payer.id) == 7, nodes)
            # Not yet: every payment is still within the fraud window plus the clock skew.
            assert await proposer(witnesses, clock, 1).svc.checkpointer.step() is None
            clock.t += (POLICY.fraud_window_ms + POLICY.max_clock_skew_ms) / 1000 + 2
            cp = await proposer(witnesses, clock, 1).svc.checkpointer.step()
            assert cp is not None and cp.epoch == 1 and cp.header.covered_count == 6
            await wait_for("adopted", lambda n: n.svc.ledger.checkpoint == cp, witnesses)
            # A peer outside the committee (it holds the facts) adopts it when it syncs.
            await payee.svc.sync_with(witnesses[0].id)
            assert payee.svc.ledger.checkpoint == cp
            balances = witnesses[0].svc.balances()
            assert balances[payee.id] == sum(1000 + j for j in range(6))
            for n in [*witnesses, payee]:
                assert n.svc.balances() == balances
                # The 6 certificates and 6 receipts are pruned; the checkpoint and the
                # witnesses' identity proofs (one per account, as they have met) stay.
                kinds = [n.svc.ledger.item(i)[0] for i in n.svc.ledger.fact_ids()]  # type: ignore[index]
                assert set(kinds) == {FactKind.IDENTITY_PROOF, FactKind.CHECKPOINT}, kinds
                assert kinds.count(FactKind.CHECKPOINT) == 1
                assert n.store.fact_count() == len(kinds)
            # Payments go on after the checkpoint (seq 7 on top of the covered 1..6).
            await payer.svc.sync_with(witnesses[0].id)
            assert payer.svc.ledger.checkpoint == cp
            await payer.svc.pay(make_receipt(PAYER, PAYEE, 50, 100))
            await wait_for("seq 7", lambda n: n.svc.ledger.next_seq(payer.id) == 8, witnesses)
            # A new peer: only the checkpoint (and its rows) and the facts after it cross.
            await fresh.peer.connect(witnesses[1].addr)
            result = await fresh.svc.sync_with(witnesses[1].id)
            # The checkpoint, the identity proofs it holds, certificate 7 and its receipt.
            held = witnesses[1].svc.ledger
            identities = sum(
                1
                for i in held.fact_ids()
                if held.item(i)[0] is FactKind.IDENTITY_PROOF  # type: ignore[index]
            )
            assert result.fetched == 1 + identities + 2
            assert fresh.svc.ledger.checkpoint == cp
            assert fresh.svc.state_hash() == witnesses[1].svc.state_hash()
            assert fresh.svc.balances() == witnesses[1].svc.balances()
            assert fresh.svc.ledger.next_seq(payer.id) == 8
    for d in ("n0", "fresh"):
        report = verify_snapshot(read_snapshot(tmp_path / d))
        assert report.ok, report.problems
        kinds = [k for _i, k, _d in read_snapshot(tmp_path / d).facts]
        assert kinds.count(FactKind.CHECKPOINT) == 1, (d, kinds)


async def test_a_new_peer_refuses_forged_rows_from_a_neighbour(tmp_path: Path) -> None:
    """A neighbour that serves a genuine checkpoint with rows it doctored (more credit for
    its friend) is refused: the rows must hash to what the committee signed."""
    clock = Clock()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"n{n}", k, RULE, POLICY, clock=clock)
            )
            for n, k in enumerate([*WITNESS_KEYS, PAYER, FRESH])
        ]
        witnesses, payer, fresh = nodes[:4], nodes[4], nodes[5]
        for n in nodes:
            n.svc.checkpointer.interval_ms = INTERVAL_MS
        await connect_all(nodes[:5])
        with trio.fail_after(60):
            for job in range(3):
                await payer.svc.pay(make_receipt(PAYER, PAYEE, 1000 + job, job))
            clock.t += (POLICY.fraud_window_ms + POLICY.max_clock_skew_ms) / 1000 + 2
            cp = await proposer(witnesses, clock, 1).svc.checkpointer.step()
            assert cp is not None
            liar = witnesses[2]
            await wait_for("adopted", lambda n: n.svc.ledger.checkpoint == cp, [liar])
            honest = liar.svc.fact_sync.answer_checkpoint

            def doctored(req: GetCheckpoint) -> CheckpointReply:
                reply = honest(req)
                rows = list(reply.accounts)
                rows[0] = dataclasses.replace(rows[0], balance=rows[0].balance + 7)
                rows[1] = dataclasses.replace(rows[1], balance=rows[1].balance - 7)
                return dataclasses.replace(reply, accounts=tuple(rows))

            liar.svc.fact_sync.answer_checkpoint = doctored  # type: ignore[method-assign]
            await fresh.peer.connect(liar.addr)
            with pytest.raises(SettlementError, match="do not match"):
                await fresh.svc.sync_with(liar.id)
            assert fresh.svc.ledger.checkpoint is None
            # From an honest neighbour it adopts the same checkpoint.
            await fresh.peer.connect(witnesses[0].addr)
            await fresh.svc.sync_with(witnesses[0].id)
            assert fresh.svc.ledger.checkpoint == cp
            assert fresh.svc.balances() == witnesses[0].svc.balances()
