"""Run a pipeline (``protocols.pipeline``) through the market, stage by stage.

Placement first: from the ads of the peers that serve the whole model and each
stage (their measured p50s), ``choose_placement`` runs the pipeline split only
where the estimate beats the best single node that holds the whole model
(stage p50s + one market hop per stage + the bytes of every cut, against that
node's p50 + one hop); otherwise the whole model runs as one ordinary job.
Throughput is not in the estimate yet (no micro-batches in flight).

Each stage is an ordinary market job on the stage's model cid: its own
auction, so the executor of every stage is picked from that stage's bids; its
own receipt; spot checks per stage with the same probability as a plain job.
A stage whose executor dies or fails is re-awarded to the next bidder (or a
new auction) by the requester machinery; earlier stages are not re-run, since
their outputs are held here.

Streaming (the default; ``Streamer``): every stage is auctioned and awarded at
once, each stage executor gets a signed ``StageRoute`` (``peer.market.stage_link``)
and forwards its outputs straight to the next one; the requester gets digests
(``JobForwarded``) and the last stage's outputs. A dead stage executor is
replaced by that stage's next bidder and the previous executor forwards its held
outputs again; a failed forward returns the outputs to the requester, which
sends them on itself (the route-through-requester path, for that cut only).
With a spot check (it needs the intermediates) or ``STREAM = False`` stages run
one after another through the requester: stage i+1 is sent exactly the wire
stage i returned.

After the last stage, ``check_chain`` verifies the receipts: stage 1 committed
to the requester's input digest, each later stage to the previous stage's
output digest, each to its own stage model, and the last one to the outputs
returned. So the chain of receipts alone proves the whole computation, which
is what lets intermediates skip the requester.

``max_price`` caps each stage's job, not the sum; the deadline covers the whole
pipeline (every stage's auction runs against the same absolute deadline).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import trio

from edge_models.errors import InvalidInput, ModelNotFound
from edge_models.pipelines import PipelineEntry, PipelineStore
from peer.job_stream import JobStreamClosed
from peer.logging_setup import exception_leaves
from peer.market.auction import Arrays, InferResult
from peer.market.jobspec import JobSpec
from peer.market.referee import Claim
from peer.market.requester import (
    Attempt,
    JobFailed,
    JobRun,
    Outcome,
    _Waiter,
    new_request,
    to_arrays,
)
from peer.market.stage_link import MAX_HELD_SEQS
from protocols.market import JobRequest, LeaseTerms, TensorMeta
from protocols.pipeline import (
    Cut,
    LocalRun,
    PipelineManifest,
    Placement,
    Segment,
    StageOutput,
    StageRoute,
    answered_downstream,
    check_chain,
    check_lease_chain,
    choose_placement,
)
from protocols.proofs import FraudProof
from protocols.receipt import MAX_BATCH, Receipt, ResultCommitment, batch_digest, content_digest
from protocols.requester import DeadlineExceeded, MarketFailure
from protocols.signed import Signed, sign_message
from protocols.tensor import decode_tensors, encode_tensors
from protocols.verification import compare_outputs

if TYPE_CHECKING:
    from peer.market.service import MarketService

log = logging.getLogger(__name__)

# Placement estimates: a kept-open libp2p stream moves ~140 MB/s on loopback (DESIGN.md); a LAN
# less. Each job through the market costs its bid window plus ~10 ms (auction, award, result).
LINK_BYTES_PER_MS = 100_000.0
HOP_OVERHEAD_MS = 10.0
PLACE_BUDGET_S = 1.0  # a lookup that finds nobody can take the whole budget
STREAM = True  # stage executors forward intermediates to each other (else via the requester)


@dataclass
class PipelineResult(InferResult):
    """The last stage's outputs; ``receipt``/``executor`` are the last stage's, ``price`` the
    sum over stages; ``stages`` holds every stage's own result (and receipt)."""

    pipeline_cid: str = ""
    stages: list[InferResult] = field(default_factory=list)  # empty: run unsplit
    placement: str = ""  # why it ran split or whole
    forwarded: int = 0  # cuts whose intermediate went executor to executor (streaming)

    @property
    def receipts(self) -> list[Any]:
        """The receipts owed: one per stage run by another peer (a self-awarded stage has
        none), or the whole model's when it ran unsplit."""
        jobs = self.stages or [self]
        return [s.receipt for s in jobs if s.receipt is not None]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["model_cid"] = self.pipeline_cid
        out["pipeline"] = {
            "cid": self.pipeline_cid,
            "split": bool(self.stages),
            "placement": self.placement,
            "forwarded": self.forwarded,
            "stages": [
                {
                    "model_cid": s.model_cid,
                    "executor": s.executor,
                    "local": s.local,
                    "price": s.price,
                    "latency_ms": round(s.latency_ms, 3),
                    "attempts": [list(a) for a in s.attempts],
                    "spot_check": s.spot_check,
                    "receipt": None if s.receipt is None else s.receipt.receipt_id.hex(),
                }
                for s in self.stages
            ],
        }
        return out


def find_pipeline(market: MarketService, ref: str) -> PipelineEntry | None:
    """The pipeline ``ref`` names in this peer's store (name, cid or cid prefix), or None."""
    registry = market.registry
    store: PipelineStore | None = getattr(registry, "pipelines", None)
    if store is None:
        data_dir = getattr(getattr(market.peer, "config", None), "data_dir", None)
        if data_dir is None or not (data_dir / "models" / "pipelines").is_dir():
            return None
        store = PipelineStore(data_dir / "models" / "pipelines")
    try:
        return store.find(ref)
    except ModelNotFound:
        return None


