"""Auctions: get a model's servers into our gossip mesh, run one job (or lease batch).

``Auctions.prepare(cid, until)`` joins the model's topic and, the first time
(then at most once a minute), finds its servers through the ``Dialer`` and
dials them; ``expected_bidders(cid)`` is who should bid, so an auction can
close as soon as they all have (the adaptive bid window of
``protocols.requester``). ``new_run`` builds the ``JobRun`` of one
``RequesterJob``; ``one_job`` runs a whole single job and returns its result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import numpy.typing as npt
import trio
from libp2p.peer.id import ID

from peer.job_stream import JOB_PROTOCOL, FrameStream
from peer.market.clock import Clock, system_clock
from peer.market.dialer import Dialer
from peer.market.direct import DirectRequests
from peer.market.gossip import MarketGossip
from peer.market.jobspec import JobSpec
from peer.market.receipts import ReceiptBook
from peer.market.requester import JobRun, LocalRunner, new_request
from peer.market.stream_pool import StreamPool
from protocols import requester as rq
from protocols.market import JobRequest
from protocols.proofs import FraudProof
from protocols.receipt import Receipt
from protocols.tensor import TensorLimits

log = logging.getLogger(__name__)

MICRO = 1_000_000
PREPARE_TIMEOUT = 5.0
REDISCOVER_S = 60.0
MESH_TARGET = 4  # GossipSub's degree_low: more are grafted by heartbeats
MESH_SETTLE_S = 0.5
DIRECT_OPEN_S = 10.0  # budget to open an auction stream (in the background)
MAX_MISSES = 2  # auctions in a row without a bid before a server is no longer waited for

Arrays = dict[str, npt.NDArray[Any]]


@dataclass
class InferResult:
    """One job's outputs and its receipt. ``price`` is in micro-credits (as in the receipt)."""

    outputs: Arrays
    receipt: Receipt | None  # None: our own executor ran it (self-award); nothing is owed
    executor: str
    price: int
    latency_ms: float
    model_cid: str
    attempts: list[tuple[str, str]] = field(default_factory=list)
    spot_check: str | None = None  # None: not checked; "agree" or why the outputs disagree
    fraud_proofs: list[FraudProof] = field(default_factory=list)  # cheaters this job exposed
    wire: Any = field(default=None, repr=False)  # the outputs as received (for referees)

    @property
    def local(self) -> bool:
        """The job ran on this peer's own executor: no receipt, no payment."""
        return self.receipt is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_cid": self.model_cid,
            "executor": self.executor,
            "local": self.local,
            "price": self.price,
            "price_credits": self.price / MICRO,
            "latency_ms": round(self.latency_ms, 3),
            "receipt": None if self.receipt is None else self._receipt_dict(self.receipt),
            "attempts": [list(a) for a in self.attempts],
            "spot_check": self.spot_check,
            "fraud": [p.offender for p in self.fraud_proofs],
        }

    @staticmethod
    def _receipt_dict(receipt: Receipt) -> dict[str, Any]:
        c = receipt.commitment.message
        return {
            "id": receipt.receipt_id.hex(),
            "job_id": c.job_id.hex(),
            "requester": c.requester,
            "executor": c.executor,
            "model_cid": c.model_cid,
            "price": c.price,
            "count": c.count,
            "compute_ms": c.compute_ms,
            "input_digest": c.input_digest.hex(),
            "output_digest": c.output_digest.hex(),
            "bytes": receipt.to_bytes().hex(),
        }


class Bans:
    """Whose bids no job takes: proven cheaters found by our own spot checks, and the
    accounts ``ledger_banned`` says the ledger has banned."""

    def __init__(self, ledger_banned: Callable[[str], bool] = lambda _pid: False) -> None:
        self.proven_cheaters: set[str] = set()
        self.ledger_banned = ledger_banned

    def __contains__(self, peer_id: object) -> bool:
        if peer_id in self.proven_cheaters:
            return True
        return isinstance(peer_id, str) and self.ledger_banned(peer_id)

    def plus(self, extra: Iterable[str]) -> Container[str]:
        """These bans and ``extra`` (e.g. the executor a spot check must not ask again)."""
        return _BansPlus(self, frozenset(extra))


@dataclass(frozen=True)
class _BansPlus:
    bans: Bans
    extra: frozenset[str]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.extra or peer_id in self.bans


