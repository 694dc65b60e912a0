"""``MarketService``: the job market of one peer (requester always, executor when it serves models).

::

    async with open_peer(config) as peer, open_market(peer, runtime=runtime) as market:
        result = await market.infer("tiny_add", {"x": x, "y": y}, max_price=2.0)
        async with market.lease("tiny_add", max_jobs=1000, seconds=60) as lease:
            outputs = await lease.infer({"x": x, "y": y})

Prices in this API are credits (floats, like ``Config.price``); messages and
receipts carry integer micro-credits (``MICRO`` per credit). Deadlines given
to ``infer`` are seconds from now.

This module wires the pieces, each in its own module: ``dialer`` (finding
servers, opening streams: the one place that dials), ``auction`` (mesh,
expected bidders, one job), ``lease``, ``spot_check`` (second opinions and
referees), ``executor`` (serving) and ``clock`` (injected time).
"""

from __future__ import annotations

import logging
import random
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from edge_models.errors import EdgeModelError, ModelNotFound
from edge_models.runtime import validate_inputs
from edge_models.spec import ModelEntry
from peer.host import retire_stream_handler
from peer.job_stream import JOB_PROTOCOL
from peer.market.auction import MICRO, Arrays, Auctions, Bans, InferResult
from peer.market.clock import Clock, system_clock
from peer.market.dialer import Dialer
from peer.market.direct import AUCTION_PROTOCOL
from peer.market.executor import ExecutorService
from peer.market.gossip import GossipGuard, MarketGossip
from peer.market.jobspec import JobSpec
from peer.market.lease import Lease
from peer.market.pipeline import find_pipeline, run_pipeline
from peer.market.receipts import ReceiptBook, ReceiptHook
from peer.market.referee import REFEREE_PROTOCOL, Claim, RefereeService, SpotChecks, arbitrate
from peer.market.requester import to_arrays
from peer.market.spot_check import REFEREE_MAX_S, SpotChecker
from peer.market.stage_link import STAGE_PROTOCOL, StageLinks
from peer.worker import INLINE_P50_MS, Worker
from protocols import executor as ex
from protocols import requester as rq
from protocols.committee import CommitteeRule, RefereePanel
from protocols.market import CLOCK_SKEW_S
from protocols.proofs import ArbitratedReceipt, FraudProof, referee_panel
from protocols.receipt import ResultCommitment
from protocols.signed import Signed
from protocols.tensor import DEFAULT_LIMITS, TensorLimits, encode_tensors

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 3.0  # at least this long; up to a third of the job's deadline (slow DHT)
# A name resolved through ads is remembered this long: one lookup, not one per job.
NAME_TTL_S = 60.0
MAX_NAMES = 256
_CID_RE = re.compile(r"[0-9a-f]{64}")

__all__ = [
    "MICRO",
    "InferResult",
    "Lease",
    "MarketService",
    "MarketSettings",
    "UnknownModel",
    "open_market",
    "to_micro",
]


def to_micro(credits: float) -> int:
    if credits < 0:
        raise ValueError(f"a price must not be negative, got {credits}")
    return round(credits * MICRO)


class UnknownModel(LookupError):
    """No model of that name is in the local registry or in any ad found."""


@dataclass(frozen=True)
class MarketSettings:
    price: float = 1.0
    max_price: float = 10.0
    bid_window: float = 0.2
    job_timeout: float = 30.0
    max_concurrent: int = 2
    max_queue: int = 4
    limits: TensorLimits = DEFAULT_LIMITS
    # 2 s of grace past eta x 2 before falling back to the next bidder: a result that
    # comes back through a circuit relay needs more than the pure default's 1 s.
    policy: rq.RequesterPolicy = field(
        default_factory=lambda: rq.RequesterPolicy(grace_s=2.0, patience=0.25)
    )
    # Keep a single job's stream for the next award to that executor (peer.market.stream_pool).
    # Off by default: the README demo under load has not passed 6 runs in 6 with it on. Its
    # failures (job streams that do not open in time) happen with it off too, on the
    # first awards to starved executors (docs/market-peer.md, issue 16).
    keep_job_streams: bool = False
    # Send each JobRequest straight to the servers the auction expects, on an auction stream
    # (``peer.market.direct``), as well as on gossip: their bids skip the gossip mesh.
    direct_requests: bool = True
    # Served models whose measured p50 is under this run on the loop thread (0: never).
    inline_p50_ms: float = INLINE_P50_MS

    @classmethod
    def from_config(cls, config: Any) -> MarketSettings:
        return cls(
            price=float(config.price),
            max_price=float(getattr(config, "max_price", 10.0)),
            bid_window=float(getattr(config, "bid_window", 0.2)),
            job_timeout=float(config.job_timeout) if config.job_timeout > 0 else 30.0,
            max_concurrent=max(int(config.max_concurrent_jobs), 1),
        )