def _check_inputs(entry: PipelineEntry, arrays: Mapping[str, Any]) -> None:
    want = {t.name: t for t in entry.manifest.inputs}
    if set(arrays) != set(want):
        raise InvalidInput(
            f"pipeline {entry.name} takes inputs {sorted(want)}, got {sorted(arrays)}"
        )
    for name, array in arrays.items():
        spec = want[name]
        if str(array.dtype) != spec.dtype:
            raise InvalidInput(f"input {name!r} must be {spec.dtype}, got {array.dtype}")
        if spec.shape is not None and len(array.shape) != len(spec.shape):
            raise InvalidInput(f"input {name!r} must have rank {len(spec.shape)}")


async def best_p50(market: MarketService, cid: str) -> float | None:
    """The lowest p50 (ms) any unbanned peer's ad gives for ``cid``; None if nobody serves it."""
    bans = market.auctions.bans
    providers = await market.peer.find_providers(cid)
    p50s = [
        m.p50_ms
        for p in providers
        if p.ad is not None and p.peer_id not in bans
        for m in p.ad.models
        if m.cid == cid
    ]
    return min(p50s) if p50s else None


def cached_p50(market: MarketService, cid: str) -> float | None:
    """The lowest p50 for ``cid`` in the unexpired ads this peer already holds (the ads its
    lookups fetched), from unbanned peers; None if none lists it."""
    cache = getattr(getattr(market.peer, "discovery", None), "ad_cache", None)
    entries = getattr(cache, "entries", None)
    if not isinstance(entries, dict):
        return None
    now, bans = market.clock(), market.auctions.bans
    p50s = [
        m.p50_ms
        for ad, _ in list(entries.values())
        if ad.expires_at > now and ad.peer_id not in bans
        for m in ad.models
        if m.cid == cid
    ]
    return min(p50s) if p50s else None


async def place(market: MarketService, entry: PipelineEntry, bid_window: float | None) -> Placement:
    """Split or whole (``protocols.pipeline.choose_placement``), from the p50s in the ads of
    the peers serving the whole model and each stage (looked up in parallel, bounded)."""
    manifest = entry.manifest
    cids = [manifest.model, *(s.cid for s in manifest.stages)]
    found: dict[str, float | None] = {}

    async def look(cid: str) -> None:
        try:
            found[cid] = await best_p50(market, cid)
        except Exception as exc:  # a failed lookup counts as nobody serving it
            log.info("pipeline %s: looking up %s failed: %s", entry.name, cid[:12], exc)
            found[cid] = None

    with trio.move_on_after(PLACE_BUDGET_S):
        async with trio.open_nursery() as nursery:
            for cid in cids:
                nursery.start_soon(look, cid)
    window = market.settings.bid_window if bid_window is None else bid_window
    # A lookup still running at the budget's end: the ads already held answer for it (a DHT
    # slowed by load must not make a split win that a known whole-model server beats);
    # with none, it is "no answer in time", not "nobody".
    for cid in cids:
        if cid not in found and (p50 := cached_p50(market, cid)) is not None:
            log.info("pipeline %s: %s from ads held (lookup late)", entry.name, cid[:12])
            found[cid] = p50
    late = [i for i, cid in enumerate(cids) if cid not in found]
    placement = choose_placement(
        found.get(manifest.model),
        [found.get(s.cid) for s in manifest.stages],
        manifest.crossing_bytes,
        bytes_per_ms=LINK_BYTES_PER_MS,
        hop_ms=window * 1e3 + HOP_OVERHEAD_MS,
        late=late,
    )
    log.info("pipeline %s: %s", entry.name, placement.why)
    return placement


async def run_pipeline(
    market: MarketService,
    entry: PipelineEntry,
    inputs: Mapping[str, Any],
    *,
    max_price: float | None = None,
    deadline: float | None = None,
    spot_check: float = 0.0,
    bid_window: float | None = None,
) -> PipelineResult:
    """Run every stage of ``entry`` as a market job, chained; verify the receipt chain."""
    t0, wall0 = market.clock(), time.perf_counter()
    until = t0 + (market.settings.job_timeout if deadline is None else deadline)
    manifest = entry.manifest
    arrays = to_arrays(inputs)
    _check_inputs(entry, arrays)
    placement = await place(market, entry, bid_window)
    if not placement.split:  # a single node beats the split: run the whole model there
        whole = await market.infer(
            manifest.model,
            arrays,
            max_price=max_price,
            deadline=max(until - market.clock(), 0.1),
            spot_check=spot_check,
            bid_window=bid_window,
        )
        values = {f.name: getattr(whole, f.name) for f in fields(InferResult)}
        return PipelineResult(**values, pipeline_cid=entry.cid, placement=placement.why)
    wire: Any = encode_tensors(arrays)
    first_digest = content_digest(wire)
    stages: list[InferResult] = []
    streamed = None
    if STREAM:
        # Which stages are spot-checked is drawn now, with the probability of a plain job
        # each: their intermediates come through here (the check needs them), the rest stream.
        n = len(manifest.stages)
        checked = frozenset(
            k for k in range(n) if spot_check > 0 and market.checker.sampler.want(spot_check)
        )
        kw = {"max_price": max_price, "bid_window": bid_window}
        streamed = await run_streamed(market, entry, arrays, wire, until, checked=checked, **kw)
    if streamed is not None:
        stages = streamed[0]
        wire = stages[-1].wire
    for i, stage in enumerate(manifest.stages if streamed is None else ()):
        if market.clock() >= until:
            raise MarketFailure(
                f"pipeline {entry.name}: the deadline passed before stage {i + 1} of "
                f"{len(manifest.stages)}",
                model_cid=stage.cid,
                job_id=bytes(16),
            )
        cid, stage_entry = await market.resolve(stage.cid)
        spec = market._spec(
            cid,
            stage_entry,
            max_price=max_price,
            until=until,
            bid_window=bid_window,
            spot_check=spot_check,
        )
        result = await market.auctions.one_job(spec, wire)
        if spot_check > 0 and market.checker.sampler.want(spot_check):
            result = await market.checker.check(result, spec, wire)
        stages.append(result)
        # Exactly what the executor returned goes on: stage i's output digest is stage i+1's
        # input digest.
        wire = result.wire if result.wire is not None else encode_tensors(result.outputs)
    links: list[ResultCommitment | LocalRun] = [
        LocalRun(content_digest(s.wire if s.wire is not None else encode_tensors(s.outputs)))
        if s.receipt is None
        else s.receipt.commitment.message
        for s in stages
    ]
    check_chain(manifest, first_digest, links, content_digest(wire))
    last = stages[-1]
    return PipelineResult(
        outputs=last.outputs,
        receipt=last.receipt,
        executor=last.executor,
        price=sum(s.price for s in stages),
        latency_ms=(time.perf_counter() - wall0) * 1e3,
        model_cid=last.model_cid,
        attempts=[a for s in stages for a in s.attempts],
        spot_check=None
        if all(s.spot_check is None for s in stages)
        else ";".join(f"stage {i + 1}: {s.spot_check}" for i, s in enumerate(stages)),
        fraud_proofs=[p for s in stages for p in s.fraud_proofs],
        wire=wire,
        pipeline_cid=entry.cid,
        stages=stages,
        placement=placement.why,
        forwarded=0 if streamed is None else streamed[1].forwarded_cuts,
    )


