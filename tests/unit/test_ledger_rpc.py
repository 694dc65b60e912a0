"""The /edgeswarm/ledger/1 wire: typed requests and replies round-trip; garbage is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.codec import decode, encode
from protocols.errors import ProtocolError, ValidationError
from protocols.ledger_rpc import (
    MAX_FRAME,
    MAX_ITEMS,
    Certify,
    CertifyReply,
    ErrorReply,
    Get,
    GetReply,
    Push,
    PushReply,
    Sync,
    SyncReply,
    decode_reply,
    decode_request,
    reply_type,
)

blobs = st.binary(max_size=64)
ids = st.lists(st.binary(min_size=32, max_size=32), max_size=8).map(tuple)
requests = st.one_of(
    blobs.map(Certify),
    st.lists(blobs, max_size=8).map(lambda x: Push(tuple(x))),
    blobs.map(Sync),
    ids.map(Get),
)


@given(requests)
def test_requests_round_trip_through_cbor(req: Certify | Push | Sync | Get) -> None:
    assert decode_request(decode(encode(req.to_wire()), max_size=MAX_FRAME)) == req


@given(
    st.one_of(
        blobs.map(CertifyReply),
        st.tuples(st.integers(0, MAX_ITEMS), st.integers(0, MAX_ITEMS)).map(
            lambda t: PushReply(*t)
        ),
        st.one_of(st.none(), blobs).map(SyncReply),
        st.lists(blobs, max_size=8).map(lambda x: GetReply(tuple(x))),
    )
)
def test_replies_round_trip(reply: CertifyReply | PushReply | SyncReply | GetReply) -> None:
    raw = decode(encode(reply.to_wire()), max_size=MAX_FRAME)
    assert decode_reply(raw, type(reply)) == reply


@given(st.recursive(st.none() | st.integers() | st.text() | st.binary(), st.lists, max_leaves=8))
def test_garbage_requests_raise_a_validation_error(raw: object) -> None:
    with pytest.raises(ValidationError):
        decode_request(raw)


@pytest.mark.parametrize(
    "raw",
    [
        {"v": 2, "op": "push", "items": []},
        {"v": 1, "op": "steal"},
        {"v": 1, "op": "certify", "req": "text"},
        {"v": 1, "op": "push", "items": [b"x"] * (MAX_ITEMS + 1)},
        {"v": 1, "op": "push", "items": [b"x", 5]},
        {"v": 1, "op": "get", "ids": [b"short"]},
        {"v": 1, "op": "sync", "m": None},
    ],
)
def test_bad_requests_say_what_is_wrong(raw: object) -> None:
    with pytest.raises(ValidationError) as err:
        decode_request(raw)
    assert str(err.value)


def test_error_replies_and_bad_counts() -> None:
    assert decode_reply({"v": 1, "err": "x" * 1000}, PushReply) == ErrorReply("x" * 400)
    for bad in ({"v": 1, "new": -1, "bad": 0}, {"v": 1, "new": 1}, {"v": 1, "new": True, "bad": 0}):
        with pytest.raises(ProtocolError):
            decode_reply(bad, PushReply)
    assert reply_type(Sync(b"")) is SyncReply
