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

Served by ``GET /metrics`` of ``edgeswarm run --http`` (see ``peer.http``);
never through prometheus_client's ``start_http_server`` (a thread bound to
0.0.0.0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

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
