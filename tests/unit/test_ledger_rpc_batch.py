"""``certify_many``: a payer's pipelined transfer requests in one frame, one answer each."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.codec import decode, encode
from protocols.errors import ValidationError
from protocols.ledger_rpc import (
    MAX_BATCH,
    MAX_FRAME,
    CertifyMany,
    CertifyManyReply,
    ErrorReply,
    decode_reply,
    decode_request,
    reply_type,
)

members = st.lists(st.binary(max_size=64), min_size=1, max_size=MAX_BATCH).map(tuple)


def _wire(value: object) -> object:
    return decode(encode(value), max_size=MAX_FRAME)


@given(members)
def test_a_batch_round_trips(reqs: tuple[bytes, ...]) -> None:
    req = CertifyMany(reqs)
    assert decode_request(_wire(req.to_wire())) == req
    assert reply_type(req) is CertifyManyReply


@given(st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=400)), min_size=1, max_size=8))
def test_a_batch_reply_round_trips(rs: list[bytes | str]) -> None:
    reply = CertifyManyReply(tuple(rs))
    assert decode_reply(_wire(reply.to_wire()), CertifyManyReply) == reply


@pytest.mark.parametrize(
    "reqs",
    [[], [b"x"] * (MAX_BATCH + 1), [b"x", "text"], [b"x", None], b"x"],
    ids=["empty", "over-max-batch", "a-string-member", "a-null-member", "not-a-list"],
)
def test_a_bad_batch_request_is_refused_whole(reqs: object) -> None:
    with pytest.raises(ValidationError, match="certify_many"):
        decode_request(_wire({"v": 1, "op": "certify_many", "reqs": reqs}))


def test_a_batch_is_made_of_1_to_max_batch_members() -> None:
    with pytest.raises(ValidationError):
        CertifyMany(())
    with pytest.raises(ValidationError):
        CertifyMany((b"x",) * (MAX_BATCH + 1))
    assert len(CertifyMany((b"x",) * MAX_BATCH).reqs) == MAX_BATCH


@pytest.mark.parametrize(
    "rs",
    [[], [b"x"] * (MAX_BATCH + 1), [1], ["e" * 401], None],
    ids=["empty", "over-max-batch", "an-int", "an-error-over-400", "missing"],
)
def test_a_bad_batch_reply_is_refused(rs: object) -> None:
    with pytest.raises(ValidationError, match="certify_many reply"):
        decode_reply(_wire({"v": 1, "rs": rs}), CertifyManyReply)


def test_an_old_witness_answers_an_unknown_op_with_an_error() -> None:
    reply = decode_reply(_wire({"v": 1, "err": "unknown op 'certify_many'"}), CertifyManyReply)
    assert isinstance(reply, ErrorReply)
