"""Hole punching (DCUtR) on one machine: what a peer's CONNECT may make us dial.

The punch itself needs two NATs: tests/reach/test_reach_lab.py.
"""

from __future__ import annotations

import nacl.signing
from multiaddr import Multiaddr

from peer.host import build_host
from peer.reach.dcutr import HolePunch
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
