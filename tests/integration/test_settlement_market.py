"""End to end: a market job's receipt reaches settlement through the market hook and is paid."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import trio
from market_swarm import market_swarm
from settlement_helpers import (
    FakeHardware,
    key,
    pid,
    policy,
    rule_for,
    settlement_node,
    wait_for,
)

from peer.config import Config
from peer.ledger_store import open_ledger_store, read_snapshot, verify_snapshot
from peer.node import open_peer
from peer.settlement import (
    SettlementConfig,
    SettlementError,
    committee_rule_from_config,
    network_dir,
    open_peer_settlement,
    open_settlement,
)

WITNESS_KEYS = [key(400 + i) for i in range(4)]
RULE = rule_for(WITNESS_KEYS)
POLICY = policy(genesis=frozenset())  # requester and executor prove an identity (PoW)


async def test_market_receipt_is_paid_through_the_hook(tmp_path: Path) -> None:
    config = SettlementConfig(sync_interval=0, gossip=False)
    async with market_swarm(tmp_path) as swarm, AsyncExitStack() as stack:
        witnesses = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"w{i}", k, RULE, POLICY, config)
            )
            for i, k in enumerate(WITNESS_KEYS)
        ]
        ex = await swarm.start("ex0", price=0.5)
        req = await swarm.start("req", serve=False)
        services = {}
        for node in (ex, req):
            store = await stack.enter_async_context(
                open_ledger_store(tmp_path / node.name / "ledger", RULE, POLICY)
            )
            svc = await stack.enter_async_context(open_settlement(node.peer, store, config))
            node.market.on_receipt.append(svc.on_market_receipt)
            services[node.name] = svc
            for w in witnesses:
                await node.peer.connect(w.addr)
        x = np.arange(4, dtype=np.float32)
        with trio.fail_after(30):
            result = await req.market.infer("tiny_add", {"x": x, "y": x}, deadline=20)
        assert result.price == 500_000
        svc_req, svc_ex = services["req"], services["ex0"]
        with trio.fail_after(30):
            for svc in (svc_req, svc_ex):
                await svc.wait_until(lambda svc=svc: svc.ledger.next_seq(req.peer_id) == 2)
        expected = {req.peer_id: -500_000, ex.peer_id: 500_000}
        assert svc_req.balances() == expected == svc_ex.balances()
        assert svc_req.unpaid() == []
        await wait_for(
            "witnesses to hold the certificate", lambda n: n.svc.balances() == expected, witnesses
        )
        # Each holds its own identity proof; one anti-entropy round evens that out.
        with trio.fail_after(10):
            result = await svc_req.sync_with(ex.peer_id)
        assert result.fetched + result.pushed >= 1
        assert svc_req.state_hash() == svc_ex.state_hash()
    for name in ("req", "ex0"):
        assert verify_snapshot(read_snapshot(tmp_path / name / "ledger")).ok


def test_committee_rule_from_config() -> None:
    boot = "/ip4/127.0.0.1/tcp/4001/p2p/" + pid(key(1))
    rule = committee_rule_from_config(Config(bootstrap=(boot,)))
    assert rule.fallback == frozenset({pid(key(1))}) and rule.f == 1
    explicit = Config(ledger_witnesses=(pid(key(2)), pid(key(3))), ledger_f=0)
    assert committee_rule_from_config(explicit).fallback == {pid(key(2)), pid(key(3))}
    try:
        committee_rule_from_config(Config())
    except SettlementError as exc:
        assert "no ledger witnesses" in str(exc)
    else:
        raise AssertionError("a network without witnesses must be refused")


async def test_open_peer_settlement_from_config(tmp_path: Path) -> None:
    witnesses = tuple(pid(k) for k in WITNESS_KEYS)
    cfg = Config(
        data_dir=tmp_path / "p",
        listen=("/ip4/127.0.0.1/tcp/0",),
        ledger_witnesses=witnesses,
        ledger_base_limit=5.0,
        ledger_sync_interval=0.0,
        ledger_pow_bits=8,
    )
    async with (
        open_peer(cfg, key=key(7), hardware=FakeHardware(), settlement=False) as peer,
        open_peer_settlement(peer, cfg) as svc,
    ):
        assert svc is not None
        assert svc.ledger.policy.base_limit == 5_000_000
        assert svc.ledger.rule.fallback == frozenset(witnesses)
        assert svc.ledger.has_identity(peer.peer_id)  # proved its identity at start
        assert svc.ledger.policy.pow_bits == 8 and svc.genesis is not None
    assert svc.genesis is not None
    assert read_snapshot(network_dir(tmp_path / "p", svc.genesis)).rule is not None
    lone = Config(data_dir=tmp_path / "lone", listen=("/ip4/127.0.0.1/tcp/0",))
    async with (
        open_peer(lone, key=key(8), hardware=FakeHardware(), settlement=False) as peer,
        open_peer_settlement(peer, lone, optional=True) as svc,
    ):
        assert svc is None
