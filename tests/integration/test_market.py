"""The job market over real libp2p hosts on 127.0.0.1 (one trio process, tiny ONNX models)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from market_swarm import Node, market_swarm

from edge_models.runtime import ModelRuntime
from peer.job_stream import JOB_PROTOCOL
from peer.market import ExecutorsFailed, MarketSettings, NoExecutors, UnknownModel
from peer.market.gossip import topic_for
from peer.market.jobspec import JobSpec
from peer.market.requester import new_request
from protocols.codec import encode_uvarint
from protocols.market import BID_DOMAIN, Bid
from protocols.requester import RequesterPolicy
from protocols.signed import sign_message
from protocols.signing import seal
from protocols.tensor import TensorLimits, encode_tensors


async def test_request_bids_award_result_and_both_hold_the_receipt(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", price=2.0)
        req = await swarm.start("req", serve=False)
        x = np.arange(4, dtype=np.float32)
        y = np.ones(4, dtype=np.float32)
        with trio.fail_after(30):
            result = await req.market.infer("tiny_add", {"x": x, "y": y}, deadline=20)
            await ex.market.receipts.wait_for(1)
        np.testing.assert_array_equal(result.outputs["z"], x + y)
        assert result.executor == ex.peer_id
        assert result.price == 2_000_000
        result.receipt.verify()
        assert ex.market.receipts.receipts[-1] == result.receipt
        assert list(req.market.receipts.receipts) == [result.receipt]


# Where the test needs a particular winner, every bid must make the window even on a
# loaded 2-core CI box.
WINNER_WINDOW = 0.5


async def wait_providers(node: Node, cid: str, n: int, limit: float = 15.0) -> None:
    """Until ``node`` finds ``n`` providers of ``cid`` in the DHT (real queries, bounded)."""
    with trio.fail_after(limit):
        while True:
            if len({p.peer_id for p in await node.peer.find_providers(cid)}) >= n:
                return
            await trio.sleep(0.2)


async def test_three_executors_cheapest_that_meets_the_deadline_wins(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        prices = {"ex0": 3.0, "ex1": 1.5, "ex2": 2.0}
        nodes = {n: await swarm.start(n, price=p) for n, p in prices.items()}
        req = await swarm.start("req", serve=False)
        cid = next(iter(nodes["ex0"].market.served))
        await wait_providers(req, cid, 3)
        x = np.ones(3, dtype=np.float32)
        with trio.fail_after(30):
            first = await req.market.infer(
                cid, {"x": x, "y": x}, deadline=20, bid_window=WINNER_WINDOW
            )
            second = await req.market.infer(
                "tiny_add", {"x": x, "y": 2 * x}, deadline=20, bid_window=WINNER_WINDOW
            )
        for result in (first, second):
            assert result.executor == nodes["ex1"].peer_id
            assert result.price == 1_500_000
        np.testing.assert_array_equal(second.outputs["z"], 3 * x)
        # Every executor bid on both jobs: bids are public.
        assert all(n.market.executor.stats["bids"] >= 2 for n in nodes.values())


class BlockingRuntime:
    """A ModelRuntime whose runs block (in the worker thread) until released."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.inner = runtime
        self.registry = runtime.registry
        self.limits = runtime.limits
        self.release = threading.Event()
        self.started = trio.Event()

    def load(self, ref: str, **kw: Any) -> Any:
        return self.inner.load(ref, **kw)

    def run(self, ref: str, inputs: Any, *, timeout: float | None = None) -> Any:
        trio.from_thread.run_sync(self.started.set)
        self.release.wait(timeout=30)
        return self.inner.run(ref, inputs, timeout=timeout)

    def close(self) -> None:
        self.release.set()


async def test_executor_killed_mid_job_the_job_completes_elsewhere(tmp_path: Path) -> None:
    blocking: list[BlockingRuntime] = []

    def wrap(rt: ModelRuntime) -> BlockingRuntime:
        blocking.append(BlockingRuntime(rt))
        return blocking[-1]

    async with market_swarm(tmp_path) as swarm:
        try:
            cheap = await swarm.start("cheap", price=1.0, wrap_runtime=wrap)
            fair = await swarm.start("fair", price=3.0)
            req = await swarm.start("req", serve=False)
            cid = next(iter(fair.market.served))
            await wait_providers(req, cid, 2)
            x = np.arange(5, dtype=np.float32)
            results: list[Any] = []

            async def ask() -> None:
                results.append(
                    await req.market.infer(
                        cid, {"x": x, "y": x}, deadline=20, bid_window=WINNER_WINDOW
                    )
                )

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    await blocking[0].started.wait()  # the cheap one won and is running it
                    await swarm.kill("cheap")
            (result,) = results
            assert result.executor == fair.peer_id
            np.testing.assert_array_equal(result.outputs["z"], 2 * x)
            assert [ex for ex, _ in result.attempts] == [cheap.peer_id]
            assert len(req.market.receipts.receipts) == 1  # never paid twice
        finally:
            for b in blocking:
                b.release.set()