# --- streaming: intermediates go from stage executor to stage executor -----------------

MAX_STAGE_TRIES = 4  # executors tried per stage (each failover is the JobRun's own)


def _dims(manifest: PipelineManifest, arrays: Mapping[str, Any]) -> dict[str, int]:
    """The sizes the model's symbolic input dims take in this job (e.g. batch, sequence)."""
    dims: dict[str, int] = {}
    for t in manifest.inputs:
        shape = arrays[t.name].shape
        for d, n in zip(t.shape or (), shape, strict=False):
            if isinstance(d, str):
                dims.setdefault(d, int(n))
    return dims


def stage_request(
    requester: str,
    spec: JobSpec,
    cut: Cut,
    dims: Mapping[str, int],
    until: float,
    lease: LeaseTerms | None = None,
) -> JobRequest:
    """The JobRequest of a stage whose inputs are forwarded: its inputs as the manifest's cut
    lists them (symbolic dims as this job's inputs fix them, unknown ones 1), its bytes as
    the splitter counted them."""
    metas = tuple(
        TensorMeta(
            name=t.name,
            dtype=t.dtype,
            shape=tuple(
                d if isinstance(d, int) else dims.get(d, 1) if isinstance(d, str) else 1
                for d in (t.shape or ())
            ),
        )
        for t in cut.tensors
    )
    return JobRequest(
        job_id=os.urandom(16),
        requester=requester,
        model_cid=spec.cid,
        inputs=metas,
        input_bytes=max(1, cut.bytes),
        max_price=spec.max_price,
        deadline=until,
        bid_window=spec.bid_window,
        spot_check=0.0,
        nonce=os.urandom(16),
        lease=lease,
    )


class _Stage:
    """One stage's JobRun and who holds it, as the requester routes it."""

    def __init__(self, index: int, spec: JobSpec, run: JobRun) -> None:
        self.index = index
        self.spec = spec
        self.run = run
        self.routed: str | None = None  # the executor we gave its route
        self.att: Attempt | None = None  # the award that route is for
        self.outcome: Outcome | None = None
        self.error: MarketFailure | None = None
        self.result: InferResult | None = None  # a spot-checked stage's result, as checked

    @property
    def job_id(self) -> bytes:
        return self.run.request.job_id


class StreamSetupFailed(Exception):
    """Routing the stages failed before anything ran: run them through the requester."""


