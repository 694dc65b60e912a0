"""Spot checks end to end: a byzantine executor is caught, proven wrong by referees, loses its
escrowed payouts on every ledger and its later bids are ignored; checks run at the set rate.

Swarm (real hosts on 127.0.0.1, one trio process, all through ``open_peer`` so the market and
settlement are wired as in production): a bootstrap node, a requester, a cheater that serves
the tiny add model but adds 1.0 to its outputs and bids cheapest, four honest executors that
are the ledger witnesses (so the referee panels, ``protocols.proofs.referee_panel``, are drawn
from them) and a fifth honest executor that is not a witness (so a spot check always finds
an executor off the job's panel).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio
from market_swarm import FakeHardware, add_tiny_model
from settlement_helpers import key, pid

from bootstrap.node import open_bootstrap
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer.config import Config
from peer.market.referee import SpotChecks
from peer.node import Peer, open_peer
from protocols.verification import should_spot_check

HONEST = [key(700 + i) for i in range(5)]  # the first four are the ledger witnesses
CHEATER, REQUESTER = key(710), key(711)
WITNESSES = tuple(pid(k) for k in HONEST[:4])
BID_WINDOW = 0.5  # every bid makes the window even on a loaded 2-core box


class NoisyRuntime:
    """A ModelRuntime that serves the model but returns perturbed outputs."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.inner = runtime
        self.registry = runtime.registry
        self.limits = runtime.limits

    def load(self, ref: str, **kw: Any) -> Any:
        return self.inner.load(ref, **kw)

    def run(self, ref: str, inputs: Any, *, timeout: float | None = None) -> Any:
        out = self.inner.run(ref, inputs, timeout=timeout)
        return {name: (a + 1.0).astype(a.dtype) for name, a in out.items()}

    def close(self) -> None:
        self.inner.close()


def config(tmp_path: Path, name: str, boot: str = "", **kw: Any) -> Config:
    return Config(
        data_dir=tmp_path / name,
        listen=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=(boot,) if boot else (),
        ledger_witnesses=WITNESSES,
        ledger_pow_bits=8,  # a cheap test genesis (the default costs a CPU-minute)
        ledger_base_limit=100.0,  # the requester pays for many jobs before it earns
        ledger_sync_interval=0.5,
        bid_window=BID_WINDOW,
        job_timeout=20.0,
        **kw,
    )


@dataclass
class Swarm:
    boot: Peer
    requester: Peer
    cheater: Peer
    honest: list[Peer]

    @property
    def ledgers(self) -> list[Peer]:
        return [self.boot, self.requester, self.cheater, *self.honest]


@asynccontextmanager
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_bootstrap(config(tmp_path, "boot")))
        addr = boot.listen_addrs[0]

        async def executor(name: str, k: Any, price: float, noisy: bool = False) -> Peer:
            add_tiny_model(tmp_path / name)
            runtime = ModelRuntime(Registry(tmp_path / name / "models"), p50_runs=3)
            stack.callback(runtime.close)
            served: Any = NoisyRuntime(runtime) if noisy else runtime
            return await stack.enter_async_context(
                open_peer(
                    config(tmp_path, name, addr, price=price),
                    key=k,
                    hardware=FakeHardware(),
                    runtime=served,
                )
            )

        honest = [await executor(f"h{i}", k, 1.0) for i, k in enumerate(HONEST)]
        cheater = await executor("cheater", CHEATER, 0.5, noisy=True)
        requester = await stack.enter_async_context(
            open_peer(config(tmp_path, "req", addr), key=REQUESTER, hardware=FakeHardware())
        )
        s = Swarm(boot, requester, cheater, honest)
        assert all(p.settlement is not None for p in s.ledgers)
        yield s


async def wait_providers(peer: Peer, cid: str, n: int, limit: float = 20.0) -> None:
    """Until ``peer`` finds ``n`` providers of ``cid`` in the DHT (real queries, bounded)."""
    with trio.fail_after(limit):
        for _ in range(1000):
            if len({p.peer_id for p in await peer.find_providers(cid)}) >= n:
                return
            await trio.sleep(0.2)  # DHT lookups: there is no event to wait on


async def wait_all(what: str, peers: list[Peer], predicate: Any, limit: float = 30.0) -> None:
    try:
        with trio.fail_after(limit):
            for p in peers:
                assert p.settlement is not None
                await p.settlement.wait_until(lambda p=p: predicate(p))
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {limit} s waiting for {what}") from None


