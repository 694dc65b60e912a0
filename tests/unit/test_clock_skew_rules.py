"""Clock skew: times written by another peer are judged with ``clock_skew_s`` of allowance.

The requester writes the deadline (its clock), the executor the bid expiry (its
clock); each judges the other's times with its own clock. With the peer's
allowance (``protocols.market.CLOCK_SKEW_S``) jobs still run when the clocks are
5 s apart, and never beyond deadline + allowance.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.market.gossip import parse_market_message
from protocols.errors import ProtocolError
from protocols.executor import (
    Abandon,
    AcceptAward,
    AwardReceived,
    Declined,
    ExecutorState,
    InputReceived,
    PublishBid,
    RejectAward,
    RequestSeen,
    StartExecution,
    Tick,
)
from protocols.market import CLOCK_SKEW_S, LeaseTerms
from protocols.signed import sign_message
from tests.unit.test_executor import JOB, KEYS, T0, award_for, config, request

SKEW = CLOCK_SKEW_S


def test_the_peer_allows_at_least_5_s_of_skew_each_way() -> None:
    assert SKEW >= 10.0  # two peers each 5 s off the true time


@given(ahead=st.floats(min_value=0.0, max_value=SKEW - 0.5))
@settings(max_examples=50, deadline=None)
def test_an_executor_whose_clock_is_ahead_still_bids_and_runs(ahead: float) -> None:
    """The request's deadline (T0 + 3, requester's clock) already passed on our clock."""
    state = ExecutorState(config(clock_skew_s=SKEW))
    req = request(deadline=T0 + 3)
    now = T0 + 3 + ahead
    (bid,) = state.handle(RequestSeen(req, now=now))
    assert isinstance(bid, PublishBid)
    aw = award_for(req)
    assert state.handle(AwardReceived(aw, now=now + 0.2)) == [AcceptAward(aw)]
    assert state.handle(InputReceived(JOB, 0, now=now + 0.3)) == [StartExecution(JOB, 0)]
    assert state.handle(Tick(now=now + 0.4)) == []


def test_without_the_allowance_the_same_job_is_declined() -> None:
    state = ExecutorState(config())
    (declined,) = state.handle(RequestSeen(request(deadline=T0 + 3), now=T0 + 5))
    assert isinstance(declined, Declined) and "deadline" in declined.reason


def test_beyond_deadline_plus_allowance_nothing_runs() -> None:
    state = ExecutorState(config(clock_skew_s=SKEW))
    req = request(deadline=T0 + 3)
    (bid,) = state.handle(RequestSeen(req, now=T0))
    assert isinstance(bid, PublishBid)
    late = T0 + 3 + SKEW
    (refused,) = state.handle(AwardReceived(award_for(req), now=late))
    assert isinstance(refused, RejectAward) and refused.error.code in ("deadline", "bad-award")
    # An accepted award is abandoned once deadline + allowance has passed on our clock.
    req2 = request(job_id=b"\x22" * 16, deadline=T0 + 3)
    state.handle(RequestSeen(req2, now=T0))
    state.handle(AwardReceived(award_for(req2), now=T0 + 1))
    assert state.handle(Tick(now=T0 + 3 + SKEW - 0.5)) == []
    (gone,) = state.handle(Tick(now=T0 + 3 + SKEW + 0.5))
    assert isinstance(gone, Abandon)


def test_bid_expiry_leaves_room_for_a_requester_whose_clock_is_ahead() -> None:
    state = ExecutorState(config(clock_skew_s=SKEW, bid_validity_s=2.0))
    (bid,) = state.handle(RequestSeen(request(deadline=T0 + 10), now=T0))
    assert isinstance(bid, PublishBid)
    assert bid.bid.expires_at == T0 + 2.0 + SKEW


def test_lease_inputs_are_taken_until_its_end_plus_the_allowance() -> None:
    state = ExecutorState(config(clock_skew_s=SKEW))
    req = request(deadline=T0 + 30, lease=LeaseTerms(max_jobs=4, until=T0 + 5))
    state.handle(RequestSeen(req, now=T0))
    state.handle(AwardReceived(award_for(req), now=T0 + 0.1))
    assert state.handle(InputReceived(JOB, 0, now=T0 + 5 + SKEW - 0.5)) == [StartExecution(JOB, 0)]
    (late,) = state.handle(InputReceived(JOB, 1, now=T0 + 5 + SKEW + 0.5))
    assert late.error.code == "deadline"  # type: ignore[union-attr]


def test_gossip_takes_a_request_whose_deadline_is_behind_our_clock_by_less_than_the_skew() -> None:
    requester = KEYS[1]
    now = time.time()
    ok = sign_message(requester, request(deadline=now - SKEW + 1)).to_bytes()
    assert parse_market_message(ok, now).message.job_id == JOB
    stale = sign_message(requester, request(deadline=now - SKEW - 1)).to_bytes()
    with pytest.raises(ProtocolError, match="expired"):
        parse_market_message(stale, now)
