"""RequesterJob: auction, award, fallbacks, re-auctions, deadline, exactly one outcome."""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError
from protocols.identity import peer_id_from_public_key
from protocols.market import MAX_ROUND, Bid, JobRequest, LeaseTerms, TensorMeta
from protocols.receipt import Receipt, ResultCommitment, batch_digest, commit, content_digest
from protocols.requester import (
    AwardFailed,
    AwardUndelivered,
    BidReceived,
    CancelAward,
    Complete,
    DeadlineExceeded,
    DeadlineReached,
    ExecutorGone,
    ExecutorsFailed,
    Fail,
    InputSent,
    InterimReceived,
    LocalBid,
    NoExecutors,
    Phase,
    Publish,
    RequesterJob,
    RequesterPolicy,
    ResultArrived,
    ResultReceived,
    RunLocally,
    SendAcceptance,
    SendAward,
    StartTimer,
    TimerFired,
)
from protocols.signed import Signed, sign_message

KEYS = [nacl.signing.SigningKey(bytes([i]) * 32) for i in range(1, 6)]
IDS = [peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS]
REQ_KEY, REQ = KEYS[0], IDS[0]
E1, E2, E3 = IDS[1], IDS[2], IDS[3]
EXEC_KEYS = dict(zip(IDS[1:], KEYS[1:], strict=True))
CID = hashlib.sha256(b"tiny").hexdigest()
JOB = b"\x42" * 16
T0 = 1_000.0
INPUT_DIGEST = content_digest({"x": b"in"})


def request(**over: Any) -> JobRequest:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "requester": REQ,
        "model_cid": CID,
        "inputs": (TensorMeta("x", "float32", (1, 4)),),
        "input_bytes": 16,
        "max_price": 1_000,
        "deadline": T0 + 10.0,
        "bid_window": 0.5,
        "nonce": b"\x01" * 16,
    }
    fields.update(over)
    return JobRequest(**fields)


def bid(executor: str, price: int = 100, eta_ms: int = 100, expires_at: float = T0 + 5) -> Bid:
    return Bid(job_id=JOB, executor=executor, price=price, eta_ms=eta_ms, expires_at=expires_at)


def commitment(executor: str, price: int = 100, **over: Any) -> Signed[ResultCommitment]:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "requester": REQ,
        "executor": executor,
        "model_cid": CID,
        "input_digest": INPUT_DIGEST,
        "output_digest": content_digest({"y": b"out"}),
        "price": price,
        "compute_ms": 5,
    }
    fields.update(over)
    return commit(EXEC_KEYS[executor], ResultCommitment(**fields))


def started(**over: Any) -> tuple[RequesterJob, list[Any]]:
    job = RequesterJob(request(**over), now=T0, input_digest=INPUT_DIGEST)
    return job, job.start()


def awarded(job: RequesterJob, *bids: Bid) -> list[Any]:
    for b in bids:
        assert job.handle(BidReceived(b, now=T0 + 0.1)) == []
    return job.handle(TimerFired(now=T0 + 0.5))


def test_happy_path() -> None:
    job, actions = started()
    assert actions == [Publish(job.request), StartTimer(T0 + 0.5)]
    assert job.phase is Phase.COLLECTING
    actions = awarded(job, bid(E1, 300), bid(E2, 100), bid(E3, 200))
    assert len(actions) == 2
    send, timer = actions
    assert isinstance(send, SendAward) and send.executor == E2
    assert send.award.price == 100 and send.award.deadline == T0 + 10 and send.award.lease is None
    # Timer: eta 0.1 s x slack 2 + grace 1 s.
    assert timer == StartTimer(T0 + 0.5 + 0.2 + 1.0)
    assert job.phase is Phase.AWARDED and job.awarded_to == E2
    c = commitment(E2)
    done = job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 0.7))
    assert done == [Complete(commitment=c, award=send.award)]
    assert job.outcome == done[0] and job.phase is Phase.DONE
    receipt = Receipt.create(REQ_KEY, c)
    receipt.verify()
    assert receipt.price == 100 and receipt.executor == E2
    # Everything after the outcome is ignored: never paid twice.
    assert job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 0.8)) == []
    assert job.handle(TimerFired(now=T0 + 20)) == []


