"""Prometheus metrics: the ``edgeswarm_*`` counters and histograms any area may increment.

One registry per process (``REGISTRY``), separate from prometheus_client's
global one so nothing else leaks into our scrape. Counters are process-wide:
when several peers share one process (tests, benchmarks), they add up. Call
sites are one-line hooks, e.g. ``metrics.JOBS_RUN.inc()`` or
``with metrics.AUCTION_SECONDS.time(): ...``; increments are cheap (a lock and
an add) and never fail.

Facts that a peer already holds (connections, known ads, ledger facts,
pending payments, balances) are not counted twice: ``PeerCollector`` reads
them from the running peer at scrape time (``peer.http`` registers one per
served peer), so they can never drift from the truth.

py-libp2p's own events (dials, inbound connections, gossipsub RPCs, DHT
requests, pings) reach us only through the host's metrics channel, which blocks
the host once ~100 events are unread: ``drain_libp2p`` reads it for as long as
the host runs (``peer.host.running_host`` starts it) and counts them as
``edgeswarm_libp2p_*``, without per-peer labels (bounded cardinality; py-libp2p's
own ``libp2p.metrics.Metrics`` would label by peer id and register globally).

Served by ``GET /metrics`` of ``edgeswarm run --http`` (see ``peer.http``);
never through prometheus_client's ``start_http_server`` (a thread bound to
0.0.0.0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets (seconds) for jobs on an edge network: 1 ms .. 60 s.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# --- market ------------------------------------------------------------------------------
JOBS_REQUESTED = Counter(
    "edgeswarm_jobs_requested",
    "Jobs this process asked the market to run (kind: infer = one job, lease = one lease job).",
    ["kind"],
    registry=REGISTRY,
)
JOBS_RUN = Counter(
    "edgeswarm_jobs_run",
    "Jobs that ended with a result, by this peer's role in them: requester or executor "
    "(a signed receipt; a lease batch receipt counts its jobs), or local (a job of ours "
    "that our own executor won and ran: no receipt, nothing paid).",
    ["role"],
    registry=REGISTRY,
)
JOBS_FAILED = Counter(
    "edgeswarm_jobs_failed",
    "Jobs this process requested that ended without a result, by reason "
    "(no_executors, executors_failed, deadline, unknown_model, bad_input, other).",
    ["reason"],
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "edgeswarm_job_seconds",
    "Wall time of one requested job, auction included, as the requester saw it.",
    buckets=_LATENCY,
    registry=REGISTRY,
)
AUCTION_SECONDS = Histogram(
    "edgeswarm_auction_seconds",
    "Time from a job request on gossip to the award.",
    buckets=_LATENCY,
    registry=REGISTRY,
)
LEASE_JOB_SECONDS = Histogram(
    "edgeswarm_lease_job_seconds",
    "Wall time of one job on a held lease.",
    buckets=_LATENCY,
    registry=REGISTRY,
)
BIDS = Counter(
    "edgeswarm_bids",
    "Bids, by direction (sent by this peer as executor, received as requester).",
    ["direction"],
    registry=REGISTRY,
)

# --- settlement ---------------------------------------------------------------------------
PAYMENTS_CERTIFIED = Counter(
    "edgeswarm_payments_certified",
    "Transfers this peer paid that the witnesses certified.",
    registry=REGISTRY,
)
FRAUD_PROOFS = Counter(
    "edgeswarm_fraud_proofs",
    "Fraud proofs this peer produced or learned.",
    registry=REGISTRY,
)

# --- reach and models ---------------------------------------------------------------------
RELAY_CONNECTIONS = Counter(
    "edgeswarm_relay_connections",
    "Circuit relay use, by our role (client = connections we dialed through a relay, hop = "
    "hop requests (reserve or connect) we served for others within our limits).",
    ["role"],
    registry=REGISTRY,
)
MODEL_FETCH_BYTES = Counter(
    "edgeswarm_model_fetch_bytes",
    "Model bytes received from other peers.",
    registry=REGISTRY,
)

# --- the front door ----------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "edgeswarm_http_requests",
    "HTTP requests answered, by route template and status code.",
    ["route", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "edgeswarm_http_request_seconds",
    "Time to answer one HTTP request, by route template.",
    ["route"],
    buckets=_LATENCY,
    registry=REGISTRY,
)

# --- py-libp2p's own events (drained from the host's metrics channel) -------------------
LIBP2P_SWARM = Counter(
    "edgeswarm_libp2p_swarm_events",
    "py-libp2p swarm events: dial_attempt, dial_error (every address failed), "
    "incoming_conn, incoming_conn_error.",
    ["event"],
    registry=REGISTRY,
)
LIBP2P_GOSSIPSUB_RPCS = Counter(
    "edgeswarm_libp2p_gossipsub_rpcs",
    "Gossipsub RPCs received, by part (received = every RPC; publish, subopts, control).",
    ["part"],
    registry=REGISTRY,
)
LIBP2P_GOSSIPSUB_BYTES = Histogram(
    "edgeswarm_libp2p_gossipsub_message_bytes",
    "Size of the gossipsub messages received.",
    buckets=(64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536),
    registry=REGISTRY,
)
LIBP2P_DHT_REQUESTS = Counter(
    "edgeswarm_libp2p_dht_requests",
    "Kademlia DHT requests this peer served (inbound = every request; find_node, "
    "get_value, put_value, get_providers, add_provider).",
    ["kind"],
    registry=REGISTRY,
)
LIBP2P_PING_SECONDS = Histogram(
    "edgeswarm_libp2p_ping_rtt_seconds",
    "Round-trip times of libp2p pings.",
    buckets=_LATENCY,
    registry=REGISTRY,
)
LIBP2P_PING_FAILURES = Counter(
    "edgeswarm_libp2p_ping_failures",
    "libp2p pings that failed.",
    registry=REGISTRY,
)
LIBP2P_EVENTS = Counter(
    "edgeswarm_libp2p_events",
    "Events read from py-libp2p's metrics channel, by kind (swarm, gossipsub, dht, ping, "
    "other): the channel is drained, so the host never waits on it.",
    ["kind"],
    registry=REGISTRY,
)

_SWARM_FLAGS = (
    ("dial_attempt", "dial_attempt"),
    ("dial_attempt_error", "dial_error"),
    ("conn_incoming", "incoming_conn"),
    ("conn_incoming_error", "incoming_conn_error"),
)
_GOSSIP_FLAGS = ("publish", "subopts", "control")
_DHT_FLAGS = ("inbound", "find_node", "get_value", "put_value", "get_providers", "add_provider")


def record_libp2p(event: Any) -> None:
    """Count one py-libp2p metrics event (duck-typed by class name: the event classes
    live in modules we do not want to import just for this)."""
    kind = type(event).__name__
    if kind == "SwarmEvent":
        LIBP2P_EVENTS.labels("swarm").inc()
        for flag, label in _SWARM_FLAGS:
            if getattr(event, flag, False):
                LIBP2P_SWARM.labels(label).inc()
    elif kind == "GossipsubEvent":
        LIBP2P_EVENTS.labels("gossipsub").inc()
        LIBP2P_GOSSIPSUB_RPCS.labels("received").inc()
        for flag in _GOSSIP_FLAGS:
            if getattr(event, flag, False):
                LIBP2P_GOSSIPSUB_RPCS.labels(flag).inc()
        size = getattr(event, "message_size", None)
        if isinstance(size, int):
            LIBP2P_GOSSIPSUB_BYTES.observe(size)
    elif kind == "KadDhtEvent":
        LIBP2P_EVENTS.labels("dht").inc()
        for flag in _DHT_FLAGS:
            if getattr(event, flag, False):
                LIBP2P_DHT_REQUESTS.labels(flag).inc()
    elif kind == "PingEvent":
        LIBP2P_EVENTS.labels("ping").inc()
        rtts = getattr(event, "rtts", None)
        if getattr(event, "failure_error", None) is not None:
            LIBP2P_PING_FAILURES.inc()
        elif isinstance(rtts, list):
            for rtt in rtts:  # milliseconds (libp2p.host.ping)
                LIBP2P_PING_SECONDS.observe(rtt / 1e3)
    else:
        LIBP2P_EVENTS.labels("other").inc()


async def drain_libp2p(
    channel: trio.MemoryReceiveChannel[Any], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Read py-libp2p's metrics channel until it closes (or we are cancelled): with no
    reader the host blocks once the channel's 100-event buffer is full."""
    task_status.started()
    async for event in channel:
        try:
            record_libp2p(event)
        except Exception:  # a metric must never stop the drain (and so the host)
            log.debug("metrics: could not count libp2p event %r", event, exc_info=True)


