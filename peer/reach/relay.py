"""Circuit relay v2: relaying for others (hop), accepting relayed connections (stop), dialing
through relays, and keeping reservations on relays while we are not reachable.

Built on py-libp2p's ``CircuitV2Protocol`` / ``CircuitV2Transport``; what
they lack is added here:

* **Hop limits** (``HopLimits``, bootstrap nodes and public peers that opt
  in with ``relay_hop``): py-libp2p caps the number of reservations, the
  circuits per reservation and each circuit's duration and bytes. In front of
  its handler ``HopGuard`` adds a per-peer rate limit on hop requests, a cap on
  a peer's concurrent hop streams, a per-IP cap on reservations, and refuses a
  RESERVE that names another peer than the sender (py-libp2p 0.8.1 would book
  the slot for whatever peer id the message carries). Over a limit the
  stream is reset.
* **Circuits to one peer stay apart** (``CircuitProtocol``): py-libp2p 0.8.1 files
  each circuit under the destination peer's id, so a second circuit to the same
  peer (two requesters relayed to one executor at once) replaced the first's
  entry, and the end of the first closed the second's streams: the second
  requester lost its relayed connection mid-job. Each circuit now closes only its
  own streams.
* **Dialing** ``.../p2p/RELAY/p2p-circuit/p2p/PEER``: the swarm skips circuit
  addresses, so ``peer.reach.dialer`` calls ``RelayService.dial`` for them.
* **Reservations** (``Reservations``): while AutoNAT says we are private (or
  ``reachability = "private"``), hold reservations on ``relay_reservations``
  relays (bootstrap nodes first, then connected peers that offer the hop
  protocol), advertise a ``/p2p-circuit`` address per relay, renew each at
  ``RENEW_AT`` of its lifetime, and when a relay goes away, reserve on the next
  one at once (the ad is re-published with the new addresses).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import (
    PROTOCOL_ID as HOP_PROTOCOL,
)
from libp2p.relay.circuit_v2.protocol import (
    CircuitV2Protocol,
)
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from peer import metrics
from peer.reach.addresses import Advertiser
from peer.reach.notifee import QuietNotifee
from protocols.reach import parse_dial_addr, rank_dial_addrs

log = logging.getLogger(__name__)

MAX_HOP_MESSAGE = 4096  # a RESERVE/CONNECT is ~100 bytes
RENEW_AT = 0.5  # renew a reservation at this fraction of its lifetime
RESERVE_TIMEOUT = 10.0
RETRY_INTERVAL = 5.0  # while short of relays


@dataclass(frozen=True)
class HopLimits:
    """What one relay grants (defaults sized for a bootstrap node on a small VM)."""

    max_reservations: int = 128
    reservation_ttl: int = 3600  # seconds
    max_circuits_per_peer: int = 8  # concurrent circuits to one reserved peer
    circuit_duration: int = 600  # seconds one relayed connection may live
    circuit_bytes: int = 128 * 1024 * 1024  # bytes one relayed connection may carry
    hop_rate_per_minute: int = 60  # hop requests (reserve/connect) per peer per minute
    max_hop_streams_per_peer: int = 16  # concurrent hop streams of one peer
    max_reservations_per_ip: int = 8

    def relay_limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_duration,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl,
        )


class _Replay:
    """A stream whose first bytes (already read by the guard) are handed out again."""

    def __init__(self, stream: INetStream, head: bytes) -> None:
        self._stream = stream
        self._head = head

    async def read(self, n: int | None = None) -> bytes:
        if self._head:
            if n is None or n >= len(self._head):
                out, self._head = self._head, b""
            else:
                out, self._head = self._head[:n], self._head[n:]
            return out
        return await self._stream.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _remote_ip(stream: INetStream) -> str | None:
    with contextlib.suppress(Exception):
        remote = stream.get_remote_address()
        if remote:
            return str(remote[0])
    return None


class _Circuits(dict[ID, tuple[INetStream, INetStream | None]]):
    """py-libp2p's ``_active_relays`` (its ``stop`` closes what is here). Keyed by peer, an
    entry can belong to a newer circuit to that peer; ``in`` answers False so that
    py-libp2p's per-peer cleanup (which closed that newer circuit) never runs."""

    def __contains__(self, key: object) -> bool:
        return False