def test_early_and_spurious_timers_are_ignored() -> None:
    job, _ = started()
    assert job.handle(TimerFired(now=T0 + 0.1)) == []
    assert job.phase is Phase.COLLECTING


def test_no_bids_reauctions_then_fails_with_no_executors() -> None:
    job, _ = started()
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], Publish)
    assert actions[0].request.round == 1 and actions[0].request.nonce != request().nonce
    assert actions[0].request.job_id == JOB
    assert actions[1] == StartTimer(T0 + 1.0)
    actions = job.handle(TimerFired(now=T0 + 1.0))
    assert isinstance(actions[0], Publish) and actions[0].request.round == 2
    actions = job.handle(TimerFired(now=T0 + 1.5))
    assert len(actions) == 1 and isinstance(actions[0], Fail)
    err = actions[0].error
    assert isinstance(err, NoExecutors)
    assert err.waited_s == pytest.approx(1.5) and err.rounds == 3
    assert CID in str(err) and "1.5 s" in str(err) and "3 auctions" in str(err)


def test_no_bids_with_short_deadline_fails_at_deadline() -> None:
    job, actions = started(deadline=T0 + 0.8)
    actions = job.handle(TimerFired(now=T0 + 0.5))
    # Another 0.5 s window does not fit before the deadline: fail now, not at the deadline.
    assert len(actions) == 1 and isinstance(actions[0], Fail)
    assert isinstance(actions[0].error, NoExecutors)


def test_award_failure_falls_back_to_next_bidder() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100), bid(E2, 200))
    assert job.awarded_to == E1
    # A failure report about someone else changes nothing.
    assert job.handle(AwardFailed(E2, "?", now=T0 + 0.6)) == []
    actions = job.handle(AwardFailed(E1, "connection refused", now=T0 + 0.6))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2
    assert job.attempts == [(E1, "connection refused")]
    actions = job.handle(ExecutorGone(E2, now=T0 + 0.7))
    # No bids left: a new auction; failed executors' bids are not considered again.
    assert isinstance(actions[0], Publish) and actions[0].request.round == 1
    job.handle(BidReceived(bid(E1, 50), now=T0 + 0.8))
    job.handle(BidReceived(bid(E3, 300), now=T0 + 0.8))
    actions = job.handle(TimerFired(now=T0 + 1.2))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E3


def test_an_undelivered_award_goes_to_the_same_executor_again_once() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100), bid(E2, 200))
    assert job.handle(AwardUndelivered(E2, "?", now=T0 + 3.0)) == []  # not the awarded one
    actions = job.handle(AwardUndelivered(E1, "TooSlowError", now=T0 + 3.0))
    # The same award again (no byte of it left), with a fresh result timer from now.
    assert actions == [SendAward(E1, actions[0].award, actions[0].bid), StartTimer(T0 + 4.2)]  # type: ignore[union-attr]
    assert job.awarded_to == E1 and job.phase is Phase.AWARDED
    assert job.attempts == [(E1, "award undelivered: TooSlowError")]
    # Second open failed too: max_opens (2) spent, the next bidder gets it.
    actions = job.handle(AwardUndelivered(E1, "TooSlowError", now=T0 + 4.0))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2
    # Paid once, to the one that delivered; E1's late result is never accepted.
    assert job.handle(ResultReceived(commitment(E1), outputs_ok=True, now=T0 + 4.1)) == []
    done = job.handle(ResultReceived(commitment(E2, price=200), outputs_ok=True, now=T0 + 4.2))
    assert isinstance(done[0], Complete) and done[0].commitment.message.executor == E2
    assert job.handle(AwardUndelivered(E2, "late", now=T0 + 4.3)) == []


def test_an_undelivered_award_then_a_result_completes_once() -> None:
    job, _ = started()
    first = awarded(job, bid(E1, 100))[0]
    again = job.handle(AwardUndelivered(E1, "TooSlowError", now=T0 + 2.0))[0]
    assert isinstance(first, SendAward) and again == first  # the same award, same price
    job.handle(InputSent(E1, 0, INPUT_DIGEST, now=T0 + 2.1))
    c = commitment(E1, output_digest=content_digest({"y": b"out"}))
    job.handle(ResultArrived(E1, 0, content_digest({"y": b"out"}), now=T0 + 2.2))
    done = job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 2.3))
    assert done == [Complete(commitment=c, award=first.award)]
    assert job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 2.4)) == []


