"""Rules of dialable addresses (protocols/reach.py) that no other test held.

Peers' addresses are untrusted and every one kept becomes a dial. Found by mutation
testing (issue 17, docs/testing.md): each test fails when its rule is removed.
"""

from __future__ import annotations

from protocols.reach import (
    advertised_addrs,
    ip_scope,
    parse_dial_addr,
    punch_addrs,
    rank_dial_addrs,
)

PEER = "QmPeer"


def test_ports_are_1_to_65535() -> None:
    assert parse_dial_addr("/ip4/8.8.8.8/tcp/65535") is not None
    assert parse_dial_addr("/ip4/8.8.8.8/tcp/65536") is None


def test_ip6_and_every_dns_kind_are_dialable_and_nothing_else() -> None:
    a = parse_dial_addr("/ip6/2001:4860::8888/tcp/1")
    assert a is not None and a.host == "2001:4860::8888" and not a.is_dns
    for kind in ("dns", "dns4", "dns6"):
        d = parse_dial_addr(f"/{kind}/a/tcp/1")
        assert d is not None and d.is_dns
    assert parse_dial_addr("/foo/example.com/tcp/1") is None


def test_dns_names_are_1_to_253_characters() -> None:
    assert parse_dial_addr("/dns4/" + "a" * 253 + "/tcp/1") is not None
    assert parse_dial_addr("/dns4/" + "a" * 254 + "/tcp/1") is None
    assert parse_dial_addr("/dns4//tcp/1") is None


def test_an_address_is_text_of_at_most_512_characters_starting_with_a_slash() -> None:
    prefix = "/ip4/8.8.8.8/tcp/1/p2p/"
    assert parse_dial_addr(prefix + "x" * (512 - len(prefix))) is not None
    assert parse_dial_addr(prefix + "x" * (513 - len(prefix))) is None
    assert parse_dial_addr("xip4/8.8.8.8/tcp/1") is None


def test_a_relay_address_names_its_relay_in_the_p2p_part() -> None:
    good = parse_dial_addr("/ip4/8.8.8.8/tcp/1/p2p/RELAY/p2p-circuit")
    assert good is not None and good.relay == "RELAY"
    for bad in (
        "/ip4/8.8.8.8/tcp/1/xyz/RELAY/p2p-circuit",
        "/ip4/8.8.8.8/tcp/1/p2p/RELAY/extra/p2p-circuit",
        "/ip4/8.8.8.8/tcp/1/p2p//p2p-circuit",
    ):
        assert parse_dial_addr(bad) is None, bad


def test_a_relay_on_an_unusable_address_is_never_dialed() -> None:
    assert rank_dial_addrs(["/ip4/0.0.0.0/tcp/1/p2p/RELAY/p2p-circuit"], PEER) == []
    ok = rank_dial_addrs(["/ip4/8.8.8.8/tcp/1/p2p/RELAY/p2p-circuit"], PEER)
    assert [a.relay for a in ok] == ["RELAY"]


def test_ipv4_mapped_ipv6_addresses_have_the_ipv4_scope() -> None:
    assert ip_scope("::ffff:127.0.0.1") == "loopback"
    assert ip_scope("::ffff:10.0.0.1") == "private"


def test_we_advertise_at_most_16_addresses_public_and_private_listen_ones() -> None:
    many = [f"/ip4/8.8.8.{n}/tcp/1" for n in range(1, 20)]
    assert advertised_addrs([], announce=many) == many[:16]
    listen = ["/ip4/192.168.1.5/tcp/1", "/ip4/8.8.8.8/tcp/1", "/ip4/127.0.0.1/tcp/1"]
    assert advertised_addrs(listen) == listen[:2]


def test_hole_punch_addresses_are_public_or_private_and_name_no_peer_by_default() -> None:
    assert punch_addrs(["/ip4/8.8.8.8/tcp/1", "/ip4/10.0.0.1/tcp/1"]) == [
        "/ip4/8.8.8.8/tcp/1",
        "/ip4/10.0.0.1/tcp/1",
    ]
    assert punch_addrs(["/ip4/8.8.8.8/tcp/1/p2p/XXXX"]) == []


def test_only_the_first_64_addresses_are_looked_at() -> None:
    junk = ["junk"] * 64
    assert rank_dial_addrs([*junk, "/ip4/8.8.8.8/tcp/1"], PEER) == []
    assert len(rank_dial_addrs([*junk[:63], "/ip4/8.8.8.8/tcp/1"], PEER)) == 1
    assert rank_dial_addrs(["junk", "/ip4/8.8.8.8/tcp/1"], PEER, scan=1) == []
