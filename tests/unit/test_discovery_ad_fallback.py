"""``Discovery.find_ads`` on a busy box: a peer whose GET times out keeps its recent ad."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from peer.discovery import AD_CACHE_S, AdCache, Discovery


class Flaky(Discovery):
    """find_ad answers from ``online`` (None for the others: the GET timed out)."""

    def __init__(self, ids: set[str]) -> None:  # no host, no DHT: only what find_ads uses
        self.ids = ids
        self.online: dict[str, Any] = {}
        self.listed_ads = AdCache()
        self._clock = lambda: 1000.0
        self._last_crawl = 0.0

    def known_peer_ids(self) -> set[str]:
        return self.ids

    async def find_ad(self, peer_id: str, *, walk: bool = True) -> Any:
        return self.online.get(peer_id)


def ad(pid: str) -> Any:
    return SimpleNamespace(peer_id=pid, expires_at=2000.0, sort_key=lambda: (1, 2000.0))


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_an_ad_listed_moments_ago_survives_a_timed_out_lookup(
    mock_clock: trio.testing.MockClock,
) -> None:
    d = Flaky({"A", "B"})
    d.online = {"A": ad("A"), "B": ad("B")}
    assert [a.peer_id for a in await d.find_ads(refresh=False)] == ["A", "B"]
    d.online = {"A": ad("A")}  # B's GET times out now
    assert [a.peer_id for a in await d.find_ads(refresh=False)] == ["A", "B"]
    await trio.sleep(AD_CACHE_S)  # too old to stand in for an answer
    assert [a.peer_id for a in await d.find_ads(refresh=False)] == ["A"]
