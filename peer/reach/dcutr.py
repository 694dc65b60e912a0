"""DCUtR (``/libp2p/dcutr``): upgrade a relayed connection to a direct one by hole punching.

py-libp2p 0.8.1's ``DCUtRProtocol`` does the exchange per the spec: CONNECT
with our observed addresses (the NAT's public IP from identify, with our
listen port: the TCP transport listens with SO_REUSEPORT and a punch dials
*from* the listen port, so the NAT keeps the same public port), the RTT
measured over the relay, SYNC, then both sides dial each other at once (TCP
simultaneous open; the initiator upgrades as the responder so the Noise roles
match). Once a direct connection is up, the swarm's stream selection
(``best``: direct before relayed) puts every *new* stream on it, and the relayed
connection is closed later (see below). What ``HolePunch`` changes:

* **When**: py-libp2p polls every 2 s and punches every relayed peer from both
  sides at once. Here the side that *dialed* through a relay asks for a punch
  at once (``peer.reach.dialer`` calls ``request``); the other side answers.
* **No unilateral upgrade first**: py-libp2p first re-dials the peer's direct
  addresses (up to 5 s with retries). Our dialer raced those addresses against
  the relay a moment ago and the relay won, so the punch starts at once.
* **Untrusted input**: the peer's CONNECT addresses become dials, so only a
  few direct IP addresses are kept (``protocols.reach.punch_addrs``); a punch
  is answered only on a relayed connection (a direct one needs none), one at a
  time per peer and ``MAX_INBOUND`` in all.
* **The relayed connection is closed only once idle**: py-libp2p closes it 60 s
  after a punch even while streams run on it (a lease opened over the relay
  before the punch finished would break). Here, past those 60 s, it is closed
  once it carries no stream, checked every ``IDLE_CHECK`` seconds for at most
  ``IDLE_CHECKS`` times (the relay ends a circuit after 10 minutes anyway).
* **A dial that wins is not torn down**: py-libp2p polls for a direct connection
  while its punch dials run and cancels them once one shows; the swarm lists a
  connection before it has run its "connected" notifications, and a cancel
  landing there closes it (``ADDCONN_FAIL ... Cancelled``), after which the
  later rounds failed (the lab saw it in about 1 punch in 4). Here each dial runs
  in the service's own nursery (bounded by ``dial_timeout``, stopped with the
  service): the round stops waiting for it, the dial itself finishes.
* **Outcome**: each punch is logged (``hole punched to PEER: direct at ADDR in
  T s`` or why not) and kept in ``results`` (bench/reach.py reads the logs).

Runs on peers that listen on TCP (a punch needs a listen port to dial from).
Known limit: with one connection per peer (``peer.host``), py-libp2p trims a
relayed connection older than its 20 s grace when the direct one registers; a
punch starts right after the relayed dial, so the relayed one is younger unless
the punch's retries take that long.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import RELAY_CLOSE_GRACE_PERIOD, DCUtRProtocol
from multiaddr import Multiaddr

from protocols.reach import punch_addrs

log = logging.getLogger(__name__)

PUNCH_BUDGET = 30.0  # seconds one punch may take (py-libp2p tries 3 rounds)
MAX_PUNCHING = 8  # punches we run at once
MAX_INBOUND = 16  # punches we answer at once
MAX_RESULTS = 1024
QUEUE = 64
IDLE_CHECK = 10.0
IDLE_CHECKS = 60


@dataclass(frozen=True)
class PunchResult:
    ok: bool
    seconds: float
    addr: str | None  # the direct connection's address


def is_relayed(conn: Any) -> bool:
    """Whether every transport address of ``conn`` (a swarm or muxed connection) is a circuit."""
    with contextlib.suppress(Exception):
        addrs = [str(a) for a in conn.get_transport_addresses()]
        return bool(addrs) and all("/p2p-circuit" in a for a in addrs)
    return False


def direct_connection(host: IHost, peer_id: ID) -> INetConn | None:
    """A live connection to ``peer_id`` that does not go through a relay."""
    for conn in host.get_network().get_connections(peer_id):
        if not getattr(conn, "is_closed", False) and not is_relayed(conn):
            with contextlib.suppress(Exception):
                if conn.get_transport_addresses():
                    return conn
    return None


def conn_addr(conn: Any) -> str | None:
    with contextlib.suppress(Exception):
        addrs = conn.get_transport_addresses()
        return str(addrs[0]) if addrs else None
    return None


class HolePunch(DCUtRProtocol):
    """DCUtR for one host (see the module docstring); run it as a py-libp2p service."""

    def __init__(self, host: IHost) -> None:
        super().__init__(host, read_timeout=10, write_timeout=10, dial_timeout=5)
        self._send, self._receive = trio.open_memory_channel[ID](QUEUE)
        self._punching: set[ID] = set()
        self._inbound: set[ID] = set()
        self.results: dict[str, PunchResult] = {}
        # Peers first reached through a relay (``request``): a direct connection to one of
        # them later can only be a punched one, ours or theirs (DCUtR lets either side start).
        self.relayed_first: dict[str, None] = {}
        self._dials: trio.Nursery | None = None  # where punch dials run (see the docstring)
        self.changed = trio.Event()  # set (and replaced) after each punch we initiated

    def request(self, peer_id: ID) -> None:
        """Punch a hole to ``peer_id`` soon (we just dialed it through a relay)."""
        self._mark_relayed_first(peer_id)
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(peer_id)

    def _mark_relayed_first(self, peer_id: ID) -> None:
        self.relayed_first[str(peer_id)] = None
        while len(self.relayed_first) > MAX_RESULTS:
            self.relayed_first.pop(next(iter(self.relayed_first)))

    async def _auto_drive_loop(self) -> None:
        # Replaces py-libp2p's 2-second poll of every relayed peer: punch on request.
        async with trio.open_nursery() as nursery:
            self._dials = nursery
            async for peer_id in self._receive:
                if peer_id in self._punching or len(self._punching) >= MAX_PUNCHING:
                    continue
                self._punching.add(peer_id)
                nursery.start_soon(self._punch, peer_id)

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False  # see the module docstring

    async def _dial_peer(
        self,
        peer_id: ID,
        addr: Multiaddr,
        source: tuple[str, int] | None = None,
        as_responder: bool = False,
    ) -> None:
        # Cancelling this wait leaves the dial running (see the module docstring).
        nursery = self._dials
        if nursery is None:
            await super()._dial_peer(peer_id, addr, source, as_responder)
            return
        done = trio.Event()

        async def dial() -> None:
            try:
                await DCUtRProtocol._dial_peer(self, peer_id, addr, source, as_responder)
            finally:
                done.set()

        nursery.start_soon(dial)
        await done.wait()

    async def _punch(self, peer_id: ID) -> None:
        t0 = trio.current_time()
        ok = False
        try:
            with trio.move_on_after(PUNCH_BUDGET):
                ok = await self.initiate_hole_punch(peer_id)
        except Exception as exc:  # py-libp2p raises many kinds; the relay still works
            log.info("hole punch to %s failed: %s", peer_id, exc)
        finally:
            self._punching.discard(peer_id)
        self._record(peer_id, ok, trio.current_time() - t0)
        self.changed.set()
        self.changed = trio.Event()

    def _record(self, peer_id: ID, ok: bool, seconds: float) -> None:
        conn = direct_connection(self.host, peer_id) if ok else None
        addr = conn_addr(conn) if conn is not None else None
        ok = addr is not None
        if ok:
            log.info("hole punched to %s: direct at %s in %.2f s", peer_id, addr, seconds)
        else:
            log.info(
                "no hole punch to %s after %.2f s: its jobs stay on the relay", peer_id, seconds
            )
        if len(self.results) >= MAX_RESULTS:
            self.results.pop(next(iter(self.results)))
        self.results[str(peer_id)] = PunchResult(ok, seconds, addr)

    async def _close_relayed_conns_after_grace(
        self, peer_id: ID, grace: float = RELAY_CLOSE_GRACE_PERIOD
    ) -> None:
        await trio.sleep(grace)
        for _ in range(IDLE_CHECKS):
            if direct_connection(self.host, peer_id) is None:
                return  # never strand the peer: keep the relay while nothing else works
            relayed = [
                c
                for c in self.host.get_network().get_connections(peer_id)
                if is_relayed(c) and not getattr(c, "is_closed", False)
            ]
            busy = 0
            for conn in relayed:
                if conn.get_streams():
                    busy += 1
                    continue
                log.debug("closing the idle relayed connection to %s (direct now)", peer_id)
                with contextlib.suppress(Exception):
                    await conn.close()
            if not busy:
                return
            await trio.sleep(IDLE_CHECK)

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        if (
            not is_relayed(stream.muxed_conn)
            or peer_id in self._inbound
            or len(self._inbound) >= MAX_INBOUND
        ):
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        self._inbound.add(peer_id)
        self._mark_relayed_first(peer_id)  # it asks over the relayed connection we share
        t0 = trio.current_time()
        try:
            await super()._handle_dcutr_stream(stream)
        finally:
            self._inbound.discard(peer_id)
        conn = direct_connection(self.host, peer_id)
        if conn is not None:
            log.info(
                "hole punched with %s (it asked): direct at %s in %.2f s",
                peer_id,
                conn_addr(conn),
                trio.current_time() - t0,
            )

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Multiaddr]:
        texts: list[str] = []
        for raw in addr_bytes[:32]:
            with contextlib.suppress(Exception):
                texts.append(str(Multiaddr(raw)))
        return [Multiaddr(a) for a in punch_addrs(texts)]