async def test_cheater_is_caught_loses_its_payouts_and_is_ignored(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        req, cheater = s.requester, s.cheater
        cheater_id = cheater.peer_id
        assert req.market is not None and cheater.market is not None
        cid = next(iter(cheater.market.served))
        await wait_providers(req, cid, 6)
        x = np.arange(4, dtype=np.float32)

        # 1. The cheapest bid (the cheater's) wins; the spot check (p = 1) disagrees, the
        #    referees prove the cheater wrong and the honest result comes back.
        with trio.fail_after(60):
            result = await req.infer("tiny_add", {"x": x, "y": x}, spot_check=1.0, deadline=20)
        np.testing.assert_array_equal(result.outputs["z"], 2 * x)
        assert result.executor != cheater_id and result.executor in {p.peer_id for p in s.honest}
        assert [p.offender for p in result.fraud_proofs] == [cheater_id]
        assert result.spot_check is not None and "proved" in result.spot_check
        proof = result.fraud_proofs[0]
        assert proof.commitment.message.executor == cheater_id
        judged_by = {r.message.referee for r in proof.results}
        assert judged_by <= set(WITNESSES) and len(judged_by) >= 2
        assert req.market.spot_checks.checked == 1

        # 2. The proof reaches every ledger; the cheater's payout (0.5 credit, in escrow) is
        #    reversed there and it is banned; the honest checker keeps its pay.
        await wait_all(
            "every ledger to ban the cheater and reverse its payout",
            s.ledgers,
            lambda p: (
                p.settlement.ledger.is_banned(cheater_id)
                and p.settlement.ledger.forfeited().get(cheater_id) == 500_000
                and p.settlement.ledger.balance(result.executor) == 1_000_000
            ),
        )
        for p in s.ledgers:
            assert p.settlement is not None
            assert p.settlement.ledger.balance(cheater_id) == 0
            assert p.settlement.ledger.balance(req.peer_id) == -1_000_000

        # 3. Its later bids are ignored, although it keeps bidding cheapest.
        assert cheater.market.executor is not None
        bids_before = cheater.market.executor.stats["bids"]
        for i in range(3):
            with trio.fail_after(30):
                later = await req.infer("tiny_add", {"x": x, "y": x + i}, deadline=20)
            assert later.executor != cheater_id
            np.testing.assert_array_equal(later.outputs["z"], 2 * x + i)
        assert cheater.market.executor.stats["bids"] > bids_before
        assert cheater.market.executor.stats["awards"] == 1

        # 4. Spot checks run at the configured rate: with a seeded source, exactly the draws
        #    below p are checked (honest executors agree every time).
        p, n, seed = 0.3, 10, 1234
        req.market.spot_checks = SpotChecks(random.Random(seed))
        replay = random.Random(seed)
        expected = sum(replay.random() < p for _ in range(n))
        checked = 0
        for i in range(n):
            with trio.fail_after(60):
                r = await req.infer("tiny_add", {"x": x, "y": x * i}, spot_check=p, deadline=20)
            assert r.executor != cheater_id
            if r.spot_check is not None:
                assert r.spot_check == "agree", r.spot_check
                checked += 1
        assert checked == expected == req.market.spot_checks.checked
        assert req.market.spot_checks.asked == n


def test_spot_check_rate_within_binomial_tolerance() -> None:
    """The requester's decision (``SpotChecks.want``) over many seeded draws: the count of
    checks is within 4 standard deviations of n*p, for several p."""
    n = 20_000
    for p, seed in ((0.05, 1), (0.2, 2), (0.5, 3), (0.9, 4)):
        checks = SpotChecks(random.Random(seed))
        hits = sum(checks.want(p) for _ in range(n))
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(hits - n * p) <= 4 * sd, (p, hits)
        assert checks.checked == hits and checks.asked == n
    # p = 0 never checks, p = 1 always does, and a lease's first job always is.
    never, always = SpotChecks(random.Random(5)), SpotChecks(random.Random(6))
    assert not any(never.want(0.0) for _ in range(1000))
    assert all(always.want(1.0) for _ in range(1000))
    assert all(never.want(0.0, first_lease_job=True) for _ in range(100))
    assert should_spot_check(0.05, 0.9999, is_first_lease_job=True)


async def test_lease_first_job_is_checked_and_a_cheating_holder_is_proven(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        req, cheater = s.requester, s.cheater
        cheater_id = cheater.peer_id
        assert req.market is not None and cheater.market is not None
        cid = next(iter(cheater.market.served))
        await wait_providers(req, cid, 6)
        x = np.arange(4, dtype=np.float32)
        with trio.fail_after(90):
            async with req.lease("tiny_add", max_jobs=10, seconds=30, spot_check=0.0) as lease:
                # The cheater holds the lease (cheapest); its first job is always checked.
                first = await lease.infer({"x": x, "y": x})
                np.testing.assert_array_equal(first["z"], 2 * x)  # the honest result
                assert [p.offender for p in lease.fraud_proofs] == [cheater_id]
                proof = lease.fraud_proofs[0]
                assert proof.commitment.message.count == 1  # its batch, closed at once
                # The next job goes to a new, honest holder (checked too: a new batch).
                second = await lease.infer({"x": x, "y": 3 * x})
                np.testing.assert_array_equal(second["z"], 4 * x)
                assert lease.executor not in (None, cheater_id)
        assert lease.spot_checks[0].endswith(f"referees proved {cheater_id} wrong")
        assert lease.spot_checks[1:] == ["agree"]
        await wait_all(
            "every ledger to ban the cheater and reverse its lease payout",
            s.ledgers,
            lambda p: (
                p.settlement.ledger.is_banned(cheater_id)
                and p.settlement.ledger.forfeited().get(cheater_id) == 500_000
            ),
        )
