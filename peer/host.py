"""The libp2p host: TCP + Noise + yamux, identify and ping (py-libp2p defaults).

``running_host`` listens, checks that every requested address really is
listened on, and stops the host's services on exit. Two py-libp2p habits are
handled here:

* ``BasicHost.run`` ignores a failed listen, and the TCP transport binds with
  SO_REUSEPORT, so a second process on a busy port would *silently share it*
  with the first. We bind-test each fixed port without SO_REUSEPORT first and
  raise ``ListenError`` naming the address.
* A dial that succeeded waits 250 ms in the swarm's happy-eyeballs loop
  unless ``max_connections_per_peer=1``; with one connection per peer a dial
  takes ~11 ms (see docs/benchmarks.md, "Discovery"), and DHT and gossip only
  ever need one connection to a peer, so that is our default.

Dialing goes through ``peer.reach`` (installed by ``build_host``): every
address of a peer, best first, raced, with a short per-address negative
cache, instead of py-libp2p's first-address-only dial and 60 s whole-peer
block. What identify advertises comes from ``peer.reach.addresses``.

QUIC is not enabled: py-libp2p 0.8.1's QUIC transport is optional and we have
not proven it against other implementations yet; TCP is what js/go dial.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import nacl.signing
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address

from peer import metrics
from peer.identity import libp2p_key_pair
from peer.reach import attach, reach_of
from peer.reach.addresses import Advertiser

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0


class AddressError(ValueError):
    """A multiaddr given by the user or config is malformed or unusable."""


class ListenError(OSError):
    """The host cannot listen on an address (in use, not local, ...)."""


def parse_multiaddr(text: str, *, need_peer_id: bool = False) -> multiaddr.Multiaddr:
    """Parse ``text``; ``AddressError`` with what was expected and what came."""
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:
        raise AddressError(f"{text!r} is not a valid multiaddr ({exc})") from None
    protos = [p.name for p in addr.protocols()]
    if need_peer_id and "p2p" not in protos:
        raise AddressError(
            f"{text!r} has no /p2p/<peer id> part; a bootstrap address must name the peer, "
            "e.g. /ip4/1.2.3.4/tcp/4101/p2p/12D3KooW..."
        )
    if not need_peer_id and "tcp" not in protos:
        raise AddressError(f"{text!r} is not a TCP address, e.g. /ip4/127.0.0.1/tcp/0")
    return addr


def peer_info_from_addr(text: str) -> PeerInfo:
    """PeerInfo of a full multiaddr (``.../p2p/<id>``)."""
    addr = parse_multiaddr(text, need_peer_id=True)
    try:
        return info_from_p2p_addr(addr)
    except Exception as exc:
        raise AddressError(f"{text!r} does not name a peer: {exc}") from None


# A bootstrap node is every new peer's first contact (DHT, gossip, relay): py-libp2p refuses
# inbound connections past ``max_connections - min_connections`` (it closes them before
# multistream), so with an edge peer's 128 a 200-peer swarm lost ~80 peers at the door.
BOOTSTRAP_MAX_CONNECTIONS = 4096


def connection_config(
    *, one_connection_per_peer: bool = True, bootstrap: bool = False
) -> ConnectionConfig:
    """Connection limits for an edge peer, or a bootstrap node (``bootstrap``).

    py-libp2p's defaults (from a server-class go-libp2p) make every node dial
    known peers until it holds 50-150 connections; an edge box needs a handful
    for the DHT and the gossip mesh (degree 6), and jobs dial executors anyway.
    A bootstrap node dials no one but must accept every peer that joins.
    """
    if bootstrap:
        return ConnectionConfig(
            max_connections_per_peer=1 if one_connection_per_peer else 3,
            min_connections=8,
            low_watermark=16,
            high_watermark=BOOTSTRAP_MAX_CONNECTIONS - 256,
            max_connections=BOOTSTRAP_MAX_CONNECTIONS,
        )
    return ConnectionConfig(
        max_connections_per_peer=1 if one_connection_per_peer else 3,
        min_connections=8,
        low_watermark=16,
        high_watermark=96,
        max_connections=128,
    )


def build_host(
    key: nacl.signing.SigningKey,
    *,
    one_connection_per_peer: bool = True,
    mdns: bool = False,
    announce: Sequence[str] = (),
    bootstrap: bool = False,
) -> IHost:
    """A host that dials and advertises through ``peer.reach`` (``announce``: ``--announce``;
    ``bootstrap``: a bootstrap node's connection limits)."""
    advertiser = Advertiser(announce)
    host = new_host(
        key_pair=libp2p_key_pair(key),
        connection_config=connection_config(
            one_connection_per_peer=one_connection_per_peer, bootstrap=bootstrap
        ),
        enable_mDNS=mdns,
        addrs_factory=advertiser.factory,
        # py-libp2p's events for /metrics: ``running_host`` drains the channel (unread, it
        # would block the host after 100 events).
        enable_metrics=True,
    )
    attach(host, advertiser)
    return host


def _ip_and_port(addr: multiaddr.Multiaddr) -> tuple[int, str, int] | None:
    for family, proto in ((socket.AF_INET, "ip4"), (socket.AF_INET6, "ip6")):
        try:
            ip = addr.value_for_protocol(proto)
        except Exception:
            continue
        if ip:
            return family, str(ip), int(addr.value_for_protocol("tcp"))
    return None


def check_port_free(addr: multiaddr.Multiaddr) -> None:
    """Raise ``ListenError`` if ``addr``'s fixed TCP port cannot be bound exclusively."""
    parsed = _ip_and_port(addr)
    if parsed is None:
        return
    family, ip, port = parsed
    if port == 0:
        return
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR lets a restarted bootstrap reuse its port past TIME_WAIT;
        # it still fails while another socket *listens* there.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            reason = (
                "address already in use (another edgeswarm or program listens there)"
                if exc.errno == errno.EADDRINUSE
                else (exc.strerror or str(exc))
            )
            raise ListenError(f"cannot listen on {addr}: {reason}") from None


