"""``peer/market`` on an in-memory host and trio's MockClock: no sockets, no real time.

The requester's auctions, job runs and leases and the executor's service run
for real; only libp2p (``tests/unit/market_memory.py``) and ONNX Runtime (a
doubling worker) are stood in for. Bid windows, etas and deadlines pass in
virtual time through the market's injected clock.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from peer.job_stream import JOB_PROTOCOL, FrameStream, JobStreamClosed
from peer.market.auction import Auctions, Bans
from peer.market.clock import Clock, trio_clock
from peer.market.executor import ExecutorService
from peer.market.jobspec import JobSpec
from peer.market.lease import Lease
from peer.market.receipts import ReceiptBook
from peer.market.referee import SpotChecks
from peer.market.requester import new_request, to_arrays
from peer.market.spot_check import SpotChecker
from protocols import requester as rq
from protocols.codec import frame
from protocols.market import Award, Bid, JobInput, JobResult, LeaseTerms
from protocols.receipt import Receipt
from protocols.signed import Signed, sign_message
from protocols.tensor import DEFAULT_LIMITS, encode_tensors
from tests.unit.market_memory import (
    DoublingWorker,
    MemoryDialer,
    MemoryGossip,
    MemoryNet,
    key,
    pid,
    start_executor,
)

CID = hashlib.sha256(b"doubler").hexdigest()
REQ_KEY = key(1)
REQ = pid(REQ_KEY)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@dataclass
class Market:
    net: MemoryNet
    gossip: MemoryGossip
    auctions: Auctions
    checker: SpotChecker
    receipts: ReceiptBook
    clock: Clock
    nursery: trio.Nursery

    async def executor(self, n: int, price: int, **kw: Any) -> ExecutorService:
        return await start_executor(
            self.nursery, self.net, self.gossip, n, cid=CID, price=price, clock=self.clock, **kw
        )

    def spec(self, *, seconds: float = 30.0, bid_window: float = 2.0) -> JobSpec:
        return JobSpec(
            CID, None, max_price=10_000, until=self.clock() + seconds, bid_window=bid_window
        )


@asynccontextmanager
async def memory_market() -> AsyncIterator[Market]:
    clock = trio_clock()
    async with trio.open_nursery() as nursery:
        net = MemoryNet(nursery)
        gossip = MemoryGossip()
        receipts = ReceiptBook()
        receipts.attach(nursery)
        auctions = Auctions(
            key=REQ_KEY,
            peer_id=REQ,
            gossip=gossip,  # type: ignore[arg-type]
            dialer=MemoryDialer(net, REQ, gossip),  # type: ignore[arg-type]
            receipts=receipts,
            bans=Bans(),
            limits=DEFAULT_LIMITS,
            policy=rq.RequesterPolicy(),
            clock=clock,
        )
        checker = SpotChecker(
            peer_id=REQ,
            auctions=auctions,
            bans=auctions.bans,
            rule=lambda: None,
            open_referee=lambda peer, until: net.open_stream(REQ, peer, "/edgeswarm/referee/1"),
            limits=DEFAULT_LIMITS,
            sampler=SpotChecks(random.Random(0)),
            clock=clock,
        )
        yield Market(net, gossip, auctions, checker, receipts, clock, nursery)
        nursery.cancel_scope.cancel()


def job_inputs(i: float) -> dict[str, Any]:
    return {"x": np.full(4, i, dtype=np.float32)}


def wire(i: float) -> Any:
    return encode_tensors(to_arrays(job_inputs(i)))


async def test_an_auction_closes_on_the_last_expected_bid(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        execs = [await m.executor(n, price) for n, price in ((2, 300), (3, 100), (4, 200))]
        await m.auctions.prepare(CID, m.clock() + 30)
        assert m.auctions.expected_bidders(CID) == {e.peer_id for e in execs}
        t0 = trio.current_time()
        result = await m.auctions.one_job(m.spec(bid_window=2.0), wire(3))
        took = trio.current_time() - t0
    # The 2 s window closed on the third bid: only the 5 ms job took (virtual) time.
    assert took < 0.1
    assert result.executor == execs[1].peer_id and result.price == 100
    assert result.outputs["z"].tolist() == [6.0] * 4
    result.receipt.verify()
    assert [r.receipt_id for r in execs[1].receipts.receipts] == [result.receipt.receipt_id]


async def test_a_silent_expected_bidder_makes_the_auction_wait_out_the_window(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        await m.executor(2, 100)
        await m.executor(3, 50_000)  # over the max price: it never bids
        t0 = trio.current_time()
        result = await m.auctions.one_job(m.spec(bid_window=2.0), wire(1))
        took = trio.current_time() - t0
    assert 2.0 <= took < 2.1
    assert result.price == 100


async def test_a_hung_executor_is_dropped_at_its_eta_and_the_next_bid_runs_the_job(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        hung = await m.executor(2, 100, worker=DoublingWorker(hang=True))
        ok = await m.executor(3, 200)
        t0 = trio.current_time()
        result = await m.auctions.one_job(m.spec(bid_window=2.0), wire(2))
        took = trio.current_time() - t0
    assert result.executor == ok.peer_id
    assert [e for e, _why in result.attempts] == [hung.peer_id]
    # eta = p50 5 ms + margin 20 ms; dropped at eta x slack 2 + grace 1 s after the award.
    assert 1.05 <= took < 1.2
    assert not hung.receipts.receipts  # never paid


async def test_no_executor_fails_after_every_round_in_virtual_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        with pytest.raises(rq.NoExecutors) as info:
            await m.auctions.one_job(m.spec(bid_window=1.0), wire(1))
    assert info.value.rounds == 3 and info.value.waited_s == pytest.approx(3.0, abs=0.01)


def lease_for(m: Market, nursery: trio.Nursery, max_jobs: int = 1000) -> Lease:
    return Lease(
        auctions=m.auctions,
        checker=m.checker,
        receipts=m.receipts,
        nursery=nursery,
        spec=m.spec(),
        check_inputs=lambda entry, inputs: to_arrays(inputs),
        limits=DEFAULT_LIMITS,
        job_timeout=30.0,
        max_jobs=max_jobs,
        seconds=60.0,
        clock=m.clock,
    )


async def test_a_lease_runs_jobs_in_order_with_one_receipt_per_batch(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        execu = await m.executor(2, 100)
        async with trio.open_nursery() as nursery:
            lease = lease_for(m, nursery, max_jobs=4)
            outs = [await lease.infer(job_inputs(i)) for i in range(6)]
            await lease.aclose()
            nursery.cancel_scope.cancel()
    assert [float(o["z"][0]) for o in outs] == [2.0 * i for i in range(6)]
    # 4 jobs used up the first batch (committed by itself), the next batch held 2.
    assert sorted(r.count for r in lease.receipts) == [2, 4]
    assert {r.executor for r in lease.receipts} == {execu.peer_id}


# --- fair exchange on the job wire (issue 10 item 4) ----------------------------------


async def test_a_lease_with_a_window_completes_through_cumulative_acceptances(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        execu = await m.executor(2, 100)
        execu.state.config = replace(execu.state.config, max_unaccepted=4)
        async with trio.open_nursery() as nursery:
            lease = lease_for(m, nursery, max_jobs=1000)
            outs = [o async for o in lease.map((job_inputs(i) for i in range(20)), window=8)]
            await lease.aclose()
            nursery.cancel_scope.cancel()
    assert [float(o["z"][0]) for o in outs] == [2.0 * i for i in range(20)]
    (receipt,) = lease.receipts  # one receipt for the batch: the final, cumulative one
    assert receipt.count == 20
    assert [r.receipt_id for r in execu.receipts.receipts] == [receipt.receipt_id]
    assert execu.refusals == []


class RawRequester:
    """A requester that speaks the job wire by hand and never signs an Acceptance."""

    def __init__(self, m: Market, executor: ExecutorService) -> None:
        self.m = m
        self.executor = executor
        self.results: list[int] = []
        self.frames: list[Any] = []
        self.refused = trio.Event()
        executor.on_refusal = lambda *_: self.refused.set()

    async def award(self, lease: LeaseTerms | None) -> tuple[Any, Award]:
        request = new_request(
            requester=REQ,
            cid=CID,
            wire=wire(0),
            max_price=10_000,
            deadline=self.m.clock() + 30,
            bid_window=1.0,
            lease=lease,
        )
        bids: list[Bid] = []
        got_bid = trio.Event()

        def sink(b: Bid) -> None:
            bids.append(b)
            got_bid.set()

        self.m.gossip.bid_sinks[request.job_id] = sink
        self.executor.on_request(request)
        with trio.fail_after(5):
            await got_bid.wait()
        bid = bids[0]
        award = Award(
            job_id=request.job_id,
            requester=REQ,
            executor=bid.executor,
            model_cid=CID,
            price=bid.price,
            deadline=request.deadline,
            lease=lease,
        )
        stream = await self.m.net.open_stream(REQ, self.executor.peer_id, JOB_PROTOCOL)
        fs = FrameStream(stream)
        await fs.send(sign_message(REQ_KEY, award))
        return fs, award

    async def lease(self, window: int, *, jobs: int) -> tuple[FrameStream, Award]:
        """A lease award with ``window``, and ``jobs`` inputs sent at once."""
        terms = LeaseTerms(max_jobs=100, until=self.m.clock() + 20, window=window)
        fs, award = await self.award(terms)
        for seq in range(jobs):
            await fs.send(JobInput(award.job_id, seq, wire(seq)))
        return fs, award

    async def read_until_quiet(self, fs: FrameStream, quiet_s: float = 5.0) -> None:
        """Read frames until the executor says nothing for ``quiet_s`` (virtual) seconds."""
        while True:
            with trio.move_on_after(quiet_s) as cs:
                item = await fs.receive()
            if cs.cancelled_caught:
                return
            self.frames.append(item)
            if isinstance(item, JobResult):
                self.results.append(item.seq)


async def raw_lease(
    m: Market, window: int, jobs: int = 20
) -> tuple[DoublingWorker, ExecutorService, RawRequester, FrameStream, Award]:
    """An executor and a hand-driven requester with a lease of ``window`` and ``jobs`` sent."""
    worker = DoublingWorker()
    execu = await m.executor(2, 100, worker=worker)
    raw = RawRequester(m, execu)
    fs, award = await raw.lease(window, jobs=jobs)
    return worker, execu, raw, fs, award


async def test_a_requester_that_never_signs_gets_at_most_the_window_of_work(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        window = 4
        worker, execu, raw, fs, award = await raw_lease(m, window)
        await raw.read_until_quiet(fs)
        await fs.reset()  # and walks away
        with trio.fail_after(30):
            await raw.refused.wait()
    # The executor ran and delivered only the window, then waited for an acceptance that
    # never came: its unpaid work is the window, and the refusal is surfaced for arbitration.
    assert worker.ran == window and sorted(raw.results) == list(range(window))
    interims = [f for f in raw.frames if isinstance(f, Signed) and f.message.count == window // 2]
    assert interims  # it asked for an acceptance at half the window
    ((refused_award, commitment, why),) = execu.refusals
    assert refused_award == award and commitment.message.count <= window
    assert "unaccepted" in why
    assert list(execu.receipts.receipts) == []


async def test_a_requester_that_drops_a_lease_after_accepting_pays_all_but_the_window(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        window = 4
        worker, execu, raw, fs, _award = await raw_lease(m, window)
        accepted = 0
        for _ in range(3):  # accept three interims, then drop the lease
            await raw.read_until_quiet(fs)
            interim = [f for f in raw.frames if isinstance(f, Signed)][-1]
            await fs.send(Receipt.create(REQ_KEY, interim).acceptance)
            accepted = interim.message.count
        await raw.read_until_quiet(fs)
        await fs.reset()
        with trio.fail_after(30):
            await execu.receipts.wait_for(1)
    # The executor holds a receipt for everything accepted; what it delivered beyond that
    # is at most the window.
    (receipt,) = execu.receipts.receipts
    receipt.verify()
    assert receipt.count == accepted and receipt.price == 100 * accepted
    assert len(raw.results) - accepted <= window
    assert worker.ran - accepted <= window


async def test_a_single_jobs_executor_commits_first_and_loses_one_job_to_a_refusal(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        worker = DoublingWorker()
        execu = await m.executor(2, 100, worker=worker)
        raw = RawRequester(m, execu)
        fs, award = await raw.award(None)
        await fs.send(JobInput(award.job_id, 0, wire(1)))
        await raw.read_until_quiet(fs)
        await fs.reset()
        with trio.fail_after(30):
            await raw.refused.wait()
    kinds = [
        type(f.message).__name__ if isinstance(f, Signed) else type(f).__name__ for f in raw.frames
    ]
    assert kinds == ["ResultCommitment", "JobResult"]  # the claim is fixed before delivery
    assert worker.ran == 1 and execu.refusals[0][1].message.count == 1


async def test_a_server_that_stops_bidding_stops_holding_auctions_open(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        await m.executor(2, 100)
        silent = await m.executor(3, 50_000)  # over the max price: it never bids
        took = []
        for i in range(3):
            t0 = trio.current_time()
            await m.auctions.one_job(m.spec(bid_window=2.0), wire(i))
            took.append(trio.current_time() - t0)
        assert silent.peer_id not in m.auctions.expected_bidders(CID)
    # Waited out the window twice for the silent server, then closed on the bid that came.
    assert took[0] >= 2.0 and took[1] >= 2.0 and took[2] < 0.1


async def test_the_next_single_job_to_an_executor_reuses_its_job_stream(
    mock_clock: trio.testing.MockClock,
) -> None:
    """After a paid single job the stream stays open; the next award to the same executor
    goes out on it, with no new stream (no protocol negotiation on a real host)."""
    async with memory_market() as m:
        ex1 = await m.executor(2, 100)
        first = await m.auctions.one_job(m.spec(), wire(1))
        assert m.net.streams_opened == 1 and len(m.auctions.streams) == 1
        second = await m.auctions.one_job(m.spec(), wire(2))
        assert m.net.streams_opened == 1  # the award went out on the kept stream
        assert m.auctions.streams.taken == 1 and m.auctions.streams.stale == 0
    assert first.executor == second.executor == ex1.peer_id
    assert second.outputs["z"].tolist() == [4.0] * 4
    assert first.receipt is not None and second.receipt is not None
    second.receipt.verify()
    assert first.receipt.job_id != second.receipt.job_id
    assert {r.receipt_id for r in ex1.receipts.receipts} == {
        first.receipt.receipt_id,
        second.receipt.receipt_id,
    }


async def test_a_kept_stream_the_executor_dropped_falls_back_to_a_fresh_one(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        ex1 = await m.executor(2, 100)
        ex1.award_wait_s = 1.0  # it drops an idle stream after 1 s; the pool keeps it 8 s
        await m.auctions.one_job(m.spec(), wire(1))
        await trio.sleep(2.0)
        result = await m.auctions.one_job(m.spec(), wire(3))
        assert m.auctions.streams.taken == 1 and m.auctions.streams.stale == 1
        assert m.net.streams_opened == 2
    assert result.outputs["z"].tolist() == [6.0] * 4
    assert result.receipt is not None
    result.receipt.verify()
    assert ex1.stats["awards"] == 2  # the stale stream carried no award the executor took


async def test_a_kept_stream_takes_no_payload_sized_frame_before_the_next_award(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Between awards a kept stream is back to the control-frame cap: a requester cannot
    make the executor buffer a payload without holding one of its bids. A frame announced
    over the cap ends the stream at once (without the cap the executor would wait for its
    body until ``award_wait_s``)."""
    async with memory_market() as m:
        ex1 = await m.executor(2, 100)
        await m.auctions.one_job(m.spec(), wire(1))
        fs = await m.auctions.streams.take(ex1.peer_id)
        assert fs is not None
        header = frame(b"\0" * 100_000, max_size=200_000)[:3]  # uvarint(100000), no body
        t0 = trio.current_time()
        await fs.send_raw(header)
        with trio.fail_after(30), pytest.raises(JobStreamClosed):
            await fs.receive()
        assert trio.current_time() - t0 < 1.0 < ex1.award_wait_s
        assert ex1.stats["awards"] == 1