class Streamer:
    """Runs every stage of a pipeline as its own market job at once; each stage executor
    forwards its outputs straight to the next one's (``peer.market.stage_link``)."""

    def __init__(
        self,
        market: MarketService,
        entry: PipelineEntry,
        until: float,
        *,
        checked: frozenset[int] = frozenset(),
    ) -> None:
        self.market = market
        self.entry = entry
        self.until = until
        self.stages: list[_Stage] = []
        # Stages spot-checked this run (0-based): their inputs and outputs go through the
        # requester (the cuts around them are not streamed), which runs the check before
        # it sends their outputs on, as the sequential path does.
        self.checked = checked
        n = len(entry.manifest.stages)
        self.via_requester = frozenset(
            cut for k in checked for cut in (k - 1, k) if 0 <= cut < n - 1
        )
        self.forwarded_cuts = 0  # cuts whose intermediate skipped the requester
        self.returned_cuts = 0  # cuts whose forward failed: routed through the requester
        # Per stage, the lease job its current executor's seq 0 is (a stage that failed over
        # mid-lease starts its replacement at the first job the dead one did not answer).
        self.base: list[int] = []

    def _executor(self, k: int) -> str:
        st = self.stages[k]
        att = st.run.attempt
        return st.routed or (att.executor if att is not None else "")

    def _route(self, k: int, *, upstream: bool = True) -> StageRoute | None:
        """Stage k's route to its current executor, or None (nothing to route: the last
        stage fed by the requester)."""
        st, n = self.stages[k], len(self.stages)
        if not self._executor(k):
            return None
        up = k > 0 and upstream and k - 1 not in self.via_requester
        down = k < n - 1 and k not in self.via_requester
        if not up and not down:
            return None
        return StageRoute(
            job_id=st.job_id,
            requester=self.market.peer_id,
            executor=self._executor(k),
            upstream=self._executor(k - 1) if up else "",
            upstream_job=self.stages[k - 1].job_id if up else b"",
            downstream=self._executor(k + 1) if down else "",
            downstream_job=self.stages[k + 1].job_id if down else b"",
            expires=self.until,
            seq_shift=self.base[k + 1] - self.base[k] if down else 0,
        )

    async def _send(self, k: int, route: StageRoute | None) -> str:
        if route is None:
            return ""
        signed = sign_message(self.market.key, route)
        return await self.market.links.send_route(route.executor, signed, self.until)

    async def start(
        self,
        wire: Any,
        arrays: Mapping[str, Any],
        *,
        lease: LeaseTerms | None = None,
        **kw: Any,
    ) -> None:
        """Build every stage's JobRun (``lease``: each holds its executor for many jobs);
        ``drive`` runs their auctions at once, ``route_all`` routes the winners."""
        market, manifest = self.market, self.entry.manifest
        dims = _dims(manifest, arrays)
        resolved = [await market.resolve(stage.cid) for stage in manifest.stages]
        async with trio.open_nursery() as nursery:  # servers found before the auctions
            for cid, _ in resolved:
                nursery.start_soon(market.auctions.prepare, cid, self.until)
        # A stage waits for the stages before it: only a dead or failing executor is
        # dropped before the deadline, not a slow one.
        base = market.auctions.policy
        policy = replace(base, grace_s=max(base.grace_s, self.until - market.clock()))
        for k, (cid, stage_entry) in enumerate(resolved):
            spec = market._spec(cid, stage_entry, until=self.until, **kw)
            if k == 0:
                request = new_request(
                    requester=market.peer_id,
                    cid=cid,
                    wire=wire,
                    max_price=spec.max_price,
                    deadline=self.until,
                    bid_window=spec.bid_window,
                    lease=lease,
                )
            else:
                request = stage_request(
                    market.peer_id, spec, manifest.cuts[k - 1], dims, self.until, lease
                )
            run = market.auctions.new_run(spec, request, policy=policy)
            run.inputs_forwarded = k > 0 and k - 1 not in self.via_requester
            self.stages.append(_Stage(k, spec, run))
            self.base.append(0)

    async def drive(self, st: _Stage) -> None:
        try:
            st.outcome = await st.run.run()
        except MarketFailure as exc:
            st.error = exc
        finally:
            self.market.auctions.record(st.spec.cid, st.run.job.expected, st.run.job.bidders)

    async def awarded(self, k: int) -> Attempt:
        st = self.stages[k]
        att = await st.run.current_attempt()
        if att is None:
            raise (
                st.error
                or st.run.error
                or MarketFailure(
                    f"stage {k + 1}: no executor", model_cid=st.spec.cid, job_id=st.job_id
                )
            )
        return att

    async def route_all(self) -> None:
        """Every stage awarded: tell each executor its neighbours."""
        atts: list[Attempt | None] = [None] * len(self.stages)

        async def wait(k: int) -> None:
            atts[k] = await self.awarded(k)

        async with trio.open_nursery() as nursery:
            for k in range(len(self.stages)):
                nursery.start_soon(wait, k)
        whys: list[str] = []

        async def give(k: int) -> None:
            why = await self._send(k, self._route(k))
            if why:
                whys.append(why)

        async with trio.open_nursery() as nursery:
            for k in range(len(self.stages)):
                nursery.start_soon(give, k)
        if whys:
            raise StreamSetupFailed("; ".join(whys))
        for k, att in enumerate(atts):
            assert att is not None
            self.stages[k].routed = att.executor
            self.stages[k].att = att

    async def reroute(self, k: int, att: Attempt, *, fed: bool) -> None:
        """Stage k moved to ``att`` (its executor died or refused): route the new executor,
        point the next stage at it, and (``fed`` False) have the previous stage's executor
        forward its held outputs to it again."""
        st = self.stages[k]
        st.routed = att.executor
        why = await self._send(k, self._route(k, upstream=not fed))
        if why:
            raise MarketFailure(f"stage {k + 1}: {why}", model_cid=st.spec.cid, job_id=st.job_id)
        if k + 1 < len(self.stages):
            why = await self._send(k + 1, self._route(k + 1))
            if why:
                log.info("pipeline %s: %s", self.entry.name, why)
        if not fed:
            why = await self._send(k - 1, self._route(k - 1))
            if why:
                raise MarketFailure(
                    f"stage {k}: its outputs cannot be sent to stage {k + 1} again: {why}",
                    model_cid=st.spec.cid,
                    job_id=st.job_id,
                )

    async def stage_result(self, k: int, held: Any, digest: bytes) -> _Waiter:
        """Give stage k its input (``held``: the wire, when the requester has it; else the
        previous stage's executor forwards it, of ``digest``) and wait for its result,
        following its JobRun from executor to executor."""
        st = self.stages[k]
        for _ in range(MAX_STAGE_TRIES):
            att = await self.awarded(k)
            moved = att.executor != st.routed
            if moved:
                await self.reroute(k, att, fed=held is not None)
            try:
                if held is not None:
                    _, waiter = await st.run.send_input(att, held, digest)
                else:
                    _, waiter = st.run.expect_input(att, digest)
            except JobStreamClosed:
                await st.run.attempt_changed.wait()
                continue
            await waiter.done.wait()
            if waiter.error is not None:
                raise JobFailed(waiter.error)
            if not waiter.lost:
                return waiter
        raise st.error or MarketFailure(
            f"stage {k + 1}: executors kept failing", model_cid=st.spec.cid, job_id=st.job_id
        )

    async def run(self, wire: Any) -> None:
        held: Any = wire
        digest = content_digest(wire)
        n = len(self.stages)
        for k in range(n):
            waiter = await self.stage_result(k, held, digest)
            if waiter.forwarded is not None:
                held, digest = None, waiter.forwarded
                self.forwarded_cuts += 1
            elif k in self.checked:
                held = await self.spot_check(k, held)
                digest = content_digest(held)
            else:
                held, digest = waiter.wire, content_digest(waiter.wire)
                if k < n - 1 and k not in self.via_requester:  # the forward failed
                    self.returned_cuts += 1
        for st in self.stages:  # every acceptance goes out
            with trio.move_on_after(max(0.1, self.until - self.market.clock())):
                await st.run.done.wait()

    async def spot_check(self, k: int, inputs: Any) -> Any:
        """Stage k (its inputs ``inputs`` and outputs came through us) ran on another
        executor too (``SpotChecker.check``); returns the outputs to send on: the checked
        executor's, or the second opinion's where the referees found it cheated."""
        st = self.stages[k]
        with trio.move_on_after(max(0.1, self.until - self.market.clock())):
            await st.run.done.wait()  # the acceptance went out: the receipt exists
        if st.outcome is None:
            raise st.error or self._failure(k, "did not complete")
        result = _stage_result(st, st.outcome, 0.0)
        st.result = await self.market.checker.check(result, st.spec, inputs)
        return st.result.wire

    def _failure(self, k: int, why: str) -> MarketFailure:
        st = self.stages[k]
        return MarketFailure(f"stage {k + 1}: {why}", model_cid=st.spec.cid, job_id=st.job_id)


