"""Benchmark: capability-ad discovery with N real libp2p peers in one process.

For each N (default 5, 20, 50) starts a bootstrap node and N peers on
127.0.0.1 (all in one trio process, so one core serves every peer: a
pessimistic floor for a real swarm), then measures

  * start-up: wall time to open all N peers (each joins via the bootstrap);
  * time until every ad is findable: from the first peer's start until a
    fresh client (``edgeswarm peers``' role) lists all N ads;
  * one ad lookup, p50/p99: ``find_ad`` with a full iterative DHT walk, from
    random peers for random other peers;
  * a full listing (``find_ads``: self-lookup, crawl, one GET per known
    peer) from 5 peers: p50 time and the fewest ads one listing found;
  * RSS per peer: process RSS growth divided by N.

Also compares ``max_connections_per_peer=1`` (our default) with py-libp2p's
default (3) at N=20: start-up and lookup latency.

Prints a table and writes bench/results/discovery.json.

    python bench/discovery.py               # N = 5, 20, 50 (~2 min on 2 cores)
    python bench/discovery.py --sizes 5 20  # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import nacl.signing
import psutil
import trio

from bootstrap.node import open_bootstrap
from peer.config import Config
from peer.host import build_host, connect, running_host
from peer.node import Peer, open_peer

RESULTS = Path(__file__).parent / "results" / "discovery.json"
LOOKUPS = 200


class _Hardware:
    """Probe stand-in so the numbers measure discovery, not onnxruntime's import."""

    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "bench cpu", "memory": 2**30}]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


async def _all_found(peer: Peer, n: int, limit: float) -> float:
    """Seconds until ``peer.find_ads()`` lists ``n`` ads (bounded retries of the real query)."""
    start = time.perf_counter()
    with trio.fail_after(limit):
        for _ in range(int(limit / 0.2) + 1):  # bounded retries of the real query
            if len(await peer.find_ads()) >= n:
                break
            await trio.sleep(0.2)
    return time.perf_counter() - start


async def run_size(
    n: int, tmp: Path, *, one_conn: bool = True, lookups: int = LOOKUPS
) -> dict[str, Any]:
    rss_before = _rss()
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            open_bootstrap(
                Config(data_dir=tmp / f"boot-{n}-{one_conn}", listen=("/ip4/127.0.0.1/tcp/0",))
            )
        )
        t0 = time.perf_counter()
        peers: list[Peer] = []
        for i in range(n):
            cfg = Config(
                data_dir=tmp / f"p{n}-{one_conn}-{i}",
                listen=("/ip4/127.0.0.1/tcp/0",),
                bootstrap=(boot.listen_addrs[0],),
            )
            peers.append(
                await stack.enter_async_context(
                    open_peer(cfg, hardware=_Hardware(), one_connection_per_peer=one_conn)
                )
            )
        startup = time.perf_counter() - t0
        rss_peers = _rss()
        client_cfg = Config(
            data_dir=tmp / f"client-{n}-{one_conn}",
            listen=("/ip4/127.0.0.1/tcp/0",),
            bootstrap=(boot.listen_addrs[0],),
        )
        client = await stack.enter_async_context(
            open_peer(client_cfg, role="client", key=nacl.signing.SigningKey.generate())
        )
        await _all_found(client, n, limit=120)
        all_findable = time.perf_counter() - t0

        rng = random.Random(n)
        single: list[float] = []
        misses = 0
        for _ in range(lookups):
            asker, target = rng.sample(peers, 2)
            s = time.perf_counter()
            ad = await asker.find_ad(target.peer_id)
            single.append((time.perf_counter() - s) * 1000)
            misses += ad is None
        listing: list[float] = []
        listed: list[int] = []
        for i in range(min(5, n)):
            s = time.perf_counter()
            found = await peers[i].find_ads()  # with self-lookup + crawl
            listing.append((time.perf_counter() - s) * 1000)
            listed.append(len(found))
        rt_sizes = [p.dht.get_routing_table_size() for p in peers]
        conns = [len(p.connected_peers()) for p in peers]
    return {
        "n": n,
        "one_connection_per_peer": one_conn,
        "startup_s": round(startup, 3),
        "all_ads_findable_s": round(all_findable, 3),
        "lookup_ms_p50": round(_pct(single, 0.5), 2),
        "lookup_ms_p99": round(_pct(single, 0.99), 2),
        "lookup_misses": misses,
        "lookups": lookups,
        "listing_ms_p50": round(statistics.median(listing), 1),
        "listing_found_min": min(listed),
        "rss_per_peer_mb": round((rss_peers - rss_before) / n / 2**20, 2),
        "routing_table_median": statistics.median(rt_sizes),
        "connections_median": statistics.median(conns),
    }


async def dial_times(tmp: Path, *, one_conn: bool, dials: int = 30) -> dict[str, Any]:
    """Wall time of a fresh connect (TCP + Noise + yamux) between two bare hosts."""
    a_key, b_key = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    a = build_host(a_key, one_connection_per_peer=one_conn)
    b = build_host(b_key, one_connection_per_peer=one_conn)
    times: list[float] = []
    async with (
        running_host(a, ["/ip4/127.0.0.1/tcp/0"]),
        running_host(b, ["/ip4/127.0.0.1/tcp/0"]) as b_addrs,
    ):
        for _ in range(dials):
            s = time.perf_counter()
            info = await connect(a, b_addrs[0])
            times.append((time.perf_counter() - s) * 1000)
            await a.disconnect(info.peer_id)
    return {
        "one_connection_per_peer": one_conn,
        "dial_ms_p50": round(_pct(times, 0.5), 2),
        "dial_ms_p99": round(_pct(times, 0.99), 2),
        "dials": dials,
    }


async def main_async(sizes: list[int], compare: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "runs": [],
        "connection_compare": [],
        "dial": [],
    }
    with tempfile.TemporaryDirectory() as d:
        for one in (True, False):
            r = await dial_times(Path(d), one_conn=one)
            out["dial"].append(r)
            print(json.dumps(r), flush=True)
        for n in sizes:
            r = await run_size(n, Path(d))
            out["runs"].append(r)
            print(json.dumps(r), flush=True)
        if compare:
            for one in (True, False):
                r = await run_size(20, Path(d), one_conn=one, lookups=100)
                out["connection_compare"].append(r)
                print(json.dumps(r), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--no-compare", action="store_true", help="skip the connection compare")
    args = parser.parse_args()
    result = trio.run(main_async, args.sizes, not args.no_compare)
    print()
    header = ("N", "startup s", "all ads s", "lookup p50", "p99 ms", "list ms", "MB/peer", "RT")
    print("".join(f"{h:>11}" for h in header) + "  conns")
    for r in result["runs"] + result["connection_compare"]:
        cells = (
            r["n"],
            r["startup_s"],
            r["all_ads_findable_s"],
            r["lookup_ms_p50"],
            r["lookup_ms_p99"],
            r["listing_ms_p50"],
            r["rss_per_peer_mb"],
            r["routing_table_median"],
        )
        tag = ""
        if r in result["connection_compare"]:
            tag = f"  (max conns/peer {1 if r['one_connection_per_peer'] else 3})"
        print("".join(f"{c:>11}" for c in cells) + f"  {r['connections_median']}{tag}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