async def test_a_lone_serving_peer_runs_its_own_job_without_waiting_out_the_window(
    mock_clock: trio.testing.MockClock,
) -> None:
    """We are the model's only server (the lookup found nobody else): our own bid closes
    the auction at once."""

    class Local:
        def local_quote(self, request: Any) -> tuple[int, int]:
            return 0, 5

        async def run_local(self, cid: str, inputs: Any, *, deadline: float) -> Any:
            return {"z": (np.asarray(inputs["x"]) * 2).astype(np.float32)}

    async with memory_market() as m:
        m.auctions.local = Local()
        t0 = trio.current_time()
        result = await m.auctions.one_job(m.spec(bid_window=2.0), wire(5))
        took = trio.current_time() - t0
    assert result.local and result.executor == REQ
    assert result.outputs["z"].tolist() == [10.0] * 4
    assert took < 0.1  # not the 2 s window

    # A peer on the model's topic that the lookup did not find (its provider record has
    # not propagated yet) may be a server: the window is waited for, as before.
    async with memory_market() as m:
        m.auctions.local = Local()
        m.gossip.topic_peers = lambda cid: {pid(key(9))}  # type: ignore[method-assign]
        t0 = trio.current_time()
        result = await m.auctions.one_job(m.spec(bid_window=2.0), wire(5))
        took = trio.current_time() - t0
    assert result.local and 2.0 <= took < 3.0  # (+ up to 0.5 s waiting for its mesh)


