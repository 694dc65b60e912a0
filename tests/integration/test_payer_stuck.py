"""A payment the witnesses keep refusing is reported stuck and retried on a bounded beat,
not on every piece of news (real libp2p hosts on 127.0.0.1)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio
from settlement_helpers import connect_all, key, make_receipt, policy, rule_for, settlement_node

from peer.settlement import SettlementConfig
from peer.settlement.payer import STUCK_AFTER

WITNESS_KEYS = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESS_KEYS)
POLICY = policy()  # keys 1..9: genesis accounts, credit limit 1 credit
PAYER, PAYEE = key(1), key(2)


async def test_a_refused_payment_is_reported_stuck_and_not_retried_on_news(
    tmp_path: Path,
) -> None:
    eager = SettlementConfig(
        sync_interval=0, gossip=False, retry_interval=0.01, max_retry_interval=3600.0
    )
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"n{n}", k, RULE, POLICY, eager)
            )
            for n, k in enumerate([*WITNESS_KEYS, PAYER, PAYEE])
        ]
        witnesses, payer = nodes[:4], nodes[4]
        await connect_all(nodes)
        refusals = lambda: sum(w.svc.stats.refusals for w in witnesses)  # noqa: E731
        over = make_receipt(PAYER, PAYEE, 5 * POLICY.base_limit, 1)  # 5x its credit limit
        with trio.fail_after(60):
            await payer.svc.ingest_receipt(over)  # auto_pay takes it from here
            while payer.svc.payer.stuck is None:
                await payer.svc.payer.stuck_changed.wait()
        stuck = payer.svc.payer.stuck
        assert stuck.receipt_id == over.receipt_id
        assert stuck.attempts == STUCK_AFTER
        assert "over_limit" in stuck.error.lower() or "limit" in stuck.error.lower()
        seen = refusals()
        assert seen >= STUCK_AFTER * 3  # a quorum refused each attempt
        # News wakes the payer (here: new facts of its own), but the stuck payment is not
        # asked again before max_retry_interval: the witnesses hear nothing more.
        for job in range(3):
            await payer.svc.add(make_receipt(PAYEE, PAYER, 1, 100 + job))
            payer.svc.payer.wake()
            await payer.svc.sync_with(witnesses[0].id)  # round trips: time to misbehave
        assert refusals() == seen
        assert payer.svc.payer.stuck == stuck
