"""An ad carries only its own peer's addresses (nobody plants addresses for another peer)."""

from __future__ import annotations

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.ad import addr_peer, build_ad, parse_ad_record
from protocols.errors import ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.signing import seal
from tests.unit.test_ad import KEY, NOW, OTHER_PID, PID, make_ad

RELAY = OTHER_PID


@pytest.mark.parametrize(
    "addr",
    [
        "/ip4/203.0.113.7/tcp/4001",
        f"/ip4/203.0.113.7/tcp/4001/p2p/{PID}",
        f"/ip6/::1/tcp/4001/p2p/{PID}",
        f"/dns4/example.org/tcp/443/wss/p2p/{PID}",
        f"/ip4/203.0.113.7/udp/4001/quic-v1/p2p/{PID}",
        f"/ip4/198.51.100.1/tcp/4101/p2p/{RELAY}/p2p-circuit",
        f"/ip4/198.51.100.1/tcp/4101/p2p/{RELAY}/p2p-circuit/p2p/{PID}",
    ],
)
def test_own_and_relay_addresses_are_accepted(addr: str) -> None:
    ad = make_ad(addrs=(addr,))
    assert parse_ad_record(f"/edgeswarm-ad/{PID}", build_ad(KEY, ad), NOW).addrs == (addr,)


@pytest.mark.parametrize(
    "addr",
    [
        f"/ip4/203.0.113.7/tcp/4001/p2p/{OTHER_PID}",
        f"/ip4/203.0.113.7/tcp/4001/ipfs/{OTHER_PID}",
        f"/ip4/198.51.100.1/tcp/4101/p2p/{PID}/p2p-circuit/p2p/{OTHER_PID}",
        f"/ip4/203.0.113.7/tcp/4001/p2p/{PID}/p2p/{OTHER_PID}",
    ],
)
def test_an_address_of_another_peer_is_refused(addr: str) -> None:
    with pytest.raises(ValidationError, match=r"only its own addresses|names two peers"):
        make_ad(addrs=(addr,))


def test_a_signed_record_planting_another_peers_address_is_refused() -> None:
    """The signer builds the body by hand (skipping our constructor): the parser still refuses."""
    body = make_ad().to_body()
    body["addrs"] = [f"/ip4/6.6.6.6/tcp/1/p2p/{OTHER_PID}"]
    value = seal(KEY, "edgeswarm/ad/v1", body).to_bytes()
    with pytest.raises(ValidationError, match="only its own addresses"):
        parse_ad_record(f"/edgeswarm-ad/{PID}", value, NOW)


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), port=st.integers(1, 65535))
def test_any_foreign_peer_id_in_an_address_is_refused(seed: bytes, port: int) -> None:
    other = peer_id_from_public_key(bytes(nacl.signing.SigningKey(seed).verify_key))
    addr = f"/ip4/10.0.0.1/tcp/{port}/p2p/{other}"
    assert addr_peer(addr) == other
    if other == PID:
        make_ad(addrs=(addr,))
    else:
        with pytest.raises(ValidationError):
            make_ad(addrs=(addr,))