class Auctions:
    """The requester's auctions of one peer."""

    def __init__(
        self,
        *,
        key: nacl.signing.SigningKey,
        peer_id: str,
        gossip: MarketGossip,
        dialer: Dialer,
        receipts: ReceiptBook,
        bans: Bans,
        limits: TensorLimits,
        policy: rq.RequesterPolicy,
        clock: Clock = system_clock,
        keep_streams: bool = True,
        direct_requests: bool = True,
    ) -> None:
        self.key = key
        self.peer_id = peer_id
        self.gossip = gossip
        self.dialer = dialer
        self.receipts = receipts
        self.bans = bans
        self.limits = limits
        self.policy = policy
        self.clock = clock
        self._discovered: dict[str, float] = {}  # cid -> clock time of the last lookup
        self._servers: dict[str, set[str]] = {}  # cid -> servers found (providers, ads)
        self._misses: dict[str, dict[str, int]] = {}  # cid -> server -> auctions without a bid
        # Our own executor, a bidder in our own single-job auctions (set when we serve).
        self.local: LocalRunner | None = None
        # Job streams kept open after a single job, one per executor: the next award to it
        # skips opening a stream (and its protocol negotiation).
        self.streams = StreamPool(clock=clock, keep=keep_streams)
        # Auction streams to the servers we expect: requests straight to them, bids back
        # (``run`` must be running for them to open; without it, gossip alone carries them).
        self.direct = DirectRequests(
            open_stream=dialer.open_stream,
            deliver=getattr(gossip, "deliver_direct", None) if direct_requests else None,
            clock=clock,
        )

    async def prepare(self, cid: str, until: float) -> None:
        """Join the cid's topic and get executors of it into our gossip mesh.

        Servers are looked up (DHT providers, ads) and dialed the first time and
        then at most once a minute; a warm topic costs nothing here.
        """
        await self.gossip.join(cid)
        fresh = self.clock() - self._discovered.get(cid, -1e18) < REDISCOVER_S
        if fresh and self.gossip.mesh_peers(cid):
            return
        budget = max(0.1, min(PREPARE_TIMEOUT, (until - self.clock()) / 2))
        with trio.move_on_after(budget):
            candidates = set(self.gossip.topic_peers(cid))
            if not fresh:
                found = await self.dialer.servers(cid)
                found.pop(self.peer_id, None)
                # Who is expected to bid: every server found (kept across lookups, which can
                # miss records); one that stops bidding is dropped by ``record``.
                self._servers.setdefault(cid, set()).update(found)
                connected = await self.dialer.connect(found)
                candidates |= connected
                self._discovered[cid] = self.clock()
            self._expect_topic_peers(cid)
            ids = [ID.from_base58(c) for c in candidates]
            await self.gossip.wait_for_mesh(cid, ids, limit=budget)
            # Give the other servers just dialed a moment to graft too (event-driven).
            want = min(len(ids), MESH_TARGET)
            with trio.move_on_after(min(MESH_SETTLE_S, budget)):
                for _ in range(100):  # GossipSub has no "mesh grew" event to wait on
                    if len(self.gossip.mesh_peers(cid)) >= want:
                        break
                    await trio.sleep(0.01)
        self._expect_topic_peers(cid)

    def _expect_topic_peers(self, cid: str) -> None:
        """No server found by the lookup (a slow DHT on a busy box, or it timed out): the
        peers on the model's topic are who may bid; one that never does stops being
        expected after ``MAX_MISSES`` auctions (``record``). An auction that expects
        bidders keeps re-auctioning while none has bid, instead of failing after
        ``max_rounds`` short windows (``RequesterJob``)."""
        if not self._servers.get(cid):
            self._servers[cid] = set(self.gossip.topic_peers(cid)) - {self.peer_id}

    def rediscover(self, cid: str) -> None:
        """Look the cid's servers up again at the next ``prepare`` (e.g. a new one joined)."""
        self._discovered.pop(cid, None)

    def record(self, cid: str, expected: frozenset[str], bidders: frozenset[str]) -> None:
        """After an auction: servers that bid are expected again; one that missed
        ``MAX_MISSES`` auctions in a row (gone, busy, over our price) no longer holds
        auctions open. Every bidder is a server: it is expected from now on."""
        misses = self._misses.setdefault(cid, {})
        servers = self._servers.setdefault(cid, set())
        servers.update(bidders)
        # Auction streams to every server that bid, for the next auctions: opened once this
        # one is over, so they never compete with its award (a busy server answers a
        # stream's protocol negotiation slowly).
        self.direct.warm(bidders - {self.peer_id}, self.clock() + DIRECT_OPEN_S)
        for pid in bidders:
            misses.pop(pid, None)
        for pid in expected - bidders:
            misses[pid] = misses.get(pid, 0) + 1
            if misses[pid] >= MAX_MISSES:
                servers.discard(pid)
                del misses[pid]

    def expected_bidders(self, cid: str) -> frozenset[str]:
        """Who should bid on a job for ``cid``: the servers found in provider records and
        ads (accumulated over lookups) and every executor that bid before, less those that
        missed ``MAX_MISSES`` auctions in a row. The auction closes once they all bid: it
        never closes before a known server had its say, unless a bid is good enough
        (``RequesterPolicy.good_enough_price``)."""
        return frozenset(self._servers.get(cid, ()))

    def knows_every_server(self, cid: str) -> bool:
        """A lookup of ``cid``'s servers succeeded within ``REDISCOVER_S`` and every other
        peer on the model's topic is one of the servers it found: the expected bidders are
        every server we can know of. When that set is empty (we are the model's only
        server) the auction closes on the first bid, our own, instead of waiting out the
        window. A topic peer the lookup missed (provider records not propagated yet) may
        be a server: then the window is waited for, as before."""
        t = self._discovered.get(cid)
        if t is None or self.clock() - t >= REDISCOVER_S:
            return False
        others = set(self.gossip.topic_peers(cid)) - {self.peer_id}
        return others <= self._servers.get(cid, set())

    async def open_job_stream(self, executor: str, until: float) -> FrameStream:
        return FrameStream(await self.dialer.open_stream(executor, until, JOB_PROTOCOL))

    def new_run(
        self,
        spec: JobSpec,
        request: JobRequest,
        *,
        single_input: Any = None,
        banned: Iterable[str] = (),
        policy: rq.RequesterPolicy | None = None,
    ) -> JobRun:
        """A JobRun that ignores bids of ``banned`` and of everyone ``Bans`` holds
        (``policy``: instead of this peer's, e.g. a pipeline stage that waits on others)."""
        cid = spec.cid

        async def publish(signed: Any) -> None:
            # Straight to the servers we expect (their bids come back on those streams),
            # and on gossip for any server we do not know yet.
            await self.direct.send(signed, self.expected_bidders(cid))
            await self.gossip.publish(cid, signed)

        return JobRun(
            key=self.key,
            request=request,
            publish=publish,
            open_stream=self.open_job_stream,
            bid_sinks=self.gossip.bid_sinks,
            entry=spec.entry,
            limits=self.limits,
            policy=self.policy if policy is None else policy,
            single_input=single_input,
            banned=self.bans.plus(banned),
            expected=self.expected_bidders(cid),
            expected_complete=self.knows_every_server(cid),
            local=self.local,
            pool=self.streams,
            clock=self.clock,
        )

    async def one_job(self, spec: JobSpec, wire: Any, *, banned: Iterable[str] = ()) -> InferResult:
        """One job through an auction: award, inputs, result, signed acceptance."""
        t0 = time.perf_counter()
        await self.prepare(spec.cid, spec.until)
        request = new_request(
            requester=self.peer_id,
            cid=spec.cid,
            wire=wire,
            max_price=spec.max_price,
            deadline=spec.until,
            bid_window=spec.bid_window,
            spot_check=0.0,  # never announced: an executor must not know when nobody checks
        )
        run = self.new_run(spec, request, single_input=wire, banned=banned)
        try:
            outcome = await run.run()
        except rq.NoExecutors as exc:
            self._explain(exc, spec.cid, request.max_price)
            raise
        finally:
            self.record(spec.cid, run.job.expected, run.job.bidders)
        if outcome.receipt is not None:  # a local run (self-award) has none: nothing owed
            self.receipts.add(outcome.receipt, "requester")
        return InferResult(
            wire=outcome.wires.get(0),
            outputs=outcome.outputs[0],
            receipt=outcome.receipt,
            executor=outcome.executor,
            price=0 if outcome.receipt is None else outcome.receipt.price,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            model_cid=spec.cid,
            attempts=outcome.attempts,
        )

    def _explain(self, exc: rq.NoExecutors, cid: str, max_price: int) -> None:
        """Executors never bid over the max price or past the deadline: say so when some
        serving peers were reachable but none bid."""
        serving = len(self.gossip.topic_peers(cid))
        if exc.bids_seen == 0 and serving:
            exc.args = (
                f"{exc}; {serving} peer(s) serving it were reachable but none bid: is the max "
                f"price ({max_price / MICRO:g} credits) below their price, or the deadline "
                "too short?",
            )
