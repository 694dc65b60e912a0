"""``peer.market.dialer.Dialer.servers``: the ads found first survive a provider walk that hangs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from peer.market.dialer import PROVIDERS_TIMEOUT, Dialer

CID = "c" * 64


def ad(peer_id: str, cid: str) -> Any:
    return SimpleNamespace(
        peer_id=peer_id,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}",),
        models=(SimpleNamespace(cid=cid),),
    )


class Directory:
    def __init__(self, ads: list[Any], *, ads_fail: bool = False) -> None:
        self.ads = ads
        self.ads_fail = ads_fail

    async def find_providers(self, cid: str) -> list[Any]:
        await trio.sleep_forever()  # a DHT walk on a starved box
        raise AssertionError

    async def find_ads(self, *, refresh: bool = True) -> list[Any]:
        assert not refresh  # no crawl per job
        if self.ads_fail:
            raise OSError("no DHT")
        return self.ads

    async def find_ad(self, peer_id: str) -> Any:
        return None


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_hung_provider_walk_keeps_the_servers_the_ads_named(
    mock_clock: trio.testing.MockClock,
) -> None:
    dialer = Dialer(None, Directory([ad("A", CID), ad("B", "other")]))
    t0 = trio.current_time()
    found = await dialer.servers(CID)
    assert set(found) == {"A"}
    assert trio.current_time() - t0 == pytest.approx(PROVIDERS_TIMEOUT)


async def test_no_ads_and_no_providers_raise_the_ads_error(
    mock_clock: trio.testing.MockClock,
) -> None:
    dialer = Dialer(None, Directory([], ads_fail=True))
    with pytest.raises(OSError, match="no DHT"):
        await dialer.servers(CID)