@pytest.mark.parametrize(
    ("policy", "sent", "now", "expires"),
    [
        (RequesterPolicy(max_opens=1), False, T0 + 2.0, T0 + 5),  # no second open allowed
        (RequesterPolicy(), True, T0 + 2.0, T0 + 5),  # inputs went out: not undelivered
        (RequesterPolicy(), False, T0 + 2.0, T0 + 1.9),  # the bid expired meanwhile
    ],
)
def test_an_undelivered_award_counts_as_a_failure_when_it_cannot_be_resent(
    policy: RequesterPolicy, sent: bool, now: float, expires: float
) -> None:
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, policy=policy)
    job.start()
    awarded(job, bid(E1, 100, expires_at=expires), bid(E2, 200))
    if sent:
        job.handle(InputSent(E1, 0, INPUT_DIGEST, now=T0 + 1.0))
    actions = job.handle(AwardUndelivered(E1, "TooSlowError", now=now))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2
    assert job.attempts == [(E1, "award undelivered: TooSlowError")]


def test_an_undelivered_award_at_the_deadline_is_not_sent_again() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100, expires_at=T0 + 20))
    actions = job.handle(AwardUndelivered(E1, "TooSlowError", now=T0 + 10.0))
    assert isinstance(actions[-1], Fail) and isinstance(actions[-1].error, DeadlineExceeded)
    assert not any(isinstance(a, SendAward) for a in actions)


def test_max_opens_under_one_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        RequesterPolicy(max_opens=0)


def test_slow_executor_is_cancelled_and_replaced() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100, eta_ms=100), bid(E2, 200))
    actions = job.handle(TimerFired(now=T0 + 1.7))
    assert actions[0] == CancelAward(E1, actions[0].reason)  # type: ignore[union-attr]
    assert isinstance(actions[1], SendAward) and actions[1].executor == E2
    # The late result of the cancelled executor is never accepted.
    assert job.handle(ResultReceived(commitment(E1), outputs_ok=True, now=T0 + 1.8)) == []
    done = job.handle(ResultReceived(commitment(E2, price=200), outputs_ok=True, now=T0 + 1.9))
    assert isinstance(done[0], Complete) and done[0].commitment.message.executor == E2


def test_patience_gives_a_live_executor_a_share_of_the_time_left() -> None:
    # Awarded at T0 + 0.5 with the deadline at T0 + 10: 9.5 s left, a quarter is 2.375 s.
    job = RequesterJob(
        request(), now=T0, input_digest=INPUT_DIGEST, policy=RequesterPolicy(patience=0.25)
    )
    job.start()
    actions = awarded(job, bid(E1, 100, eta_ms=100), bid(E2, 200))
    assert actions[1] == StartTimer(pytest.approx(T0 + 0.5 + 0.2 + 1.0 + 2.375))
    assert job.handle(TimerFired(now=T0 + 1.7)) == []  # past eta x slack + grace: still E1
    actions = job.handle(TimerFired(now=T0 + 4.1))
    assert isinstance(actions[0], CancelAward) and actions[0].executor == E1
    assert isinstance(actions[1], SendAward) and actions[1].executor == E2


@pytest.mark.parametrize("patience", [-0.1, 1.0, 2.0])
def test_patience_outside_zero_to_one_is_refused(patience: float) -> None:
    with pytest.raises(LocalProtocolError, match="patience"):
        RequesterPolicy(patience=patience)


@pytest.mark.parametrize(
    ("c_over", "ok", "why"),
    [
        ({"price": 101}, True, "asks 101"),
        ({"model_cid": hashlib.sha256(b"other").hexdigest()}, True, "another model"),
        ({"input_digest": content_digest(0)}, True, "other inputs"),
        ({"job_id": b"\x43" * 16}, True, "another job"),
        ({"count": 2, "price": 200}, True, "covers 2 jobs"),
        ({}, False, "bad outputs"),
    ],
)
def test_bad_result_is_refused_and_next_bidder_tried(
    c_over: dict[str, Any], ok: bool, why: str
) -> None:
    job, _ = started()
    awarded(job, bid(E1, 100), bid(E2, 200))
    c = commitment(E1, **{"price": 100, **c_over})
    actions = job.handle(ResultReceived(c, outputs_ok=ok, now=T0 + 0.6))
    assert isinstance(actions[0], CancelAward) and why in actions[0].reason
    assert isinstance(actions[1], SendAward) and actions[1].executor == E2
    assert job.outcome is None


