"""AutoNAT v1 (``/libp2p/autonat/1.0.0``): are we reachable from outside, and at which address?

Server side (every peer but a pure client): py-libp2p's ``AutoNATService``
answers dial-back requests, dialing only addresses on the requester's observed
IP and refusing requests that came through a relay. Its dial-back in 0.8.1 is
``host.connect``, which returns at once because the requester *is* connected
(it asked over that connection), so every peer would be told "public". We
replace it with a real probe: a fresh TCP connection to the address and a
Noise handshake that proves the peer id, closed right after (never added to
the swarm).

Client side (``Reachability.check``): ask up to ``MAX_SERVERS`` servers
(bootstrap nodes first, then connected peers that speak AutoNAT) to dial back
our advertised direct addresses plus the addresses peers observed us at
(identify). Verdict: ``public`` when at least one server reached us and no
more failed than succeeded, ``private`` when more failed, ``unknown`` when
nobody answered. An observed address a server reached is *confirmed* and from
then on advertised (``Advertiser.confirmed``). Re-checked every
``RECHECK_INTERVAL`` and whenever the set of servers grows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import trio
from libp2p.abc import IHost
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from peer.reach.addresses import Advertiser
from protocols.reach import parse_dial_addr

log = logging.getLogger(__name__)

Status = Literal["unknown", "public", "private"]
MAX_SERVERS = 4
QUERY_TIMEOUT = 8.0  # one server's answer (it dials us back within it)
PROBE_TIMEOUT = 5.0  # our dial-back as a server
RECHECK_INTERVAL = 300.0
OK = 0  # autonat.pb Message.OK


async def probe(host: IHost, peer_id: ID, addr: Multiaddr) -> bool:
    """Dial ``addr`` afresh and check it is ``peer_id`` (Noise handshake); close it again."""
    swarm: Any = host.get_network()
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            transport = swarm.transport_manager.transport_for_dialing(addr)
            if transport is None:
                return False
            raw = await transport.dial(addr)
        except Exception as exc:
            log.debug("autonat dial-back to %s failed: %s", addr, exc)
            return False
        try:
            secured = await swarm.upgrader.upgrade_security(raw, True, peer_id)
            # Finish the muxer upgrade too, so the other side sees an ordinary connection
            # that closes (not a failed upgrade); it is never added to our swarm.
            with contextlib.suppress(Exception):
                muxed = await swarm.upgrader.upgrade_connection(secured, peer_id)
                await muxed.close()
            with contextlib.suppress(Exception):
                await secured.close()
            return True
        except Exception as exc:
            log.debug("autonat dial-back to %s: handshake failed: %s", addr, exc)
            return False
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await raw.close()
    return False


def install_server(host: IHost) -> AutoNATService:
    """Answer AutoNAT requests with a real dial-back (see the module docstring)."""
    service = AutoNATService(host, serve=True)  # type: ignore[arg-type]

    async def try_dial(peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:8]:
            try:
                addr = Multiaddr(raw)
            except Exception:
                continue
            parsed = parse_dial_addr(str(addr))
            if parsed is None or parsed.circuit:
                continue
            if await probe(host, peer_id, addr):
                return bytes(raw)
        return None

    service._try_dial = try_dial  # type: ignore[method-assign]
    return service


class Reachability:
    """Our AutoNAT verdict and the servers it came from."""

    def __init__(
        self,
        host: IHost,
        advertiser: Advertiser,
        *,
        forced: Status | None = None,
        servers: Callable[[], Sequence[ID]] = lambda: (),
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.host = host
        self.advertiser = advertiser
        self.forced = forced
        self.status: Status = forced or "unknown"
        self.servers = servers
        self.on_change = on_change
        self.changed = trio.Event()  # set (and replaced) whenever status changes
        self._client = AutoNATService(host, serve=False)  # type: ignore[arg-type]
        self.last_results: dict[str, bool] = {}

    def _set(self, status: Status) -> None:
        if status != self.status:
            log.info("reachability: %s (was %s)", status, self.status)
            self.status = status
            self.on_change()
            self.changed.set()
            self.changed = trio.Event()

    def _candidates(self) -> list[ID]:
        out = [s for s in self.servers() if s != self.host.get_id()]
        store = self.host.get_peerstore()
        for pid in self.host.get_connected_peers():
            if pid in out or len(out) >= MAX_SERVERS:
                continue
            with contextlib.suppress(Exception):
                if AUTONAT_PROTOCOL_ID in (store.get_protocols(pid) or []):
                    out.append(pid)
        return out[:MAX_SERVERS]

    def _our_addrs(self) -> list[bytes]:
        texts = [a for a in self.advertiser.addrs() if (p := parse_dial_addr(a)) and not p.circuit]
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            with contextlib.suppress(Exception):
                texts += [str(a) for a in manager.addrs()]
        out: list[bytes] = []
        for t in texts:
            p = parse_dial_addr(t)
            if p is not None and not p.circuit and not p.is_dns:
                with contextlib.suppress(Exception):
                    raw = Multiaddr(p.text).to_bytes()
                    if raw not in out:
                        out.append(raw)
        return out[:16]

    async def check(self) -> Status:
        """Ask the servers now; returns (and records) the verdict."""
        if self.forced is not None:
            return self.forced
        servers = self._candidates()
        addrs = self._our_addrs()
        results: dict[str, bool] = {}
        confirmed: list[str] = []

        async def ask(server: ID) -> None:
            try:
                status, addr = await self._client.query_server(
                    server, addrs=addrs, timeout=QUERY_TIMEOUT
                )
            except Exception as exc:  # server gone or not speaking AutoNAT: no verdict
                log.debug("autonat query to %s failed: %s", server, exc)
                return
            results[str(server)] = status == OK
            if status == OK and addr:
                with contextlib.suppress(Exception):
                    confirmed.append(str(Multiaddr(addr)))

        if addrs:
            async with trio.open_nursery() as nursery:
                for s in servers:
                    nursery.start_soon(ask, s)
        else:  # nothing to dial back (no listen address): nobody can reach us directly
            results = {str(s): False for s in servers}
        self.last_results = results
        ok = sum(results.values())
        bad = len(results) - ok
        listen = {a for a in self.advertiser.addrs()}
        self.advertiser.confirmed = [c for c in confirmed if c not in listen][:4]
        if ok and ok >= bad:
            self._set("public")
        elif bad > ok:
            self._set("private")
        return self.status

    async def run(
        self, wake: Callable[[], trio.Event], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check now and every ``RECHECK_INTERVAL`` (sooner when ``wake()`` fires)."""
        task_status.started()
        if self.forced is not None:
            return
        while True:
            event = wake()
            await self.check()
            interval = RECHECK_INTERVAL if self.status != "unknown" else 5.0
            with trio.move_on_after(interval):
                await event.wait()