class MarketService:
    def __init__(
        self,
        peer: Any,
        *,
        settings: MarketSettings,
        runtime: Any = None,
        registry: Any = None,
        rng: random.Random | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.peer = peer
        self.key = peer.key
        self.peer_id: str = peer.peer_id
        self.host = peer.host
        self.settings = settings
        self.clock = clock
        self.runtime = runtime
        self.registry = registry if registry is not None else getattr(runtime, "registry", None)
        self.receipts = ReceiptBook()
        self.gossip = MarketGossip(
            peer.pubsub, guard=GossipGuard(clock=clock), on_request=self._on_request
        )
        self.served: dict[str, tuple[str, float]] = {}  # cid -> (name, p50_ms)
        self.dialer = Dialer(self.host, peer, clock=clock)
        self.links = StageLinks(self.host, self.dialer, clock=clock)  # pipeline stages
        self.bans = Bans(self._ledger_banned)
        self.auctions = Auctions(
            key=self.key,
            peer_id=self.peer_id,
            gossip=self.gossip,
            dialer=self.dialer,
            receipts=self.receipts,
            bans=self.bans,
            limits=settings.limits,
            policy=settings.policy,
            clock=clock,
            keep_streams=settings.keep_job_streams,
            direct_requests=settings.direct_requests,
        )
        self.checker = SpotChecker(
            peer_id=self.peer_id,
            auctions=self.auctions,
            bans=self.bans,
            rule=self._rule,
            open_referee=self._open_referee,
            limits=settings.limits,
            sampler=SpotChecks(rng or random.Random()),
            on_fraud_proof=self._store_fraud_proof,
            clock=clock,
        )
        self.executor: ExecutorService | None = None
        self.referee: RefereeService | None = None
        # Names resolved through ads: name -> (cid, clock time), LRU-bounded.
        self._names: OrderedDict[str, tuple[str, float]] = OrderedDict()
        if runtime is not None:
            self.worker = Worker(
                runtime,
                max_concurrent=settings.max_concurrent,
                job_timeout=settings.job_timeout,
                clock=clock,
            )
            self.executor = ExecutorService(
                key=self.key,
                peer_id=self.peer_id,
                host=self.host,
                gossip=self.gossip,
                worker=self.worker,
                config=ex.ExecutorConfig(
                    peer_id=self.peer_id,
                    models={},
                    max_concurrent=settings.max_concurrent,
                    max_queue=settings.max_queue,
                    max_input_bytes=settings.limits.max_total_bytes,
                    clock_skew_s=CLOCK_SKEW_S,  # requesters' clocks may be off (issue 15)
                ),
                receipts=self.receipts,
                limits=settings.limits,
                clock=clock,
            )
            self.executor.on_load = getattr(peer, "set_load", None)
            # Self-award: our executor bids in our own auctions (no receipt if it wins).
            self.auctions.local = self.executor
            self.referee = RefereeService(
                key=self.key,
                peer_id=self.peer_id,
                host=self.host,
                worker=self.worker,
                limits=settings.limits,
                rule=self._rule,
            )
        self._nursery: trio.Nursery | None = None
        self.arbitrated: list[ArbitratedReceipt] = []  # our refused results, arbitrated

    # --- collaborators -------------------------------------------------------------------

    @property
    def spot_checks(self) -> SpotChecks:
        """The spot-check sampler (seedable: tests replace it)."""
        return self.checker.sampler

    @spot_checks.setter
    def spot_checks(self, sampler: SpotChecks) -> None:
        self.checker.sampler = sampler

    @property
    def proven_cheaters(self) -> set[str]:
        """Executors our own spot checks proved wrong (banned from our auctions)."""
        return self.bans.proven_cheaters

    def _ledger_banned(self, peer_id: str) -> bool:
        settlement = getattr(self.peer, "settlement", None)
        return settlement is not None and bool(settlement.ledger.is_banned(peer_id))

    async def _store_fraud_proof(self, proof: FraudProof) -> None:
        settlement = getattr(self.peer, "settlement", None)
        if settlement is not None:
            await settlement.ingest_fraud_proof(proof)

    def _rule(self) -> CommitteeRule | None:
        """The network's committee rule, when this peer runs settlement."""
        settlement = getattr(self.peer, "settlement", None)
        return None if settlement is None else settlement.ledger.rule

    async def _open_referee(self, referee: str, until: float) -> Any:
        return await self.dialer.open_stream(referee, until, REFEREE_PROTOCOL)

    def referees_for(self, commitment: Signed[ResultCommitment]) -> RefereePanel | None:
        """The referee panel of a commitment to our job (None when settlement is off)."""
        return self.checker.referees_for(commitment)

    @property
    def on_receipt(self) -> list[ReceiptHook]:
        """Coroutines called with ``(receipt, role)`` for every receipt (settlement hooks here)."""
        return self.receipts.on_receipt

    def models_source(self) -> list[tuple[str, str, float]]:
        """What the capability ad lists: ``(cid, name, p50_ms)`` of every served model."""
        return [(cid, name, p50) for cid, (name, p50) in self.served.items()]

    def _on_refusal(self, award: Any, commitment: Signed[Any], why: str) -> None:
        """The executor's hook: a requester left our single job unaccepted; have it arbitrated."""
        wires = self.executor.refused_wires.pop(award.job_id, None) if self.executor else None
        settlement = getattr(self.peer, "settlement", None)
        if wires is None or wires[1] is None or settlement is None or self._nursery is None:
            return  # a lease (its loss is the window), no result sent, or no settlement
        self._nursery.start_soon(self.arbitrate_refusal, commitment, wires, settlement)

    async def arbitrate_refusal(
        self, commitment: Signed[ResultCommitment], wires: tuple[Any, Any], settlement: Any
    ) -> ArbitratedReceipt | FraudProof | None:
        """Ask the job's referee panel about our own unaccepted result; a majority saying
        it is right is an ``ArbitratedReceipt``, handed to settlement (the requester's
        witnesses then certify nothing else of it until it is paid)."""
        rule = self._rule()
        if rule is None:
            return None
        panel = referee_panel(rule, commitment, rule.panel_cp)
        evidence = await arbitrate(
            self._open_referee,
            [Claim(commitment, wires[1])],
            wires[0],
            [panel],
            limits=self.settings.limits,
            wait_s=REFEREE_MAX_S,
        )
        found = evidence[0]
        job = commitment.message.job_id.hex()[:12]
        if isinstance(found, ArbitratedReceipt):
            self.arbitrated.append(found)
            delivered = await settlement.settle_arbitrated(found)
            log.info("job %s: arbitrated receipt delivered to %d peer(s)", job, delivered)
        elif isinstance(found, FraudProof):
            log.warning("job %s: the referees found our own result wrong", job)
        else:
            log.info("job %s: the referee panel gave no majority", job)
        return found

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.executor is not None and self.executor.on_refusal is None:
                self.executor.on_refusal = self._on_refusal
            self.receipts.attach(nursery)
            await nursery.start(self.gossip.run)
            await nursery.start(self.auctions.direct.run)
            if self.executor is not None:
                await nursery.start(self.executor.run)
                self.links.attach(self.executor)
            if self.referee is not None:
                await nursery.start(self.referee.run)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.receipts.attach(None)
                self._nursery = None
                if self.executor is not None:
                    retire_stream_handler(self.host, JOB_PROTOCOL)
                    retire_stream_handler(self.host, AUCTION_PROTOCOL)
                    retire_stream_handler(self.host, STAGE_PROTOCOL)
                nursery.cancel_scope.cancel()

    # --- executor side -----------------------------------------------------------------

    def _on_request(self, request: Any, reply: Any = None) -> None:
        if self.executor is not None:
            if reply is None:
                self.executor.on_request(request)
            else:  # it came on an auction stream: the bid goes back on it
                self.executor.on_request(request, reply)

    async def serve(
        self, refs: Iterable[str] | None = None, *, price: float | None = None
    ) -> list[str]:
        """Load models (all in the registry by default), measure p50, bid on their jobs."""
        if self.executor is None or self.runtime is None:
            raise RuntimeError("this peer has no model runtime, so it cannot serve models")
        registry = self.runtime.registry
        entries = registry.list() if refs is None else [registry.get(r) for r in refs]
        micro = to_micro(self.settings.price if price is None else price)
        done = []
        for entry in entries:
            try:
                loaded = await trio.to_thread.run_sync(self.runtime.load, entry.cid)
            except EdgeModelError as exc:
                log.warning("not serving %s: %s", entry.name, exc)
                continue
            p50 = float(loaded.p50_ms or 1.0)
            self.served[entry.cid] = (entry.name, p50)
            inline = self.settings.inline_p50_ms
            if loaded.p50_ms is not None and loaded.p50_ms < inline:
                self.worker.inline.add(entry.cid)  # no thread hop for sub-millisecond models
            self.executor.offers[entry.cid] = ex.ModelOffer(price=micro, p50_ms=max(1, round(p50)))
            await self.gossip.join(entry.cid, serve=True)
            done.append(entry.cid)
            log.info("serving %s (%s) at %s, p50 %.1f ms", entry.name, entry.cid[:12], micro, p50)
        if done and hasattr(self.peer, "models_changed"):
            self.peer.models_changed()
        return done

    # --- requester side ---------------------------------------------------------------

    async def resolve(
        self, model: str, *, within: float | None = None
    ) -> tuple[str, ModelEntry | None]:
        """A model name, cid or cid prefix -> (cid, local registry entry or None). A name
        only ads know is looked up for ``RESOLVE_TIMEOUT``, or a third of ``within``."""
        if self.registry is not None:
            try:
                entry: ModelEntry = self.registry.get(model)
                return entry.cid, entry
            except ModelNotFound:
                pass
        if _CID_RE.fullmatch(model):
            return model, None
        held = self._names.get(model)
        if held is not None and self.clock() - held[1] < NAME_TTL_S:
            return held[0], None
        # A fresh peer's ad may not list its models yet: look again for a short while. What
        # every look found counts (on a busy box one look can miss ads another found).
        ads: dict[str, Any] = {}
        with trio.move_on_after(max(RESOLVE_TIMEOUT, (within or 0.0) / 3)):
            for attempt in range(50):
                # First the peers we know (quick); then crawl for more. A first call that
                # crawled could outlast the whole window on a busy box and find nothing.
                for ad in await self.peer.find_ads(refresh=attempt > 0):
                    ads[ad.peer_id] = ad
                cids = {m.cid for ad in ads.values() for m in ad.models if m.name == model}
                if len(cids) == 1:
                    cid = cids.pop()
                    self._names[model] = (cid, self.clock())
                    self._names.move_to_end(model)
                    while len(self._names) > MAX_NAMES:
                        self._names.popitem(last=False)
                    return cid, None
                if len(cids) > 1:
                    raise UnknownModel(
                        f"model name {model!r} is ambiguous: peers serve it as {sorted(cids)}; "
                        "give a cid"
                    )
                await trio.sleep(0.3)
        served = sorted({m.name for ad in ads.values() for m in ad.models if m.name})
        raise UnknownModel(
            f"no peer serves a model named {model!r} ({len(ads)} peers found; "
            f"models served: {', '.join(served) or 'none'})"
        )

    def _check_inputs(self, entry: ModelEntry | None, inputs: Mapping[str, Any]) -> Arrays:
        arrays = to_arrays(inputs)
        if entry is not None:
            validate_inputs(entry, arrays, self.settings.limits)
        return arrays

    def _spec(
        self,
        cid: str,
        entry: ModelEntry | None,
        *,
        max_price: float | None,
        until: float,
        bid_window: float | None,
        spot_check: float = 0.0,
    ) -> JobSpec:
        return JobSpec(
            cid=cid,
            entry=entry,
            max_price=to_micro(self.settings.max_price if max_price is None else max_price),
            until=until,
            bid_window=self.settings.bid_window if bid_window is None else bid_window,
            spot_check=spot_check,
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        max_price: float | None = None,
        deadline: float | None = None,
        spot_check: float = 0.0,
        bid_window: float | None = None,
    ) -> InferResult:
        """Run one job through the market: auction, award, result, receipt. A pipeline
        registered here (``models split`` / ``models add manifest.json``) runs its stages as
        chained jobs (``peer.market.pipeline``) and returns a ``PipelineResult``.

        ``model``: name, cid or cid prefix. ``max_price`` in credits (default
        ``Config.max_price``); ``deadline`` in seconds from now (default
        ``Config.job_timeout``); ``spot_check``: probability of also running
        the job on a second executor and comparing the outputs. Raises
        ``UnknownModel``, ``edge_models.errors.InvalidInput`` (checked here when
        the model is in the local registry), or a ``protocols.requester.MarketFailure``
        (``NoExecutors``, ``ExecutorsFailed``, ``DeadlineExceeded``).
        """
        pipe = find_pipeline(self, model)
        if pipe is not None:  # a pipeline held here: its stages run as chained jobs
            return await run_pipeline(
                self,
                pipe,
                inputs,
                max_price=max_price,
                deadline=deadline,
                spot_check=spot_check,
                bid_window=bid_window,
            )
        t0 = self.clock()
        until = t0 + (self.settings.job_timeout if deadline is None else deadline)
        cid, entry = await self.resolve(model, within=until - t0)
        arrays = self._check_inputs(entry, inputs)
        wire = encode_tensors(arrays)
        spec = self._spec(
            cid,
            entry,
            max_price=max_price,
            until=until,
            bid_window=bid_window,
            spot_check=spot_check,
        )
        try:
            result = await self.auctions.one_job(spec, wire)
        except rq.NoExecutors:
            self._names.pop(model, None)  # look the name up again next time
            raise
        if spot_check > 0 and self.checker.sampler.want(spot_check):
            result = await self.checker.check(result, spec, wire)
        result.latency_ms = (self.clock() - t0) * 1e3
        return result

    @asynccontextmanager
    async def lease(
        self,
        model: str,
        *,
        max_jobs: int = 1000,
        seconds: float = 60.0,
        max_price: float | None = None,
        bid_window: float | None = None,
        spot_check: float | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold one executor for up to ``max_jobs`` jobs or ``seconds``; ``await lease.infer(x)``
        or ``async for out in lease.map(xs)``.

        ``spot_check`` (None: off): the first job of every batch is checked on a second
        executor, later ones with this probability; a held executor whose result disagrees
        is dropped, its batch closed and refereed (``lease.fraud_proofs``), and the other
        result returned.

        One receipt per batch (``lease.receipts``). When the executor goes away the
        jobs in flight move to the next bidder (or a new auction); when a batch is
        used up a new one is opened transparently.
        """
        cid, entry = await self.resolve(model)
        spec = self._spec(cid, entry, max_price=max_price, until=0.0, bid_window=bid_window)
        async with trio.open_nursery() as nursery:
            lease = Lease(
                auctions=self.auctions,
                checker=self.checker,
                receipts=self.receipts,
                nursery=nursery,
                spec=spec,
                check_inputs=self._check_inputs,
                limits=self.settings.limits,
                job_timeout=self.settings.job_timeout,
                max_jobs=max_jobs,
                seconds=seconds,
                spot_check=spot_check,
                clock=self.clock,
            )
            try:
                yield lease
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(10.0):
                    await lease.aclose()
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_market(
    peer: Any,
    *,
    runtime: Any = None,
    registry: Any = None,
    settings: MarketSettings | None = None,
    serve: Iterable[str] | bool = True,
    rng: random.Random | None = None,
    clock: Clock = system_clock,
) -> AsyncIterator[MarketService]:
    """Run a MarketService on ``peer`` (stopped on exit). With a ``runtime`` it serves
    ``serve`` (model refs; True = every model in the registry; False = none)."""
    market = MarketService(
        peer,
        settings=settings or MarketSettings.from_config(peer.config),
        runtime=runtime,
        registry=registry,
        rng=rng,
        clock=clock,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(market.run)
        if runtime is not None and serve is not False:
            await market.serve(None if serve is True else list(serve))
        try:
            yield market
        finally:
            nursery.cancel_scope.cancel()
