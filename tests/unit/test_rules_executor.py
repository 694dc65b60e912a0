"""Rules of the executor's state machine (protocols/executor.py) that no other test held.

The executor decides what it bids, which awards it takes, what runs and what it commits
to (and so is paid for). Found by mutation testing (issue 17, docs/testing.md): each test
fails when its rule is removed.
"""

from __future__ import annotations

import pytest

from protocols.errors import LocalProtocolError, ProtocolError
from protocols.executor import (
    Abandon,
    AcceptAward,
    AwardReceived,
    BatchCloseReceived,
    Declined,
    ExecutionFailed,
    ExecutionFinished,
    ExecutorState,
    InputReceived,
    JobPhase,
    ModelOffer,
    PublishBid,
    RejectAward,
    RequestSeen,
    SendError,
    SendInterim,
    SendResult,
    Tick,
)
from protocols.market import MAX_ETA_MS, LeaseTerms
from tests.unit.test_executor import CID, JOB, T0, award_for, config, request, won

D1, D2 = b"\1" * 32, b"\2" * 32


def lease(n: int = 5, window: int = 0) -> LeaseTerms:
    return LeaseTerms(max_jobs=n, until=T0 + 8, window=window)


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_open_bids", "max_finished", "max_unaccepted"])
def test_each_count_in_the_config_is_at_least_1(name: str) -> None:
    assert getattr(config(**{name: 1}), name) == 1
    with pytest.raises(LocalProtocolError):
        config(**{name: 0})


def test_bid_validity_is_at_most_an_hour_and_clock_skew_at_most_10_minutes() -> None:
    assert config(bid_validity_s=3600).bid_validity_s == 3600
    assert config(clock_skew_s=600).clock_skew_s == 600
    with pytest.raises(LocalProtocolError):
        config(bid_validity_s=3600.5)
    with pytest.raises(LocalProtocolError):
        config(clock_skew_s=600.5)


def test_a_model_offers_p50_is_at_most_max_eta_ms() -> None:
    assert ModelOffer(price=1, p50_ms=MAX_ETA_MS).p50_ms == MAX_ETA_MS
    with pytest.raises(ProtocolError):
        ModelOffer(price=1, p50_ms=MAX_ETA_MS + 1)


def test_an_execution_may_take_0_ms() -> None:
    assert ExecutionFinished(JOB, 0, D1, D2, 0, T0).compute_ms == 0


# --- bidding -----------------------------------------------------------------------------


def one_second() -> ExecutorState:
    """p50 1000 ms, no margin, idle: its eta is exactly 1.0 s."""
    return ExecutorState(config(models={CID: ModelOffer(price=250, p50_ms=1000)}, eta_margin_ms=0))


def test_a_bid_is_made_when_the_eta_exactly_meets_the_deadline() -> None:
    actions = one_second().handle(RequestSeen(request(deadline=T0 + 1.0), now=T0))
    assert isinstance(actions[0], PublishBid) and actions[0].bid.eta_ms == 1000


def test_no_bid_when_the_eta_misses_the_deadline_by_half_a_millisecond() -> None:
    actions = one_second().handle(RequestSeen(request(deadline=T0 + 0.9995), now=T0))
    assert isinstance(actions[0], Declined)


def test_a_bid_is_made_at_exactly_the_max_price_and_the_input_limit() -> None:
    state = ExecutorState(config(max_input_bytes=32))
    actions = state.handle(RequestSeen(request(max_price=250, input_bytes=32), now=T0))
    assert isinstance(actions[0], PublishBid) and actions[0].bid.price == 250


def test_a_new_round_replaces_the_open_bid_even_at_the_open_bid_cap() -> None:
    state = ExecutorState(config(max_open_bids=1))
    assert isinstance(state.handle(RequestSeen(request(), now=T0))[0], PublishBid)
    again = state.handle(RequestSeen(request(round=1), now=T0 + 0.1))
    assert isinstance(again[0], PublishBid)
    assert isinstance(state.handle(RequestSeen(request(b"\x22" * 16), now=T0))[0], Declined)


def test_a_job_with_an_open_bid_is_in_the_bidding_phase() -> None:
    state = ExecutorState(config())
    assert state.job_phase(JOB) is JobPhase.UNKNOWN
    state.handle(RequestSeen(request(), now=T0))
    assert state.job_phase(JOB) is JobPhase.BIDDING


def test_a_bid_is_kept_up_to_and_including_its_expiry() -> None:
    state = ExecutorState(config())
    bid = state.handle(RequestSeen(request(), now=T0))[0]
    assert isinstance(bid, PublishBid)
    expiry = bid.bid.expires_at
    assert state.handle(Tick(expiry)) == []
    assert state.open_bid(JOB) is not None
    aw = award_for(request(), deadline=T0 + 10)
    assert state.handle(AwardReceived(aw, now=expiry)) == [AcceptAward(aw)]


# --- awards and their errors ---------------------------------------------------------------


def test_a_refused_award_is_answered_with_an_error_about_job_0() -> None:
    state = ExecutorState(config())
    actions = state.handle(AwardReceived(award_for(request()), now=T0))  # we never bid
    assert isinstance(actions[0], RejectAward)
    assert actions[0].error.seq == 0 and actions[0].error.code == "bad-award"


