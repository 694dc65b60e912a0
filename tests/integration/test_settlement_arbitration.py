"""Arbitration, settlement side: a requester that vanished or refuses to sign is settled by
a referee panel's ArbitratedReceipt, paid through the witnesses (real hosts, real stores)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from settlement_helpers import (
    key,
    make_receipt,
    make_transfer,
    now_ms,
    pid,
    policy,
    rule_for,
    settlement_node,
    wait_for,
)

from peer.settlement import SettlementConfig, SettlementError
from protocols.proofs import ArbitratedReceipt, referee_panel, sign_referee_result
from protocols.verification import decide
from protocols.witness import Refusal, Refuse

WITNESS_KEYS = [key(700 + i) for i in range(4)]
KEY_OF = {pid(k): k for k in WITNESS_KEYS}
RULE = rule_for(WITNESS_KEYS)
POLICY = policy()
VANISHED, REFUSER, EXECUTOR, OTHER = key(1), key(2), key(3), key(4)


def arbitrated(requester: object, price: int, job: int) -> ArbitratedReceipt:
    """The panel of the job (drawn by the rule, never a party) finds the result right."""
    c = make_receipt(requester, EXECUTOR, price, job).commitment  # type: ignore[arg-type]
    panel = referee_panel(RULE, c, 0)
    verdicts = [
        sign_referee_result(
            KEY_OF[m], c, output_digest=c.message.output_digest, verdict="match", time_ms=now_ms()
        )
        for m in panel.members
    ]
    evidence = decide(c, verdicts, panel)
    assert isinstance(evidence, ArbitratedReceipt)
    return evidence


async def test_vanished_and_refusing_requesters_are_settled_by_arbitration(tmp_path: Path) -> None:
    paying = SettlementConfig(sync_interval=0, gossip=False)
    refusing = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)
    async with AsyncExitStack() as stack:
        witnesses = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"w{i}", k, RULE, POLICY, paying)
            )
            for i, k in enumerate(WITNESS_KEYS)
        ]
        executor = await stack.enter_async_context(
            settlement_node(tmp_path / "ex", EXECUTOR, RULE, POLICY, paying)
        )
        refuser = await stack.enter_async_context(
            settlement_node(tmp_path / "refuser", REFUSER, RULE, POLICY, refusing)
        )
        for n in (executor, refuser):
            for w in witnesses:
                await n.peer.connect(w.addr)
        await executor.peer.connect(refuser.addr)

        # 1. A requester that vanished after the result: its witnesses hold the debt now,
        #    and the requester's own payer pays it the moment it is back and learns it.
        owed = arbitrated(VANISHED, 400_000, 1)
        assert await executor.svc.settle_arbitrated(owed) == 4  # the 4 witnesses; it is gone
        await wait_for(
            "witnesses to hold the debt",
            lambda n: n.svc.ledger.outstanding_debts(pid(VANISHED)) == [owed],
            witnesses,
        )
        back = await stack.enter_async_context(
            settlement_node(tmp_path / "vanished", VANISHED, RULE, POLICY, paying)
        )
        for w in witnesses:
            await back.peer.connect(w.addr)
        await executor.peer.connect(back.addr)
        assert await executor.svc.settle_arbitrated(owed) == 5
        await wait_for(
            "the arbitrated receipt to be paid",
            lambda n: n.svc.ledger.balance(pid(EXECUTOR)) == 400_000,
            [*witnesses, back],
        )

        # 2. A requester that refuses to sign (and to pay): it can pay nobody else.
        other = make_receipt(REFUSER, OTHER, 100_000, 3)
        await refuser.svc.ingest_receipt(other)  # owed before the debt came
        debt = arbitrated(REFUSER, 300_000, 2)
        assert await executor.svc.settle_arbitrated(debt) == 5
        # Its payer would pay the debt first: witnesses certify nothing else until then.
        await wait_for(
            "the refuser to hold its debt", lambda n: n.svc.unpaid() == [debt, other], [refuser]
        )
        t = make_transfer(REFUSER, other, 1)
        for w in witnesses:  # asked (without locking anything), every witness refuses it
            w.svc.ledger.ingest_payable(other)
            action = w.svc.witness.handle_transfer(t, other, w.svc.ledger, now_ms())
            assert isinstance(action, Refuse) and action.reason is Refusal.OUTSTANDING_DEBT
        # Paying the debt is certified, and then the executor is paid for it.
        with trio.fail_after(20):
            await refuser.svc.pay(debt)
        await wait_for(
            "the debt to be paid",
            lambda n: n.svc.ledger.balance(pid(EXECUTOR)) == 700_000,
            witnesses,
        )
        # Only the executor settles its own arbitrated receipt.
        with pytest.raises(SettlementError):
            await refuser.svc.settle_arbitrated(debt)
