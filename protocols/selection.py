"""Deterministic bid selection: the same bids, request and ``now`` give the same ranking.

Bids that cannot serve the job are dropped (wrong job, expired, over the
max price, eta past the deadline, banned or self-dealing executors). The
rest are scored (lower is better) from price relative to the max price, eta
relative to the time left, and reputation in [0, 1] (unknown peers get
``weights.default_reputation``). Ties, and several bids from one executor,
are settled by a total order ending in sha256(job_id || executor), so the
order bids arrived in never matters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from protocols.errors import LocalProtocolError
from protocols.market import Bid, JobRequest


@dataclass(frozen=True)
class Weights:
    """How much each term counts; price dominates by default so the cheapest fitting bid wins."""

    price: float = 1.0
    eta: float = 0.25
    reputation: float = 0.25
    default_reputation: float = 0.5

    def __post_init__(self) -> None:
        for name in ("price", "eta", "reputation", "default_reputation"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1e6:
                raise LocalProtocolError(f"Weights.{name} must be a number >= 0, got {value!r}")


DEFAULT_WEIGHTS = Weights()


def tie_break(job_id: bytes, executor: str) -> bytes:
    """sha256(job_id || executor): a per-job pseudo-random order nobody can pick for everyone."""
    return hashlib.sha256(job_id + executor.encode()).digest()


def bid_fits(
    request: JobRequest,
    bid: Bid,
    *,
    now: float,
    banned: Container[str] = frozenset(),
    local_ok: bool = False,
) -> bool:
    """Whether ``bid`` may be awarded for ``request`` at ``now``. A bid by the requester
    itself fits only with ``local_ok``: the requester's own executor quoting for a job it
    runs locally (never paid, no receipt), which only ``RequesterJob`` may ask for."""
    return (
        bid.job_id == request.job_id
        and (local_ok or bid.executor != request.requester)
        and bid.executor not in banned
        and now <= bid.expires_at
        and bid.price <= request.max_price
        and now + bid.eta_ms / 1000.0 <= request.deadline
    )


def score(
    request: JobRequest,
    bid: Bid,
    *,
    now: float,
    reputation: Mapping[str, float],
    weights: Weights = DEFAULT_WEIGHTS,
) -> float:
    """Lower is better. Each term is in [0, 1] before weighting."""
    price_term = bid.price / request.max_price if request.max_price else 0.0
    time_left = max(request.deadline - now, 1e-3)
    eta_term = min(bid.eta_ms / 1000.0 / time_left, 1.0)
    rep = reputation.get(bid.executor, weights.default_reputation)
    rep = min(max(float(rep), 0.0), 1.0)
    return weights.price * price_term + weights.eta * eta_term + weights.reputation * (1.0 - rep)


def rank_bids(
    request: JobRequest,
    bids: Iterable[Bid],
    *,
    now: float,
    reputation: Mapping[str, float] | None = None,
    banned: Container[str] = frozenset(),
    weights: Weights = DEFAULT_WEIGHTS,
    local_ok: bool = False,
) -> list[Bid]:
    """Fitting bids, best first, at most one per executor (its best). Winner is ``[0]``.
    ``local_ok``: the requester's own bid competes too (see ``bid_fits``)."""
    rep = reputation or {}
    best: dict[str, tuple[tuple[float, bytes, int, int, float], Bid]] = {}
    for bid in bids:
        if not bid_fits(request, bid, now=now, banned=banned, local_ok=local_ok):
            continue
        # A total order on distinct bids: score, then the hash, then the raw
        # fields (cheaper, faster, longer-lived first) for one executor's re-bids.
        key = (
            score(request, bid, now=now, reputation=rep, weights=weights),
            tie_break(request.job_id, bid.executor),
            bid.price,
            bid.eta_ms,
            -bid.expires_at,
        )
        held = best.get(bid.executor)
        if held is None or key < held[0]:
            best[bid.executor] = (key, bid)
    return [bid for _, bid in sorted(best.values(), key=lambda kb: kb[0])]
