"""protocols.reach.punch_addrs: which addresses of a DCUtR CONNECT a hole punch dials."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocols.reach import MAX_PUNCH_ADDRS, parse_dial_addr, punch_addrs

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
OTHER = "12D3KooWGRUVh8RYiwoMwwUGmrLNXxPvZrPvDEv1GXxvNMnQ3NkK"


def test_only_direct_ip_addresses_others_can_reach_are_dialed() -> None:
    addrs = [
        "/ip4/10.77.0.101/tcp/4002",  # a NAT's public side
        "/ip4/127.0.0.1/tcp/4002",  # the peer's loopback: would dial ourselves
        "/ip4/0.0.0.0/tcp/4002",
        "/ip4/224.0.0.1/tcp/4002",
        "/ip4/169.254.1.1/tcp/4002",
        "/dns4/example.com/tcp/4002",  # a name: we would resolve whatever it says
        f"/ip4/10.77.0.1/tcp/4001/p2p/{OTHER}/p2p-circuit",
        f"/ip4/10.77.0.102/tcp/4002/p2p/{OTHER}",  # names another peer
        "/ip4/10.77.0.101/udp/4002/quic-v1",
        f"/ip4/192.168.61.2/tcp/4002/p2p/{PEER}",  # its LAN address, its own id dropped
        "/ip4/10.77.0.101/tcp/4002",  # a duplicate
        "not an address",
    ]
    assert punch_addrs(addrs, PEER) == ["/ip4/10.77.0.101/tcp/4002", "/ip4/192.168.61.2/tcp/4002"]
    # Not knowing the peer's id: no address may name one.
    assert punch_addrs(addrs) == ["/ip4/10.77.0.101/tcp/4002"]


def test_a_flood_of_addresses_is_capped() -> None:
    addrs = [f"/ip4/10.0.{i // 250}.{i % 250 + 1}/tcp/1" for i in range(1000)]
    assert punch_addrs(addrs, PEER) == addrs[:MAX_PUNCH_ADDRS]
    # Only the first entries are looked at: junk first, then good ones, yields nothing.
    assert punch_addrs(["junk"] * 32 + addrs, PEER) == []


@given(st.lists(st.text(max_size=80) | st.sampled_from(["/ip4/8.8.8.8/tcp/1"]), max_size=50))
def test_what_comes_out_is_few_direct_and_dialable(addrs: list[str]) -> None:
    out = punch_addrs(addrs, PEER)
    assert len(out) <= MAX_PUNCH_ADDRS and len(set(out)) == len(out)
    for text in out:
        a = parse_dial_addr(text)
        assert a is not None and not a.circuit and not a.is_dns
