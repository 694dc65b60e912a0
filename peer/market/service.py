"""``MarketService``: the job market of one peer (requester always, executor when it serves models).

::

    async with open_peer(config) as peer, open_market(peer, runtime=runtime) as market:
        result = await market.infer("tiny_add", {"x": x, "y": y}, max_price=2.0)
        async with market.lease("tiny_add", max_jobs=1000, seconds=60) as lease:
            outputs = await lease.infer({"x": x, "y": y})

Prices in this API are credits (floats, like ``Config.price``); messages and
receipts carry integer micro-credits (``MICRO`` per credit). Deadlines given
to ``infer`` are seconds from now.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import AsyncIterator, Container, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from edge_models.errors import EdgeModelError, ModelNotFound
from edge_models.runtime import validate_inputs
from edge_models.spec import ModelEntry
from peer.job_stream import JOB_PROTOCOL, FrameStream
from peer.market.executor import ExecutorService
from peer.market.gossip import GossipGuard, MarketGossip
from peer.market.receipts import ReceiptBook, ReceiptHook
from peer.market.referee import REFEREE_PROTOCOL, Claim, RefereeService, SpotChecks, arbitrate
from peer.market.requester import (
    Attempt,
    JobFailed,
    JobRun,
    _Waiter,
    declared_problem,
    new_request,
    to_arrays,
)
from peer.worker import Worker
from protocols import executor as ex
from protocols import requester as rq
from protocols.committee import RefereePanel
from protocols.errors import ProtocolError
from protocols.market import JobInput, LeaseTerms
from protocols.proofs import FraudProof
from protocols.receipt import Receipt, ResultCommitment, content_digest
from protocols.tensor import DEFAULT_LIMITS, TensorLimits, decode_tensors, encode_tensors
from protocols.verification import compare_outputs

log = logging.getLogger(__name__)

MICRO = 1_000_000
DIAL_TIMEOUT = 5.0
PREPARE_TIMEOUT = 5.0
RESOLVE_TIMEOUT = 3.0
REDISCOVER_S = 60.0
MESH_TARGET = 4  # GossipSub's degree_low: more are grafted by heartbeats
MESH_SETTLE_S = 0.5
MAX_DIALS = 8
REFEREE_MIN_S = 5.0  # arbitration gets at least this long, even past the job's deadline
REFEREE_MAX_S = 20.0
_CID_RE = re.compile(r"[0-9a-f]{64}")

Arrays = dict[str, npt.NDArray[Any]]


def to_micro(credits: float) -> int:
    if credits < 0:
        raise ValueError(f"a price must not be negative, got {credits}")
    return round(credits * MICRO)


class UnknownModel(LookupError):
    """No model of that name is in the local registry or in any ad found."""


@dataclass
class InferResult:
    """One job's outputs and its receipt. ``price`` is in micro-credits (as in the receipt)."""

    outputs: Arrays
    receipt: Receipt
    executor: str
    price: int
    latency_ms: float
    model_cid: str
    attempts: list[tuple[str, str]] = field(default_factory=list)
    spot_check: str | None = None  # None: not checked; "agree" or why the outputs disagree
    fraud_proofs: list[FraudProof] = field(default_factory=list)  # cheaters this job exposed
    wire: Any = field(default=None, repr=False)  # the outputs as received (for referees)

    def to_dict(self) -> dict[str, Any]:
        c = self.receipt.commitment.message
        return {
            "model_cid": self.model_cid,
            "executor": self.executor,
            "price": self.price,
            "price_credits": self.price / MICRO,
            "latency_ms": round(self.latency_ms, 3),
            "receipt": {
                "id": self.receipt.receipt_id.hex(),
                "job_id": c.job_id.hex(),
                "requester": c.requester,
                "executor": c.executor,
                "model_cid": c.model_cid,
                "price": c.price,
                "count": c.count,
                "compute_ms": c.compute_ms,
                "input_digest": c.input_digest.hex(),
                "output_digest": c.output_digest.hex(),
                "bytes": self.receipt.to_bytes().hex(),
            },
            "attempts": [list(a) for a in self.attempts],
            "spot_check": self.spot_check,
            "fraud": [p.offender for p in self.fraud_proofs],
        }