def test_result_after_deadline_is_not_accepted() -> None:
    job, _ = started(deadline=T0 + 2)
    awarded(job, bid(E1, 100, eta_ms=1_000))
    actions = job.handle(ResultReceived(commitment(E1), outputs_ok=True, now=T0 + 2.01))
    assert isinstance(actions[0], CancelAward)
    assert isinstance(actions[1], Fail) and isinstance(actions[1].error, DeadlineExceeded)
    assert len(actions) == 2


def test_deadline_while_awarded_cancels_and_fails() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100))
    actions = job.handle(DeadlineReached(now=T0 + 10))
    assert isinstance(actions[0], CancelAward) and actions[0].executor == E1
    assert isinstance(actions[1], Fail) and isinstance(actions[1].error, DeadlineExceeded)
    assert "deadline" in str(actions[1].error)


def test_all_failed_without_time_for_another_auction() -> None:
    job, _ = started(deadline=T0 + 1.0)
    awarded(job, bid(E1, 100))
    actions = job.handle(AwardFailed(E1, "refused: busy", now=T0 + 0.6))
    assert len(actions) == 1 and isinstance(actions[0], Fail)
    assert isinstance(actions[0].error, ExecutorsFailed)
    assert "refused: busy" in str(actions[0].error)


def test_bids_arriving_during_award_are_fallbacks() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100))
    job.handle(BidReceived(bid(E2, 150), now=T0 + 0.6))
    actions = job.handle(AwardFailed(E1, "gone", now=T0 + 0.7))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2


def test_expired_and_too_slow_bids_are_not_awarded() -> None:
    job, _ = started(deadline=T0 + 3)
    actions = awarded(job, bid(E1, 100, expires_at=T0 + 0.4), bid(E2, 100, eta_ms=2_600))
    assert isinstance(actions[0], Publish)  # nothing usable: a new auction


def test_lease_batch_result() -> None:
    lease = LeaseTerms(max_jobs=10, until=T0 + 8)
    job, _ = started(lease=lease)
    actions = awarded(job, bid(E1, 30))
    assert isinstance(actions[0], SendAward) and actions[0].award.lease == lease
    digests = [content_digest(i) for i in range(7)]
    c = commitment(E1, price=7 * 30, count=7, input_digest=batch_digest(digests))
    done = job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 1))
    assert isinstance(done[0], Complete)
    assert Receipt.create(REQ_KEY, c).count == 7


def test_usage_errors() -> None:
    job = RequesterJob(request(), now=T0)
    with pytest.raises(LocalProtocolError):
        job.handle(TimerFired(now=T0))
    job.start()
    with pytest.raises(LocalProtocolError):
        job.start()
    with pytest.raises(LocalProtocolError):
        RequesterPolicy(max_rounds=0)


def test_start_after_deadline_fails_at_once() -> None:
    job = RequesterJob(request(deadline=T0 + 1), now=T0 + 1)
    actions = job.start()
    assert len(actions) == 1 and isinstance(actions[0], Fail)
    assert isinstance(actions[0].error, NoExecutors)


def test_banned_and_reputation_are_used() -> None:
    job = RequesterJob(request(), now=T0, banned={E1}, reputation={E3: 1.0, E2: 0.0})
    job.start()
    actions = awarded(job, bid(E1, 10), bid(E2, 100), bid(E3, 100))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E3


def test_no_executors_says_bids_were_unusable() -> None:
    job, _ = started(deadline=T0 + 0.9)
    job.handle(BidReceived(bid(E1, price=5_000), now=T0 + 0.1))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], Fail) and isinstance(actions[0].error, NoExecutors)
    assert actions[0].error.bids_seen == 1 and "over the max price" in str(actions[0].error)


def test_forged_commitment_is_never_accepted() -> None:
    job, _ = started()
    awarded(job, bid(E1, 100), bid(E2, 200))
    genuine = commitment(E1)
    # E3 signs E1's commitment body: the envelope verifies for E3, not for the named executor.
    forged = Signed(message=genuine.message, envelope=commitment(E3).envelope)
    actions = job.handle(ResultReceived(forged, outputs_ok=True, now=T0 + 0.6))
    assert isinstance(actions[0], CancelAward) and "does not verify" in actions[0].reason
    assert isinstance(actions[1], SendAward) and actions[1].executor == E2


