"""Rules of the market's gossip intake (peer/market/gossip.py: ``parse_market_message`` and
``GossipGuard``) that the mutation run of issue 17 found unheld. Every message here comes
from an untrusted peer; each test fails when its rule is removed.
"""

from __future__ import annotations

import nacl.signing
import pytest
from libp2p.peer.id import ID

from peer.market.gossip import GossipGuard, parse_market_message
from protocols.codec import encode
from protocols.errors import ProtocolError
from protocols.market import (
    CLOCK_SKEW_S,
    MAX_BID_VALIDITY_S,
    Bid,
    JobRequest,
    TensorMeta,
)
from protocols.signed import sign_message
from tests.unit.test_market_gossip_guard import CID, T0, Msg, guard, key, msg, pid


def signed_request(k: nacl.signing.SigningKey, n: int, *, deadline: float = T0 + 30) -> bytes:
    r = JobRequest(
        job_id=n.to_bytes(16, "big"),
        requester=pid(k),
        model_cid=CID,
        inputs=(TensorMeta("x", "float32", (4,)),),
        input_bytes=16,
        max_price=10,
        deadline=deadline,
        bid_window=0.2,
    )
    return sign_message(k, r).to_bytes()


def signed_bid(k: nacl.signing.SigningKey, n: int, *, expires_at: float = T0 + 5) -> bytes:
    b = Bid(job_id=n.to_bytes(16, "big"), executor=pid(k), price=5, eta_ms=5, expires_at=expires_at)
    return sign_message(k, b).to_bytes()


def test_an_expired_bid_or_one_valid_too_long_is_refused() -> None:
    k = key(2)
    assert parse_market_message(signed_bid(k, 1, expires_at=T0), T0).message.price == 5
    for expires_at in (T0 - 0.5, T0 + MAX_BID_VALIDITY_S + 1):
        with pytest.raises(ProtocolError):
            parse_market_message(signed_bid(k, 1, expires_at=expires_at), T0)


def test_a_requests_deadline_is_judged_with_the_clock_skew_allowance() -> None:
    """The deadline is the requester's clock: up to CLOCK_SKEW_S past it is still taken,
    more is refused."""
    k = key(1)
    late = signed_request(k, 1, deadline=T0 - CLOCK_SKEW_S / 2)
    assert parse_market_message(late, T0).message.deadline == T0 - CLOCK_SKEW_S / 2
    with pytest.raises(ProtocolError):
        parse_market_message(signed_request(k, 1, deadline=T0 - CLOCK_SKEW_S - 1), T0)


def test_a_market_message_that_is_not_a_map_is_a_protocol_error() -> None:
    for data in (encode([1, 2]), encode("d"), encode(7)):
        with pytest.raises(ProtocolError):
            parse_market_message(data, T0)


def test_a_message_whose_origin_cannot_be_read_is_dropped_as_bad_origin() -> None:
    """Any failure to read the origin drops the message; the validator never raises."""
    g = guard()
    k = key(1)
    bad = Msg(data=signed_request(k, 1), from_id=None)  # type: ignore[arg-type]
    assert not g(ID(b"x"), bad)
    assert g.stats.dropped == {"bad-origin": 1}
    assert g.stats.accepted == 0


def test_a_message_that_does_not_parse_is_counted_under_its_error_type() -> None:
    g = guard()
    assert not g(ID(b"x"), msg(key(3), b"\x00garbage"))
    assert not g(ID(b"x"), msg(key(3), encode({"d": "edgeswarm/other/v1"})))
    assert g.stats.dropped == {"DecodeError": 1, "ProtocolError": 1}


def test_by_default_a_signer_may_burst_400_requests_then_200_a_second() -> None:
    now = [T0]
    g = GossipGuard(clock=lambda: now[0])
    k = key(1)
    passed = [g(ID(b"x"), msg(k, signed_request(k, i), seq=i)) for i in range(401)]
    assert passed == [True] * 400 + [False]
    now[0] += 1.0
    more = [g(ID(b"x"), msg(k, signed_request(k, 1000 + i), seq=i)) for i in range(201)]
    assert more == [True] * 200 + [False]


def test_by_default_a_signer_may_burst_400_bids_then_500_a_second() -> None:
    now = [T0]
    g = GossipGuard(clock=lambda: now[0])
    k = key(2)
    assert [g(ID(b"x"), msg(k, signed_bid(k, i), seq=i)) for i in range(401)][-2:] == [True, False]
    now[0] += 1.0
    more = [g(ID(b"x"), msg(k, signed_bid(k, 1000 + i), seq=i)) for i in range(401)]
    assert more == [True] * 400 + [False]  # 500 a second refill, capped at the burst


def test_the_guard_keeps_rate_buckets_for_at_most_max_peers_signers() -> None:
    """Memory bound: 4096 signers by default, the least recently seen forgotten first."""
    g = GossipGuard(clock=lambda: T0)
    for i in range(4097):
        assert g._take(f"peer{i}", "bid", T0)
    assert len(g._buckets) == 4096
    assert ("peer0", "bid") not in g._buckets
    assert ("peer4096", "bid") in g._buckets


def test_the_guard_forgets_the_oldest_seen_message_past_max_seen() -> None:
    g = GossipGuard(clock=lambda: T0, max_seen=2)
    k = key(1)
    for i in range(3):
        assert g(ID(b"x"), msg(k, signed_request(k, i), seq=i))
    assert g(ID(b"x"), msg(k, signed_request(k, 0), seq=9))  # forgotten: passes again
    assert not g(ID(b"x"), msg(k, signed_request(k, 2), seq=10))  # still remembered


def test_by_default_bids_refill_at_500_a_second() -> None:
    """0.799 s after the burst is spent: 399.5 tokens at 500/s (399 bids), 400 at 501/s."""
    now = [T0]
    g = GossipGuard(clock=lambda: now[0])
    k = key(2)
    assert sum(g(ID(b"x"), msg(k, signed_bid(k, i), seq=i)) for i in range(401)) == 400
    now[0] += 0.799
    more = [g(ID(b"x"), msg(k, signed_bid(k, 1000 + i), seq=i)) for i in range(400)]
    assert more == [True] * 399 + [False]


def test_by_default_the_guard_remembers_65536_message_keys() -> None:
    g = GossipGuard(clock=lambda: T0)
    for i in range(65535):
        g._seen[("filler", i)] = None
    k = key(1)
    assert g(ID(b"x"), msg(k, signed_request(k, 1)))
    assert ("filler", 0) in g._seen  # 65536 keys: none forgotten yet
    assert g(ID(b"x"), msg(k, signed_request(k, 2)))
    assert ("filler", 0) not in g._seen and ("filler", 1) in g._seen