async def test_model_nobody_serves_fails_with_no_executors_before_the_deadline(
    tmp_path: Path,
) -> None:
    async with market_swarm(tmp_path) as swarm:
        await swarm.start("ex0")
        req = await swarm.start("req", serve=False)
        cid = "ab" * 32
        x = np.ones(2, dtype=np.float32)
        t0 = time.time()
        with trio.fail_after(10), pytest.raises(NoExecutors) as info:
            await req.market.infer(cid, {"x": x}, deadline=5)
        assert time.time() - t0 < 5
        assert cid in str(info.value) and "within" in str(info.value)
        with trio.fail_after(10), pytest.raises(UnknownModel, match="no peer serves a model named"):
            await req.market.infer("no_such_model", {"x": x}, deadline=5)


async def test_oversize_input_is_refused_and_the_executor_keeps_serving(tmp_path: Path) -> None:
    small = MarketSettings(
        bid_window=0.15, job_timeout=20.0, limits=TensorLimits(max_total_bytes=4096)
    )
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", settings=small)
        req = await swarm.start("req", serve=False)
        cid = next(iter(ex.market.served))
        await wait_providers(req, cid, 1)
        market = req.market
        tiny = encode_tensors({"x": np.ones(2, np.float32), "y": np.ones(2, np.float32)})

        async def lying_job(payload: Any) -> str:
            """A request that declares ``tiny`` inputs, then sends ``payload``."""
            until = time.time() + 10
            await market.auctions.prepare(cid, until)
            request = new_request(
                requester=market.peer_id,
                cid=cid,
                wire=tiny,
                max_price=10**7,
                deadline=until,
                bid_window=0.15,
            )
            spec = JobSpec(cid, None, max_price=10**7, until=until, bid_window=0.15)
            run = market.auctions.new_run(spec, request, single_input=payload)
            with pytest.raises(ExecutorsFailed) as info:
                await run.run()
            return str(info.value)

        huge = encode_tensors({"x": np.ones(40_000, np.float32), "y": np.ones(40_000, np.float32)})
        over = encode_tensors({"x": np.ones(800, np.float32), "y": np.ones(800, np.float32)})
        with trio.fail_after(30):
            why = await lying_job(huge)
            assert "bad-input" in why and "refused" in why and "cap" in why
            why = await lying_job(over)
            assert "bad-input" in why and "4096 bytes" in why
            # Without an award, even the announcement of a big frame ends the stream.
            raw = await req.peer.host.new_stream(ID.from_base58(ex.peer_id), [JOB_PROTOCOL])
            await raw.write(encode_uvarint(50_000_000) + b"\0" * 1000)
            with pytest.raises((StreamError, EOFError)):  # EOF or reset: the executor hung up
                for _ in range(10):
                    if not await raw.read(1024):
                        raise EOFError
            await raw.reset()
            # A stream that never sends its award is dropped after award_wait_s.
            ex.market.executor.award_wait_s = 0.2
            silent = await req.peer.host.new_stream(ID.from_base58(ex.peer_id), [JOB_PROTOCOL])
            with pytest.raises((StreamError, EOFError)):
                for _ in range(10):
                    if not await silent.read(1024):
                        raise EOFError
            await silent.reset()
            x = np.ones(2, np.float32)
            result = await market.infer(cid, {"x": x, "y": x}, deadline=20)
        assert result.executor == ex.peer_id
        np.testing.assert_array_equal(result.outputs["z"], 2 * x)