def test_lease_timer_waits_for_the_lease_to_end() -> None:
    job, _ = started(lease=LeaseTerms(max_jobs=100, until=T0 + 6))
    actions = awarded(job, bid(E1, 10, eta_ms=100))
    assert actions[1] == StartTimer(T0 + 6 + 0.2 + 1.0)
    assert job.handle(TimerFired(now=T0 + 5)) == []


def test_bid_flood_is_bounded() -> None:
    job = RequesterJob(request(), now=T0, policy=RequesterPolicy(max_bidders=2))
    job.start()
    for e in (E1, E2, E3):
        for price in range(10, 20):
            job.handle(BidReceived(bid(e, price), now=T0 + 0.1))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    # E3 came third and was not remembered; E1/E2's cheapest bids were kept.
    assert isinstance(actions[0], SendAward) and actions[0].executor in (E1, E2)
    assert actions[0].award.price == 10


_BID = st.builds(
    bid,
    st.sampled_from([E1, E2, E3]),
    price=st.integers(0, 1_200),
    eta_ms=st.integers(0, 12_000),
    expires_at=st.floats(T0, T0 + 3),
)


@settings(max_examples=100, deadline=None)
@given(bids=st.lists(_BID, max_size=14), data=st.data())
def test_arrival_order_never_changes_the_award(bids: list[Bid], data: st.DataObject) -> None:
    def award_for(order: list[Bid]) -> list[Any]:
        job, _ = started()
        for b in order:
            job.handle(BidReceived(b, now=T0 + 0.1))
        return job.handle(TimerFired(now=T0 + 0.5))

    assert award_for(bids) == award_for(data.draw(st.permutations(bids)))


# --- adaptive bid window -------------------------------------------------------------


def test_auction_closes_when_every_expected_bidder_has_bid() -> None:
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=frozenset(IDS[1:4]))
    job.start()
    assert job.handle(BidReceived(bid(E1, 300), now=T0 + 0.01)) == []
    assert job.handle(BidReceived(bid(E3, 200), now=T0 + 0.02)) == []
    actions = job.handle(BidReceived(bid(E2, 100), now=T0 + 0.03))
    # Closed at the third bid, 30 ms in, not at the window's end (T0 + 0.5); best bid wins.
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2
    assert actions[1] == StartTimer(T0 + 0.03 + 0.2 + 1.0)
    assert job.phase is Phase.AWARDED


def test_auction_waits_for_a_missing_expected_bidder_until_the_window_ends() -> None:
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=frozenset(IDS[1:4]))
    job.start()
    assert job.handle(BidReceived(bid(E1), now=T0 + 0.01)) == []
    assert job.handle(BidReceived(bid(E2), now=T0 + 0.02)) == []
    assert job.phase is Phase.COLLECTING
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[0], SendAward)


def test_banned_or_own_expected_bidders_are_not_waited_for() -> None:
    expected = frozenset({E1, E2, REQ})
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=expected, banned={E2})
    job.start()
    # A banned bidder's bid never closes the window, and never wins.
    assert job.handle(BidReceived(bid(E2, 1), now=T0 + 0.01)) == []
    actions = job.handle(BidReceived(bid(E1), now=T0 + 0.02))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1


@pytest.mark.parametrize("complete", [True, False])
def test_a_lone_server_closes_on_its_own_bid_only_when_the_lookup_found_nobody_else(
    complete: bool,
) -> None:
    # The I/O layer's lookup is fresh and names no other server (expected_complete, empty
    # expected set): our own quote closes the auction at once. Without a fresh lookup the
    # window is waited for (an unseen server may still bid).
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected_complete=complete)
    job.start()
    actions = job.handle(LocalBid(price=0, eta_ms=5, now=T0 + 0.001))
    if complete:
        assert isinstance(actions[0], RunLocally) and job.phase is Phase.AWARDED
    else:
        assert actions == [] and job.phase is Phase.COLLECTING