def _stage_result(st: _Stage, o: Outcome, wall_ms: float) -> InferResult:
    assert o.receipt is not None  # a streamed stage never runs on our own executor
    return InferResult(
        outputs=o.outputs.get(0, {}),
        receipt=o.receipt,
        executor=o.executor,
        price=o.receipt.price,
        latency_ms=wall_ms,
        model_cid=st.spec.cid,
        attempts=o.attempts,
        wire=o.wires.get(0),
    )


async def run_streamed(
    market: MarketService,
    entry: PipelineEntry,
    arrays: Mapping[str, Any],
    wire: Any,
    until: float,
    *,
    checked: frozenset[int] = frozenset(),
    **kw: Any,
) -> tuple[list[InferResult], Streamer] | None:
    """Run every stage at once, intermediates going executor to executor (but into and out
    of the ``checked`` stages, which are spot-checked on the way); None when the stages
    cannot be routed (then nothing ran and nothing is owed)."""
    s = Streamer(market, entry, until, checked=checked)
    await s.start(wire, arrays, **kw)
    wall0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for st in s.stages:
            nursery.start_soon(s.drive, st)
        try:
            await s.route_all()
        except StreamSetupFailed as exc:
            log.info("pipeline %s: not streaming: %s", entry.name, exc)
            nursery.cancel_scope.cancel()
            return None
        with trio.move_on_after(max(0.1, until - market.clock()) + 5.0) as cs:
            await s.run(wire)
        nursery.cancel_scope.cancel()
    if cs.cancelled_caught:
        st = s.stages[-1]
        raise DeadlineExceeded(model_cid=st.spec.cid, job_id=st.job_id, deadline=until, attempts=())
    results = []
    for st in s.stages:
        if st.outcome is None:
            raise st.error or MarketFailure(
                f"stage {st.index + 1} did not complete", model_cid=st.spec.cid, job_id=st.job_id
            )
        o = st.outcome
        assert o.receipt is not None  # a streamed stage never runs on our own executor
        market.receipts.add(o.receipt, "requester")  # accepted: owed, checked or not
        wall_ms = (time.perf_counter() - wall0) * 1e3
        results.append(st.result or _stage_result(st, o, wall_ms))
    return results, s


# --- a lease over a pipeline: micro-batches in flight, every stage busy at once -----------


def _market_failure(exc: BaseException) -> MarketFailure | None:
    """``exc`` if it is a MarketFailure, or the first of a group of only those (and
    cancellations); None otherwise."""
    if isinstance(exc, MarketFailure):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exception_leaves(exc) if not isinstance(e, trio.Cancelled)]
        if leaves and all(isinstance(e, MarketFailure) for e in leaves):
            return leaves[0]  # type: ignore[return-value]
    return None


DEFAULT_WINDOW = 4


