"""Hole punching (DCUtR) on one machine: what a peer's CONNECT may make us dial.

The punch itself needs two NATs: tests/reach/test_reach_lab.py.
"""

from __future__ import annotations

import nacl.signing
import pytest
import trio
from multiaddr import Multiaddr

from peer.host import build_host
from peer.reach.dcutr import IDLE_CHECK, HolePunch
from protocols.reach import MAX_PUNCH_ADDRS


def test_a_connect_message_makes_us_dial_only_a_few_direct_addresses() -> None:
    punch = HolePunch(build_host(nacl.signing.SigningKey.generate()))
    raw = [
        Multiaddr("/ip4/127.0.0.1/tcp/4001").to_bytes(),  # would dial ourselves
        Multiaddr("/dns4/example.com/tcp/4001").to_bytes(),
        b"\xff\xff junk",
        *(Multiaddr(f"/ip4/10.77.0.{i}/tcp/4001").to_bytes() for i in range(1, 40)),
    ]
    out = [str(a) for a in punch._decode_observed_addrs(raw)]
    assert out == [f"/ip4/10.77.0.{i}/tcp/4001" for i in range(1, MAX_PUNCH_ADDRS + 1)]


class FakeConn:
    def __init__(self, addr: str, streams: int = 0) -> None:
        self.addr = Multiaddr(addr)
        self.streams = [object()] * streams
        self.is_closed = False

    def get_transport_addresses(self) -> list[Multiaddr]:
        return [self.addr]

    def get_streams(self) -> list[object]:
        return self.streams

    async def close(self) -> None:
        self.is_closed = True


class FakeHost:
    def __init__(self, conns: list[FakeConn]) -> None:
        self.conns = conns

    def get_network(self) -> FakeHost:
        return self

    def get_connections(self, peer_id: object) -> list[FakeConn]:
        return self.conns


CIRCUIT = "/p2p/12D3KooWGRUVh8RYiwoMwwUGmrLNXxPvZrPvDEv1GXxvNMnQ3NkK/p2p-circuit"


async def test_after_a_punch_the_relayed_connection_closes_only_once_no_stream_uses_it(
    autojump_clock: object,
) -> None:
    direct, busy, idle = (
        FakeConn("/ip4/10.77.0.101/tcp/4001"),
        FakeConn(CIRCUIT, 1),
        FakeConn(CIRCUIT),
    )
    punch = HolePunch(FakeHost([direct, busy, idle]))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(punch._close_relayed_conns_after_grace, "peer", 60.0)
        await trio.sleep(61)
        assert idle.is_closed and not busy.is_closed  # a lease still runs on it
        busy.streams = []
        await trio.sleep(IDLE_CHECK + 1)
        assert busy.is_closed and not direct.is_closed


async def test_without_a_direct_connection_the_relay_is_kept(autojump_clock: object) -> None:
    idle = FakeConn(CIRCUIT)
    punch = HolePunch(FakeHost([idle]))  # type: ignore[arg-type]
    await punch._close_relayed_conns_after_grace("peer", 60.0)  # type: ignore[arg-type]
    assert not idle.is_closed


async def test_a_punch_round_that_stops_waiting_leaves_its_dial_to_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # py-libp2p cancels a round's dials once a direct connection shows; a dial still inside
    # the swarm's add_conn must not be cancelled with it (that closed the new connection).
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    finished: list[str] = []
    go = trio.Event()

    async def slow_dial(self: object, peer_id: object, addr: Multiaddr, *_a: object) -> None:
        await go.wait()  # e.g. the swarm running its "connected" notifications
        finished.append(str(addr))

    monkeypatch.setattr(DCUtRProtocol, "_dial_peer", slow_dial)
    punch = HolePunch(build_host(nacl.signing.SigningKey.generate()))
    async with trio.open_nursery() as nursery:
        punch._dials = nursery
        with trio.move_on_after(0.05):  # the round gives up waiting
            await punch._dial_peer("peer", Multiaddr("/ip4/10.77.0.101/tcp/4001"))  # type: ignore[arg-type]
        go.set()
    assert finished == ["/ip4/10.77.0.101/tcp/4001"]
