"""The market finds executors by DHT provider records (no crawl) and fetches only their ads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
from market_swarm import Node, market_swarm


async def providers_with_ads(node: Node, cid: str, n: int, limit: float = 20.0) -> list:
    """Until ``node`` finds ``n`` servers of ``cid``, each with its ad (real lookups, bounded)."""
    with trio.fail_after(limit):
        for _ in range(1000):
            found = await node.peer.find_providers(cid)
            if len([p for p in found if p.ad is not None]) >= n:
                return found
            await trio.sleep(0.2)  # DHT records propagate: there is no event to wait on
    raise AssertionError("unreachable")


async def test_executors_are_found_by_provider_records_without_a_crawl(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        servers = [await swarm.start(f"ex{i}", price=1.0 + i) for i in range(3)]
        idle = [await swarm.start(f"idle{i}", serve=False) for i in range(3)]
        req = await swarm.start("req", serve=False)
        cid = next(iter(servers[0].market.served))
        found = await providers_with_ads(req, cid, 3)
        # Only the servers: the idle peers (ads without the model) are never listed.
        assert {p.peer_id for p in found} == {s.peer_id for s in servers}
        for p in found:
            assert p.ad is not None and p.ad.peer_id == p.peer_id
            assert p.addrs == p.ad.addrs
            assert any(m.cid == cid for m in p.ad.models)
        # A job by cid runs without listing the network.
        x = np.ones(3, np.float32)
        with trio.fail_after(30):
            result = await req.market.infer(cid, {"x": x, "y": x}, deadline=20)
        assert result.executor in {s.peer_id for s in servers}
        assert req.peer.discovery.crawls == 0
        # Asked again: the ads come from the cache, only the provider lookup goes out.
        cache = req.peer.discovery.ad_cache
        misses = cache.misses
        again = await req.peer.find_providers(cid)
        assert {p.peer_id for p in again} == {s.peer_id for s in servers}
        assert cache.misses == misses and cache.hits >= 3
        assert all(i.peer_id not in cache.entries for i in idle)


async def test_the_ad_cache_follows_changes_in_the_network(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        req = await swarm.start("req", serve=False)
        cid = next(iter(ex.market.served))
        (first,) = await providers_with_ads(req, cid, 1)
        assert first.ad is not None and first.ad.load == 0.0
        req.peer.discovery.ad_cache.max_age = 0.05
        ex.peer.set_load(0.75, 3)  # re-published within a second
        with trio.fail_after(20):
            for _ in range(1000):
                (now,) = await req.peer.find_providers(cid)
                if now.ad is not None and now.ad.load == 0.75:
                    break
                await trio.sleep(0.2)  # the new ad must reach the DHT: no event to wait on
        assert now.ad is not None and now.ad.seq > first.ad.seq and now.ad.queue == 3
        # A new server shows up in the next lookup.
        late = await swarm.start("late", price=0.5)
        found = await providers_with_ads(req, cid, 2)
        assert late.peer_id in {p.peer_id for p in found}
        assert req.peer.discovery.crawls == 0
