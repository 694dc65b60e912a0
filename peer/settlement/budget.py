"""Per-peer budgets for ledger input: what a remote peer may make us parse and verify.

A token bucket per peer id: ``rate`` facts per second, up to ``burst`` at once.
Checked before anything is parsed, so a peer over its budget costs us a counter
update. The table of peers is bounded (the least recently seen are forgotten).
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class PeerBudget:
    """Token buckets keyed by peer id."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = trio.current_time,
        max_peers: int = 10_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a budget needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, at)
        self.refused = 0  # requests refused for being over budget

    def take(self, peer: str, n: int = 1) -> bool:
        """Spend ``n`` tokens of ``peer``'s budget; False (and nothing spent) if it lacks them."""
        now = self.clock()
        tokens, at = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= n
        if ok:
            tokens -= n
        else:
            self.refused += 1
        self._buckets[peer] = (tokens, now)  # re-inserted: most recently seen last
        while len(self._buckets) > self.max_peers:
            del self._buckets[next(iter(self._buckets))]
        return ok
