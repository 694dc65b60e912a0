"""GossipGuard, the market topics' validator: what it lets through and what it drops."""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.signing
from libp2p.peer.id import ID

from peer.market.gossip import GossipGuard, topic_for
from protocols.identity import peer_id_from_public_key
from protocols.market import Bid, JobRequest, TensorMeta
from protocols.signed import sign_message

CID = "cd" * 32
T0 = 50_000.0


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


@dataclass
class Msg:
    """The fields of a gossipsub rpc Message the guard reads."""

    data: bytes
    from_id: bytes
    topicIDs: list[str] = field(default_factory=lambda: [topic_for(CID)])
    seqno: bytes = b"\0" * 8


def msg(k: nacl.signing.SigningKey, data: bytes, seq: int = 0, topic: str | None = None) -> Msg:
    return Msg(
        data=data,
        from_id=ID.from_base58(pid(k)).to_bytes(),
        topicIDs=[topic or topic_for(CID)],
        seqno=seq.to_bytes(8, "big"),
    )


def request(k: nacl.signing.SigningKey, n: int = 1, round_: int = 0) -> bytes:
    r = JobRequest(
        job_id=bytes([n]) * 16,
        requester=pid(k),
        model_cid=CID,
        inputs=(TensorMeta("x", "float32", (4,)),),
        input_bytes=16,
        max_price=10,
        deadline=T0 + 30,
        bid_window=0.2,
        round=round_,
    )
    return sign_message(k, r).to_bytes()


def bid(k: nacl.signing.SigningKey, n: int = 1, price: int = 5) -> bytes:
    b = Bid(job_id=bytes([n]) * 16, executor=pid(k), price=price, eta_ms=5, expires_at=T0 + 5)
    return sign_message(k, b).to_bytes()


def guard(**kw: float) -> GossipGuard:
    return GossipGuard(clock=lambda: T0, **kw)  # type: ignore[arg-type]


def test_valid_requests_and_bids_pass_and_are_routed_once() -> None:
    g = guard()
    routed: list[tuple[str, object]] = []
    g.on_valid = lambda topic, parsed: routed.append((topic, parsed.message))
    req_key, ex_key = key(1), key(2)
    assert g(ID(b"x"), msg(req_key, request(req_key)))
    assert g(ID(b"x"), msg(ex_key, bid(ex_key), seq=1))
    assert g.stats.accepted == 2 and g.stats.total_dropped == 0
    assert [type(m).__name__ for _, m in routed] == ["JobRequest", "Bid"]
    assert {t for t, _ in routed} == {topic_for(CID)}


def test_duplicates_wrong_topic_replays_and_garbage_are_dropped() -> None:
    g = guard()
    req_key, ex_key, rogue = key(1), key(2), key(3)
    assert g(ID(b"x"), msg(req_key, request(req_key)))
    # Same (job, round) again under a new gossip seqno: a duplicate.
    assert not g(ID(b"x"), msg(req_key, request(req_key), seq=9))
    # A new round of the same job is not a duplicate.
    assert g(ID(b"x"), msg(req_key, request(req_key, round_=1), seq=10))
    assert not g(ID(b"x"), msg(req_key, request(req_key, n=2), topic=topic_for("ef" * 32)))
    assert not g(ID(b"x"), msg(rogue, bid(ex_key)))  # someone else's bid, re-published
    assert not g(ID(b"x"), msg(rogue, b"\x00garbage"))
    assert not g(ID(b"x"), msg(rogue, b"\xa0" * 20_000))  # over the cap
    assert set(g.stats.dropped) >= {"duplicate", "wrong-topic", "signer-not-origin"}


def test_per_signer_rate_limit() -> None:
    g = guard(bids_per_s=1.0, burst=3.0)
    ex_key, other = key(2), key(4)
    passed = [g(ID(b"x"), msg(ex_key, bid(ex_key, n=i + 1), seq=i)) for i in range(6)]
    assert passed == [True, True, True, False, False, False]
    assert g.stats.dropped["rate"] == 3
    assert g(ID(b"x"), msg(other, bid(other, n=1)))  # another signer has its own budget


def test_a_message_straight_from_its_signer_is_admitted_once_across_both_paths() -> None:
    """Auction streams (``peer.market.direct``): a request or bid that came straight from
    its signer passes the same rules; its gossip copy is then valid (forwarded, not scored
    down) but not routed again; a copy seen on gossip first is not admitted again."""
    g = guard()
    routed: list[object] = []
    g.on_valid = lambda topic, parsed: routed.append(parsed.message)
    req_key, ex_key = key(1), key(2)
    direct = g.admit_direct(pid(req_key), request(req_key))
    assert direct is not None and isinstance(direct.message, JobRequest)
    assert g(ID(b"x"), msg(req_key, request(req_key)))  # valid, forwarded...
    assert routed == [] and g.stats.total_dropped == 0  # ...but not handled twice
    assert not g(ID(b"x"), msg(req_key, request(req_key), seq=2))  # a third copy: a replay
    assert g.stats.dropped == {"duplicate": 1}
    # Gossip first: the stream's copy is ignored, with no offence counted.
    assert g(ID(b"x"), msg(ex_key, bid(ex_key), seq=3))
    assert g.admit_direct(pid(ex_key), bid(ex_key)) is None
    assert len(routed) == 1 and g.stats.dropped == {"duplicate": 1}


def test_a_direct_message_must_be_signed_by_the_streams_peer() -> None:
    g = guard()
    req_key, other = key(1), key(3)
    assert g.admit_direct(pid(other), request(req_key)) is None  # relayed by someone else
    assert g.admit_direct(pid(req_key), b"\xa0") is None  # not a market message
    assert g.stats.dropped["signer-not-origin"] == 1 and g.stats.total_dropped == 2
    # It was not remembered: the signer's own copy still gets in.
    assert g.admit_direct(pid(req_key), request(req_key)) is not None


def test_direct_messages_share_the_signers_rate() -> None:
    g = guard(requests_per_s=0.0, burst=2.0)
    k = key(1)
    got = [g.admit_direct(pid(k), request(k, n=i)) for i in range(1, 4)]
    assert [m is not None for m in got] == [True, True, False]
    assert g.stats.dropped == {"rate": 1}
