"""The one place that dials: every address of a peer, best first, raced within a budget.

py-libp2p 0.8.1's swarm dials at most one address per transport class (so
one TCP address: whichever the peerstore lists first), never dials
``/p2p-circuit`` addresses, and blocks a peer for 60 s once that single
address failed. A peer on a real machine lists several addresses (each
interface, a NAT's public side, relays), so the first one is often the wrong
one. ``Dialer`` replaces the swarm's ``dial_peer`` on the host it is installed
on, so every dial (``host.connect``, ``host.new_stream``, the DHT, gossip,
the market, settlement) goes through it:

* candidate addresses = the ones the caller gave + the peerstore's, ranked by
  ``protocols.reach.rank_dial_addrs`` (same subnet, public, private, relayed;
  never a remote peer's loopback), at most ``MAX_DIAL_ADDRS``;
* raced happy-eyeballs style: the best address is dialed first, the next one
  when it fails or after ``STAGGER`` seconds, and so on; the first connection
  that comes up wins, the other attempts are cancelled (a late second
  connection is closed);
* a short negative cache per *address* (``NEGATIVE_TTL``): an address that
  just failed is skipped for a few seconds, the peer's other addresses are
  not; an explicit dial (``fresh=True``) ignores it;
* ``/p2p-circuit`` addresses are dialed through the relay client when one is
  attached (``circuit_dial``; see ``peer.reach.relay``); when such a dial wins,
  ``on_relayed(peer)`` asks for a hole punch (``peer.reach.dcutr``);
* a held connection that does not go through a relay is preferred to a relayed one,
  for dials and for every new stream: ``install`` also makes the swarm's stream
  placement pick among direct connections first (py-libp2p's ``best`` looks at
  a connection type that a hole-punched TCP connection leaves ``UNKNOWN``, so it
  ranked the relayed connection, which carried more streams, first).

Failures raise ``DialError`` (a ``SwarmException``, what py-libp2p's callers
already catch) naming every address tried and why it failed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import psutil
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from peer.reach.addresses import expand_listen
from protocols.reach import MAX_DIAL_ADDRS, DialAddr, Network, parse_dial_addr, rank_dial_addrs

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 10.0  # a whole dial (all addresses) when the caller gives no budget
STAGGER = 0.25  # start the next address after this long (or when the current one fails)
NEGATIVE_TTL = 5.0  # seconds an address that failed is skipped
NEGATIVE_MAX = 4096  # entries in the negative cache (it is cleared past this)
INTERFACES_TTL = 30.0  # seconds our interface list is cached

CircuitDial = Callable[[Multiaddr], Awaitable[INetConn]]


class DialError(SwarmException):
    """No address of a peer gave a connection; the message lists what was tried."""


def local_networks() -> list[Network]:
    """The subnets of our own interfaces (for 'same subnet first')."""
    out: list[Network] = []
    with contextlib.suppress(Exception):  # no interface info: rank without it
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.netmask and a.family.name in ("AF_INET", "AF_INET6"):
                    with contextlib.suppress(ValueError):
                        ip = a.address.split("%", 1)[0]
                        out.append(ipaddress.ip_network(f"{ip}/{a.netmask}", strict=False))
    return out


def _live(conns: Iterable[INetConn]) -> list[INetConn]:
    return [c for c in conns if not getattr(c, "is_closed", False)]


def _relayed(conn: INetConn) -> bool:
    with contextlib.suppress(Exception):
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    return False


def _reason(exc: BaseException) -> str:
    """A short cause: py-libp2p wraps the interesting error one or two levels deep."""
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    for _ in range(3):
        if cause is None:
            break
        parts.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    return ": ".join(parts)[:300]


class Dialer:
    """Dials peers for one host (see the module docstring); ``install`` hooks it into the swarm."""

    def __init__(
        self,
        host: IHost,
        *,
        stagger: float = STAGGER,
        negative_ttl: float = NEGATIVE_TTL,
        networks: Callable[[], Sequence[Network]] = local_networks,
    ) -> None:
        self.host = host
        self.stagger = stagger
        self.negative_ttl = negative_ttl
        self.circuit_dial: CircuitDial | None = None
        self.on_relayed: Callable[[ID], None] | None = None
        self._networks_source = networks
        self._networks: Sequence[Network] = ()
        self._networks_at = -1e9
        self._failed: dict[tuple[str, str], float] = {}  # (peer id, address) -> until
        self._inflight: dict[ID, trio.Event] = {}
        self.swarm: Any = host.get_network()
        self._swarm_select: Callable[[list[INetConn], ID], INetConn] = lambda conns, _p: conns[0]

    # -- hook ---------------------------------------------------------------

    def install(self) -> Dialer:
        """Make the host's swarm dial through us and put new streams on a direct connection
        when it holds one (instance attributes shadow the methods)."""
        self.swarm.dial_peer = self.dial_peer
        select = getattr(self.swarm, "_select_connection", None)
        if select is not None:
            self._swarm_select = select
            self.swarm._select_connection = self.select_connection
        self.swarm._edgeswarm_dialer = self
        return self

    def select_connection(self, connections: list[INetConn], peer_id: ID) -> INetConn:
        """The connection a new stream to ``peer_id`` goes on: the swarm's choice among the
        direct ones if there are any, else among all (relayed)."""
        direct = [c for c in connections if not _relayed(c)]
        chosen: INetConn = self._swarm_select(direct or connections, peer_id)
        return chosen

    @staticmethod
    def of(host: IHost) -> Dialer | None:
        """The dialer installed on ``host``, if any."""
        dialer = getattr(host.get_network(), "_edgeswarm_dialer", None)
        return dialer if isinstance(dialer, Dialer) else None

    async def dial_peer(self, peer_id: ID) -> list[INetConn]:
        """Drop-in for ``Swarm.dial_peer``: the peerstore's addresses, ``DIAL_TIMEOUT`` budget."""
        return [await self.connect(peer_id, (), deadline=DIAL_TIMEOUT)]

    # -- addresses -------------------------------------------------------------

    def networks(self) -> Sequence[Network]:
        now = trio.current_time()
        if now - self._networks_at > INTERFACES_TTL:
            self._networks = list(self._networks_source())
            self._networks_at = now
        return self._networks

    def _ours(self) -> set[tuple[str, int]]:
        """(ip, port) we listen on: never dialed for another peer (it would be ourselves)."""
        out: set[tuple[str, int]] = set()
        with contextlib.suppress(Exception):
            for a in expand_listen(self.host.get_transport_addrs()):
                parsed = parse_dial_addr(a)
                if parsed is not None:
                    out.add((parsed.host, parsed.port))
        return out

    def candidates(self, peer_id: ID, addrs: Iterable[str | Multiaddr] = ()) -> list[DialAddr]:
        """Every address we know for ``peer_id``, ranked best first (never our own address,
        nor a relay circuit through ourselves)."""
        texts = [str(a) for a in addrs]
        with contextlib.suppress(Exception):  # no peerstore entry
            texts += [str(a) for a in self.host.get_peerstore().addrs(peer_id)]
        ranked = rank_dial_addrs(texts, str(peer_id), self.networks(), limit=2 * MAX_DIAL_ADDRS)
        ours = self._ours()
        me = str(self.host.get_id())
        ranked = [
            a for a in ranked if a.relay != me and (a.circuit or (a.host, a.port) not in ours)
        ]
        return ranked[:MAX_DIAL_ADDRS]

    def _is_failed(self, peer: str, addr: DialAddr, now: float) -> bool:
        until = self._failed.get((peer, addr.text))
        if until is None:
            return False
        if until <= now:
            del self._failed[(peer, addr.text)]
            return False
        return True

    def _mark_failed(self, peer: str, addr: DialAddr) -> None:
        now = trio.current_time()
        if len(self._failed) >= NEGATIVE_MAX:
            self._failed = {k: v for k, v in self._failed.items() if v > now}
            if len(self._failed) >= NEGATIVE_MAX:
                self._failed.clear()
        self._failed[(peer, addr.text)] = now + self.negative_ttl

    def forget_failures(self, peer_id: ID | str) -> None:
        """Lift the negative cache for every address of a peer."""
        peer = str(peer_id)
        for k in [k for k in self._failed if k[0] == peer]:
            del self._failed[k]

    # -- dialing ----------------------------------------------------------------

    def connection(self, peer_id: ID) -> INetConn | None:
        """A live connection to ``peer_id``, if we hold one (a direct one before a relayed one)."""
        conns = _live(self.swarm.get_connections(peer_id))
        direct = [c for c in conns if not _relayed(c)]
        if direct:
            return direct[0]
        return conns[0] if conns else None

    async def connect(
        self,
        peer_id: ID,
        addrs: Iterable[str | Multiaddr] = (),
        *,
        deadline: float = DIAL_TIMEOUT,
        fresh: bool = False,
    ) -> INetConn:
        """A connection to ``peer_id``: the one we hold, or the first address that answers.

        ``addrs`` adds to what the peerstore knows; ``fresh`` ignores the negative
        cache (an explicit dial the caller paces itself, e.g. a bootstrap link).
        Raises ``DialError`` within ``deadline`` seconds (a duration).
        """
        if peer_id == self.host.get_id():
            raise DialError("a peer does not dial itself")
        addrs = list(addrs)
        with trio.move_on_after(deadline) as scope:
            for _ in range(3):  # another task's dial may be in flight: wait for it, re-check
                conn = self.connection(peer_id)
                if conn is not None:
                    return await self._ready(conn)
                pending = self._inflight.get(peer_id)
                if pending is None:
                    break
                await pending.wait()
            done = trio.Event()
            self._inflight[peer_id] = done
            try:
                return await self._race(peer_id, addrs, fresh=fresh)
            finally:
                done.set()
                if self._inflight.get(peer_id) is done:
                    del self._inflight[peer_id]
        assert scope.cancelled_caught
        raise DialError(f"no connection to {peer_id} within {deadline:.1f} s")

    async def _ready(self, conn: INetConn) -> INetConn:
        started = getattr(conn, "event_started", None)
        if started is not None:
            await started.wait()
        return conn

    async def _dial_one(self, peer_id: ID, addr: DialAddr) -> INetConn:
        if addr.circuit:
            if self.circuit_dial is None:
                raise DialError("no relay client on this peer")
            conn = await self.circuit_dial(Multiaddr(f"{addr.text}/p2p/{peer_id}"))
        else:
            single = getattr(self.swarm, "_dial_addr_single_attempt", None)
            dial = single if single is not None else self.swarm.dial_addr
            conn = await dial(Multiaddr(addr.text), peer_id)
        return await self._ready(conn)

    async def _race(self, peer_id: ID, addrs: list[Any], *, fresh: bool) -> INetConn:
        peer = str(peer_id)
        ranked = self.candidates(peer_id, addrs)
        now = trio.current_time()
        todo = ranked if fresh else [a for a in ranked if not self._is_failed(peer, a, now)]
        if not todo:
            if not ranked:
                raise DialError(f"no dialable address known for {peer}")
            raise DialError(
                f"all {len(ranked)} addresses of {peer} failed in the last "
                f"{self.negative_ttl:.0f} s: {', '.join(a.text for a in ranked)}"
            )
        winner: list[INetConn] = []
        won: list[DialAddr] = []
        errors: list[str] = []

        async def attempt(addr: DialAddr, failed: trio.Event, cancel: trio.CancelScope) -> None:
            try:
                conn = await self._dial_one(peer_id, addr)
            except Exception as exc:  # py-libp2p raises many kinds; one address failed
                errors.append(f"{addr.text}: {_reason(exc)}")
                self._mark_failed(peer, addr)
                failed.set()
                return
            self._failed.pop((peer, addr.text), None)
            if winner:  # a second connection came up before the cancel landed
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await conn.close()
                return
            winner.append(conn)
            won.append(addr)
            log.debug("dialed %s at %s", peer, addr.text)
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            for addr in todo:
                failed = trio.Event()
                nursery.start_soon(attempt, addr, failed, nursery.cancel_scope)
                with trio.move_on_after(self.stagger):
                    await failed.wait()
        if winner:
            if won[0].circuit and self.on_relayed is not None:
                self.on_relayed(peer_id)
            return winner[0]
        raise DialError(f"cannot reach {peer}: " + "; ".join(errors))

    async def open_stream(
        self,
        peer_id: ID,
        protocols: Sequence[str],
        addrs: Iterable[str | Multiaddr] = (),
        *,
        deadline: float = DIAL_TIMEOUT,
    ) -> INetStream:
        """Connect (see ``connect``), then open a stream for one of ``protocols``."""
        with trio.fail_after(deadline):
            await self.connect(peer_id, addrs, deadline=deadline)
            return await self.host.new_stream(peer_id, [TProtocol(p) for p in protocols])