class CircuitProtocol(CircuitV2Protocol):
    """``CircuitV2Protocol`` whose circuits each close their own streams when they end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active_relays = _Circuits()
        self.relays_ended = 0  # relay directions ended (two per circuit)
        self.relay_ended = trio.Event()  # set (and replaced) when one ends

    async def _relay_data(
        self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID, *args: Any
    ) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, *args)
        finally:
            try:
                entry = dict.get(self._active_relays, peer_id)
                if entry is not None and src_stream in entry:  # ours, not a newer circuit's
                    dict.pop(self._active_relays, peer_id, None)
                await self._close_stream(src_stream)
                await self._close_stream(dst_stream)
            finally:
                self.relays_ended += 1
                self.relay_ended.set()
                self.relay_ended = trio.Event()


class HopGuard:
    """Limits in front of py-libp2p's hop handler (see the module docstring)."""

    def __init__(
        self, protocol: CircuitV2Protocol, limits: HopLimits, clock: Callable[[], float]
    ) -> None:
        self.protocol = protocol
        self.limits = limits
        self.clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._open: dict[str, int] = {}
        self._reservation_ip: dict[str, str] = {}  # reserved peer -> its IP
        self.refused = 0

    def _rate_ok(self, peer: str) -> bool:
        now = self.clock()
        recent = self._recent.setdefault(peer, deque())
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if len(recent) >= self.limits.hop_rate_per_minute:
            return False
        recent.append(now)
        if len(self._recent) > 10_000:  # forget idle peers
            self._recent = {p: d for p, d in self._recent.items() if d}
        return True

    def _ip_ok(self, peer: str, ip: str | None) -> bool:
        if ip is None:
            return True
        rm = self.protocol.resource_manager
        live = {str(p) for p in getattr(rm, "_reservations", {})}
        self._reservation_ip = {p: i for p, i in self._reservation_ip.items() if p in live}
        if peer in self._reservation_ip:
            return True
        same = sum(1 for i in self._reservation_ip.values() if i == ip)
        return same < self.limits.max_reservations_per_ip

    async def _refuse(self, stream: INetStream, why: str) -> None:
        self.refused += 1
        log.info("relay: refused a hop stream: %s", why)
        with contextlib.suppress(Exception):
            await stream.reset()

    async def handle(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if not self._rate_ok(peer):
            await self._refuse(stream, f"{peer} is over {self.limits.hop_rate_per_minute}/min")
            return
        if self._open.get(peer, 0) >= self.limits.max_hop_streams_per_peer:
            await self._refuse(stream, f"{peer} holds too many hop streams")
            return
        self._open[peer] = self._open.get(peer, 0) + 1
        try:
            try:
                with trio.fail_after(RESERVE_TIMEOUT):
                    body = await read_varint_prefixed_bytes_limited(stream, MAX_HOP_MESSAGE)
                msg = HopMessage()
                msg.ParseFromString(body)
            except Exception as exc:
                await self._refuse(stream, f"bad hop message from {peer}: {exc}")
                return
            if msg.type == HopMessage.RESERVE:
                if msg.HasField("peer") and msg.peer.id and ID(msg.peer.id) != ID.from_base58(peer):
                    await self._refuse(stream, f"{peer} asked to reserve for another peer")
                    return
                ip = _remote_ip(stream)
                if not self._ip_ok(peer, ip):
                    await self._refuse(stream, f"too many reservations from {ip}")
                    return
                if ip is not None:
                    self._reservation_ip[peer] = ip
            replay: Any = _Replay(stream, encode_varint_prefixed(body))
            metrics.RELAY_CONNECTIONS.labels("hop").inc()
            await self.protocol._handle_hop_stream(replay)
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]


class _Lost(QuietNotifee):
    """Calls ``on_lost(peer)`` when the last connection to a peer closes."""

    def __init__(self, on_lost: Callable[[ID], None]) -> None:
        self.on_lost = on_lost

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if not [c for c in network.get_connections(peer) if not getattr(c, "is_closed", False)]:
            self.on_lost(peer)


@dataclass
class Held:
    relay: ID
    circuit: str  # our address through it, without /p2p/<our id>
    expires: float  # unix time
    lifetime: float  # seconds the relay granted


