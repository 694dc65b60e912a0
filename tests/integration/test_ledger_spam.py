"""Growing someone else's ledger is not free: pushed facts are budgeted per peer and kept only
when this peer has a reason to hold them; gossip carries only network-wide facts that verify."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

import psutil
import trio
from settlement_helpers import key, make_receipt, pid, policy, rule_for, settlement_node

from peer.settlement import SettlementConfig, SettlementError
from peer.settlement.budget import PeerBudget
from peer.settlement.fact_sync import FACT_BUDGET_BURST, FACT_BUDGET_RATE
from protocols.codec import decode, encode
from protocols.ledger_rpc import Push, PushReply
from protocols.ledger_state import FactKind, encode_item

WITNESSES = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESSES)
POLICY = policy()
VICTIM, ATTACKER = key(7001), key(7002)
TOTAL = 100_000
VALID_EVERY = 50  # 2 000 properly signed receipts among the 100 000


def _forge(template: bytes, n: int) -> bytes:
    """A receipt that parses (throwaway keys, fresh id) but whose acceptance signature is
    random: as cheap to make as it is for the spammer."""
    outer = decode(template, max_size=4096)
    acceptance = decode(outer["a"], max_size=4096)
    acceptance["s"] = n.to_bytes(8, "big") + os.urandom(56)
    outer["a"] = encode(acceptance)
    return encode(outer)


def _spam() -> list[bytes]:
    items: list[bytes] = []
    template = make_receipt(key(9000), key(9001), 1, 0).to_bytes()
    for n in range(TOTAL):
        if n % VALID_EVERY == 0:  # genuinely signed, between two fresh keys
            a, b = key(10_000 + n), key(20_000_000 + n)
            data = make_receipt(a, b, 1, n).to_bytes()
        else:
            data = _forge(template, n)
        items.append(encode_item(FactKind.RECEIPT, data))
    return items


async def test_a_peer_pushing_100k_facts_between_throwaway_keys_stays_bounded(
    tmp_path: Path,
) -> None:
    spam = _spam()
    config = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(
            settlement_node(tmp_path / "victim", VICTIM, RULE, POLICY, config)
        )
        attacker = await stack.enter_async_context(
            settlement_node(tmp_path / "attacker", ATTACKER, RULE, POLICY, config)
        )
        await attacker.peer.connect(victim.addr)
        # The default budget, on a clock that stands still: the burst and no refill, so
        # the outcome does not depend on how fast this box pushes.
        victim.svc.fact_sync.budget = PeerBudget(
            FACT_BUDGET_RATE, FACT_BUDGET_BURST, clock=lambda: 0.0
        )
        facts_before = len(victim.svc.ledger)
        rss_before = psutil.Process().memory_info().rss
        refused_frames = 0
        bad = 0
        with trio.fail_after(300):
            for i in range(0, TOTAL, 512):
                try:
                    reply = await attacker.svc.client.call(
                        victim.id, Push(tuple(spam[i : i + 512])), PushReply
                    )
                    bad += reply.bad
                    assert reply.new == 0
                except SettlementError as exc:
                    assert "over budget" in str(exc)
                    refused_frames += 1
        # Nothing stuck: not the valid receipts (strangers' business), not the forgeries.
        # The one new fact is the attacker's identity proof (its client introduces itself).
        assert victim.svc.ledger.identity_proof(attacker.id) is not None
        assert len(victim.svc.ledger) == facts_before + 1
        assert victim.svc.stats.pushed_in == 1
        taken = int(FACT_BUDGET_BURST) // 512  # whole frames within the burst
        assert refused_frames == -(-TOTAL // 512) - taken
        assert bad == taken * 512  # every frame within budget parsed, every item refused
        # The victim held at most a frame of spam at a time (the spam list itself lives in
        # this process too, ~100 MB of it allocated before rss_before was taken).
        grown_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
        assert grown_mb < 40, grown_mb
        # ... and goes on: a receipt it is party to is taken from the same peer's push once
        # its budget refills, and its store still writes.
        own = make_receipt(ATTACKER, VICTIM, 5, 1)
        victim.svc.fact_sync.budget = PeerBudget(1000, 1000)  # a fresh budget, not a wait
        assert await attacker.svc.push(victim.id, [(FactKind.RECEIPT, own.to_bytes())]) == 1
        assert victim.svc.ledger.has(own.receipt_id)


def test_budget_refills_at_its_rate_and_refuses_without_spending() -> None:
    now = [0.0]
    budget = PeerBudget(rate=10, burst=20, clock=lambda: now[0])
    assert budget.take("a", 20)
    assert not budget.take("a", 1)  # empty
    assert budget.take("b", 5)  # per peer
    now[0] = 0.5
    assert not budget.take("a", 6)  # 5 refilled, 6 asked: refused, nothing spent
    assert budget.take("a", 5)
    assert budget.refused == 2


async def test_gossip_validator_passes_only_network_wide_facts_that_verify(
    tmp_path: Path,
) -> None:
    from settlement_helpers import certify_offline, make_transfer

    from protocols.proofs import EquivocationProof

    config = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)
    payer = key(7100)
    pol = policy(genesis=frozenset({pid(payer)}))
    r = make_receipt(payer, key(7101), 10, 1)
    cert = certify_offline(WITNESSES, RULE, pol, make_transfer(payer, r, 1), r)
    proof = EquivocationProof.of(make_transfer(payer, r, 2), make_transfer(payer, r, 2, time_ms=1))

    class Msg:
        def __init__(self, data: bytes) -> None:
            self.data = data

    async with settlement_node(tmp_path / "v", VICTIM, RULE, pol, config) as node:
        validate = node.svc.fact_sync.validate_gossip
        held = len(node.svc.ledger)  # its own identity proof
        ok = [
            validate("peer-a", Msg(encode_item(FactKind.CERTIFICATE, cert.to_bytes()))),
            validate("peer-a", Msg(encode_item(FactKind.EQUIVOCATION_PROOF, proof.to_bytes()))),
        ]
        assert ok == [True, True]
        forged = bytearray(cert.to_bytes())
        forged[-5] ^= 1
        refused = [
            # a receipt is not a network-wide fact (it goes to the payer's committee)
            validate("peer-a", Msg(encode_item(FactKind.RECEIPT, r.to_bytes()))),
            validate("peer-a", Msg(encode_item(FactKind.CERTIFICATE, bytes(forged)))),
            validate("peer-a", Msg(b"\xff" * 40)),
        ]
        assert refused == [False, False, False]
        assert node.svc.stats.gossip_rejected == 3
        # The forwarder's budget bounds what it can make us verify.
        node.svc.fact_sync.budget = PeerBudget(rate=1, burst=2, clock=lambda: 0.0)
        item = Msg(encode_item(FactKind.CERTIFICATE, cert.to_bytes()))
        assert [validate("peer-b", item) for _ in range(3)] == [True, True, False]
        assert len(node.svc.ledger) == held  # validating stores nothing