def test_errors_about_a_lease_job_name_that_job() -> None:
    state = ExecutorState(config())
    won(state, request(lease=lease(3)))
    state.handle(InputReceived(JOB, 1, now=T0 + 1))
    for seq, now, code in (
        (1, T0 + 1, "duplicate"),
        (3, T0 + 1, "bad-input"),
        (2, T0 + 9, "deadline"),
    ):
        r = state.handle(InputReceived(JOB, seq, now=now))
        assert isinstance(r[0], SendError)
        assert (r[0].error.code, r[0].error.seq) == (code, seq)
    r = state.handle(InputReceived(b"\x44" * 16, 2, now=T0 + 1))  # no award at all
    assert isinstance(r[0], SendError) and r[0].error.seq == 2


def test_a_failure_reason_is_cut_to_1024_characters() -> None:
    state = ExecutorState(config())
    won(state, request())
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    r = state.handle(ExecutionFailed(JOB, 0, "x" * 5000, T0 + 1))
    assert isinstance(r[0], SendError) and r[0].error.message == "x" * 1024


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("bad-input", "bad-input"),
        ("deadline", "deadline"),
        ("internal", "internal"),
        ("busy", "internal"),
        ("duplicate", "internal"),
        ("made-up", "internal"),
    ],
)
def test_a_failure_is_sent_as_bad_input_deadline_or_internal(given: str, sent: str) -> None:
    state = ExecutorState(config())
    won(state, request())
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    r = state.handle(ExecutionFailed(JOB, 0, "why", T0 + 1, code=given))
    assert isinstance(r[0], SendError) and r[0].error.code == sent


# --- running and committing --------------------------------------------------------------


def test_a_second_report_for_a_finished_lease_job_is_a_local_error() -> None:
    state = ExecutorState(config())
    won(state, request(lease=lease()))
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    state.handle(ExecutionFinished(JOB, 0, D1, D2, 1, T0 + 1))
    with pytest.raises(LocalProtocolError):
        state.handle(ExecutionFinished(JOB, 0, D1, D2, 1, T0 + 1))
    with pytest.raises(LocalProtocolError):
        state.handle(ExecutionFailed(JOB, 0, "late", T0 + 1))


def test_a_lease_is_not_committed_while_a_started_job_still_runs() -> None:
    state = ExecutorState(config())
    won(state, request(lease=lease()))
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    state.handle(InputReceived(JOB, 1, now=T0 + 1))
    state.handle(ExecutionFinished(JOB, 0, D1, D2, 1, T0 + 1))
    r = state.handle(BatchCloseReceived(JOB, 1, now=T0 + 2))
    assert len(r) == 1 and isinstance(r[0], SendError) and r[0].error.code == "bad-input"


def test_a_lease_that_ends_with_no_result_commits_nothing_and_is_abandoned() -> None:
    state = ExecutorState(config())
    won(state, request(lease=lease()))
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    state.handle(ExecutionFailed(JOB, 0, "boom", T0 + 1))
    assert state.handle(BatchCloseReceived(JOB, 0, now=T0 + 2)) == [Abandon(JOB, "no job finished")]
    assert state.job_phase(JOB) is JobPhase.FINISHED


@pytest.mark.parametrize("window", [1, 2, 3])
def test_a_small_window_asks_for_acceptance_after_the_first_result(window: int) -> None:
    """Half the window, at least 1, rounded down: 1, 2 and 3 all ask after one result."""
    state = ExecutorState(config())
    won(state, request(lease=lease(10, window=window)))
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    r = state.handle(ExecutionFinished(JOB, 0, D1, D2, 1, T0 + 1))
    assert r[0] == SendResult(JOB, 0) and isinstance(r[1], SendInterim)
    assert r[1].commitment.count == 1


def test_finished_job_ids_are_remembered_up_to_max_finished() -> None:
    state = ExecutorState(config(max_finished=2))
    jobs = [bytes([0x50 + i]) * 16 for i in range(3)]
    for job in jobs[:2]:
        won(state, request(job))
        state.handle(InputReceived(job, 0, now=T0 + 1))
        state.handle(ExecutionFinished(job, 0, D1, D2, 1, T0 + 1))
    for job in jobs[:2]:
        assert state.job_phase(job) is JobPhase.FINISHED
        assert isinstance(state.handle(RequestSeen(request(job), now=T0 + 2))[0], Declined)
    won(state, request(jobs[2]))
    state.handle(InputReceived(jobs[2], 0, now=T0 + 1))
    state.handle(ExecutionFinished(jobs[2], 0, D1, D2, 1, T0 + 1))
    assert state.job_phase(jobs[0]) is JobPhase.UNKNOWN  # the oldest is forgotten
    assert state.job_phase(jobs[1]) is JobPhase.FINISHED


def test_an_award_is_abandoned_only_after_its_deadline_and_every_expired_one_is() -> None:
    state = ExecutorState(config(clock_skew_s=1.0))
    other = request(b"\x66" * 16)
    won(state, request())
    won(state, other)
    assert state.handle(Tick(T0 + 10 + 1.0)) == []  # exactly the deadline + skew
    ended = state.handle(Tick(T0 + 10 + 1.001))
    assert sorted(a.job_id for a in ended if isinstance(a, Abandon)) == sorted([JOB, other.job_id])


def test_an_event_of_no_known_kind_is_a_bug_that_raises() -> None:
    state = ExecutorState(config())
    with pytest.raises(AssertionError):
        state.handle(object())  # type: ignore[arg-type]