FAILURE_REASONS = {
    "NoExecutors": "no_executors",
    "ExecutorsFailed": "executors_failed",
    "DeadlineExceeded": "deadline",
    "TooSlowError": "deadline",
    "UnknownModel": "unknown_model",
    "InvalidInput": "bad_input",
    "JobFailed": "bad_input",
}


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` label for a failed job."""
    for cls in type(exc).__mro__:
        if cls.__name__ in FAILURE_REASONS:
            return FAILURE_REASONS[cls.__name__]
    return "other"


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


class PeerCollector(Collector):
    """Gauges read from one running peer at scrape time (cheap, in-memory reads only)."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def collect(self) -> Iterator[Metric]:
        peer = self.peer
        try:
            yield _gauge(
                "edgeswarm_connections",
                "Peers this peer has an open libp2p connection to.",
                len(peer.host.get_connected_peers()),
            )
            yield _gauge(
                "edgeswarm_peers_known",
                "Edgeswarm peers this peer knows of (routing table, connections, stored ads).",
                len(peer.discovery.known_peer_ids()),
            )
            market = peer.market
            if market is not None:
                yield _gauge(
                    "edgeswarm_receipts_held",
                    "Receipts in this peer's receipt book.",
                    len(market.receipts.receipts),
                )
            svc = peer.settlement
            if svc is not None:
                ledger = svc.ledger
                yield _gauge(
                    "edgeswarm_ledger_facts",
                    "Facts (receipts, certificates, proofs) in this peer's ledger.",
                    len(ledger),
                )
                yield _gauge(
                    "edgeswarm_payments_pending",
                    "Receipts this peer owes that no certificate pays yet.",
                    len(svc.unpaid()),
                )
                yield _gauge(
                    "edgeswarm_balance_micro",
                    "This peer's ledger balance in micro-credits.",
                    svc.balances().get(peer.peer_id, 0),
                )
        except Exception:  # a scrape must never fail because one source is mid-change
            log.exception("metrics: reading the peer failed")
