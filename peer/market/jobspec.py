"""``JobSpec``: what one market job (or lease batch) is about, as one frozen value.

It replaces the argument group (cid, registry entry, max price, deadline, bid
window, spot check) that used to travel through every requester helper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edge_models.spec import ModelEntry
from protocols.market import MAX_BID_WINDOW_S


@dataclass(frozen=True)
class JobSpec:
    """One job on ``cid``: ``max_price`` in micro-credits per job, ``until`` the absolute
    POSIX deadline, ``bid_window`` in seconds, ``spot_check`` a probability."""

    cid: str
    entry: ModelEntry | None
    max_price: int
    until: float
    bid_window: float
    spot_check: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_price, int) or self.max_price < 0:
            raise ValueError(f"max_price must be an int >= 0 micro-credits, got {self.max_price!r}")
        if not math.isfinite(self.until):
            raise ValueError("the deadline must be a finite time")
        if not 0 <= self.bid_window <= MAX_BID_WINDOW_S:
            raise ValueError(f"bid_window must be in [0, {MAX_BID_WINDOW_S}] s")
        if not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"spot_check must be a probability, got {self.spot_check}")

    def unchecked(self) -> JobSpec:
        """The same job without a spot check (a spot check's own second run)."""
        return replace(self, spot_check=0.0)