def test_expected_complete_still_waits_for_every_expected_server() -> None:
    job = RequesterJob(
        request(),
        now=T0,
        input_digest=INPUT_DIGEST,
        expected=frozenset({E1}),
        expected_complete=True,
    )
    job.start()
    assert job.handle(LocalBid(price=0, eta_ms=5, now=T0 + 0.001)) == []
    actions = job.handle(BidReceived(bid(E1, 300), now=T0 + 0.01))
    assert isinstance(actions[0], RunLocally)  # E1 has bid; our own free quote wins


def test_a_good_enough_bid_closes_the_auction_at_once() -> None:
    policy = RequesterPolicy(good_enough_price=150)
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, policy=policy)
    job.start()
    assert job.handle(BidReceived(bid(E1, 300), now=T0 + 0.01)) == []
    actions = job.handle(BidReceived(bid(E2, 150), now=T0 + 0.02))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2


def test_unusable_bids_never_close_the_window_early() -> None:
    # Both expected bidders bid, but the only bid is expired: wait for the window, not
    # an early re-auction.
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=frozenset({E1}))
    job.start()
    assert job.handle(BidReceived(bid(E1, expires_at=T0 + 0.01), now=T0 + 0.02)) == []
    assert job.phase is Phase.COLLECTING and job.request.round == 0


def test_close_early_off_waits_out_the_window() -> None:
    policy = RequesterPolicy(close_early=False, good_enough_price=10_000)
    job = RequesterJob(
        request(), now=T0, input_digest=INPUT_DIGEST, policy=policy, expected=frozenset({E1})
    )
    job.start()
    assert job.handle(BidReceived(bid(E1), now=T0 + 0.01)) == []
    assert job.phase is Phase.COLLECTING


# --- lease bookkeeping in the machine: InputSent / ResultArrived ------------------------

OUT = [content_digest({"y": bytes([i])}) for i in range(8)]
INS = [content_digest({"x": bytes([i])}) for i in range(8)]


def leased(max_jobs: int = 10) -> tuple[RequesterJob, SendAward]:
    job, _ = started(lease=LeaseTerms(max_jobs=max_jobs, until=T0 + 8))
    send = awarded(job, bid(E1, 30))[0]
    assert isinstance(send, SendAward)
    return job, send


def send_and_receive(job: RequesterJob, n: int, *, now: float = T0 + 0.6) -> None:
    for i in range(n):
        assert job.next_seq == i
        assert job.handle(InputSent(E1, i, INS[i], now)) == []
    for i in range(n):
        assert job.handle(ResultArrived(E1, i, OUT[i], now)) == []
    assert job.results_arrived == n


def lease_commitment(n: int, **over: Any) -> Signed[ResultCommitment]:
    fields: dict[str, Any] = {
        "price": 30 * n,
        "count": n,
        "input_digest": batch_digest(INS[:n]),
        "output_digest": batch_digest(OUT[:n]),
    }
    fields.update(over)
    return commitment(E1, **fields)


def test_lease_seqs_and_digests_are_the_machines() -> None:
    job, send = leased()
    send_and_receive(job, 3)
    c = lease_commitment(3)
    done = job.handle(ResultReceived(c, outputs_ok=True, now=T0 + 1))
    assert done == [Complete(commitment=c, award=send.award)]


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"output_digest": batch_digest(OUT[1:4])}, "output digest"),
        ({"input_digest": batch_digest(INS[1:4])}, "input digest"),
        ({"count": 2, "price": 60}, "2 jobs, 3 results"),
    ],
)
def test_a_lease_commitment_that_does_not_match_what_was_exchanged_is_refused(
    over: dict[str, Any], why: str
) -> None:
    job, _ = leased()
    send_and_receive(job, 3)
    actions = job.handle(ResultReceived(lease_commitment(3, **over), outputs_ok=True, now=T0 + 1))
    assert isinstance(actions[0], CancelAward) and why in actions[0].reason
    assert not any(isinstance(a, Complete) for a in actions)


def test_a_result_for_a_seq_never_sent_or_sent_twice_revokes_the_award() -> None:
    job, _ = leased()
    job.handle(InputSent(E1, 0, INS[0], T0 + 0.6))
    actions = job.handle(ResultArrived(E1, 5, OUT[5], T0 + 0.7))
    assert isinstance(actions[0], CancelAward) and "not asked for" in actions[0].reason
    job, _ = leased()
    send_and_receive(job, 1)
    actions = job.handle(ResultArrived(E1, 0, OUT[0], T0 + 0.7))
    assert isinstance(actions[0], CancelAward)


