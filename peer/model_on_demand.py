"""``fetch_on_demand``: bid for models we do not hold but providers have; fetch when we win.

A peer with ``fetch_on_demand = true`` (and a runtime) watches the capability
ads for models that other peers offer and it lacks. For each (up to
``MAX_CANDIDATES``) it asks one provider for the manifest (the size), joins
the model's gossip topic and gives the executor an offer whose p50 is the
estimated time to fetch, admit and load the model plus the provider's p50, so
every bid's eta includes the fetch. When an award for such a model arrives the
executor first calls ``prepare(cid)``: the model is fetched, admitted and
served (its real p50 replaces the estimate), then the job runs as usual.
Models fetched this way are kept; when the store is over ``model_store_bytes``
the least recently used ones that are neither configured (``serve``) nor in
use go first (``evict``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from protocols import executor as ex
from protocols.market import MAX_ETA_MS

if TYPE_CHECKING:
    from peer.model_transfer import ModelTransfer

log = logging.getLogger(__name__)

WATCH_INTERVAL = 5.0  # seconds between the first looks at the ads
WATCH_MAX = 60.0
MAX_CANDIDATES = 8  # models we offer to fetch at once
ASSUMED_MBPS = 20.0  # until a fetch here measured better: MB/s for the eta
LOAD_MBPS = 50.0  # admission + session load, MB/s of model
FIXED_MS = 500  # lookup, manifest, connection set-up


class OnDemand:
    def __init__(self, transfer: ModelTransfer) -> None:
        self.transfer = transfer
        self.peer = transfer.peer
        self.offered: dict[str, int] = {}  # cid -> estimated eta (ms) we bid with
        self.last_used: dict[str, float] = {}
        self.in_use: dict[str, int] = {}
        self.measured_mbps: float | None = None

    @property
    def market(self) -> Any:
        return self.peer.market

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        executor = self.market.executor
        executor.prepare = self.prepare
        task_status.started()
        try:
            delay = WATCH_INTERVAL
            while True:
                await self.look()
                # The ads change slowly: look often at first, then every WATCH_MAX seconds
                # (each look fetches the ads of the peers we know).
                await trio.sleep(delay)
                delay = min(delay * 2, WATCH_MAX)
        finally:
            executor.prepare = None

    async def look(self) -> None:
        """Offer every model in others' ads that we lack (bounded), with a fetch-inclusive eta."""
        try:
            ads = await self.peer.find_ads(refresh=False)
        except Exception as exc:  # a listing that failed: next round
            log.debug("on-demand: no ads: %s", exc)
            return
        registry = self.transfer.registry
        for ad in ads:
            if ad.peer_id == self.peer.peer_id:
                continue
            for offer in ad.models:
                cid = offer.cid
                if (
                    cid in self.offered
                    or cid in self.market.served
                    or cid in registry
                    or len(self.offered) >= MAX_CANDIDATES
                ):
                    continue
                size = await self._size(ad.peer_id, ad.addrs, cid)
                if size is None or size > registry.limits.max_model_bytes:
                    continue
                await self._offer(cid, size, offer.p50_ms)

    async def _size(self, pid: str, addrs: tuple[str, ...], cid: str) -> int | None:
        from peer.discovery import Provider

        manifest = await self.transfer.fetcher.manifest_from(Provider(pid, addrs), cid)
        return None if manifest is None else manifest.size

    def eta_ms(self, size: int, provider_p50_ms: float) -> int:
        mbps = self.measured_mbps or ASSUMED_MBPS
        fetch = size / (mbps * 1e6) * 1000 + size / (LOAD_MBPS * 1e6) * 1000
        return min(int(FIXED_MS + fetch + max(provider_p50_ms, 1.0) * 2), MAX_ETA_MS)

    async def _offer(self, cid: str, size: int, provider_p50_ms: float) -> None:
        eta = self.eta_ms(size, provider_p50_ms)
        from peer.market.service import to_micro

        price = to_micro(self.market.settings.price)
        self.market.executor.offers[cid] = ex.ModelOffer(price=price, p50_ms=eta)
        self.offered[cid] = eta
        await self.market.gossip.join(cid, serve=True)
        log.info("on demand: bidding for %s (%d bytes) with an eta of %d ms", cid[:12], size, eta)

    async def prepare(self, cid: str) -> None:
        """Before an award runs: fetch, admit and serve ``cid`` if we do not hold it yet."""
        self.last_used[cid] = time.monotonic()
        self.in_use[cid] = self.in_use.get(cid, 0) + 1
        try:
            if cid in self.market.served:
                return
            try:
                result = await self.transfer.fetch(cid)
            except Exception:
                # Stop bidding with this estimate; a later look offers it again if the
                # ads still list it.
                self.market.executor.offers.pop(cid, None)
                self.offered.pop(cid, None)
                raise
            if result.seconds > 0 and not result.already:
                self.measured_mbps = result.entry.size / result.seconds / 1e6
            self.offered.pop(cid, None)
            log.info("on demand: fetched %s in %.2f s for an award", cid[:12], result.seconds)
        finally:
            self.in_use[cid] -= 1
            if not self.in_use[cid]:
                del self.in_use[cid]
        self.evict(cid)  # quick (unlink + fsync); in the trio thread, as the market's dicts are

    def evict(self, keep: str) -> list[str]:
        """Remove least recently used models until the store fits ``model_store_bytes``."""
        from peer.model_transfer import serve_cids

        limit = int(getattr(self.peer.config, "model_store_bytes", 0))
        registry = self.transfer.registry
        if limit <= 0:
            return []
        pinned = {keep, *serve_cids(self.peer.config), *self.in_use}
        entries = sorted(
            (e for e in registry.list() if e.cid not in pinned),
            key=lambda e: self.last_used.get(e.cid, 0.0),
        )
        total = sum(e.size for e in registry.list())
        gone: list[str] = []
        for e in entries:
            if total <= limit:
                break
            self.market.served.pop(e.cid, None)
            self.market.executor.offers.pop(e.cid, None)
            registry.remove(e.cid)
            total -= e.size
            gone.append(e.cid)
            log.info("evicted model %s (%s): the store is over %d bytes", e.name, e.cid[:12], limit)
        if gone:
            self.peer.models_changed()
        return gone
