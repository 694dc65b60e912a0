"""Run a pipeline (``protocols.pipeline``) through the market, one stage after another.

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

Intermediate tensors come back to the requester and go out again, unchanged:
stage i+1 is sent exactly the wire stage i returned. This first version does
**not** stream executor to executor (issue 18 wants that; see docs/market.md).

After the last stage, ``check_chain`` verifies the receipts: stage 1 committed
to the requester's input digest, each later stage to the previous stage's
output digest, each to its own stage model, and the last one to the outputs
returned. So the chain of receipts alone proves the whole computation, which
is what will let intermediates skip the requester later.

``max_price`` caps each stage's job, not the sum; the deadline covers the whole
pipeline (every stage's auction runs against the same absolute deadline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import trio

from edge_models.errors import InvalidInput, ModelNotFound
from edge_models.pipelines import PipelineEntry, PipelineStore
from peer.market.auction import InferResult
from peer.market.requester import to_arrays
from protocols.pipeline import LocalRun, Placement, check_chain, choose_placement
from protocols.receipt import ResultCommitment, content_digest
from protocols.requester import MarketFailure
from protocols.tensor import encode_tensors

if TYPE_CHECKING:
    from peer.market.service import MarketService

log = logging.getLogger(__name__)

# Placement estimates: a kept-open libp2p stream moves ~140 MB/s on loopback (DESIGN.md); a LAN
# less. Each job through the market costs its bid window plus ~10 ms (auction, award, result).
LINK_BYTES_PER_MS = 100_000.0
HOP_OVERHEAD_MS = 10.0
PLACE_BUDGET_S = 1.0  # a lookup that finds nobody can take the whole budget


@dataclass
class PipelineResult(InferResult):
    """The last stage's outputs; ``receipt``/``executor`` are the last stage's, ``price`` the
    sum over stages; ``stages`` holds every stage's own result (and receipt)."""

    pipeline_cid: str = ""
    stages: list[InferResult] = field(default_factory=list)  # empty: run unsplit
    placement: str = ""  # why it ran split or whole

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

    with trio.move_on_after(PLACE_BUDGET_S):
        async with trio.open_nursery() as nursery:
            for cid in cids:
                nursery.start_soon(look, cid)
    window = market.settings.bid_window if bid_window is None else bid_window
    placement = choose_placement(
        found.get(manifest.model),
        [found.get(s.cid) for s in manifest.stages],
        manifest.crossing_bytes,
        bytes_per_ms=LINK_BYTES_PER_MS,
        hop_ms=window * 1e3 + HOP_OVERHEAD_MS,
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
    for i, stage in enumerate(manifest.stages):
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
    )