class PipelineLease:
    """Holds one executor per stage (a lease each) for many jobs; ``map`` keeps ``window``
    jobs (micro-batches) in flight, so while stage 2 runs job n, stage 1 already runs job
    n+1. Intermediates stream executor to executor as for single jobs; one receipt per
    stage covers its batch, and the receipts chain (``check_chain(jobs=n)``).

    A stage executor that dies mid-lease is replaced without stopping the stream
    (``_take_over``): that stage's JobRun awards its next bidder (or a new auction), which
    takes over from the first job the dead one did not answer, n0 (its seq 0 is job n0).
    The requester routes it, points the next stage at it, registers jobs n0.. with it, and
    re-routes the previous stage's executor, which forwards its held outputs of jobs n0..
    again (``StageRoute.seq_shift``). No other stage runs a job twice, every job is answered
    once, and at the dead stage the dead executor is paid at most for the jobs of its last
    accepted interim commitment (all before n0), its replacement for jobs n0 on
    (``check_lease_chain`` at ``aclose``). Jobs the dead executor forwarded on although
    its answers never reached us count as answered and the new one starts after them
    (``_point_next_stage``: the next stage's new route fences the old executor off and
    reports what it took). Only where that cannot hold (the dead executor
    answered a job after one it lost; no executor left; ``MAX_STAGE_TRIES`` take-overs)
    does the lease stop streaming: the jobs not answered then run one at a time through
    ``run_pipeline`` (``fallback``; their stages already done run again, and are paid
    again). The batches are closed and paid at ``aclose``."""

    def __init__(
        self,
        market: MarketService,
        entry: PipelineEntry,
        streamer: Streamer,
        *,
        spot_check: float | None = None,
    ) -> None:
        self.market = market
        self.entry = entry
        self.s = streamer
        self.spot_check = spot_check  # as a single-model lease's: every stage's job 0, then p
        self.spot_checks: list[str] = []  # each check: "stage k job n: agree" or what happened
        self.fraud_proofs: list[FraudProof] = []
        n = len(streamer.stages)
        self.sent = 0  # jobs given to stage 1
        self.done = 0  # jobs answered (streamed or in the fallback)
        self.streamed = 0  # jobs whose last stage answered on the stream
        self.in_digests: list[bytes] = []
        self.out_digests: list[bytes] = []
        self.results: list[InferResult] = []  # one per stage, after ``aclose``
        self.failed_from: int | None = None
        self.failure = ""  # why the lease stopped streaming, if it did
        self.fallback: list[PipelineResult] = []  # jobs run one at a time after a failure
        self.failovers: list[str] = []  # each take-over: stage, job, old -> new executor
        # Per cut (stage 1's inputs, each stage's outputs), job -> digest: the chain check.
        self.cut_digests: list[dict[int, bytes]] = [{} for _ in range(n + 1)]
        # Per stage, job -> its inputs when we hold them (None: forwarded), until answered.
        self._given: list[dict[int, Any]] = [{} for _ in range(n)]
        self._next: list[int] = [0] * n  # jobs given to each stage so far
        self._waiters: list[dict[int, _Waiter]] = [{} for _ in range(n)]
        self._locks = [trio.Lock() for _ in range(n)]
        self._takeovers = [0] * n
        # Per stage, what its dead executors were paid (accepted interim commitments).
        self.paid_before: list[list[Segment]] = [[] for _ in range(n)]
        self.interim_receipts: list[Receipt] = []
        # Jobs a lost executor forwarded on before its answer reached us: its signed outputs
        # (what the next stage ran on; that executor is unpaid for them).
        self.delivered: list[Signed[StageOutput]] = []

    def _wire(self, inputs: Mapping[str, Any]) -> Any:
        arrays = to_arrays(inputs)
        _check_inputs(self.entry, arrays)
        return encode_tensors(arrays)

    def _failure(self, k: int, why: str) -> MarketFailure:
        st = self.s.stages[k]
        return MarketFailure(f"stage {k + 1}: {why}", model_cid=st.spec.cid, job_id=st.job_id)

    async def _give(self, k: int, n: int, held: Any, digest: bytes) -> None:
        """Job ``n``'s inputs go to stage k (``held``: we send them; None: the previous
        stage's executor forwards them, of ``digest``)."""
        async with self._locks[k]:
            att = await self._held_attempt(k)  # a take-over re-gives the jobs before n
            self._given[k][n] = held
            self.cut_digests[k][n] = digest
            self._next[k] = n + 1
            await self._send_one(k, n, att)

    async def _held_attempt(self, k: int) -> Attempt:
        """Stage k's live award (under its lock); one that moved to another executor is
        taken over first."""
        att = await self.s.awarded(k)
        if att is not self.s.stages[k].att:
            await self._take_over(k, att)
        return att

    async def _send_one(self, k: int, n: int, att: Attempt) -> None:
        st = self.s.stages[k]
        held, digest = self._given[k][n], self.cut_digests[k][n]
        try:
            if held is not None:
                seq, waiter = await st.run.send_input(att, held, digest)
            else:
                seq, waiter = st.run.expect_input(att, digest)
        except JobStreamClosed:  # the award ended under us: taken over when collected
            waiter = _Waiter(lost=True)
            waiter.done.set()
            self._waiters[k][n] = waiter
            return
        if seq != n - self.s.base[k]:  # never: every stage takes its jobs in order
            raise self._failure(k, f"job {n} went as seq {seq}, base {self.s.base[k]}")
        self._waiters[k][n] = waiter

    async def _take_over(self, k: int, att: Attempt) -> None:
        """Stage k's award moved to ``att`` (its executor died or was given up on): resume
        the stream there from the first job the old one did not answer."""
        st = self.s.stages[k]
        self._takeovers[k] += 1
        if self._takeovers[k] > MAX_STAGE_TRIES:
            raise self._failure(k, f"{MAX_STAGE_TRIES} executors failed mid-lease")
        ws = self._waiters[k]
        lost = [n for n, w in sorted(ws.items()) if w.lost or not w.done.is_set()]
        n0 = lost[0] if lost else self._next[k]
        late = [n for n, w in ws.items() if n > n0 and w.done.is_set() and not w.lost]
        if late:
            raise self._failure(
                k, f"its executor answered job {min(late)} but not job {n0}: cannot take over"
            )
        old = st.att
        if old is not None and old.interim is not None:  # what the dead one is owed
            self.interim_receipts.append(old.interim)
            self.market.receipts.add(old.interim, "requester")
            self.paid_before[k].append(Segment(self.s.base[k], old.interim.commitment.message))
        st.att, st.routed = att, att.executor
        if k + 1 < len(self.s.stages):  # else stage k's forwards are refused and come to us
            # The next stage is pointed at the new executor first: from then on it takes
            # nothing more from the old one, and its answer says which jobs the old one
            # forwarded to it although their JobForwarded never reached us. Those are
            # answered (by the old one, unpaid): the new one starts after them.
            n0 = await self._point_next_stage(k, old, n0)
        self.s.base[k] = n0
        why = await self.s._send(k, self.s._route(k))
        if why:
            raise self._failure(k, why)
        for n in range(n0, self._next[k]):
            await self._send_one(k, n, att)
        if k > 0:  # the previous stage's executor forwards its held outputs of n0.. again
            why = await self.s._send(k - 1, self.s._route(k - 1))
            if why:
                raise self._failure(k, f"its inputs cannot be forwarded again: {why}")
        moved = f"stage {k + 1} from job {n0}: {old.executor if old else '?'} -> {att.executor}"
        self.failovers.append(moved)
        log.warning("pipeline %s: took over %s", self.entry.name, moved)

    async def _point_next_stage(self, k: int, old: Attempt | None, n0: int) -> int:
        """Route stage k+1 to stage k's new executor (``st.routed``, set); returns the first
        job the new executor runs: ``n0``, or after the jobs from ``n0`` on that the old
        executor had forwarded to stage k+1 already (``answered_downstream``)."""
        st, nxt = self.s.stages[k], self.s.stages[k + 1]
        route = self.s._route(k + 1)
        if route is None:
            return n0
        signed = sign_message(self.market.key, route)
        why, taken = await self.market.links.route_taken(route.executor, signed, self.s.until)
        if why:
            log.info("pipeline %s: %s", self.entry.name, why)
            return n0
        if old is None or k in self.s.via_requester:
            return n0
        answered = answered_downstream(
            taken,
            requester=self.market.peer_id,
            executor=old.executor,
            job_id=st.job_id,
            to_job=nxt.job_id,
            first=n0,
            end=self._next[k],
            base=self.s.base[k],
            to_base=self.s.base[k + 1],
        )
        for n, out in answered:
            waiter = _Waiter(forwarded=out.message.output_digest)
            waiter.done.set()
            self._waiters[k][n] = waiter
            self._given[k].pop(n, None)
            self.delivered.append(out)
        if answered:
            log.warning(
                "pipeline %s: stage %d's old executor forwarded job(s) %d..%d before it was "
                "lost; its replacement starts after them",
                self.entry.name,
                k + 1,
                answered[0][0],
                answered[-1][0],
            )
        return n0 + len(answered)

    async def _answer(self, k: int, n: int) -> _Waiter:
        """Stage k's answer to job ``n``, following take-overs."""
        st = self.s.stages[k]
        for _ in range(MAX_STAGE_TRIES + 1):
            w = self._waiters[k][n]
            await w.done.wait()
            if w.error is not None:
                raise JobFailed(w.error)
            if not w.lost:
                return w
            async with self._locks[k]:
                if self._waiters[k][n] is w:  # nobody took over since
                    old = st.att
                    if old is not None:
                        with trio.move_on_after(max(1.0, self.s.until - self.market.clock())):
                            await old.ended.wait()  # its award ends: the next one follows
                    await self._held_attempt(k)
        self.failed_from = n
        raise self._failure(k, f"its executors kept failing at job {n} of the lease")

    async def _fetch(self, k: int, n: int, digest: bytes) -> Any:
        """Stage k's outputs of job ``n`` from its executor, which forwarded them on and holds
        them (``StageLinks.fetch``); they must have the digest recorded. Or why not (str)."""
        st = self.s.stages[k]
        if st.att is None:
            return f"stage {k + 1} has no executor"
        seq = n - self.s.base[k]
        if seq < 0:
            return f"stage {k + 1}'s job {n} was answered by an executor that was lost"
        limit = self.market.settings.limits.max_total_bytes
        got = await self.market.links.fetch(st.att.executor, st.job_id, seq, self.s.until, limit)
        if isinstance(got, str):
            return got
        if content_digest(got) != digest:
            return f"{st.att.executor} gave other outputs of job {n} than it forwarded"
        return got

    async def _spot_check(self, k: int, n: int, waiter: _Waiter) -> None:
        """Job ``n`` of stage k runs again on another executor, on the same inputs (ours or
        fetched from the previous stage's executor), as a single-model lease's job does.
        Agreement: it goes on. Disagreement: stage k's batch is closed (its commitment is
        the evidence), the referees judge its claim for job n, and the lease stops
        streaming (job n and the rest run on one at a time)."""
        st = self.s.stages[k]
        att, seq = st.att, n - self.s.base[k]
        where = f"stage {k + 1} job {n}"
        if att is None or seq < 0 or att.waiters.get(seq) is not waiter:
            self.spot_checks.append(f"{where}: not checked: its executor was lost")
            return
        ins = self._given[k].get(n)
        if ins is None:  # the previous stage's executor forwarded them
            ins = await self._fetch(k - 1, n, self.cut_digests[k][n])
        outs = (
            waiter.wire if waiter.forwarded is None else await self._fetch(k, n, waiter.forwarded)
        )
        why = next((x for x in (ins, outs) if isinstance(x, str)), None)
        if why is not None:
            self.spot_checks.append(f"{where}: not checked: {why}")
            return
        checker = self.market.checker
        check = await checker.second_opinion(st.spec, ins, st.job_id, att.executor)
        if isinstance(check, str):
            self.spot_checks.append(f"{where}: {check}")
            return
        outputs = decode_tensors(outs, limits=self.market.settings.limits)
        verdict = compare_outputs(outputs, check.outputs)
        if verdict.agree:
            self.spot_checks.append(f"{where}: agree")
            return
        log.warning("pipeline %s: %s: %s", self.entry.name, where, verdict.reason)
        # Stop sending to it, and get its signed commitment for what it ran: the evidence.
        await st.run.close_batch()
        with trio.move_on_after(max(1.0, self.s.until - self.market.clock())):
            await st.run.done.wait()
        outcome = st.run.outcome
        if outcome is None or outcome.receipt is None or check.receipt is None:
            why = f"{verdict.reason}; the executor did not commit"
        else:
            c = outcome.receipt.commitment
            count = c.message.count
            claim = Claim(
                c,
                outs,
                seq=seq,
                ins=tuple(att.inputs[s] for s in range(count)),
                outs=tuple(
                    att.forwarded[s] if s in att.forwarded else content_digest(att.outputs[s])
                    for s in range(count)
                ),
            )
            claims = [claim, Claim(check.receipt.commitment, check.wire)]
            proofs, why = await checker.referee(claims, ins, verdict.reason, self.s.until)
            self.fraud_proofs += proofs
        self.spot_checks.append(f"{where}: {why}")
        raise self._failure(k, f"spot check of job {n}: {why}")

    async def map(
        self, inputs: Iterable[Mapping[str, Any]], *, window: int = DEFAULT_WINDOW
    ) -> AsyncIterator[Arrays]:
        """Outputs of every job of ``inputs``, in order, ``window`` jobs in flight (at most
        ``MAX_HELD_SEQS``: what a stage executor holds to re-feed a take-over)."""
        if not 1 <= window <= MAX_HELD_SEQS:
            raise ValueError(f"window must be in 1..{MAX_HELD_SEQS}")
        n_stages = len(self.s.stages)
        it = iter(inputs)
        pending: dict[int, Mapping[str, Any]] = {}  # jobs given and not yet answered
        slots = trio.Semaphore(window)
        chans = [trio.open_memory_channel[int](window) for _ in range(n_stages)]
        out_send, out_recv = trio.open_memory_channel[Arrays](window)

        async def feed() -> None:
            async with chans[0][0]:
                for _ in range(MAX_BATCH):
                    await slots.acquire()  # before taking an input: none is lost on a failure
                    item = next(it, None)
                    if item is None:
                        return
                    n = self.sent
                    pending[n] = item
                    wire = self._wire(item)
                    digest = content_digest(wire)
                    self.in_digests.append(digest)
                    await self._give(0, n, wire, digest)
                    self.sent += 1
                    await chans[0][0].send(n)

        async def collect(k: int) -> None:
            nxt = chans[k + 1][0] if k + 1 < n_stages else out_send
            async with chans[k][1], nxt:
                async for n in chans[k][1]:
                    waiter = await self._answer(k, n)
                    if self.spot_check is not None and self.market.checker.sampler.want(
                        self.spot_check, first_lease_job=n == 0
                    ):  # before job n goes on from here: nobody gets unchecked outputs of it
                        await self._spot_check(k, n, waiter)
                    if waiter.forwarded is not None:
                        held, digest = None, waiter.forwarded
                    else:
                        held, digest = waiter.wire, content_digest(waiter.wire)
                    if k + 1 < n_stages:
                        await self._give(k + 1, n, held, digest)
                        await chans[k + 1][0].send(n)
                    else:
                        self.cut_digests[n_stages][n] = digest
                        self.out_digests.append(digest)
                        arrays = decode_tensors(held, limits=self.market.settings.limits)
                        await out_send.send(arrays)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                for k in range(n_stages):
                    nursery.start_soon(collect, k)
                async with out_recv:
                    async for arrays in out_recv:
                        pending.pop(self.done, None)
                        for k in range(n_stages):  # answered everywhere: never given again
                            self._given[k].pop(self.done, None)
                            self._waiters[k].pop(self.done, None)
                        self.done += 1
                        self.streamed += 1
                        slots.release()
                        yield arrays
        except BaseException as exc:
            failure = _market_failure(exc)
            if failure is None:
                raise
            self.failure = str(failure)
        else:
            return
        # Streaming cannot go on: every job not answered yet runs on as a single pipeline
        # job (each stage auctioned again, failing over one stage at a time).
        rest = [pending[n] for n in sorted(pending)]
        log.warning(
            "pipeline %s: %s; %d job(s) go on one at a time",
            self.entry.name,
            self.failure,
            len(rest),
        )
        for item in [*rest, *it]:
            result = await run_pipeline(self.market, self.entry, item)
            self.fallback.append(result)
            self.done += 1
            yield result.outputs

    async def aclose(self) -> None:
        """Close every stage's batch, in stage order; book and chain-check the receipts."""
        for st in self.s.stages:
            if not st.run.done.is_set():
                await st.run.close_batch()
            with trio.move_on_after(max(1.0, self.s.until - self.market.clock())):
                await st.run.done.wait()
        wall = 0.0
        for st in self.s.stages:
            o = st.outcome
            if o is None or o.receipt is None:
                continue
            self.market.receipts.add(o.receipt, "requester")
            self.results.append(
                InferResult(
                    outputs={},
                    receipt=o.receipt,
                    executor=o.executor,
                    price=o.receipt.price,
                    latency_ms=wall,
                    model_cid=st.spec.cid,
                    attempts=o.attempts,
                )
            )
        jobs = self.streamed
        if len(self.results) != len(self.s.stages) or not jobs or self.fallback:
            return
        finals = [r.receipt.commitment.message for r in self.results if r.receipt is not None]
        if not self.failovers:
            check_chain(
                self.entry.manifest,
                batch_digest(self.in_digests[:jobs]),
                finals,
                batch_digest(self.out_digests[:jobs]),
                jobs=jobs,
            )
            return
        check_lease_chain(
            self.entry.manifest,
            [[cut[n] for n in range(jobs)] for cut in self.cut_digests],
            [[*self.paid_before[k], Segment(self.s.base[k], c)] for k, c in enumerate(finals)],
        )

    @property
    def receipts(self) -> list[Receipt]:
        return [r.receipt for r in self.results if r.receipt is not None]