async def _refuse(stream: Any) -> None:
    with contextlib.suppress(Exception):
        await stream.reset()


def retire_stream_handler(host: IHost, protocol: str) -> None:
    """Stop serving ``protocol``: later streams for it are reset.

    Never ``remove_stream_handler`` while the host runs: py-libp2p 0.8.1's multiselect
    checks ``protocol in handlers``, awaits a write, then indexes ``handlers[protocol]``,
    so a removal in between raises KeyError inside the swarm and tears the host down.
    """
    host.set_stream_handler(TProtocol(protocol), _refuse)


def concrete_addrs(host: IHost) -> list[str]:
    """Dialable listen addresses with ``/p2p/<id>``; wildcards expanded to interfaces."""
    peer_part = f"/p2p/{host.get_id()!s}"
    out: list[str] = []
    for addr in host.get_transport_addrs():
        parsed = _ip_and_port(addr)
        expanded = [addr]
        if parsed is not None and ipaddress.ip_address(parsed[1]).is_unspecified:
            expanded = expand_wildcard_address(addr)
        for a in expanded:
            text = str(a) + peer_part
            if text not in out:
                out.append(text)
    return out


async def _close_listeners(host: IHost) -> None:
    """Stop accepting connections (``host.close`` closes the listeners again: a no-op).

    py-libp2p's ``Swarm.close`` closes the connections *before* the listeners:
    a peer that sees its connection drop and re-dials at once (a bootstrap
    link) is accepted again by the closing node, and that late connection is
    then left to task cancellation, so the peer goes on listing us as
    connected for a while after we are gone.
    """

    async def close_one(listener: Any) -> None:
        with contextlib.suppress(Exception):
            await listener.close()

    listeners = getattr(host.get_network(), "listeners", {})
    async with trio.open_nursery() as nursery:
        for listener in list(listeners.values()):
            nursery.start_soon(close_one, listener)


async def _close_connections(host: IHost) -> None:
    """Close every connection at once: the swarm closes them one by one, ~0.2 s each."""

    async def close_one(conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    connections = getattr(host.get_network(), "connections", {})
    async with trio.open_nursery() as nursery:
        for conns in list(connections.values()):
            for conn in list(conns):
                nursery.start_soon(close_one, conn)


@asynccontextmanager
async def running_host(host: IHost, listen: Sequence[str]) -> AsyncIterator[list[str]]:
    """Run ``host`` listening on ``listen``; yield its full listen multiaddrs."""
    addrs = [parse_multiaddr(a) for a in listen]
    for a in addrs:
        check_port_free(a)
    network = host.get_network()
    # The metrics drain outlives the host's service and its shielded close below: a send
    # to a full metrics channel must never hold up a dial or the shutdown.
    metric_events = host.get_metrics_recv_channel()
    async with trio.open_nursery() as drain:
        if metric_events is not None:
            await drain.start(metrics.drain_libp2p, metric_events)
        try:
            async with _serving(host, network, addrs) as concrete:
                yield concrete
        finally:
            drain.cancel_scope.cancel()


@asynccontextmanager
async def _serving(host: IHost, network: Any, addrs: list[Any]) -> AsyncIterator[list[str]]:
    async with background_trio_service(network):
        await network.listen(*addrs)
        listeners = getattr(network, "listeners", {})
        missing = [str(a) for a in addrs if str(a) not in listeners]
        if missing:
            raise ListenError(f"cannot listen on {', '.join(missing)} (see the log above)")
        mdns = getattr(host, "mDNS", None)
        if mdns is not None:  # LAN discovery (config.mdns): finds peers without bootstrap
            mdns.start()
        try:
            yield concrete_addrs(host)
        finally:
            # Stopping the service alone leaves the TCP listeners' system tasks
            # running; close() shuts connections, listeners and mDNS first.
            # Listeners before connections: nobody gets back in while we close.
            # Shielded (and bounded) so it also runs when we are being cancelled.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await _close_listeners(host)
                await _close_connections(host)
                await host.close()


async def connect(host: IHost, address: str, *, limit: float = DIAL_TIMEOUT) -> PeerInfo:
    """Dial a full multiaddr now (no negative cache); raises ``peer.reach.DialError``.

    The peer's other known addresses are raced too (see ``peer.reach``).
    """
    info = peer_info_from_addr(address)
    await reach_of(host).connect(info.peer_id, info.addrs, deadline=limit, fresh=True)
    return info
