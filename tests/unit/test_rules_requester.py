"""Rules of the requester's state machine (protocols/requester.py) that no other test held.

The requester decides whom it awards, what it accepts and so what it pays for; bids come
from untrusted peers. Found by mutation testing (issue 17, docs/testing.md): each test
fails when its rule is removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from protocols.errors import LocalProtocolError
from protocols.market import Bid
from protocols.requester import (
    AwardFailed,
    BidReceived,
    Complete,
    CompleteLocally,
    DeadlineExceeded,
    Fail,
    LocalBid,
    LocalFinished,
    NoExecutors,
    Publish,
    RequesterJob,
    RequesterPolicy,
    ResultReceived,
    RunLocally,
    SendAward,
    StartTimer,
    TimerFired,
)
from protocols.selection import Weights
from tests.unit.test_requester import (
    E1,
    E2,
    E3,
    INPUT_DIGEST,
    T0,
    awarded,
    bid,
    commitment,
    request,
    started,
)


def job_with(policy: RequesterPolicy, **over: object) -> RequesterJob:
    job = RequesterJob(request(**over), now=T0, input_digest=INPUT_DIGEST, policy=policy)
    job.start()
    return job


# --- policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("max_rounds", 1, 0),
        ("max_bidders", 1, 0),
        ("eta_slack", 1.0, 0.999),
        ("grace_s", 0.0, -0.001),
        ("good_enough_price", 0, -1),
    ],
)
def test_policy_bounds(field: str, ok: object, bad: object) -> None:
    assert getattr(RequesterPolicy(**{field: ok}), field) == ok  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        RequesterPolicy(**{field: bad})  # type: ignore[arg-type]


# --- bids -----------------------------------------------------------------------------------


def test_a_bid_for_another_job_is_ignored_and_takes_no_bidder_slot() -> None:
    """Foreign bids never count: they cannot crowd honest bidders out of the cap."""
    job = job_with(RequesterPolicy(max_bidders=1))
    other = Bid(job_id=b"\x99" * 16, executor=E1, price=10, eta_ms=100, expires_at=T0 + 5)
    assert job.handle(BidReceived(other, now=T0 + 0.1)) == []
    job.handle(BidReceived(bid(E2, 100), now=T0 + 0.1))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2


def test_at_the_bidder_cap_new_bidders_are_dropped_but_a_held_one_may_rebid() -> None:
    job = job_with(RequesterPolicy(max_bidders=2))
    job.handle(BidReceived(bid(E1, 300), now=T0 + 0.1))
    job.handle(BidReceived(bid(E2, 300), now=T0 + 0.1))
    job.handle(BidReceived(bid(E3, 10), now=T0 + 0.1))  # a third bidder: not remembered
    job.handle(BidReceived(bid(E1, 200), now=T0 + 0.1))  # a held bidder's better re-bid
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], SendAward)
    assert (actions[0].executor, actions[0].award.price) == (E1, 200)


def test_of_an_executors_bids_the_longest_lived_are_kept() -> None:
    """Four bids per executor at most: of equal price and eta, the longest-lived stay."""
    job, _ = started()
    for i in range(5):
        job.handle(BidReceived(bid(E1, 100, expires_at=T0 + 1 + i), now=T0 + 0.1))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], SendAward) and actions[0].bid.expires_at == T0 + 5


def test_unusable_bids_are_counted_in_the_no_executors_failure() -> None:
    job = job_with(RequesterPolicy(max_rounds=1))
    job.handle(BidReceived(bid(E1, 5_000), now=T0 + 0.1))  # over the max price
    job.handle(BidReceived(bid(E2, 5_000), now=T0 + 0.1))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], Fail) and isinstance(actions[0].error, NoExecutors)
    assert actions[0].error.bids_seen == 2


def test_a_good_enough_bid_at_exactly_the_max_price_closes_the_auction() -> None:
    job = job_with(RequesterPolicy(good_enough_price=1_000))
    actions = job.handle(BidReceived(bid(E1, 1_000), now=T0 + 0.1))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1


def test_the_policys_weights_rank_the_bids() -> None:
    """Weights that count only the eta give the award to the fastest, not the cheapest."""
    fastest = RequesterPolicy(weights=Weights(price=0.0, eta=1.0, reputation=0.0))
    job = job_with(fastest)
    actions = awarded(job, bid(E1, 100, eta_ms=900), bid(E2, 900, eta_ms=100))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2


# --- timing ---------------------------------------------------------------------------------


def test_with_under_a_second_left_patience_shares_only_the_time_left() -> None:
    policy = RequesterPolicy(eta_slack=1.0, grace_s=0.0, patience=0.5)
    job = job_with(policy, deadline=T0 + 1.0)
    actions = awarded(job, bid(E1, 100, eta_ms=0))  # awarded at T0 + 0.5: 0.5 s left
    assert actions[1] == StartTimer(pytest.approx(T0 + 0.5 + 0.25))


def test_a_result_at_exactly_the_deadline_completes_the_job() -> None:
    job, _ = started(deadline=T0 + 2)
    awarded(job, bid(E1, 100, eta_ms=1_000))
    c = commitment(E1)
    actions = job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 2))
    assert len(actions) == 1 and isinstance(actions[0], Complete)


def test_a_local_run_finishing_at_exactly_the_deadline_completes_locally() -> None:
    job, _ = started(deadline=T0 + 2)
    job.handle(LocalBid(price=100, eta_ms=100, now=T0 + 0.1))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], RunLocally)
    done = job.handle(LocalFinished(outputs_ok=True, now=T0 + 2))
    assert len(done) == 1 and isinstance(done[0], CompleteLocally)


def test_an_award_failing_at_exactly_the_deadline_fails_as_deadline_exceeded() -> None:
    job, _ = started(deadline=T0 + 1.0)
    awarded(job, bid(E1, 100))
    actions = job.handle(AwardFailed(E1, "refused: busy", now=T0 + 1.0))
    assert len(actions) == 1 and isinstance(actions[0], Fail)
    assert isinstance(actions[0].error, DeadlineExceeded)


# --- re-auctions ----------------------------------------------------------------------------


def test_a_new_round_gets_a_nonce_derived_from_the_last() -> None:
    job, first = started()
    actions = job.handle(TimerFired(now=T0 + 0.5))  # no bids: round 1
    assert isinstance(first[0], Publish) and isinstance(actions[0], Publish)
    nonce = hashlib.sha256(first[0].request.nonce + bytes([1])).digest()[:16]
    assert actions[0].request.round == 1
    assert actions[0].request.nonce == nonce


def test_a_new_round_forgets_the_tried_executors_bids_and_makes_room_for_others() -> None:
    job = job_with(RequesterPolicy(max_bidders=1))
    awarded(job, bid(E1, 100))
    actions = job.handle(AwardFailed(E1, "refused", now=T0 + 0.6))
    assert isinstance(actions[0], Publish) and actions[0].request.round == 1
    assert job.handle(BidReceived(bid(E2, 100), now=T0 + 0.7)) == []
    after = job.handle(TimerFired(now=T0 + 1.1))
    assert isinstance(after[0], SendAward) and after[0].executor == E2


def test_an_event_of_no_known_kind_is_a_bug_that_raises() -> None:
    job, _ = started()
    with pytest.raises(AssertionError):
        job.handle(_Odd(now=T0 + 0.1))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Odd:
    now: float
