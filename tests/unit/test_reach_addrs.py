"""protocols.reach: which addresses we dial (and in what order) and which we advertise."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from protocols.reach import (
    MAX_DIAL_ADDRS,
    advertised_addrs,
    ip_scope,
    parse_dial_addr,
    rank_dial_addrs,
)

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
RELAY = "12D3KooWGRUVh8RYiwoMwwUGmrLNXxPvZrPvDEv1GXxvNMnQ3NkK"
LAN = [ipaddress.ip_network("192.168.61.0/24")]


def ranked(addrs: list[str], networks: list = LAN) -> list[str]:  # type: ignore[type-arg]
    return [a.text for a in rank_dial_addrs(addrs, PEER, networks)]


def test_public_before_private_and_same_subnet_first() -> None:
    addrs = [
        "/ip4/10.1.2.3/tcp/1",
        "/ip4/192.168.61.7/tcp/2",
        "/ip4/8.8.8.8/tcp/3",
        f"/ip4/8.8.4.4/tcp/5/p2p/{RELAY}/p2p-circuit",
        "/ip4/100.64.0.9/tcp/4",
    ]
    assert ranked(addrs) == [
        "/ip4/192.168.61.7/tcp/2",  # our own subnet
        "/ip4/8.8.8.8/tcp/3",  # public
        "/ip4/10.1.2.3/tcp/1",  # private, in the peer's order
        "/ip4/100.64.0.9/tcp/4",  # carrier NAT counts as private
        f"/ip4/8.8.4.4/tcp/5/p2p/{RELAY}/p2p-circuit",  # relayed last
    ]


def test_a_remote_peers_loopback_is_never_dialed() -> None:
    assert ranked(["/ip4/127.0.0.1/tcp/1", "/ip4/10.77.0.1/tcp/2", "/ip6/::1/tcp/3"]) == [
        "/ip4/10.77.0.1/tcp/2"
    ]
    # Loopback and a relay circuit: the peer listens on loopback only; try it, then the relay.
    circuit = f"/ip4/8.8.4.4/tcp/5/p2p/{RELAY}/p2p-circuit"
    assert ranked([circuit, "/ip4/127.0.0.1/tcp/1"]) == ["/ip4/127.0.0.1/tcp/1", circuit]
    # Only loopback: the peer can only be on this machine, so loopback is dialed.
    assert ranked(["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.2/tcp/2"]) == [
        "/ip4/127.0.0.1/tcp/1",
        "/ip4/127.0.0.2/tcp/2",
    ]


def test_unusable_addresses_and_other_peers_are_dropped() -> None:
    other = "12D3KooWGRUVh8RYiwoMwwUGmrLNXxPvZrPvDEv1GXxvNMnQ3NkL"
    addrs = [
        "/ip4/0.0.0.0/tcp/1",
        "/ip6/::/tcp/1",
        "/ip6/fe80::1/tcp/1",
        "/ip4/224.0.0.1/tcp/1",
        "/ip4/8.8.8.8/udp/1",
        "/ip4/8.8.8.8/tcp/0",
        "/ip4/8.8.8.8/tcp/70000",
        "/ip4/::1/tcp/1",
        "not a multiaddr",
        f"/ip4/8.8.8.8/tcp/9/p2p/{other}",  # names another peer
        f"/ip4/8.8.8.8/tcp/9/p2p/{PEER}/p2p-circuit",  # the peer as its own relay
        "/ip4/8.8.8.8/tcp/9/p2p-circuit",  # no relay id
        "/ip4/8.8.8.8/tcp/10/p2p/" + PEER,
        "/ip4/8.8.8.8/tcp/10",  # duplicate of the one above without /p2p
    ]
    assert ranked(addrs) == ["/ip4/8.8.8.8/tcp/10"]


def test_dns_names_rank_as_public_and_limit_holds() -> None:
    assert ranked(["/ip4/10.0.0.1/tcp/1", "/dns4/box.example.org/tcp/4001"]) == [
        "/dns4/box.example.org/tcp/4001",
        "/ip4/10.0.0.1/tcp/1",
    ]
    many = [f"/ip4/8.8.{i // 250}.{i % 250}/tcp/1" for i in range(200)]
    assert len(ranked(many)) == MAX_DIAL_ADDRS


def test_scopes() -> None:
    assert ip_scope("127.0.0.1") == "loopback"
    assert ip_scope("::1") == "loopback"
    assert ip_scope("10.77.0.1") == "private"
    assert ip_scope("fd00::2") == "private"
    assert ip_scope("100.100.1.1") == "private"
    assert ip_scope("1.1.1.1") == "public"
    assert ip_scope("::ffff:1.1.1.1") == "public"
    assert ip_scope("fe80::1") == "unusable"
    assert ip_scope("0.0.0.0") == "unusable"


def test_advertised_drops_loopback_and_orders_announce_confirmed_listen_relayed() -> None:
    listen = ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.77.0.5/tcp/4001", "/ip4/0.0.0.0/tcp/4001"]
    relay = f"/ip4/10.77.0.1/tcp/4101/p2p/{RELAY}/p2p-circuit"
    assert advertised_addrs(
        listen,
        announce=["/ip4/203.0.113.7/tcp/4001"],
        confirmed=["/ip4/198.51.100.3/tcp/4001"],
        relayed=[relay],
    ) == [
        "/ip4/203.0.113.7/tcp/4001",
        "/ip4/198.51.100.3/tcp/4001",
        "/ip4/10.77.0.5/tcp/4001",
        relay,
    ]
    # Listening on loopback only: that is what we advertise (a one-machine swarm).
    assert advertised_addrs(["/ip4/127.0.0.1/tcp/4001"]) == ["/ip4/127.0.0.1/tcp/4001"]
    # ... and beside it the relay circuits; an announced address replaces it.
    assert advertised_addrs(["/ip4/127.0.0.1/tcp/4001"], relayed=[relay]) == [
        "/ip4/127.0.0.1/tcp/4001",
        relay,
    ]
    assert advertised_addrs(
        ["/ip4/127.0.0.1/tcp/4001"], announce=["/dns4/box.example.org/tcp/4001"]
    ) == ["/dns4/box.example.org/tcp/4001"]


def test_parse_circuit_address() -> None:
    text = f"/ip4/10.77.0.1/tcp/4101/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"
    a = parse_dial_addr(text, PEER)
    assert a is not None and a.circuit and a.relay == RELAY
    assert a.text == f"/ip4/10.77.0.1/tcp/4101/p2p/{RELAY}/p2p-circuit"
    assert parse_dial_addr(text, RELAY) is None


@given(st.lists(st.text(max_size=80), max_size=30))
def test_ranking_never_fails_on_garbage(addrs: list[str]) -> None:
    out = rank_dial_addrs(addrs, PEER, LAN)
    assert len(out) <= MAX_DIAL_ADDRS
    assert all(parse_dial_addr(a.text, PEER) == a for a in out)


@given(
    st.lists(
        st.builds(
            lambda a, b, port: f"/ip4/{a}.{b}.1.2/tcp/{port}",
            st.sampled_from([8, 10, 127, 192, 100]),
            st.integers(0, 255),
            st.integers(1, 65535),
        ),
        max_size=20,
    )
)
def test_ranking_is_sorted_by_class_and_keeps_the_peers_order(addrs: list[str]) -> None:
    out = [a.text for a in rank_dial_addrs(addrs, PEER, LAN, limit=100)]
    assert len(out) == len(set(out))
    nonlocal_ = [a for a in out if not a.startswith("/ip4/127.")]
    if nonlocal_:
        assert nonlocal_ == out  # no loopback beside usable addresses
    # Within one scope, the peer's order is kept.
    for scope in ("public", "private"):
        mine = [a for a in out if ip_scope(a.split("/")[2]) == scope]
        given_order = [a for a in dict.fromkeys(addrs) if a in mine]
        assert mine == given_order