async def test_a_lookup_that_finds_no_server_expects_the_topics_peers_and_waits_for_a_bid(
    mock_clock: trio.testing.MockClock,
) -> None:
    """On a busy box the DHT lookup can find no server while the executors are on the
    model's topic, and their bids take longer than the bid window to come back. The topic's
    peers are then the expected bidders: the auction keeps re-auctioning until a bid comes
    (the deadline bounds it) instead of failing after ``max_rounds`` short windows."""
    async with memory_market() as m:
        await m.executor(2, 100)

        async def nobody(cid: str) -> dict[str, tuple[str, ...]]:
            return {}

        m.auctions.dialer.servers = nobody  # type: ignore[method-assign]
        publish = m.gossip.publish

        async def slow_bids(cid: str, signed: Signed[Any]) -> None:
            if isinstance(signed.message, Bid):
                await trio.sleep(1.0)  # 3 rounds of 0.2 s are over before it arrives
            await publish(cid, signed)

        m.gossip.publish = slow_bids  # type: ignore[method-assign]
        result = await m.auctions.one_job(m.spec(bid_window=0.2), wire(3))
    assert result.outputs["z"].tolist() == [6.0] * 4


class _GiveUpOnce(MemoryDialer):
    """The first job stream opens on the executor's side, but the requester gives up
    before writing (a negotiation that outlived its budget): ``TooSlowError``."""

    silent: Any = None

    async def open_stream(self, peer_id: str, until: float, protocol: str) -> Any:
        stream = await super().open_stream(peer_id, until, protocol)
        if protocol == JOB_PROTOCOL and self.silent is None:
            self.silent = stream  # nothing written on it; the executor sees a silent stream
            raise trio.TooSlowError
        return stream


async def test_an_award_whose_stream_open_timed_out_is_sent_again_and_runs_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with memory_market() as m:
        dialer = _GiveUpOnce(m.net, REQ, m.gossip)
        m.auctions.dialer = dialer  # type: ignore[assignment]
        worker = DoublingWorker()
        only = await m.executor(2, 100, worker=worker)
        result = await m.auctions.one_job(m.spec(bid_window=2.0), wire(4))
        with trio.fail_after(60):  # the executor drops the silent stream (award_wait_s)
            assert await dialer.silent.read(1) == b""
    assert m.net.streams_opened == 2
    # The same executor got the award on the second stream: run once, paid once.
    assert result.executor == only.peer_id and result.outputs["z"].tolist() == [8.0] * 4
    assert [why for _e, why in result.attempts] == [
        "award undelivered: cannot open a job stream: TooSlowError"
    ]
    assert worker.ran == 1 and only.stats["awards"] == 1
    assert [r.receipt_id for r in only.receipts.receipts] == [result.receipt.receipt_id]
