"""peer.reach's dialer with real hosts on loopback: every address, best first, raced."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

import nacl.signing
import trio
from libp2p.abc import IHost

from peer.host import build_host, connect, running_host
from peer.reach import DialError, reach_of

LOCAL = "/ip4/127.0.0.1/tcp/0"
PING = "/ipfs/ping/1.0.0"


@asynccontextmanager
async def host() -> AsyncIterator[tuple[IHost, str]]:
    h = build_host(nacl.signing.SigningKey.generate())
    async with running_host(h, [LOCAL]) as addrs:
        yield h, addrs[0]


def closed_port() -> int:
    """A port nobody listens on (bound and released: connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel does) but never answers: a dial hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def count_dials(h: IHost) -> list[str]:
    """Record every address the swarm dials (wraps the single-address dial)."""
    swarm = h.get_network()
    real = swarm._dial_addr_single_attempt  # type: ignore[attr-defined]
    seen: list[str] = []

    async def counted(addr, peer_id, source=None):  # type: ignore[no-untyped-def]
        seen.append(str(addr))
        return await real(addr, peer_id, source)

    swarm._dial_addr_single_attempt = counted  # type: ignore[attr-defined]
    return seen


async def test_only_the_third_of_three_addresses_works() -> None:
    async with host() as (a, _), host() as (b, b_addr):
        pid = b.get_id()
        real = b_addr.rsplit("/p2p/", 1)[0]
        bad1 = f"/ip4/127.0.0.1/tcp/{closed_port()}"
        bad2 = f"/ip4/127.0.0.2/tcp/{closed_port()}"
        dials = count_dials(a)
        with trio.fail_after(5):
            await reach_of(a).connect(str(pid), [bad1, bad2, real], deadline=5)
        assert reach_of(a).dialer.connection(pid) is not None
        assert [d.split("/p2p/")[0] for d in dials] == [bad1, bad2, real]
        # The stream works on the connection we made.
        with trio.fail_after(5):
            stream = await reach_of(a).open_stream(str(pid), [PING], deadline=5)
            await stream.close()


async def test_a_hanging_address_is_raced_not_waited_for() -> None:
    with silent_listener() as port:
        async with host() as (a, _), host() as (b, b_addr):
            real = b_addr.rsplit("/p2p/", 1)[0]
            start = trio.current_time()
            with trio.fail_after(5):
                await reach_of(a).connect(b.get_id(), [f"/ip4/127.0.0.1/tcp/{port}", real])
            # The hanging dial would take the swarm's 10+ s upgrade timeout; the race starts
            # the next address after the stagger (0.25 s) and wins with it.
            assert trio.current_time() - start < 3.0


async def test_negative_cache_is_per_address_and_short() -> None:
    async with host() as (a, _), host() as (b, b_addr):
        pid = b.get_id()
        real = b_addr.rsplit("/p2p/", 1)[0]
        bad = f"/ip4/127.0.0.1/tcp/{closed_port()}"
        dialer = reach_of(a).dialer
        dials = count_dials(a)
        try:
            await dialer.connect(pid, [bad], deadline=5)
        except DialError as exc:
            assert bad in str(exc)
        else:
            raise AssertionError("a dial to a closed port succeeded")
        assert len(dials) == 1
        # The bad address is skipped now; the peer itself is not blocked (py-libp2p
        # would refuse every dial to it for 60 s).
        with trio.fail_after(5):
            await dialer.connect(pid, [bad, real], deadline=5)
        assert [d.split("/p2p/")[0] for d in dials] == [bad, real]
        # Only the bad address, still cached: refused at once, naming it.
        await a.disconnect(pid)
        a.get_peerstore().clear_addrs(pid)
        try:
            await dialer.connect(pid, [bad], deadline=5)
        except DialError as exc:
            assert "failed in the last" in str(exc)
        else:
            raise AssertionError("a cached bad address was dialed")
        assert len(dials) == 2
        # An explicit dial (a bootstrap link's own backoff) ignores the cache.
        try:
            await dialer.connect(pid, [bad], deadline=5, fresh=True)
        except DialError as exc:
            assert "failed in the last" not in str(exc)
        assert len(dials) == 3
        # And the cache expires: with a zero TTL the address is dialed again.
        dialer.negative_ttl = 0.0
        dialer.forget_failures(pid)
        for expected in (4, 5):
            with suppress(DialError):
                await dialer.connect(pid, [bad], deadline=5)
            assert len(dials) == expected


async def test_host_connect_and_new_stream_use_every_address() -> None:
    """Plain py-libp2p calls (what the DHT, gossip and other services do) go through us."""
    async with host() as (a, _), host() as (b, b_addr):
        pid = b.get_id()
        real = b_addr.rsplit("/p2p/", 1)[0]
        bad = f"/ip4/127.0.0.1/tcp/{closed_port()}"
        from multiaddr import Multiaddr

        # The stale address first, as the peerstore would hold it after a restart.
        a.get_peerstore().add_addrs(pid, [Multiaddr(bad)], 600)
        a.get_peerstore().add_addrs(pid, [Multiaddr(real)], 600)
        with trio.fail_after(5):
            stream = await a.new_stream(pid, [PING])  # type: ignore[list-item]
            await stream.close()
        # peer.host.connect (the bootstrap link) with a full multiaddr.
        await a.disconnect(pid)
        with trio.fail_after(5):
            info = await connect(a, b_addr, limit=5)
        assert info.peer_id == pid


async def test_a_dial_fails_within_its_budget() -> None:
    with silent_listener() as port:
        async with host() as (a, _), host() as (b, _):
            start = trio.current_time()
            try:
                await reach_of(a).connect(b.get_id(), [f"/ip4/127.0.0.1/tcp/{port}"], deadline=0.5)
            except DialError as exc:
                assert "within 0.5 s" in str(exc)
            else:
                raise AssertionError("dialed a silent port")
            assert trio.current_time() - start < 2.0