@asynccontextmanager
async def pipeline_lease(
    market: MarketService,
    ref: str,
    example: Mapping[str, Any],
    *,
    max_jobs: int = 1000,
    seconds: float = 60.0,
    max_price: float | None = None,
    bid_window: float | None = None,
    spot_check: float | None = None,
) -> AsyncIterator[PipelineLease]:
    """Lease every stage of pipeline ``ref`` (``example``: one job's inputs, which fix the
    shapes the stages' requests announce) and route them; ``lease.map(inputs)``.
    ``spot_check``: as for a single-model lease (``PipelineLease._spot_check``)."""
    entry = find_pipeline(market, ref)
    if entry is None:
        raise ModelNotFound(f"no pipeline {ref!r} is registered on this peer")
    lease_until = market.clock() + seconds
    until = lease_until + max(5.0, market.settings.job_timeout / 3)
    s = Streamer(market, entry, until)
    arrays = to_arrays(example)
    _check_inputs(entry, arrays)
    terms = LeaseTerms(max_jobs=max_jobs, until=lease_until)
    kw = {"max_price": max_price, "bid_window": bid_window}
    await s.start(encode_tensors(arrays), arrays, lease=terms, **kw)
    async with trio.open_nursery() as nursery:
        for st in s.stages:
            nursery.start_soon(s.drive, st)
        await s.route_all()
        lease = PipelineLease(market, entry, s, spot_check=spot_check)
        try:
            yield lease
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30.0):
                await lease.aclose()
            nursery.cancel_scope.cancel()
