"""Which connection a stream went over: direct, relayed, or direct after a hole punch.

``StreamRoutes`` is a swarm notifee that notes, for every stream this host
opens or accepts, the address of its connection at that moment (a relayed
connection's address holds ``/p2p-circuit``). ``route_of`` describes one such
address for a report::

    routes = StreamRoutes()
    host.get_network().register_notifee(routes)
    ...                                   # a job runs
    addr = routes.last(executor, JOB)     # the job stream's connection
    route_of(addr, punched)               # {"kind": "relayed", "relay": ..., ...}

Bounded: at most ``limit`` streams are remembered (the oldest go first).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from libp2p.abc import INetStream

from peer.reach.dcutr import conn_addr
from peer.reach.notifee import QuietNotifee

RELAYED = "relayed"
DIRECT = "direct"
PUNCHED = "hole-punched"


class StreamRoutes(QuietNotifee):
    """The connection address of each stream of this host (see the module docstring)."""

    def __init__(self, limit: int = 256) -> None:
        self._seen: deque[tuple[INetStream, str, str]] = deque(maxlen=limit)

    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        conn = getattr(stream, "muxed_conn", None)
        addr = conn_addr(conn) or ""
        self._seen.append((stream, str(getattr(conn, "peer_id", "")), addr))

    def all(self, peer_id: str, protocol: str) -> list[str]:
        """Connection addresses of ``peer_id``'s streams of ``protocol``, oldest first
        (a stream counts once its protocol is negotiated)."""
        return [a for s, p, a in self._seen if p == peer_id and s.get_protocol() == protocol]

    def last(self, peer_id: str, protocol: str) -> str | None:
        found = self.all(peer_id, protocol)
        return found[-1] if found else None


def relay_of(addr: str) -> str | None:
    """The relay's peer id in a relayed address (``.../p2p/RELAY/p2p-circuit...``)."""
    if "/p2p-circuit" not in addr:
        return None
    head = addr.split("/p2p-circuit", 1)[0]
    return head.rsplit("/p2p/", 1)[1] if "/p2p/" in head else None


def route_of(
    addr: str | None, punched_addr: str | None = None, *, relayed_first: bool = False
) -> dict[str, Any]:
    """``{"kind", "connection", "relay"}`` for a stream on ``addr``: kind ``relayed``
    (through ``relay``), ``hole-punched`` (on the direct connection a punch opened, whose
    address is ``punched_addr``, or any direct connection to a peer this host could first
    reach only through a relay: ``relayed_first``; the punch that opened it may still be
    finishing, or the other side started it), ``direct``, or None when no stream was seen."""
    if not addr:
        return {"kind": None, "connection": None, "relay": None}
    if "/p2p-circuit" in addr:
        return {"kind": RELAYED, "connection": addr, "relay": relay_of(addr)}
    punched = relayed_first or (punched_addr is not None and addr == punched_addr)
    kind = PUNCHED if punched else DIRECT
    return {"kind": kind, "connection": addr, "relay": None}
