"""``MarketService.resolve``: a model name through ads, remembered, and looked up once."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from peer.market.service import NAME_TTL_S, MarketService, UnknownModel

CID = "ab" * 32


def ad(peer_id: str, *names: str) -> Any:
    return SimpleNamespace(
        peer_id=peer_id, models=tuple(SimpleNamespace(cid=CID, name=n) for n in names)
    )


class Peer:
    """``find_ads`` answers in turn (the last answer repeats); counts the lookups."""

    def __init__(self, *answers: list[Any]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def find_ads(self, *, refresh: bool = True) -> list[Any]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def service(peer: Peer) -> Any:
    """Just what ``resolve`` reads of a MarketService."""
    return SimpleNamespace(registry=None, peer=peer, clock=trio.current_time, _names=OrderedDict())


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_resolved_name_is_remembered_for_a_while(
    mock_clock: trio.testing.MockClock,
) -> None:
    peer = Peer([ad("A", "minilm")])
    svc = service(peer)
    for _ in range(5):  # a batch of jobs: one lookup
        assert await MarketService.resolve(svc, "minilm") == (CID, None)
    assert peer.calls == 1
    await trio.sleep(NAME_TTL_S)
    assert await MarketService.resolve(svc, "minilm") == (CID, None)
    assert peer.calls == 2


async def test_what_every_lookup_found_counts(mock_clock: trio.testing.MockClock) -> None:
    """On a busy box one lookup can miss the ads another found: the name is resolved from
    all of them, and the error counts every peer seen."""
    peer = Peer([ad("A"), ad("B")], [ad("A")], [ad("C", "minilm")])
    assert await MarketService.resolve(service(peer), "minilm") == (CID, None)
    with pytest.raises(UnknownModel, match=r"\(2 peers found; models served: minilm\)"):
        await MarketService.resolve(service(Peer([ad("A")], [ad("B", "minilm")])), "other")
