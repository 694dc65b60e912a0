"""Self-award in RequesterJob: the requester's own executor competes in its own auction.

A local bid (``LocalBid``) is ranked with remote bids by the same rules; when it wins the
job runs locally (``RunLocally``) and ends with ``CompleteLocally``: no Award, no
commitment, no receipt. Bids from the wire in the requester's name never count.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_requester import (
    CID,
    E1,
    E2,
    INPUT_DIGEST,
    JOB,
    REQ,
    T0,
    awarded,
    bid,
    commitment,
    request,
    started,
)

from protocols.errors import LocalProtocolError
from protocols.executor import ExecutorConfig, ExecutorState, ModelOffer
from protocols.market import LeaseTerms
from protocols.requester import (
    AwardFailed,
    BidReceived,
    CancelAward,
    CompleteLocally,
    DeadlineExceeded,
    Fail,
    InputSent,
    LocalBid,
    LocalFinished,
    NoExecutors,
    Phase,
    RequesterJob,
    ResultReceived,
    RunLocally,
    SendAward,
    StartTimer,
    TimerFired,
)
from protocols.selection import bid_fits, rank_bids


def local(price: int = 100, eta_ms: int = 100, now: float = T0 + 0.1) -> LocalBid:
    return LocalBid(price=price, eta_ms=eta_ms, now=now)


def test_alone_the_local_bid_wins_and_completes_without_a_receipt() -> None:
    job, _ = started()
    assert job.handle(local()) == []  # nobody expected: the window runs out first
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert len(actions) == 2
    run, timer = actions
    assert isinstance(run, RunLocally) and run.bid.executor == REQ and run.bid.price == 100
    assert timer == StartTimer(T0 + 0.5 + 0.2 + 1.0)
    assert job.phase is Phase.AWARDED and job.awarded_to == REQ
    done = job.handle(LocalFinished(outputs_ok=True, now=T0 + 0.6))
    assert done == [CompleteLocally(run.bid)]
    assert job.outcome == done[0] and job.phase is Phase.DONE
    # Exactly one outcome: later events are ignored.
    assert job.handle(LocalFinished(outputs_ok=True, now=T0 + 0.7)) == []


def test_a_cheaper_remote_bid_beats_the_local_one() -> None:
    job, _ = started()
    job.handle(local(price=500))
    actions = awarded(job, bid(E1, 100))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1


def test_a_cheaper_local_bid_beats_remote_ones() -> None:
    job, _ = started()
    job.handle(local(price=50))
    actions = awarded(job, bid(E1, 100), bid(E2, 200))
    assert isinstance(actions[0], RunLocally)


def test_local_bid_counts_as_in_for_the_adaptive_window() -> None:
    """With one expected remote server, its bid closes the auction at once (the local
    bid is already in); the cheaper of the two wins."""
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, expected=frozenset({E1}))
    job.start()
    assert job.handle(local(price=300)) == []  # E1 has not bid yet
    actions = job.handle(BidReceived(bid(E1, 100), now=T0 + 0.2))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1


def test_a_failed_or_slow_local_run_falls_back_to_the_next_bid() -> None:
    job, _ = started()
    job.handle(local(price=10))
    actions = awarded(job, bid(E1, 100))
    assert isinstance(actions[0], RunLocally)
    actions = job.handle(AwardFailed(REQ, "local run failed: boom", now=T0 + 0.6))
    assert isinstance(actions[0], SendAward) and actions[0].executor == E1
    assert job.attempts == [(REQ, "local run failed: boom")]

    job, _ = started()
    job.handle(local(price=10, eta_ms=100))
    awarded(job, bid(E1, 100))
    actions = job.handle(TimerFired(now=T0 + 0.5 + 1.2))  # past eta x 2 + grace
    assert isinstance(actions[0], CancelAward) and actions[0].executor == REQ
    assert isinstance(actions[1], SendAward) and actions[1].executor == E1
    # The cancelled local run's late result is ignored.
    assert job.handle(LocalFinished(outputs_ok=True, now=T0 + 1.8)) == []

    job, _ = started()
    job.handle(local(price=10))
    awarded(job, bid(E1, 100))
    actions = job.handle(LocalFinished(outputs_ok=False, now=T0 + 0.6, problem="bad shape"))
    assert actions[0] == CancelAward(REQ, "bad shape")
    assert isinstance(actions[1], SendAward) and actions[1].executor == E1


def test_only_a_failed_local_run_means_executors_failed() -> None:
    job, _ = started(deadline=T0 + 0.9)  # no room for a second auction round
    job.handle(local())
    awarded(job)
    actions = job.handle(AwardFailed(REQ, "local run failed", now=T0 + 0.6))
    assert len(actions) == 1 and isinstance(actions[0], Fail)


def test_a_wire_bid_in_the_requesters_name_never_counts() -> None:
    """Self-dealing guard: only LocalBid may put the requester's own bid in the auction.
    (Fails if ``_on_bid`` lets a bid with executor == requester through.)"""
    job, _ = started()
    assert job.handle(BidReceived(bid(REQ, 1), now=T0 + 0.1)) == []
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert not any(isinstance(a, RunLocally | SendAward) for a in actions)
    assert job.bidders == frozenset()


def test_leases_and_banned_requesters_never_run_locally() -> None:
    lease = LeaseTerms(max_jobs=10, until=T0 + 5)
    job, _ = started(lease=lease)
    assert job.handle(local()) == []
    assert job.bidders == frozenset()
    job = RequesterJob(request(), now=T0, input_digest=INPUT_DIGEST, banned={REQ})
    job.start()
    assert job.handle(local()) == []
    assert job.bidders == frozenset()


def test_no_inputs_are_sent_and_no_commitment_is_accepted_on_a_local_run() -> None:
    job, _ = started()
    job.handle(local())
    job.handle(TimerFired(now=T0 + 0.5))
    with pytest.raises(LocalProtocolError):
        job.handle(InputSent(REQ, 0, INPUT_DIGEST, now=T0 + 0.6))
    # A (validly signed) commitment by someone else is not our local run's result.
    assert job.handle(ResultReceived(commitment(E1), outputs_ok=True, now=T0 + 0.6)) == []
    assert job.phase is Phase.AWARDED


def test_local_bid_over_the_max_price_or_too_slow_does_not_fit() -> None:
    job, _ = started()
    job.handle(local(price=1_001))  # max_price is 1000
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert not any(isinstance(a, RunLocally) for a in actions)

    job, _ = started(deadline=T0 + 1.0)
    job.handle(local(eta_ms=5_000))
    actions = job.handle(TimerFired(now=T0 + 0.5))
    assert isinstance(actions[-1], Fail) and isinstance(actions[-1].error, NoExecutors)


def test_selection_admits_the_requester_only_with_local_ok() -> None:
    r = request()
    own = bid(REQ)
    assert not bid_fits(r, own, now=T0)
    assert bid_fits(r, own, now=T0, local_ok=True)
    assert rank_bids(r, [own], now=T0) == []
    assert rank_bids(r, [own], now=T0, local_ok=True) == [own]


def test_executor_quote_is_the_bid_it_would_send_others() -> None:
    cfg: dict[str, Any] = {"peer_id": REQ, "models": {CID: ModelOffer(price=70, p50_ms=30)}}
    state = ExecutorState(ExecutorConfig(**cfg))
    assert state.quote(request(), T0) == (70, 30 + 20)
    assert state.quote(request(max_price=10), T0) == "price 70 is over the max price 10"
    assert state.quote(request(model_cid="0" * 64), T0) == "model not served"
    # ...and quoting records no open bid (awards to ourselves never go through the state).
    assert state.job_phase(JOB).value == "unknown"


def test_a_local_result_after_the_deadline_is_not_accepted() -> None:
    """As for a remote result (fails if ``_on_local_finished`` drops its deadline check)."""
    job, _ = started()  # deadline T0 + 10
    job.handle(local())
    assert isinstance(job.handle(TimerFired(now=T0 + 0.5))[0], RunLocally)
    actions = job.handle(LocalFinished(outputs_ok=True, now=T0 + 10.5))
    assert isinstance(actions[0], CancelAward) and actions[0].executor == REQ
    assert isinstance(actions[-1], Fail) and isinstance(actions[-1].error, DeadlineExceeded)