class RelayService:
    """Circuit relay v2 on one host: stop side always, hop side when ``hop``, client dialing."""

    def __init__(
        self,
        host: IHost,
        *,
        hop: bool = False,
        limits: HopLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.hop = hop
        self.limits = limits or HopLimits()
        self.protocol = CircuitProtocol(host, limits=self.limits.relay_limits(), allow_hop=hop)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
        config = RelayConfig(roles=roles, limits=self.limits.relay_limits())
        self.transport = CircuitV2Transport(host, self.protocol, config)
        self.guard = HopGuard(self.protocol, self.limits, clock)

    async def dial(self, addr: Multiaddr) -> INetConn:
        """Connect through the relay named in ``addr`` (``.../p2p/R/p2p-circuit/p2p/PEER``)."""
        conn = await self.transport.dial(addr)
        metrics.RELAY_CONNECTIONS.labels("client").inc()
        return conn

    async def reserve(self, relay: ID) -> float:
        """Reserve a slot on ``relay`` (connected or dialable); its expiry (unix time) or raise."""
        from peer.reach import reach_of

        with trio.fail_after(RESERVE_TIMEOUT):
            stream = await reach_of(self.host).open_stream(relay, [str(HOP_PROTOCOL)])
            try:
                ok = await self.transport._make_reservation(stream, relay)
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()
        if not ok:
            raise ConnectionError(f"relay {relay} refused the reservation")
        expires = float(self.transport._reservations.get(relay, 0))
        return expires if expires > time.time() else time.time() + 60.0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            if self.hop:
                self.host.set_stream_handler(HOP_PROTOCOL, self.guard.handle)
            task_status.started()
            await trio.sleep_forever()


class Reservations:
    """Keeps reservations on ``target`` relays while ``wanted()`` (we are not reachable)."""

    def __init__(
        self,
        service: RelayService,
        advertiser: Advertiser,
        *,
        target: int,
        wanted: Callable[[], bool],
        relays: Callable[[], Sequence[ID]],
        published: Callable[[], None],
    ) -> None:
        self.service = service
        self.host = service.host
        self.advertiser = advertiser
        self.target = target
        self.wanted = wanted
        self.relays = relays
        self.published = published
        self.held: dict[ID, Held] = {}
        self.wake = trio.Event()
        self.changed = trio.Event()  # set (and replaced) when the relays we hold change
        self.failures = 0
        self.renewals = 0
        self._watcher = _Lost(self._lost)

    def _lost(self, peer: ID) -> None:
        if peer in self.held:
            log.warning("relay %s went away; reserving elsewhere", peer)
            del self.held[peer]
            self._advertise()
            self.wake.set()

    def _advertise(self) -> None:
        self.advertiser.relayed = [h.circuit for h in self.held.values()]
        self.published()
        self.changed.set()
        self.changed = trio.Event()

    def _relay_addr(self, relay: ID) -> str | None:
        """Our circuit address through ``relay``: its best address + /p2p/R/p2p-circuit."""
        with contextlib.suppress(Exception):
            addrs = [str(a) for a in self.host.get_peerstore().addrs(relay)]
            ranked = rank_dial_addrs(addrs, str(relay))
            direct = [a for a in ranked if not a.circuit]
            if direct:
                return f"{direct[0].text}/p2p/{relay}/p2p-circuit"
        return None

    def _candidates(self) -> list[ID]:
        me = self.host.get_id()
        out = [r for r in self.relays() if r != me]
        store = self.host.get_peerstore()
        for pid in self.host.get_connected_peers():
            if pid in out or pid == me:
                continue
            with contextlib.suppress(Exception):
                if HOP_PROTOCOL in (store.get_protocols(pid) or []):
                    out.append(pid)
        return out

    async def _reserve(self, relay: ID) -> None:
        try:
            expires = await self.service.reserve(relay)
        except Exception as exc:
            self.failures += 1
            log.info("no reservation on relay %s: %s", relay, exc)
            return
        circuit = self._relay_addr(relay)
        if circuit is None or parse_dial_addr(circuit) is None:
            log.info("relay %s has no address we can advertise", relay)
            return
        new = relay not in self.held
        self.held[relay] = Held(relay, circuit, expires, max(1.0, expires - time.time()))
        if new:
            log.info("reserved a slot on relay %s; reachable at %s", relay, circuit)
            self._advertise()
        else:
            self.renewals += 1
            log.debug("renewed the reservation on relay %s", relay)
            self.changed.set()
            self.changed = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host.get_network().register_notifee(self._watcher)
        task_status.started()
        while True:
            self.wake = trio.Event()
            if not self.wanted():
                if self.held:
                    self.held.clear()
                    self._advertise()
                wait = 30.0
            else:
                now = time.time()
                # Renew what is due, then top up to the target.
                due = [h.relay for h in self.held.values() if self._due(h, now)]
                for relay in due:
                    await self._reserve(relay)
                for relay in self._candidates():
                    if len(self.held) >= self.target:
                        break
                    if relay not in self.held:
                        await self._reserve(relay)
                wait = RETRY_INTERVAL if len(self.held) < self.target else self._next_renewal()
            with trio.move_on_after(wait):
                await self.wake.wait()

    def _due(self, h: Held, now: float) -> bool:
        return now >= h.expires - self._renew_margin(h)

    def _renew_margin(self, h: Held) -> float:
        return (1 - RENEW_AT) * h.lifetime

    def _next_renewal(self) -> float:
        now = time.time()
        soonest = min(
            (h.expires - self._renew_margin(h) - now for h in self.held.values()), default=30.0
        )
        return max(1.0, min(soonest, 300.0))
