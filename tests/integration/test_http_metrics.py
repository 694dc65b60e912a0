"""/metrics covers the issue's list, and py-libp2p's own events reach it.

py-libp2p sends its events (inbound connections, gossipsub RPCs, DHT requests) into a
100-slot channel that blocks the host when nobody reads it; ``peer.host.running_host``
drains it into ``edgeswarm_libp2p_*``. Here a real swarm (bootstrap, executor, a door with
--http) runs jobs until its hosts have sent well over 100 events each way through the
channel: had the drain stopped, the hosts would have stalled and the jobs timed out.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import trio
from http_swarm import http_swarm
from test_http_v2 import scrape

from peer import metrics
from peer.http import v2

# The list (jobs requested/run/failed by reason, auction and lease latency, bids,
# payments certified and pending, ledger facts, fraud proofs, peers, connections, relay
# use, model fetch bytes) and libp2p's own.
FAMILIES = [
    "edgeswarm_jobs_requested",
    "edgeswarm_jobs_run",
    "edgeswarm_jobs_failed",
    "edgeswarm_auction_seconds",
    "edgeswarm_lease_job_seconds",
    "edgeswarm_bids",
    "edgeswarm_payments_certified",
    "edgeswarm_payments_pending",
    "edgeswarm_ledger_facts",
    "edgeswarm_fraud_proofs",
    "edgeswarm_peers_known",
    "edgeswarm_connections",
    "edgeswarm_relay_connections",
    "edgeswarm_model_fetch_bytes",
    "edgeswarm_libp2p_events",
    "edgeswarm_libp2p_swarm_events",
    "edgeswarm_libp2p_gossipsub_rpcs",
    "edgeswarm_libp2p_dht_requests",
]


def _events() -> float:
    return sum(
        metrics.REGISTRY.get_sample_value("edgeswarm_libp2p_events_total", {"kind": k}) or 0.0
        for k in ("swarm", "gossipsub", "dht", "ping", "other")
    )


async def test_drain_reads_far_more_than_the_channel_holds() -> None:
    """libp2p's channel holds 100 events; the drain keeps it from ever filling."""
    send, recv = trio.open_memory_channel[object](100)
    swarm = type("SwarmEvent", (), {})
    before = (
        metrics.REGISTRY.get_sample_value(
            "edgeswarm_libp2p_swarm_events_total", {"event": "incoming_conn"}
        )
        or 0.0
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.drain_libp2p, recv)
        with trio.fail_after(10):
            for _ in range(1000):
                event = swarm()
                event.conn_incoming = True
                await send.send(event)
            await send.send(SimpleNamespace())  # an unknown kind is counted as "other"
            await send.aclose()  # the drain ends when the host closes its side
    after = metrics.REGISTRY.get_sample_value(
        "edgeswarm_libp2p_swarm_events_total", {"event": "incoming_conn"}
    )
    assert after == before + 1000


@pytest.mark.timeout(300)
async def test_metrics_lists_every_family_and_libp2p_events_flow(tmp_path: Path) -> None:
    async with http_swarm(tmp_path) as door, door.client() as client:
        r = await client.get("/metrics")
        for family in FAMILIES:
            assert f"# HELP {family}" in r.text, family
        x = np.arange(6, dtype=np.float32)
        body, headers = v2.encode_request({"x": x, "y": x}, binary=True)
        start = _events()
        jobs = 0
        with trio.fail_after(240):
            # Each job is gossip (request, bids), a job stream and DHT traffic: go on until
            # the hosts pushed well over the channel's 100 slots through it.
            while _events() - start < 300 and jobs < 200:
                r = await client.post(
                    "/v2/models/tiny_add/infer", content=body, headers={**headers, **door.auth}
                )
                assert r.status_code == 200, r.text
                jobs += 1
        sample = await scrape(client)
        got = {
            labels: value
            for (name, labels), value in sample.items()
            if name == "edgeswarm_libp2p_events_total"
        }
        assert sum(got.values()) - start >= 300, (jobs, got)
        assert (
            sample[("edgeswarm_libp2p_gossipsub_rpcs_total", frozenset({("part", "received")}))] > 0
        )
        assert (
            sample[("edgeswarm_libp2p_swarm_events_total", frozenset({("event", "incoming_conn")}))]
            > 0
        )