async def test_forged_bids_are_dropped_by_the_validator(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        req = await swarm.start("req", serve=False)
        rogue = await swarm.start("rogue", serve=False)
        cid = next(iter(ex.market.served))
        topic = topic_for(cid)
        await req.market.gossip.join(cid)
        await rogue.market.gossip.join(cid)
        await rogue.peer.connect(req.peer.listen_addrs[0])
        with trio.fail_after(10):
            await rogue.peer.pubsub.wait_for_mesh(ID.from_base58(req.peer_id), topic, timeout=10)
        # The rogue skips its own validator so its forgeries leave it.
        rogue.peer.pubsub.remove_topic_validator(topic)
        job_id = b"\x07" * 16
        got: list[Bid] = []
        delivered = trio.Event()

        def sink(bid: Bid) -> None:
            got.append(bid)
            delivered.set()

        req.market.gossip.bid_sinks[job_id] = sink
        now = time.time()
        bid = Bid(job_id=job_id, executor=ex.peer_id, price=1, eta_ms=5, expires_at=now + 5)
        # 1: claims to be ex's bid but is signed with the rogue's key.
        forged = seal(rogue.peer.key, BID_DOMAIN, bid.to_body()).to_bytes()
        # 2: ex's genuinely signed bid, replayed by the rogue (signer is not the origin).
        replayed = sign_message(ex.peer.key, bid).to_bytes()
        # 3: the rogue's own bid with one bit of the signature flipped.
        own = Bid(job_id=job_id, executor=rogue.peer_id, price=1, eta_ms=5, expires_at=now + 5)
        flipped = bytearray(sign_message(rogue.peer.key, own).to_bytes())
        flipped[-3] ^= 0x01
        guard = req.market.gossip.guard
        before = guard.stats.total_dropped
        for data in (forged, replayed, bytes(flipped), b"\xa0garbage"):
            await rogue.peer.pubsub.publish(topic, data)
        with trio.fail_after(10):
            await guard.stats.wait_dropped(before + 4)
        # A genuine bid from the same sender still goes through, and only it.
        await rogue.peer.pubsub.publish(topic, sign_message(rogue.peer.key, own).to_bytes())
        with trio.fail_after(10):
            await delivered.wait()
        assert got == [own]
        assert guard.stats.dropped.get("signer-not-origin", 0) >= 1  # the replay
        assert guard.stats.dropped.get("SignatureError", 0) >= 1  # the forgery


async def test_a_lease_runs_1000_jobs_for_one_batch_receipt(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", price=0.5)
        req = await swarm.start("req", serve=False)
        cid = next(iter(ex.market.served))
        await wait_providers(req, cid, 1)
        n = 1000
        with trio.fail_after(90):
            async with req.market.lease(cid, max_jobs=n, seconds=60) as lease:

                async def worker(k: int) -> None:
                    for i in range(k, n, 4):
                        x = np.full(3, i, dtype=np.float32)
                        out = await lease.infer({"x": x, "y": x})
                        assert out["z"][0] == 2 * i

                async with trio.open_nursery() as nursery:
                    for k in range(4):
                        nursery.start_soon(worker, k)
            await ex.market.receipts.wait_for(1)
        (receipt,) = lease.receipts
        receipt.verify()
        assert (receipt.count, receipt.price, receipt.executor) == (n, n * 500_000, ex.peer_id)
        assert list(ex.market.receipts.receipts) == [receipt]


async def test_a_lease_fails_over_when_its_executor_goes_away(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        cheap = await swarm.start("cheap", price=1.0)
        fair = await swarm.start("fair", price=2.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(fair.market.served))
        await wait_providers(req, cid, 2)
        with trio.fail_after(60):
            async with req.market.lease(
                cid, max_jobs=100, seconds=30, bid_window=WINNER_WINDOW
            ) as lease:
                for i in range(5):
                    x = np.full(2, i, dtype=np.float32)
                    assert (await lease.infer({"x": x, "y": x}))["z"][0] == 2 * i
                assert lease.executor == cheap.peer_id
                await swarm.kill("cheap")
                for i in range(5, 10):
                    x = np.full(2, i, dtype=np.float32)
                    assert (await lease.infer({"x": x, "y": x}))["z"][0] == 2 * i
                assert lease.executor == fair.peer_id
            await fair.market.receipts.wait_for(1)
        # The gone executor's batch was never committed, so it is not paid; the new one is.
        (receipt,) = lease.receipts
        assert (receipt.executor, receipt.count, receipt.price) == (fair.peer_id, 5, 5 * 2_000_000)
        assert lease.jobs_done == 10


async def test_spot_check_runs_the_job_on_a_second_executor(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        a = await swarm.start("a", price=1.0)
        b = await swarm.start("b", price=2.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(a.market.served))
        await wait_providers(req, cid, 2)
        x = np.linspace(0, 1, 8, dtype=np.float32)
        with trio.fail_after(30):
            result = await req.market.infer(
                cid, {"x": x, "y": x}, deadline=20, bid_window=WINNER_WINDOW, spot_check=1.0
            )
        assert result.executor == a.peer_id
        assert result.spot_check == "agree"
        # Both runs are paid: one receipt each, to different executors.
        assert {r.executor for r in req.market.receipts.receipts} == {a.peer_id, b.peer_id}


async def test_a_used_up_lease_batch_is_renewed_transparently(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", price=1.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(ex.market.served))
        await wait_providers(req, cid, 1)
        with trio.fail_after(60):
            async with req.market.lease(cid, max_jobs=3, seconds=30) as lease:
                for i in range(7):
                    x = np.full(2, i, dtype=np.float32)
                    assert (await lease.infer({"x": x, "y": x}))["z"][0] == 2 * i
            await ex.market.receipts.wait_for(3)
        assert sorted(r.count for r in lease.receipts) == [1, 3, 3]
        assert len({r.job_id for r in lease.receipts}) == 3


async def test_an_executor_past_its_eta_is_dropped_for_the_next_bidder(tmp_path: Path) -> None:
    blocking: list[BlockingRuntime] = []

    def wrap(rt: ModelRuntime) -> BlockingRuntime:
        blocking.append(BlockingRuntime(rt))
        return blocking[-1]

    async with market_swarm(tmp_path) as swarm:
        try:
            stuck = await swarm.start("stuck", price=1.0, wrap_runtime=wrap)
            fair = await swarm.start("fair", price=3.0)
            req = await swarm.start("req", serve=False)
            cid = next(iter(fair.market.served))
            await wait_providers(req, cid, 2)
            x = np.arange(3, dtype=np.float32)
            with trio.fail_after(30):
                result = await req.market.infer(
                    cid, {"x": x, "y": x}, deadline=20, bid_window=WINNER_WINDOW
                )
            assert result.executor == fair.peer_id
            ((who, why),) = result.attempts
            assert who == stuck.peer_id and "no result" in why
            assert blocking[0].started.is_set()
            # The stuck executor is never paid, even if it finishes later.
            blocking[0].release.set()
            assert [r.executor for r in req.market.receipts.receipts] == [fair.peer_id]
        finally:
            for b in blocking:
                b.release.set()


async def test_concurrent_jobs_from_one_requester_each_get_one_receipt(tmp_path: Path) -> None:
    # About receipts, not fail-over: on a loaded box 8 jobs at once can keep an executor
    # past eta x 2 + 1 s, so the requester waits longer before moving on.
    patient = MarketSettings(
        bid_window=0.15, job_timeout=20.0, policy=RequesterPolicy(grace_s=10.0)
    )
    async with market_swarm(tmp_path, settings=patient) as swarm:
        a = await swarm.start("a", price=1.0)
        b = await swarm.start("b", price=1.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(a.market.served))
        await wait_providers(req, cid, 2)
        outputs: dict[int, Any] = {}

        async def job(i: int) -> None:
            x = np.full(3, i, dtype=np.float32)
            # A long window is only the fallback: the auction closes when both servers bid
            # (under load, bids can take hundreds of ms to come back).
            result = await req.market.infer(cid, {"x": x, "y": x}, deadline=20, bid_window=3.0)
            outputs[i] = result.outputs

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(job, i)
        assert {i: float(o["z"][0]) for i, o in outputs.items()} == {i: 2.0 * i for i in range(8)}
        receipts = list(req.market.receipts.receipts)
        assert len(receipts) == 8 and len({r.job_id for r in receipts}) == 8
        assert {r.executor for r in receipts} <= {a.peer_id, b.peer_id}


async def test_no_bid_under_the_max_price_says_why(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", price=5.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(ex.market.served))
        await wait_providers(req, cid, 1)
        x = np.ones(2, dtype=np.float32)
        with trio.fail_after(20), pytest.raises(NoExecutors) as info:
            await req.market.infer(cid, {"x": x, "y": x}, max_price=1.0, deadline=5)
        assert "max price (1 credits)" in str(info.value)
        assert ex.market.executor.stats["bids"] == 0


async def test_an_auction_closes_when_every_expected_server_has_bid(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        a = await swarm.start("a", price=2.0)
        b = await swarm.start("b", price=1.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(a.market.served))
        await wait_providers(req, cid, 2)
        x = np.ones(2, dtype=np.float32)
        with trio.fail_after(30):
            await req.market.infer(cid, {"x": x, "y": x}, deadline=25, bid_window=10.0)
            assert req.market.auctions.expected_bidders(cid) == {a.peer_id, b.peer_id}
            # Auction streams to both servers (opened in the background after the lookup).
            direct = req.market.auctions.direct
            await direct.wait_linked({a.peer_id, b.peer_id})
            sent, bids = direct.sent, [n.market.executor.stats["bids_direct"] for n in (a, b)]
            t0 = trio.current_time()
            result = await req.market.infer(cid, {"x": x, "y": x}, deadline=25, bid_window=10.0)
            took = trio.current_time() - t0
        # Both servers bid, so the 10 s window closed early; the cheaper one still won.
        assert took < 5.0
        assert result.executor == b.peer_id
        # The request went straight to both, and both bids came back on those streams
        # (each bid once: the gossip copy of the request was not bid on again).
        assert direct.sent == sent + 2
        assert [n.market.executor.stats["bids_direct"] for n in (a, b)] == [c + 1 for c in bids]
        assert [n.market.executor.stats["bids"] for n in (a, b)] == [2, 2]