@dataclass(frozen=True)
class MarketSettings:
    price: float = 1.0
    max_price: float = 10.0
    bid_window: float = 0.2
    job_timeout: float = 30.0
    max_concurrent: int = 2
    max_queue: int = 4
    limits: TensorLimits = DEFAULT_LIMITS
    policy: rq.RequesterPolicy = field(default_factory=rq.RequesterPolicy)

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
    ) -> None:
        self.peer = peer
        self.key = peer.key
        self.peer_id: str = peer.peer_id
        self.host = peer.host
        self.settings = settings
        self.runtime = runtime
        self.registry = registry if registry is not None else getattr(runtime, "registry", None)
        self.receipts = ReceiptBook()
        self.gossip = MarketGossip(peer.pubsub, guard=GossipGuard(), on_request=self._on_request)
        self.served: dict[str, tuple[str, float]] = {}  # cid -> (name, p50_ms)
        self.executor: ExecutorService | None = None
        if runtime is not None:
            self.worker = Worker(
                runtime, max_concurrent=settings.max_concurrent, job_timeout=settings.job_timeout
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
                ),
                receipts=self.receipts,
                limits=settings.limits,
            )
            self.executor.on_load = getattr(peer, "set_load", None)
            self.referee: RefereeService | None = RefereeService(
                key=self.key,
                peer_id=self.peer_id,
                host=self.host,
                worker=self.worker,
                limits=settings.limits,
                panel_for=self._panel_for,
            )
        else:
            self.referee = None
        self._nursery: trio.Nursery | None = None
        self._discovered: dict[str, float] = {}
        self._servers: dict[str, set[str]] = {}  # cid -> servers found (providers, ads)
        self.spot_checks = SpotChecks(rng or random.Random())
        self.proven_cheaters: set[str] = set()  # found by our own spot checks
        self.banned: Container[str] = _Banned(self)

    def _rule(self) -> Any:
        """The network's committee rule, when this peer runs settlement."""
        settlement = getattr(self.peer, "settlement", None)
        return None if settlement is None else settlement.ledger.rule

    def _panel_for(self, c: ResultCommitment) -> RefereePanel | None:
        rule = self._rule()
        return None if rule is None else rule.referees_for(c.job_id, (c.requester, c.executor))

    @property
    def on_receipt(self) -> list[ReceiptHook]:
        """Coroutines called with ``(receipt, role)`` for every receipt (settlement hooks here)."""
        return self.receipts.on_receipt

    def models_source(self) -> list[tuple[str, str, float]]:
        """What the capability ad lists: ``(cid, name, p50_ms)`` of every served model."""
        return [(cid, name, p50) for cid, (name, p50) in self.served.items()]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.receipts.attach(nursery)
            await nursery.start(self.gossip.run)
            if self.executor is not None:
                await nursery.start(self.executor.run)
            if self.referee is not None:
                await nursery.start(self.referee.run)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.receipts.attach(None)
                self._nursery = None
                if self.executor is not None:
                    self.host.remove_stream_handler(TProtocol(JOB_PROTOCOL))
                nursery.cancel_scope.cancel()

    # --- executor side -----------------------------------------------------------------

    def _on_request(self, request: Any) -> None:
        if self.executor is not None:
            self.executor.on_request(request)

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
            self.executor.offers[entry.cid] = ex.ModelOffer(price=micro, p50_ms=max(1, round(p50)))
            await self.gossip.join(entry.cid, serve=True)
            done.append(entry.cid)
            log.info("serving %s (%s) at %s, p50 %.1f ms", entry.name, entry.cid[:12], micro, p50)
        if done and hasattr(self.peer, "models_changed"):
            self.peer.models_changed()
        return done

    # --- requester side ---------------------------------------------------------------

    async def resolve(self, model: str) -> tuple[str, ModelEntry | None]:
        """A model name, cid or cid prefix -> (cid, local registry entry or None)."""
        if self.registry is not None:
            try:
                entry: ModelEntry = self.registry.get(model)
                return entry.cid, entry
            except ModelNotFound:
                pass
        if _CID_RE.fullmatch(model):
            return model, None
        # A fresh peer's ad may not list its models yet: look again for a short while.
        ads: list[Any] = []
        with trio.move_on_after(RESOLVE_TIMEOUT):
            for _ in range(50):
                ads = await self.peer.find_ads()
                cids = {m.cid for ad in ads for m in ad.models if m.name == model}
                if len(cids) == 1:
                    return cids.pop(), None
                if len(cids) > 1:
                    raise UnknownModel(
                        f"model name {model!r} is ambiguous: peers serve it as {sorted(cids)}; "
                        "give a cid"
                    )
                await trio.sleep(0.3)
        served = sorted({m.name for ad in ads for m in ad.models if m.name})
        raise UnknownModel(
            f"no peer serves a model named {model!r} ({len(ads)} peers found; "
            f"models served: {', '.join(served) or 'none'})"
        )

    async def _prepare(self, cid: str, until: float) -> None:
        """Join the cid's topic and get executors of it into our gossip mesh.

        Servers are looked up (DHT providers, ads) and dialed the first time and
        then at most once a minute; a warm topic costs nothing here.
        """
        await self.gossip.join(cid)
        fresh = time.monotonic() - self._discovered.get(cid, -1e9) < REDISCOVER_S
        if fresh and self.gossip.mesh_peers(cid):
            return
        budget = max(0.1, min(PREPARE_TIMEOUT, (until - time.time()) / 2))
        with trio.move_on_after(budget):
            candidates = set(self.gossip.topic_peers(cid))
            if not fresh:
                candidates |= await self._connect_servers(cid)
                self._discovered[cid] = time.monotonic()
            ids = [ID.from_base58(c) for c in candidates]
            await self.gossip.wait_for_mesh(cid, ids, limit=budget)
            # Give the other servers just dialed a moment to graft too (event-driven).
            want = min(len(ids), MESH_TARGET)
            with trio.move_on_after(min(MESH_SETTLE_S, budget)):
                for _ in range(100):  # GossipSub has no "mesh grew" event to wait on
                    if len(self.gossip.mesh_peers(cid)) >= want:
                        break
                    await trio.sleep(0.01)

    async def _connect_servers(self, cid: str) -> set[str]:
        """Find peers serving ``cid`` (DHT providers, then ads) and dial a few of them."""
        found: dict[str, tuple[str, ...]] = {}
        try:
            for p in await self.peer.find_providers(cid):
                found.setdefault(p.peer_id, p.addrs)
        except Exception as exc:  # DHT errors: fall back to ads
            log.debug("find_providers failed: %s", exc)
        if not found:
            for ad in await self.peer.find_ads():
                if any(m.cid == cid for m in ad.models):
                    found.setdefault(ad.peer_id, ad.addrs)
        found.pop(self.peer_id, None)
        self._servers[cid] = set(found)
        connected: set[str] = set()

        async def dial(pid: str, addrs: tuple[str, ...]) -> None:
            for a in addrs:
                full = a if "/p2p/" in a else f"{a}/p2p/{pid}"
                try:
                    with trio.fail_after(DIAL_TIMEOUT):
                        await self.host.connect(info_from_p2p_addr(Multiaddr(full)))
                    connected.add(pid)
                    return
                except Exception as exc:  # one bad address: try the next
                    log.debug("dial %s failed: %s", full, exc)

        async with trio.open_nursery() as nursery:
            for pid, addrs in list(found.items())[:MAX_DIALS]:
                nursery.start_soon(dial, pid, addrs)
        return connected

    async def _open_stream(self, executor: str, until: float) -> FrameStream:
        return FrameStream(await self._new_stream(executor, until, JOB_PROTOCOL))

    async def _open_referee(self, referee: str, until: float) -> Any:
        return await self._new_stream(referee, until, REFEREE_PROTOCOL)

    async def _new_stream(self, executor: str, until: float, protocol: str) -> Any:
        pid = ID.from_base58(executor)
        budget = max(0.05, min(DIAL_TIMEOUT, until - time.time()))
        with trio.fail_after(budget):
            if not self.host.get_network().connections.get(pid):
                try:
                    known = self.host.get_peerstore().addrs(pid)
                except Exception:
                    known = []
                if not known:
                    ad = await self.peer.find_ad(executor)
                    for a in ad.addrs if ad is not None else ():
                        info = info_from_p2p_addr(Multiaddr(a))
                        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
            return await self.host.new_stream(pid, [TProtocol(protocol)])

    def _new_run(
        self,
        cid: str,
        entry: ModelEntry | None,
        request: Any,
        *,
        single_input: Any = None,
        banned: frozenset[str] = frozenset(),
    ) -> JobRun:
        """A JobRun that ignores bids of ``banned``, of proven cheaters and of accounts the
        ledger has banned."""

        async def publish(signed: Any) -> None:
            await self.gossip.publish(cid, signed)

        return JobRun(
            key=self.key,
            request=request,
            publish=publish,
            open_stream=self._open_stream,
            bid_sinks=self.gossip.bid_sinks,
            entry=entry,
            limits=self.settings.limits,
            policy=self.settings.policy,
            single_input=single_input,
            banned=_Banned(self, banned),
            expected=self.expected_bidders(cid),
        )

    def expected_bidders(self, cid: str) -> frozenset[str]:
        """Who should bid on a job for ``cid``: the servers found in provider records and
        ads that are on the model's topic now (the auction closes once they all bid)."""
        return frozenset(self._servers.get(cid, set()) & self.gossip.topic_peers(cid))

    def _check_inputs(self, entry: ModelEntry | None, inputs: Mapping[str, Any]) -> Arrays:
        arrays = to_arrays(inputs)
        if entry is not None:
            validate_inputs(entry, arrays, self.settings.limits)
        return arrays

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
        """Run one job through the market: auction, award, result, receipt.

        ``model``: name, cid or cid prefix. ``max_price`` in credits (default
        ``Config.max_price``); ``deadline`` in seconds from now (default
        ``Config.job_timeout``); ``spot_check``: probability of also running
        the job on a second executor and comparing the outputs. Raises
        ``UnknownModel``, ``edge_models.errors.InvalidInput`` (checked here when
        the model is in the local registry), or a ``protocols.requester.MarketFailure``
        (``NoExecutors``, ``ExecutorsFailed``, ``DeadlineExceeded``).
        """
        t0 = time.perf_counter()
        until = time.time() + (self.settings.job_timeout if deadline is None else deadline)
        cid, entry = await self.resolve(model)
        arrays = self._check_inputs(entry, inputs)
        wire = encode_tensors(arrays)
        result = await self._one_job(cid, entry, wire, max_price, until, bid_window, spot_check)
        if spot_check > 0 and self.spot_checks.want(spot_check):
            result = await self._spot_check(result, cid, entry, wire, max_price, until, bid_window)
        result.latency_ms = (time.perf_counter() - t0) * 1e3
        return result

    async def _spot_check(
        self,
        result: InferResult,
        cid: str,
        entry: ModelEntry | None,
        wire: Any,
        max_price: float | None,
        until: float,
        bid_window: float | None,
    ) -> InferResult:
        """Run the job again on another executor (not on the job's referee panel if another
        one bids); on disagreement the referees decide, and the honest result is returned."""
        c = result.receipt.commitment.message
        check = await self._second_opinion(
            cid, entry, wire, max_price, until, bid_window, c.job_id, result.executor
        )
        if isinstance(check, str):
            result.spot_check = check
            return result
        verdict = compare_outputs(result.outputs, check.outputs)
        if verdict.agree:
            result.spot_check = "agree"
            return result
        log.warning(
            "spot check: %s and %s disagree: %s", result.executor, check.executor, verdict.reason
        )
        claims = [Claim(r.receipt.commitment, r.wire) for r in (result, check)]
        proofs, why = await self._referee(claims, wire, verdict.reason, until)
        cheaters = {p.offender for p in proofs}
        honest = check if result.executor in cheaters else result
        honest.fraud_proofs, honest.spot_check = proofs, why
        return honest

    async def _second_opinion(
        self,
        cid: str,
        entry: ModelEntry | None,
        wire: Any,
        max_price: float | None,
        until: float,
        bid_window: float | None,
        job_id: bytes,
        executor: str,
    ) -> InferResult | str:
        """The same inputs as a fresh job on another executor: off the checked job's referee
        panel if one of those bids, else (small swarms) any other; or why not."""
        panel = self.referees_for(job_id, executor)
        if panel is not None:
            try:
                return await self._one_job(
                    cid,
                    entry,
                    wire,
                    max_price,
                    until,
                    bid_window,
                    0.0,
                    banned={executor, *panel.members},
                )
            except rq.MarketFailure as exc:
                if time.time() >= until:
                    return f"not checked: {exc}"
        try:
            return await self._one_job(
                cid, entry, wire, max_price, until, bid_window, 0.0, banned={executor}
            )
        except rq.MarketFailure as exc:
            return f"not checked: {exc}"

    def referees_for(self, job_id: bytes, executor: str) -> RefereePanel | None:
        """The referee panel of our job run by ``executor`` (None when settlement is off)."""
        rule = self._rule()
        return None if rule is None else rule.referees_for(job_id, (self.peer_id, executor))

    async def _referee(
        self, claims: list[Claim], wire: Any, reason: str, until: float
    ) -> tuple[list[FraudProof], str]:
        """The disagreeing claims go to their referee panels; a FraudProof bans its executor
        (here at once, everywhere once settlement spreads it). Returns the proofs and what
        happened, for ``spot_check``."""
        rule = self._rule()
        if rule is None:
            return [], f"{reason}; not refereed: no committee rule (settlement is off)"
        panels = [
            rule.referees_for(
                c.commitment.message.job_id, (self.peer_id, c.commitment.message.executor)
            )
            for c in claims
        ]
        budget = min(REFEREE_MAX_S, max(REFEREE_MIN_S, until - time.time()))
        evidence = await arbitrate(
            self._open_referee, claims, wire, panels, limits=self.settings.limits, wait_s=budget
        )
        proofs = [e for e in evidence if isinstance(e, FraudProof)]
        settlement = getattr(self.peer, "settlement", None)
        for proof in proofs:
            log.warning(
                "fraud proven against %s (job %s)",
                proof.offender,
                proof.commitment.message.job_id.hex()[:12],
            )
            self.proven_cheaters.add(proof.offender)
            if settlement is not None:
                try:
                    await settlement.ingest_fraud_proof(proof)
                except Exception as exc:  # our ban stands; the ledger may learn it by sync
                    log.warning("could not store the fraud proof: %s", exc)
        if not proofs:
            return [], f"{reason}; referees did not decide"
        cheaters = ", ".join(sorted({p.offender for p in proofs}))
        return proofs, f"{reason}; referees proved {cheaters} wrong"

    async def _one_job(
        self,
        cid: str,
        entry: ModelEntry | None,
        wire: Any,
        max_price: float | None,
        until: float,
        bid_window: float | None,
        spot_check: float,
        *,
        banned: set[str] | None = None,
    ) -> InferResult:
        t0 = time.perf_counter()
        await self._prepare(cid, until)
        request = new_request(
            requester=self.peer_id,
            cid=cid,
            wire=wire,
            max_price=to_micro(self.settings.max_price if max_price is None else max_price),
            deadline=until,
            bid_window=self.settings.bid_window if bid_window is None else bid_window,
            spot_check=spot_check,
        )
        run = self._new_run(cid, entry, request, single_input=wire, banned=frozenset(banned or ()))
        try:
            outcome = await run.run()
        except rq.NoExecutors as exc:
            self._explain(exc, cid, request.max_price)
            raise
        self.receipts.add(outcome.receipt, "requester")
        return InferResult(
            wire=outcome.wires.get(0),
            outputs=outcome.outputs[0],
            receipt=outcome.receipt,
            executor=outcome.executor,
            price=outcome.receipt.price,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            model_cid=cid,
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
        """Hold one executor for up to ``max_jobs`` jobs or ``seconds``; ``await lease.infer(x)``.

        ``spot_check`` (None: off): the first job of every batch is checked on a second
        executor, later ones with this probability; a held executor whose result disagrees
        is dropped, its batch closed and refereed (``lease.fraud_proofs``), and the other
        result returned.

        One receipt per batch (``lease.receipts``). When the executor goes away the
        jobs in flight move to the next bidder (or a new auction); when a batch is
        used up a new one is opened transparently.
        """
        cid, entry = await self.resolve(model)
        async with trio.open_nursery() as nursery:
            lease = Lease(
                self,
                nursery,
                cid,
                entry,
                max_jobs=max_jobs,
                seconds=seconds,
                max_price=to_micro(self.settings.max_price if max_price is None else max_price),
                bid_window=self.settings.bid_window if bid_window is None else bid_window,
                spot_check=spot_check,
            )
            try:
                yield lease
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(10.0):
                    await lease.aclose()
                nursery.cancel_scope.cancel()


class _Banned:
    """Whose bids a job ignores: ``extra``, our proven cheaters, and the ledger's banned."""

    def __init__(self, market: MarketService, extra: Iterable[str] = ()) -> None:
        self.market = market
        self.extra = frozenset(extra)

    def __contains__(self, peer_id: object) -> bool:
        if peer_id in self.extra or peer_id in self.market.proven_cheaters:
            return True
        settlement = getattr(self.market.peer, "settlement", None)
        return settlement is not None and settlement.ledger.is_banned(peer_id)


class Lease:
    """Jobs over one held executor. Made by ``MarketService.lease``."""

    MAX_TRIES = 6

    def __init__(
        self,
        market: MarketService,
        nursery: trio.Nursery,
        cid: str,
        entry: ModelEntry | None,
        *,
        max_jobs: int,
        seconds: float,
        max_price: int,
        bid_window: float,
        spot_check: float | None = None,
    ) -> None:
        self.market = market
        self.nursery = nursery
        self.cid = cid
        self.entry = entry
        self.max_jobs = max_jobs
        self.seconds = seconds
        self.max_price = max_price
        self.bid_window = bid_window
        self.receipts: list[Receipt] = []
        self.errors: list[rq.MarketFailure] = []
        self.spot_check = spot_check
        self.spot_checks: list[str] = []  # outcome of each check: "agree" or what happened
        self.fraud_proofs: list[FraudProof] = []
        self.jobs_done = 0
        self._current: JobRun | None = None
        self._runs: list[JobRun] = []
        self._lock = trio.Lock()
        self._closed = False
        self._until = 0.0

    @property
    def executor(self) -> str | None:
        run = self._current
        att = run.attempt if run is not None else None
        return att.executor if att is not None else None

    async def _run(self, wire: Any) -> JobRun:
        """The batch to send on: the current one, or a new auction (``wire``: a job's
        inputs, whose names/shapes the JobRequest announces)."""
        async with self._lock:  # one auction at a time, however many callers
            run = self._current
            if run is not None and not run.done.is_set() and time.time() < self._until - 0.5:
                att = run.attempt
                if att is None or att.next_seq < self.max_jobs:
                    return run
            until = time.time() + self.seconds
            self._until = until
            deadline = until + max(5.0, self.market.settings.job_timeout / 3)
            await self.market._prepare(self.cid, deadline)
            request = new_request(
                requester=self.market.peer_id,
                cid=self.cid,
                wire=wire,
                max_price=self.max_price,
                deadline=deadline,
                bid_window=self.bid_window,
                lease=LeaseTerms(max_jobs=self.max_jobs, until=until),
            )
            run = self.market._new_run(self.cid, self.entry, request)
            await self.nursery.start(self._drive, run)
            old = self._current
            if old is not None and not old.done.is_set():
                att = old.attempt
                # A used-up batch commits by itself after its last job; an expiring one is closed.
                if att is None or att.next_seq < self.max_jobs:
                    self.nursery.start_soon(old.close_batch)
            self._current = run
            self._runs.append(run)
            return run

    async def _drive(self, run: JobRun, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            outcome = await run.run(task_status=task_status)
        except rq.MarketFailure as exc:
            if not self._closed:
                self.errors.append(exc)
            return
        self.receipts.append(outcome.receipt)
        self.market.receipts.add(outcome.receipt, "requester")

    async def infer(self, inputs: Mapping[str, Any]) -> Arrays:
        """Run one job on the leased executor; returns its outputs."""
        if self._closed:
            raise RuntimeError("this lease is closed")
        arrays = self.market._check_inputs(self.entry, inputs)
        wire = encode_tensors(arrays)
        digest = content_digest(wire)
        budget = max(1.0, self.market.settings.job_timeout)
        last = "no executor held the lease"
        for _ in range(self.MAX_TRIES):
            run = await self._run(wire)
            att = await run.current_attempt()
            if att is None:
                if run.error is not None and run.outcome is None:
                    if self._current is run:
                        self._current = None
                    if isinstance(run.error, rq.NoExecutors | rq.DeadlineExceeded):
                        raise run.error
                    last = str(run.error)
                continue
            if att.next_seq >= self.max_jobs:
                continue
            seq = att.next_seq
            att.next_seq += 1
            waiter = _Waiter()
            att.waiters[seq] = waiter
            att.inputs[seq] = digest
            assert att.fs is not None
            try:
                await att.fs.send(JobInput(att.award.job_id, seq, wire))
                eta = att.bid.eta_ms / 1000.0
                with trio.move_on_after(max(budget, eta * 4 + 1.0)) as cs:
                    await waiter.done.wait()
            except Exception as exc:  # stream gone under us: fail over
                last = f"{att.executor}: {exc}"
                self._report(run, att, f"job stream failed: {exc}")
                continue
            if cs.cancelled_caught:
                last = f"{att.executor}: no result for job {seq} in time"
                self._report(run, att, last)
                continue
            if waiter.error is not None:
                raise JobFailed(waiter.error)
            if waiter.lost or waiter.wire is None:
                last = f"{att.executor}: {att.failure or 'executor went away'}"
                continue
            try:
                outputs = decode_tensors(waiter.wire, limits=self.market.settings.limits)
            except ProtocolError as exc:
                self._report(run, att, f"outputs do not decode: {exc}")
                continue
            problem = declared_problem(outputs, self.entry)
            if problem:
                self._report(run, att, f"outputs of job {seq}: {problem}")
                continue
            self.jobs_done += 1
            if self.spot_check is not None and self.market.spot_checks.want(
                self.spot_check, first_lease_job=seq == 0
            ):
                outputs = await self._check(run, att, seq, wire, waiter.wire, outputs)
            return outputs
        raise rq.ExecutorsFailed(model_cid=self.cid, job_id=b"\0" * 16, attempts=(("lease", last),))

    async def _check(
        self, run: JobRun, att: Attempt, seq: int, wire: Any, out_wire: Any, outputs: Arrays
    ) -> Arrays:
        """Spot-check job ``seq`` of the held executor; returns the outputs to trust."""
        market = self.market
        until = time.time() + max(1.0, market.settings.job_timeout)
        check = await market._second_opinion(
            self.cid,
            self.entry,
            wire,
            self.max_price / MICRO,
            until,
            self.bid_window,
            att.award.job_id,
            att.executor,
        )
        if isinstance(check, str):
            self.spot_checks.append(check)
            return outputs
        verdict = compare_outputs(outputs, check.outputs)
        if verdict.agree:
            self.spot_checks.append("agree")
            return outputs
        log.warning(
            "lease spot check: %s and %s disagree: %s", att.executor, check.executor, verdict.reason
        )
        # Stop sending to it, and get its signed commitment for what it ran: the evidence.
        if self._current is run:
            self._current = None
        await run.close_batch()
        with trio.move_on_after(max(1.0, until - time.time())):
            await run.done.wait()
        outcome = run.outcome
        if outcome is None:  # it never committed: it is not paid, there is nothing to prove
            self.spot_checks.append(f"{verdict.reason}; the executor did not commit")
            return check.outputs
        seqs = sorted(outcome.wires)
        claim = Claim(
            outcome.receipt.commitment,
            out_wire,
            seq=seqs.index(seq),
            ins=tuple(att.inputs[s] for s in seqs),
            outs=tuple(content_digest(outcome.wires[s]) for s in seqs),
        )
        claims = [claim, Claim(check.receipt.commitment, check.wire)]
        proofs, why = await market._referee(claims, wire, verdict.reason, until)
        self.fraud_proofs += proofs
        self.spot_checks.append(why)
        return check.outputs if att.executor in {p.offender for p in proofs} else outputs

    @staticmethod
    def _report(run: JobRun, att: Attempt, reason: str) -> None:
        if run.attempt is att:
            att.failure = reason
            att.scope.cancel()
            run.post(rq.AwardFailed(att.executor, reason, time.time()))

    async def aclose(self) -> None:
        """Close the open batch (its receipt comes back) and wait for every run to end."""
        self._closed = True
        for run in self._runs:
            if not run.done.is_set():
                await run.close_batch()
        for run in self._runs:
            with trio.move_on_after(5.0):
                await run.done.wait()


@asynccontextmanager
async def open_market(
    peer: Any,
    *,
    runtime: Any = None,
    registry: Any = None,
    settings: MarketSettings | None = None,
    serve: Iterable[str] | bool = True,
    rng: random.Random | None = None,
) -> AsyncIterator[MarketService]:
    """Run a MarketService on ``peer`` (stopped on exit). With a ``runtime`` it serves
    ``serve`` (model refs; True = every model in the registry; False = none)."""
    market = MarketService(
        peer,
        settings=settings or MarketSettings.from_config(peer.config),
        runtime=runtime,
        registry=registry,
        rng=rng,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(market.run)
        if runtime is not None and serve is not False:
            await market.serve(None if serve is True else list(serve))
        try:
            yield market
        finally:
            nursery.cancel_scope.cancel()
