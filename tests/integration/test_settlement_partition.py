"""Two partitions trade separately, heal, and converge to one state hash by anti-entropy."""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from pathlib import Path

import nacl.signing
from settlement_helpers import (
    BEACON,
    Node,
    connect_all,
    key,
    make_receipt,
    pid,
    policy,
    settlement_node,
    wait_for,
)

from peer.ledger_store import read_snapshot, verify_snapshot
from peer.settlement import SettlementConfig
from protocols.committee import CommitteeRule


def _top_bit(k: nacl.signing.SigningKey) -> int:
    return hashlib.sha256(pid(k).encode()).digest()[0] >> 7


# Witnesses split by the top bit of their XOR-metric key: a committee target with top bit 0
# is closer to all of side A than to any of side B, so some accounts are witnessed by A only.
_CANDIDATES = [key(200 + i) for i in range(40)]
SIDE_A = [k for k in _CANDIDATES if _top_bit(k) == 0][:4]
SIDE_B = [k for k in _CANDIDATES if _top_bit(k) == 1][:4]
# A pool of 8 witnesses, f = 1: each account's committee is the 4 closest to it.
RULE = CommitteeRule(beacon=BEACON, pool=frozenset(pid(k) for k in SIDE_A + SIDE_B), f=1)
POLICY = policy(genesis=frozenset())


def payer_witnessed_by(side: list[nacl.signing.SigningKey], start: int) -> nacl.signing.SigningKey:
    """A key whose whole committee lies in ``side`` (about every second key)."""
    want = {pid(k) for k in side}
    for n in range(start, start + 200):
        k = key(n)
        if set(RULE.committee_for(pid(k)).members) == want:
            return k
    raise AssertionError("no such key in range")


async def test_partitions_trade_heal_and_converge(tmp_path: Path) -> None:
    payer_a, payer_b = payer_witnessed_by(SIDE_A, 10_000), payer_witnessed_by(SIDE_B, 50_000)
    config = SettlementConfig(sync_interval=0.2, gossip=True)
    async with AsyncExitStack() as stack:

        async def side(keys: list[nacl.signing.SigningKey], name: str) -> list[Node]:
            nodes = [
                await stack.enter_async_context(
                    settlement_node(tmp_path / f"{name}{i}", k, RULE, POLICY, config)
                )
                for i, k in enumerate(keys)
            ]
            await connect_all(nodes)
            return nodes

        a = await side([*SIDE_A, payer_a], "a")
        b = await side([*SIDE_B, payer_b], "b")
        # Each side trades on its own: its payer pays three of its witnesses.
        for nodes, payer_key, witnesses in ((a, payer_a, SIDE_A), (b, payer_b, SIDE_B)):
            for j, w in enumerate(witnesses[:3]):
                r = make_receipt(payer_key, w, 1000 * (j + 1), j + 100 * len(nodes))
                await nodes[j].svc.ingest_receipt(r)
                await nodes[-1].svc.ingest_receipt(r)
        for nodes, payer_key in ((a, payer_a), (b, payer_b)):
            await wait_for(
                "each payer to settle its side",
                lambda n, p=payer_key: n.svc.ledger.next_seq(pid(p)) == 4,
                nodes[-1:],
            )
        assert a[-1].svc.state_hash() != b[-1].svc.state_hash()
        union = set().union(*(set(n.svc.ledger.fact_ids()) for n in a + b))
        # Heal: one link between the sides; anti-entropy with random neighbours does the rest.
        await a[0].peer.connect(b[0].addr)
        everyone = a + b
        await wait_for(
            "every ledger to hold every fact",
            lambda n: set(n.svc.ledger.fact_ids()) >= union,
            everyone,
            limit=30,
        )
        hashes = {n.svc.state_hash() for n in everyone}
        assert len(hashes) == 1
        balances = everyone[0].svc.balances()
        assert balances[pid(payer_a)] == -6000 and balances[pid(payer_b)] == -6000
        assert all(n.svc.balances() == balances for n in everyone)
        assert sum(balances.values()) == 0
        assert sum(n.svc.stats.syncs for n in everyone) > 0
    for d in [tmp_path / f"{s}{i}" for s in "ab" for i in range(5)]:
        report = verify_snapshot(read_snapshot(d))
        assert report.ok, (d, report.problems)
