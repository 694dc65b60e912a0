"""Reaching peers on real networks: dialing, advertised addresses, relays, NAT traversal.

The seam every other part of the peer uses to dial::

    reach = reach_of(host)                      # or peer.reach
    conn = await reach.connect(peer_id, addrs, deadline=5.0)
    stream = await reach.open_stream(peer_id, ["/edgeswarm/job/1"], deadline=5.0)

``peer_id`` is a base58 string or a py-libp2p ``ID``; ``addrs`` (optional)
adds to what the peerstore knows (an ad's addresses, a provider record).
Every address is tried, best first, raced (``peer.reach.dialer``); relayed
addresses go through the relay client when the peer runs one
(``peer.reach.relay``). Plain ``host.connect``/``host.new_stream`` take the
same path, because the dialer replaces the swarm's ``dial_peer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from peer.reach.addresses import Advertiser
from peer.reach.dialer import DIAL_TIMEOUT, Dialer, DialError

__all__ = ["DIAL_TIMEOUT", "Advertiser", "DialError", "Dialer", "Reach", "reach_of"]


def _pid(peer_id: str | ID) -> ID:
    if isinstance(peer_id, ID):
        return peer_id
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:
        raise DialError(f"{peer_id!r} is not a peer id: {exc}") from None


@dataclass
class Reach:
    """Everything about reaching peers for one host."""

    host: IHost
    dialer: Dialer
    advertiser: Advertiser
    relay: Any = None  # peer.reach.relay.RelayService while services run
    reachability: Any = None  # peer.reach.autonat.Reachability while services run
    reservations: Any = None  # peer.reach.relay.Reservations (peers only)
    punch: Any = None  # peer.reach.dcutr.HolePunch while services run (TCP listeners only)
    _kick: trio.Event = field(default_factory=trio.Event)

    def kick(self) -> None:
        """Something changed (a bootstrap link came up): re-check reachability and relays now."""
        self._kick.set()
        self._kick = trio.Event()
        if self.reservations is not None:
            self.reservations.wake.set()

    def on_reachability(self, republish: Callable[[], None]) -> Callable[[], None]:
        """What to do when AutoNAT changes its verdict: republish our ad, and wake the
        relay reservations (a peer found private reserves at once, not at their next
        30 s check)."""

        def changed() -> None:
            republish()
            if self.reservations is not None:
                self.reservations.wake.set()

        return changed

    @property
    def status(self) -> str:
        """``public``, ``private`` or ``unknown`` (AutoNAT, or the ``reachability`` setting)."""
        return self.reachability.status if self.reachability is not None else "unknown"

    def ad_reachability(self) -> str:
        """What our ad says: "public", "private", or "" while unknown."""
        status = self.status
        return status if status in ("public", "private") else ""

    @asynccontextmanager
    async def services(
        self, role: str, config: Any, republish: Callable[[], None]
    ) -> AsyncIterator[None]:
        """Run relay (stop; hop on bootstrap nodes and ``relay_hop`` peers), AutoNAT,
        hole punching (DCUtR) when we listen on TCP and, for peers, relay reservations
        while AutoNAT says we are private."""
        from libp2p.tools.anyio_service import background_trio_service

        from peer.logging_setup import install_libp2p_filter
        from peer.reach.autonat import Reachability, install_server
        from peer.reach.dcutr import HolePunch
        from peer.reach.relay import RelayService, Reservations

        install_libp2p_filter()  # the relay's py-libp2p loggers exist now

        forced = config.reachability if config.reachability in ("public", "private") else None
        bootstrap_ids = [_pid(a.rsplit("/p2p/", 1)[1]) for a in config.bootstrap if "/p2p/" in a]
        if role != "client":
            install_server(self.host)
        async with trio.open_nursery() as nursery:
            self.relay = RelayService(self.host, hop=role == "bootstrap" or config.relay_hop)
            await nursery.start(self.relay.run)
            self.dialer.circuit_dial = self.relay.dial
            self.reachability = Reachability(
                self.host,
                self.advertiser,
                forced=forced,
                servers=lambda: bootstrap_ids,
                on_change=self.on_reachability(republish),
            )
            if role == "peer":
                await nursery.start(self.reachability.run, lambda: self._kick)
                self.reservations = Reservations(
                    self.relay,
                    self.advertiser,
                    target=config.relay_reservations,
                    wanted=lambda: self.status == "private",
                    relays=lambda: bootstrap_ids,
                    published=republish,
                )
                await nursery.start(self.reservations.run)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if role != "bootstrap" and self.host.get_transport_addrs():
                        self.punch = HolePunch(self.host)
                        await stack.enter_async_context(background_trio_service(self.punch))
                        await self.punch.event_started.wait()
                        self.dialer.on_relayed = self.punch.request
                    try:
                        yield
                    finally:
                        self.dialer.circuit_dial = None
                        self.dialer.on_relayed = None
            finally:
                # Only after the hole-punch service stopped: cancelling first made its stop()
                # raise Cancelled over whatever the body raised, and this nursery then
                # swallowed both (a failing test inside open_peer passed).
                nursery.cancel_scope.cancel()

    async def connect(
        self,
        peer_id: str | ID,
        addrs: Iterable[str | Multiaddr] = (),
        *,
        deadline: float = DIAL_TIMEOUT,
        fresh: bool = False,
    ) -> INetConn:
        """A connection to the peer (held, or dialed: every address, best first, raced).

        Schedules identify on a new connection, as ``host.connect`` does.
        """
        pid = _pid(peer_id)
        had = self.dialer.connection(pid) is not None
        conn = await self.dialer.connect(pid, addrs, deadline=deadline, fresh=fresh)
        schedule = getattr(self.host, "_schedule_identify", None)
        if not had and schedule is not None:
            schedule(pid, reason="connect")
        return conn

    async def open_stream(
        self,
        peer_id: str | ID,
        protocols: Sequence[str],
        addrs: Iterable[str | Multiaddr] = (),
        *,
        deadline: float = DIAL_TIMEOUT,
    ) -> INetStream:
        """A new stream to the peer for one of ``protocols`` (dialing it if needed)."""
        return await self.dialer.open_stream(_pid(peer_id), protocols, addrs, deadline=deadline)

    def advertised(self) -> list[str]:
        """Our advertised addresses, each ending in ``/p2p/<our id>``."""
        me = str(self.host.get_id())
        return [f"{a}/p2p/{me}" for a in self.advertiser.addrs()]


def attach(host: IHost, advertiser: Advertiser | None = None) -> Reach:
    """Install a dialer on ``host`` and remember the bundle on its swarm.

    Also replaces the host's ``get_addrs`` (what identify, provider records and
    peer records carry): py-libp2p 0.8.1 strips "the" ``/p2p`` part of each
    address before appending ours, and for a relay address
    ``.../p2p/RELAY/p2p-circuit`` that cuts at the relay, so it would tell
    everyone our address is the *relay's* address.
    """
    advertiser = advertiser or Advertiser()
    advertiser.host = host

    def get_addrs() -> list[Multiaddr]:
        me = host.get_id()
        return [Multiaddr(f"{a}/p2p/{me}") for a in advertiser.addrs()]

    host.get_addrs = get_addrs  # type: ignore[method-assign]
    reach = Reach(host=host, dialer=Dialer(host).install(), advertiser=advertiser)
    host.get_network()._edgeswarm_reach = reach  # type: ignore[attr-defined]
    return reach


def reach_of(host: IHost) -> Reach:
    """The ``Reach`` of ``host`` (attached on first use for hosts not made by ``build_host``)."""
    reach = getattr(host.get_network(), "_edgeswarm_reach", None)
    return reach if isinstance(reach, Reach) else attach(host)
