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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    relay: Any = None  # peer.reach.relay.RelayClient once started

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
    """Install a dialer on ``host`` and remember the bundle on its swarm."""
    advertiser = advertiser or Advertiser()
    advertiser.host = host
    reach = Reach(host=host, dialer=Dialer(host).install(), advertiser=advertiser)
    host.get_network()._edgeswarm_reach = reach  # type: ignore[attr-defined]
    return reach


def reach_of(host: IHost) -> Reach:
    """The ``Reach`` of ``host`` (attached on first use for hosts not made by ``build_host``)."""
    reach = getattr(host.get_network(), "_edgeswarm_reach", None)
    return reach if isinstance(reach, Reach) else attach(host)
