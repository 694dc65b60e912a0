"""The relay's limits against untrusted peers (peer.reach.relay.HopGuard and py-libp2p's caps).

Each test fails when its rule is removed: a relay serves strangers, so every
resource they can make it hold is bounded.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import nacl.signing
import pytest
import trio
import trio.lowlevel
from libp2p.abc import IHost, INetStream
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from peer.host import build_host, running_host
from peer.reach import reach_of
from peer.reach.relay import HopLimits, RelayService

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
SINK = "/edgeswarm-test/sink/1"


@dataclass
class Node:
    host: IHost
    addr: str
    relay: RelayService


@asynccontextmanager
async def node(**kw: object) -> AsyncIterator[Node]:
    host = build_host(nacl.signing.SigningKey.generate())
    service = RelayService(host, **kw)  # type: ignore[arg-type]
    async with running_host(host, LOCAL) as addrs, trio.open_nursery() as nursery:
        await nursery.start(service.run)
        reach_of(host).dialer.circuit_dial = service.dial
        try:
            yield Node(host, addrs[0], service)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def relay_and_clients(limits: HopLimits, n: int) -> AsyncIterator[tuple[Node, list[Node]]]:
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(node(hop=True, limits=limits))
        clients = [await stack.enter_async_context(node()) for _ in range(n)]
        for c in clients:
            await reach_of(c.host).connect(relay.host.get_id(), [relay.addr], deadline=5)
        yield relay, clients


async def reserve_ok(client: Node, relay: Node) -> bool:
    try:
        with trio.fail_after(10):
            await client.relay.reserve(relay.host.get_id())
    except (ConnectionError, trio.TooSlowError, Exception):
        return False
    return True


def reserved(relay: Node) -> set[str]:
    return {str(p) for p in relay.relay.protocol.resource_manager._reservations}


async def test_reservations_beyond_the_relays_cap_are_refused() -> None:
    async with relay_and_clients(HopLimits(max_reservations=2), 3) as (relay, clients):
        assert [await reserve_ok(c, relay) for c in clients] == [True, True, False]
        assert len(reserved(relay)) == 2


async def test_reservations_per_ip_are_capped() -> None:
    # All clients come from 127.0.0.1: one IP.
    limits = HopLimits(max_reservations=10, max_reservations_per_ip=2)
    async with relay_and_clients(limits, 3) as (relay, clients):
        assert [await reserve_ok(c, relay) for c in clients] == [True, True, False]
        assert relay.relay.guard.refused == 1
        # A peer that holds a reservation may renew it.
        assert await reserve_ok(clients[0], relay)


async def test_hop_requests_over_the_rate_limit_are_reset() -> None:
    async with relay_and_clients(HopLimits(hop_rate_per_minute=3), 1) as (relay, (client,)):
        assert [await reserve_ok(client, relay) for _ in range(4)] == [True, True, True, False]
        assert relay.relay.guard.refused == 1


async def _hop_stream(client: Node, relay: Node) -> INetStream:
    with trio.fail_after(5):
        return await client.host.new_stream(relay.host.get_id(), [HOP])


async def test_a_peer_cannot_hold_more_hop_streams_than_its_cap() -> None:
    async with relay_and_clients(HopLimits(max_hop_streams_per_peer=2), 1) as (relay, (client,)):
        held = [await _hop_stream(client, relay) for _ in range(2)]  # idle: the relay waits
        with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017 (reset: any stream error)
            extra = await _hop_stream(client, relay)
            await extra.read(1)
        assert relay.relay.guard.refused == 1
        for s in held:
            await s.reset()


async def test_a_reservation_for_another_peer_is_refused() -> None:
    async with relay_and_clients(HopLimits(), 2) as (relay, (mallory, victim)):
        stream = await _hop_stream(mallory, relay)
        msg = HopMessage(
            type=HopMessage.RESERVE, peer=CircuitPeer(id=victim.host.get_id().to_bytes())
        )
        await stream.write(encode_varint_prefixed(msg.SerializeToString()))
        with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017 (reset: any stream error)
            await stream.read(1)
        assert str(victim.host.get_id()) not in reserved(relay)
        assert relay.relay.guard.refused == 1


async def test_a_circuit_is_cut_at_its_data_cap() -> None:
    limits = HopLimits(circuit_bytes=64 * 1024)
    async with relay_and_clients(limits, 2) as (relay, (dialer, target)):
        assert await reserve_ok(target, relay)
        received = bytearray()
        finished = trio.Event()

        async def sink(stream: INetStream) -> None:
            try:
                while chunk := await stream.read(65536):
                    received.extend(chunk)
            except Exception:
                pass
            finished.set()

        target.host.set_stream_handler(SINK, sink)  # type: ignore[arg-type]
        circuit = Multiaddr(f"{relay.addr}/p2p-circuit/p2p/{target.host.get_id()}")
        with trio.fail_after(10):
            await reach_of(dialer.host).connect(target.host.get_id(), [circuit], deadline=10)
            stream = await dialer.host.new_stream(target.host.get_id(), [SINK])  # type: ignore[list-item]
        with trio.fail_after(20), pytest.raises(Exception):  # noqa: B017 (reset: any stream error)
            for _ in range(64):  # 1 MiB in 16 KiB writes: far over the cap
                await stream.write(b"x" * 16384)
                await trio.lowlevel.checkpoint()
            await stream.close()
            with trio.fail_after(10):
                await finished.wait()
            raise AssertionError(f"the relay carried {len(received)} bytes past a 64 KiB cap")
        assert len(received) < 64 * 1024


async def test_an_oversized_hop_message_is_refused_before_it_is_read() -> None:
    async with relay_and_clients(HopLimits(), 1) as (relay, (client,)):
        stream = await _hop_stream(client, relay)
        await stream.write(encode_varint_prefixed(b"\x08" * 5000)[:8])  # claims 5000 bytes
        with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017 (reset: any stream error)
            await stream.read(1)
        assert relay.relay.guard.refused == 1


async def test_reservations_are_renewed_before_they_expire() -> None:
    from peer.reach.addresses import Advertiser
    from peer.reach.relay import Reservations

    async with relay_and_clients(HopLimits(reservation_ttl=3), 1) as (relay, (client,)):
        rid = relay.host.get_id()
        held = Reservations(
            client.relay,
            Advertiser(),
            target=1,
            wanted=lambda: True,
            relays=lambda: [rid],
            published=lambda: None,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(held.run)
            with trio.fail_after(20):
                while rid not in held.held:  # each wait ends on a reservation event
                    await held.changed.wait()
                first = held.held[rid].expires
                while held.renewals < 2:
                    await held.changed.wait()
            # Renewed: a later expiry, and the relay still holds us past the first lifetime.
            assert held.held[rid].expires > first
            assert str(client.host.get_id()) in reserved(relay)
            nursery.cancel_scope.cancel()


ECHO = "/edgeswarm-test/echo/1"


async def _echo(stream: INetStream) -> None:
    with contextlib.suppress(Exception):
        while chunk := await stream.read(4096):
            await stream.write(chunk)
        await stream.close()


async def _relayed_echo(dialer: Node, target: Node) -> bytes:
    with trio.fail_after(10):
        stream = await dialer.host.new_stream(target.host.get_id(), [ECHO])  # type: ignore[list-item]
        await stream.write(b"ping")
        return bytes(await stream.read(4))


async def test_the_end_of_one_circuit_leaves_another_to_the_same_peer_open() -> None:
    # Two requesters relayed to one executor at once (py-libp2p filed both circuits under
    # the executor's id: the end of the first closed the second's streams).
    async with relay_and_clients(HopLimits(), 3) as (relay, (target, first, second)):
        assert await reserve_ok(target, relay)
        target.host.set_stream_handler(ECHO, _echo)  # type: ignore[arg-type]
        tid = target.host.get_id()
        circuit = Multiaddr(f"{relay.addr}/p2p-circuit/p2p/{tid}")
        for dialer in (first, second):
            with trio.fail_after(10):
                await reach_of(dialer.host).connect(tid, [circuit], deadline=10)
            assert await _relayed_echo(dialer, target) == b"ping"
        protocol = relay.relay.protocol
        ended = protocol.relays_ended
        # The first circuit ends at both of its ends.
        for host, peer in ((first.host, tid), (target.host, first.host.get_id())):
            for conn in list(host.get_network().get_connections(peer)):
                await conn.close()
        with trio.fail_after(10):
            while protocol.relays_ended < ended + 2:  # its two relay directions
                await protocol.relay_ended.wait()
        assert await _relayed_echo(second, target) == b"ping"
