"""Dialing for the market, in one place: finding a model's servers and opening streams.

Every connection the market makes goes through ``Dialer``: ``servers(cid)`` (DHT
provider records, then ads), ``connect(found)`` and ``open_stream(peer_id,
until, protocol)``. The reach area (issue 12) swaps these internals for its
own dialer (every address, best first, raced; relays) without touching the
auction, lease or spot-check code that calls them.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from peer.market.clock import Clock, system_clock

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 5.0
PROVIDERS_TIMEOUT = 2.5  # a provider-record walk; the ads already found are kept past it
MAX_DIALS = 8
ADDR_TTL_S = 600


class Directory(Protocol):
    """Where servers and addresses are looked up (``peer.node.Peer``)."""

    async def find_providers(self, cid: str) -> list[Any]: ...
    async def find_ads(self, *, refresh: bool = True) -> list[Any]: ...
    async def find_ad(self, peer_id: str) -> Any: ...


class Dialer:
    def __init__(self, host: Any, directory: Directory, *, clock: Clock = system_clock) -> None:
        self.host = host
        self.directory = directory
        self.clock = clock

    async def servers(self, cid: str) -> dict[str, tuple[str, ...]]:
        """Peers serving ``cid`` and their addresses: ads of the peers we know (no crawl),
        then DHT provider records for at most ``PROVIDERS_TIMEOUT`` (a lookup can miss
        some records, and on a busy box a provider walk can outlast the caller's budget:
        the ads found first are kept; the auction waits for every server found)."""
        found: dict[str, tuple[str, ...]] = {}
        ads_failed: Exception | None = None
        try:
            # Ads of the peers we already know: no crawl per job (issue 15); the crawl
            # stays for listing (`edgeswarm peers`) and resolving model names.
            for ad in await self.directory.find_ads(refresh=False):
                if any(m.cid == cid for m in ad.models):
                    found.setdefault(ad.peer_id, tuple(ad.addrs))
        except Exception as exc:
            ads_failed = exc
            log.debug("find_ads failed: %s", exc)
        try:
            with trio.move_on_after(PROVIDERS_TIMEOUT):
                for p in await self.directory.find_providers(cid):
                    found.setdefault(p.peer_id, tuple(p.addrs))
        except Exception as exc:  # DHT errors: the ads still tell
            log.debug("find_providers failed: %s", exc)
        if not found and ads_failed is not None:
            raise ads_failed
        return found

    async def connect(self, found: dict[str, tuple[str, ...]]) -> set[str]:
        """Dial up to ``MAX_DIALS`` of ``found`` at once; returns who is connected."""
        connected: set[str] = set()

        async def dial(pid: str, addrs: tuple[str, ...]) -> None:
            for a in addrs:
                full = a if "/p2p/" in a else f"{a}/p2p/{pid}"
                try:
                    with trio.fail_after(DIAL_TIMEOUT):
                        await self.host.connect(info_from_p2p_addr(Multiaddr(full)))
                    connected.add(pid)
                    return
                except Exception as exc:  # one bad address: try the next
                    log.debug("dial %s failed: %s", full, exc)

        async with trio.open_nursery() as nursery:
            for pid, addrs in list(found.items())[:MAX_DIALS]:
                nursery.start_soon(dial, pid, addrs)
        return connected

    async def open_stream(self, peer_id: str, until: float, protocol: str) -> Any:
        """A new ``protocol`` stream to ``peer_id``, dialing it first if needed (its address
        from the peerstore, else its ad); ``trio.TooSlowError`` past ``until``."""
        pid = ID.from_base58(peer_id)
        budget = max(0.05, min(DIAL_TIMEOUT, until - self.clock()))
        with trio.fail_after(budget):
            if not self.host.get_network().connections.get(pid):
                try:
                    known = self.host.get_peerstore().addrs(pid)
                except Exception:
                    known = []
                if not known:
                    ad = await self.directory.find_ad(peer_id)
                    for a in ad.addrs if ad is not None else ():
                        info = info_from_p2p_addr(Multiaddr(a))
                        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, ADDR_TTL_S)
            return await self.host.new_stream(pid, [TProtocol(protocol)])
