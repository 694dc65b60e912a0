"""AutoNAT on loopback: a peer others can dial is public; one they cannot is private.

py-libp2p 0.8.1's AutoNAT server "dials back" with ``host.connect``, which
returns at once over the connection the request came on, so it calls
everyone public; ``peer.reach.autonat`` probes with a fresh connection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from bootstrap.node import open_bootstrap
from peer.config import Config
from peer.node import Peer, open_peer
from tests.integration.market_swarm import FakeHardware

LOCAL = ("/ip4/127.0.0.1/tcp/0",)


async def settle(peer: Peer, want: Callable[[str], bool], *, limit: float = 30) -> str:
    """Wait for the peer's reachability verdict (event-driven); return it."""
    reach = peer.reach
    with trio.fail_after(limit):
        for _ in range(100):
            if want(reach.status):
                return str(reach.status)
            await reach.reachability.changed.wait()
    raise AssertionError(f"reachability stayed {reach.status}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_dialable_peer_is_public_and_says_so_in_its_ad(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            open_bootstrap(Config(data_dir=tmp_path / "boot", listen=LOCAL))
        )
        cfg = Config(data_dir=tmp_path / "p", listen=LOCAL, bootstrap=(boot.listen_addrs[0],))
        peer = await stack.enter_async_context(
            open_peer(cfg, hardware=FakeHardware(), market=False, settlement=False)
        )
        assert await settle(peer, lambda s: s != "unknown") == "public"
        assert peer.reach.reservations.held == {}  # public peers hold no relay slot
        with trio.fail_after(30):
            for _ in range(300):  # re-published within a second (rate limit)
                if peer.ad is not None and peer.ad.reachability == "public":
                    break
                await trio.sleep(0.1)
        assert peer.ad is not None and peer.ad.reachability == "public"


async def test_a_peer_whose_address_does_not_answer_is_private(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            open_bootstrap(Config(data_dir=tmp_path / "boot", listen=LOCAL))
        )
        # Listens nowhere but claims a loopback address (on the IP the server sees): only
        # a real dial-back finds out nobody answers there.
        cfg = Config(
            data_dir=tmp_path / "p",
            listen=(),
            announce=(f"/ip4/127.0.0.1/tcp/{closed_port()}",),
            bootstrap=(boot.listen_addrs[0],),
        )
        peer = await stack.enter_async_context(
            open_peer(cfg, hardware=FakeHardware(), market=False, settlement=False)
        )
        assert await settle(peer, lambda s: s != "unknown") == "private"
        assert peer.reach.reachability.last_results == {boot.peer_id: False}
