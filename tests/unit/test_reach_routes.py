"""Which connection job data takes: a lease leaves the relay once a direct path is up, the
CLI's route report, and relay reservations that start as soon as AutoNAT says private.

The lab proves the same end to end: tests/reach/test_reach_lab.py (hole punch).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
from multiaddr import Multiaddr

from peer.cli.infer_net import WIDE_LISTEN, client_listen
from peer.config import Config
from peer.market.lease import MAX_MOVES, Lease
from peer.reach import Reach
from peer.reach.dialer import Dialer
from peer.reach.routes import route_of

EX = "12D3KooWGRUVh8RYiwoMwwUGmrLNXxPvZrPvDEv1GXxvNMnQ3NkK"
RELAY = "12D3KooWK2UFDkQrc4YajGamJgiCjvJad4UDZESiPPVEEDXuyXU9"
CIRCUIT = f"/ip4/10.77.0.2/tcp/4001/p2p/{RELAY}/p2p-circuit"
DIRECT = "/ip4/10.77.0.101/tcp/4001"


class FakeConn:
    def __init__(self, addr: str) -> None:
        self.addr = Multiaddr(addr)
        self.is_closed = False

    def get_transport_addresses(self) -> list[Multiaddr]:
        return [self.addr]


class FakeHost:
    def __init__(self) -> None:
        self.conns: list[FakeConn] = []

    def get_network(self) -> FakeHost:
        return self

    def get_connections(self, peer_id: object) -> list[FakeConn]:
        assert str(peer_id) == EX
        return self.conns


def make_lease(host: FakeHost) -> Lease:
    spec = SimpleNamespace(cid="cid", entry=None, max_price=1, bid_window=0.5)
    auctions = SimpleNamespace(dialer=SimpleNamespace(host=host))
    lease = Lease(
        auctions=auctions,  # type: ignore[arg-type]
        checker=None,  # type: ignore[arg-type]
        receipts=None,  # type: ignore[arg-type]
        nursery=None,  # type: ignore[arg-type]
        spec=spec,  # type: ignore[arg-type]
        check_inputs=lambda _e, _i: {},
        limits=None,  # type: ignore[arg-type]
        job_timeout=10.0,
        max_jobs=100,
        seconds=60.0,
        clock=lambda: 0.0,
    )
    lease._until = 60.0
    return lease


def batch_on(addr: str) -> Any:
    ready = trio.Event()
    ready.set()
    stream = SimpleNamespace(muxed_conn=FakeConn(addr))
    att = SimpleNamespace(executor=EX, fs=SimpleNamespace(stream=stream), ready=ready)
    return SimpleNamespace(done=trio.Event(), attempt=att, can_send=lambda _n: True)


def test_a_relayed_batch_is_left_once_a_direct_connection_to_its_executor_is_up() -> None:
    host = FakeHost()
    lease = make_lease(host)
    run = batch_on(CIRCUIT)
    lease._current = run
    assert lease._usable(run)  # relayed, and no direct path: stay
    assert lease.route == CIRCUIT
    host.conns = [FakeConn(CIRCUIT), FakeConn(DIRECT)]  # a hole was punched
    assert not lease._usable(run)
    assert not lease._usable(run)  # decided once: the batch is left, counted once
    assert lease.moves == {EX: 1}
    host.conns = [FakeConn(CIRCUIT)]
    assert not lease._usable(run)  # still left (a new batch goes wherever the swarm puts it)


def test_a_direct_batch_stays() -> None:
    host = FakeHost()
    host.conns = [FakeConn(DIRECT)]
    lease = make_lease(host)
    run = batch_on(DIRECT)
    assert lease._usable(run)
    assert lease.moves == {}


def test_batches_leave_the_relay_a_bounded_number_of_times() -> None:
    host = FakeHost()
    host.conns = [FakeConn(DIRECT)]
    lease = make_lease(host)
    for _ in range(MAX_MOVES):
        assert not lease._usable(batch_on(CIRCUIT))
    # The swarm keeps putting new streams on the relay: no auction per job from now on.
    assert lease._usable(batch_on(CIRCUIT))
    assert lease.moves == {EX: MAX_MOVES}


def test_route_of_a_stream() -> None:
    assert route_of(None) == {"kind": None, "connection": None, "relay": None}
    assert route_of(CIRCUIT) == {"kind": "relayed", "connection": CIRCUIT, "relay": RELAY}
    assert route_of(DIRECT)["kind"] == "direct"
    assert route_of(DIRECT, DIRECT)["kind"] == "hole-punched"
    assert route_of(DIRECT, "/ip4/10.77.0.101/tcp/4002")["kind"] == "direct"
    # A peer first reached only through a relay: a direct connection to it is a punched one,
    # even before our punch recorded its address (or when the other side punched).
    assert route_of(DIRECT, None, relayed_first=True)["kind"] == "hole-punched"
    assert route_of(CIRCUIT, None, relayed_first=True)["kind"] == "relayed"


def test_the_cli_listens_wide_only_to_punch_beyond_loopback() -> None:
    boot = f"/ip4/10.77.0.2/tcp/4001/p2p/{RELAY}"
    local = f"/ip4/127.0.0.1/tcp/4001/p2p/{RELAY}"
    assert client_listen(Config(bootstrap=(boot,))).listen == (WIDE_LISTEN,)
    assert client_listen(Config(bootstrap=(local,))).listen == Config().listen
    mine = ("/ip4/192.168.1.5/tcp/0",)  # the user chose: kept
    assert client_listen(Config(bootstrap=(boot,), listen=mine)).listen == mine


def test_autonat_saying_private_wakes_the_relay_reservations() -> None:
    published: list[int] = []
    reach = Reach(host=None, dialer=None, advertiser=None)  # type: ignore[arg-type]
    reach.reservations = SimpleNamespace(wake=trio.Event())
    reach.on_reachability(lambda: published.append(1))()
    assert published == [1] and reach.reservations.wake.is_set()


class BusiestFirst:
    """A swarm whose own placement picks the connection with most streams (py-libp2p's
    ``best`` when neither connection says it is direct)."""

    def __init__(self) -> None:
        self.streams: dict[int, int] = {}

    def get_network(self) -> BusiestFirst:
        return self

    def _select_connection(self, conns: list[Any], peer_id: object) -> Any:
        return max(conns, key=lambda c: self.streams.get(id(c), 0))


def test_new_streams_go_on_a_direct_connection_when_one_is_held() -> None:
    swarm = BusiestFirst()
    Dialer(swarm).install()  # type: ignore[arg-type]
    relayed, direct, other = FakeConn(CIRCUIT), FakeConn(DIRECT), FakeConn("/ip4/10.0.0.1/tcp/1")
    swarm.streams = {id(relayed): 5, id(direct): 0, id(other): 1}
    assert swarm._select_connection([relayed, direct], EX) is direct
    assert swarm._select_connection([relayed, direct, other], EX) is other  # the swarm's pick
    assert swarm._select_connection([relayed], EX) is relayed