def test_a_revoked_executors_late_result_is_ignored() -> None:
    job, _ = leased()
    send_and_receive(job, 1)
    assert job.handle(ResultArrived(E2, 1, OUT[1], T0 + 0.7)) == []


# --- illegal (phase, event) pairs raise LocalProtocolError ----------------------------


def test_input_sent_without_a_live_award_is_a_local_error() -> None:
    job, _ = started()
    with pytest.raises(LocalProtocolError, match="without a live award"):
        job.handle(InputSent(E1, 0, INPUT_DIGEST, T0 + 0.1))  # still collecting bids
    awarded(job, bid(E1))
    with pytest.raises(LocalProtocolError, match="without a live award"):
        job.handle(InputSent(E2, 0, INPUT_DIGEST, T0 + 0.6))  # E2 holds no award
    job.handle(DeadlineReached(T0 + 11))
    assert job.phase is Phase.DONE
    with pytest.raises(LocalProtocolError):
        job.handle(InputSent(E1, 0, INPUT_DIGEST, T0 + 11))  # nothing after the end


def test_input_sent_with_the_wrong_seq_or_past_the_award_is_a_local_error() -> None:
    job, _ = leased(max_jobs=2)
    with pytest.raises(LocalProtocolError, match="expected 0"):
        job.handle(InputSent(E1, 1, INS[1], T0 + 0.6))
    job.handle(InputSent(E1, 0, INS[0], T0 + 0.6))
    job.handle(InputSent(E1, 1, INS[1], T0 + 0.6))
    with pytest.raises(LocalProtocolError, match="past the award"):
        job.handle(InputSent(E1, 2, INS[2], T0 + 0.6))


def test_a_single_jobs_input_must_be_the_announced_one() -> None:
    job, _ = started()
    awarded(job, bid(E1))
    with pytest.raises(LocalProtocolError, match="input digest"):
        job.handle(InputSent(E1, 0, INS[0], T0 + 0.6))


@pytest.mark.parametrize(
    "event",
    [
        BidReceived(bid(E1), T0),
        TimerFired(T0),
        AwardFailed(E1, "x", T0),
        ExecutorGone(E1, T0),
        DeadlineReached(T0),
        InputSent(E1, 0, INPUT_DIGEST, T0),
        ResultArrived(E1, 0, INPUT_DIGEST, T0),
    ],
)
def test_every_event_before_start_is_a_local_error(event: Any) -> None:
    job = RequesterJob(request(), now=T0)
    with pytest.raises(LocalProtocolError, match="start"):
        job.handle(event)


def test_events_carry_valid_digests_and_seqs() -> None:
    with pytest.raises(LocalProtocolError):
        InputSent(E1, -1, INPUT_DIGEST, T0)
    with pytest.raises(LocalProtocolError):
        ResultArrived(E1, 0, b"short", T0)


# --- fair exchange: cumulative acceptances on a lease ---------------------------------


def test_an_interim_commitment_matching_what_arrived_is_accepted() -> None:
    job, send = leased()
    send_and_receive(job, 2)
    interim = lease_commitment(2)
    assert job.handle(InterimReceived(interim, T0 + 1)) == [SendAcceptance(interim)]
    assert job.phase is Phase.AWARDED  # the lease goes on
    # The final commitment still covers everything.
    for i in (2, 3):
        job.handle(InputSent(E1, i, INS[i], T0 + 1))
        job.handle(ResultArrived(E1, i, OUT[i], T0 + 1))
    final = lease_commitment(4)
    assert job.handle(ResultReceived(final, outputs_ok=True, now=T0 + 2)) == [
        Complete(commitment=final, award=send.award)
    ]


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"count": 1, "price": 30, "input_digest": batch_digest(INS[:1])}, "1 jobs, 2 results"),
        ({"output_digest": batch_digest(OUT[2:4])}, "output digest"),
        ({"price": 999}, "asks 999"),
    ],
)
def test_a_lying_interim_commitment_revokes_the_award(over: dict[str, Any], why: str) -> None:
    job, _ = leased()
    send_and_receive(job, 2)
    actions = job.handle(InterimReceived(lease_commitment(2, **over), T0 + 1))
    assert isinstance(actions[0], CancelAward) and why in actions[0].reason
    assert not any(isinstance(a, SendAcceptance) for a in actions)


def test_an_interim_is_never_accepted_twice_nor_on_a_single_job() -> None:
    job, _ = leased()
    send_and_receive(job, 2)
    interim = lease_commitment(2)
    job.handle(InterimReceived(interim, T0 + 1))
    again = job.handle(InterimReceived(interim, T0 + 1))
    assert isinstance(again[0], CancelAward) and "already accepted" in again[0].reason
    single, _ = started()
    awarded(single, bid(E1))
    single.handle(InputSent(E1, 0, INPUT_DIGEST, T0 + 0.6))
    single.handle(ResultArrived(E1, 0, OUT[0], T0 + 0.6))
    c = commitment(E1, output_digest=OUT[0])
    actions = single.handle(InterimReceived(c, T0 + 1))
    assert isinstance(actions[0], CancelAward) and "single job" in actions[0].reason


def test_a_cold_mesh_with_expected_servers_keeps_auctioning_until_the_deadline() -> None:
    """Servers are known but none has bid yet (gossip mesh still forming after start):
    the job keeps auctioning past ``max_rounds`` while the deadline allows, then fails
    at the deadline, never after 3 rounds of 0.5 s with 10 s left."""
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=frozenset({E1}))
    job.start()
    now = T0
    for round_ in range(1, 19):  # 18 more windows of 0.5 s fit before T0 + 10
        now += 0.5
        actions = job.handle(TimerFired(now=now))
        assert isinstance(actions[0], Publish) and actions[0].request.round == round_
    actions = job.handle(TimerFired(now=now + 0.5))
    assert isinstance(actions[0], Fail) and isinstance(actions[0].error, NoExecutors)
    # A bid that finally arrives in a later round wins as usual.
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=frozenset({E1}))
    job.start()
    for i in range(1, 5):
        job.handle(TimerFired(now=T0 + 0.5 * i))
    # Every expected server has bid: the adaptive window closes on that bid.
    actions = job.handle(BidReceived(bid(E1, 100), now=T0 + 2.1))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1


def test_rounds_spent_waiting_for_a_cold_mesh_do_not_use_up_the_re_auctions() -> None:
    """The first bids came only in round 3 (a busy box): both bidders then fail their
    awards, and the job still re-auctions (``max_rounds`` counts rounds after the first
    bid), instead of failing with 20 s left."""
    job = RequesterJob(
        request(deadline=T0 + 30.0),
        now=T0,
        input_digest=INPUT_DIGEST,
        expected=frozenset({E1, E2}),
    )
    job.start()
    for i in (1, 2):
        actions = job.handle(TimerFired(now=T0 + 0.5 * i))
        assert isinstance(actions[0], Publish) and actions[0].request.round == i
    job.handle(BidReceived(bid(E1, 100, expires_at=T0 + 20), now=T0 + 1.1))
    actions = job.handle(BidReceived(bid(E2, 200, expires_at=T0 + 20), now=T0 + 1.2))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1
    actions = job.handle(AwardFailed(E1, "cannot reach the executor", now=T0 + 6))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E2
    actions = job.handle(AwardFailed(E2, "no result", now=T0 + 11))
    assert isinstance(actions[0], Publish) and actions[0].request.round == 3


def test_a_cold_mesh_re_auctions_at_most_up_to_the_wires_last_round() -> None:
    """A short window and a long deadline: hundreds of cold rounds, each with a fresh
    nonce, never a round the wire refuses (``MAX_ROUND``); then the job fails."""
    job = RequesterJob(
        request(deadline=T0 + 600.0, bid_window=0.1),
        now=T0,
        input_digest=INPUT_DIGEST,
        expected=frozenset({E1}),
    )
    job.start()
    nonces, now, actions = set(), T0, []
    for _ in range(MAX_ROUND + 5):
        now += 0.1
        actions = job.handle(TimerFired(now=now))
        if not isinstance(actions[0], Publish):
            break
        nonces.add(actions[0].request.nonce)
        JobRequest.from_bytes(sign_message(REQ_KEY, actions[0].request).to_bytes(), now=now)
    assert job.round == MAX_ROUND and len(nonces) == MAX_ROUND
    assert isinstance(actions[0], Fail) and isinstance(actions[0].error, NoExecutors)
