"""ExecutorState: when to bid, which awards to take, running each job once, commitments."""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
import pytest

from protocols.errors import LocalProtocolError
from protocols.executor import (
    Abandon,
    AcceptanceReceived,
    AcceptAward,
    AwardReceived,
    BatchCloseReceived,
    ConnectionLost,
    Declined,
    ExecutionFailed,
    ExecutionFinished,
    ExecutorConfig,
    ExecutorState,
    InputReceived,
    InputRejected,
    ModelOffer,
    PublishBid,
    RejectAward,
    RequestSeen,
    SendCommitment,
    SendError,
    SendInterim,
    SendResult,
    StartExecution,
    Tick,
)
from protocols.identity import peer_id_from_public_key
from protocols.market import Award, JobRequest, LeaseTerms, TensorMeta
from protocols.receipt import Receipt, batch_digest, commit, content_digest

KEYS = [nacl.signing.SigningKey(bytes([i]) * 32) for i in range(1, 4)]
ME_KEY = KEYS[0]
ME, REQ, OTHER = (peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS)
CID = hashlib.sha256(b"tiny").hexdigest()
UNSERVED = hashlib.sha256(b"nope").hexdigest()
JOB = b"\x11" * 16
T0 = 5_000.0


def config(**over: Any) -> ExecutorConfig:
    fields: dict[str, Any] = {
        "peer_id": ME,
        "models": {CID: ModelOffer(price=250, p50_ms=40)},
        "max_concurrent": 2,
        "max_queue": 2,
        "bid_validity_s": 2.0,
        "eta_margin_ms": 10,
    }
    fields.update(over)
    return ExecutorConfig(**fields)


def request(job_id: bytes = JOB, **over: Any) -> JobRequest:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "requester": REQ,
        "model_cid": CID,
        "inputs": (TensorMeta("x", "float32", (1, 8)),),
        "input_bytes": 32,
        "max_price": 1_000,
        "deadline": T0 + 10,
        "bid_window": 0.2,
    }
    fields.update(over)
    return JobRequest(**fields)


def award_for(req: JobRequest, **over: Any) -> Award:
    fields: dict[str, Any] = {
        "job_id": req.job_id,
        "requester": req.requester,
        "executor": ME,
        "model_cid": req.model_cid,
        "price": 250,
        "deadline": req.deadline,
        "lease": req.lease,
    }
    fields.update(over)
    return Award(**fields)


def won(state: ExecutorState, req: JobRequest, now: float = T0 + 0.3) -> Award:
    bid_actions = state.handle(RequestSeen(req, now=T0))
    assert isinstance(bid_actions[0], PublishBid)
    aw = award_for(req)
    assert state.handle(AwardReceived(aw, now=now)) == [AcceptAward(aw)]
    return aw


# --- bidding ------------------------------------------------------------------------


def test_bids_with_configured_price_and_measured_eta() -> None:
    state = ExecutorState(config())
    actions = state.handle(RequestSeen(request(), now=T0))
    assert len(actions) == 1 and isinstance(actions[0], PublishBid)
    b = actions[0].bid
    assert (b.job_id, b.executor, b.price, b.eta_ms) == (JOB, ME, 250, 50)
    assert b.expires_at == T0 + 2.0
    assert state.open_bid(JOB) == b


def test_eta_grows_with_the_queue() -> None:
    state = ExecutorState(config())
    won(state, request(b"\x01" * 16))
    won(state, request(b"\x02" * 16))
    b = state.handle(RequestSeen(request(), now=T0))[0]
    assert isinstance(b, PublishBid) and b.bid.eta_ms == 40 * 2 + 10


def test_bid_expiry_capped_by_deadline() -> None:
    state = ExecutorState(config())
    b = state.handle(RequestSeen(request(deadline=T0 + 1), now=T0))[0]
    assert isinstance(b, PublishBid) and b.bid.expires_at == T0 + 1


@pytest.mark.parametrize(
    ("req", "why"),
    [
        (request(model_cid=UNSERVED), "not served"),
        (request(max_price=249), "over the max price"),
        (request(requester=ME), "own request"),
        (request(deadline=T0 + 0.049), "misses the deadline"),
        (request(input_bytes=10**7), "over the limit"),
    ],
)
def test_declines(req: JobRequest, why: str) -> None:
    actions = ExecutorState(config(max_input_bytes=10**6)).handle(RequestSeen(req, now=T0))
    assert len(actions) == 1 and isinstance(actions[0], Declined) and why in actions[0].reason


def test_declines_without_capacity() -> None:
    state = ExecutorState(config(max_concurrent=1, max_queue=0))
    won(state, request(b"\x01" * 16))
    actions = state.handle(RequestSeen(request(), now=T0))
    assert isinstance(actions[0], Declined) and "capacity" in actions[0].reason


def test_open_bids_are_bounded() -> None:
    state = ExecutorState(config(max_open_bids=2))
    for i in range(2):
        assert isinstance(
            state.handle(RequestSeen(request(bytes([i]) * 16), now=T0))[0], PublishBid
        )
    assert isinstance(state.handle(RequestSeen(request(), now=T0))[0], Declined)
    # Once the old bids expired there is room again.
    later = T0 + 3
    assert isinstance(
        state.handle(RequestSeen(request(deadline=later + 5), now=later))[0], PublishBid
    )


# --- awards ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "code", "why"),
    [
        ({"price": 251}, "bad-award", "not our bid"),
        ({"executor": OTHER}, "bad-award", "not this executor"),
        ({"requester": OTHER}, "bad-award", "another requester"),
        ({"model_cid": UNSERVED}, "bad-award", "another requester or model"),
        ({"lease": LeaseTerms(5, T0 + 5)}, "bad-award", "lease terms"),
        ({"deadline": T0 + 11}, "bad-award", "later than the request"),
    ],
)
def test_awards_must_match_our_bid(over: dict[str, Any], code: str, why: str) -> None:
    state = ExecutorState(config())
    req = request()
    state.handle(RequestSeen(req, now=T0))
    actions = state.handle(AwardReceived(award_for(req, **over), now=T0 + 0.3))
    assert len(actions) == 1 and isinstance(actions[0], RejectAward)
    assert actions[0].error.code == code and why in actions[0].error.message
    assert actions[0].error.executor == ME


def test_award_without_bid_after_expiry_or_deadline_refused() -> None:
    state = ExecutorState(config())
    req = request()
    r = state.handle(AwardReceived(award_for(req), now=T0))
    assert isinstance(r[0], RejectAward) and "no bid" in r[0].error.message
    state.handle(RequestSeen(req, now=T0))
    r = state.handle(AwardReceived(award_for(req), now=T0 + 2.01))
    assert isinstance(r[0], RejectAward) and "expired" in r[0].error.message
    short = request(b"\x22" * 16, deadline=T0 + 1)
    state.handle(RequestSeen(short, now=T0))
    r = state.handle(AwardReceived(award_for(short), now=T0 + 1))
    assert isinstance(r[0], RejectAward) and r[0].error.code == "deadline"


def test_award_refused_when_full() -> None:
    state = ExecutorState(config(max_concurrent=1, max_queue=0))
    a, b = request(b"\x01" * 16), request(b"\x02" * 16)
    state.handle(RequestSeen(a, now=T0))
    state.handle(RequestSeen(b, now=T0))
    assert isinstance(state.handle(AwardReceived(award_for(a), now=T0))[0], AcceptAward)
    r = state.handle(AwardReceived(award_for(b), now=T0))
    assert isinstance(r[0], RejectAward) and r[0].error.code == "busy"


# --- running ----------------------------------------------------------------------------


def test_single_job_runs_once_and_commits() -> None:
    state = ExecutorState(config())
    aw = won(state, request())
    assert state.active == 1 and state.awarded_jobs == {JOB}
    assert state.handle(InputReceived(JOB, 0, now=T0 + 0.4)) == [StartExecution(JOB, 0)]
    dup = state.handle(InputReceived(JOB, 0, now=T0 + 0.4))
    assert isinstance(dup[0], SendError) and dup[0].error.code == "duplicate"
    ins, outs = content_digest("in"), content_digest("out")
    actions = state.handle(ExecutionFinished(JOB, 0, ins, outs, 37, now=T0 + 0.5))
    # Commitment first, then the result (fair exchange: the claim is fixed before delivery).
    assert actions[1] == SendResult(JOB, 0)
    assert isinstance(actions[0], SendCommitment)
    c = actions[0].commitment
    assert (c.job_id, c.requester, c.executor, c.price, c.count) == (JOB, REQ, ME, aw.price, 1)
    assert (c.input_digest, c.output_digest, c.compute_ms) == (ins, outs, 37)
    assert state.active == 0
    # The commitment signs and becomes a valid receipt.
    Receipt.create(KEYS[1], commit(ME_KEY, c)).verify()
    # The job never runs again: not on a replayed input, not on a new auction of the same id.
    again = state.handle(InputReceived(JOB, 0, now=T0 + 0.6))
    assert isinstance(again[0], SendError) and again[0].error.code == "duplicate"
    assert isinstance(state.handle(RequestSeen(request(), now=T0 + 0.6))[0], Declined)
    r = state.handle(AwardReceived(aw, now=T0 + 0.6))
    assert isinstance(r[0], RejectAward) and r[0].error.code == "duplicate"


def test_input_rules() -> None:
    state = ExecutorState(config())
    r = state.handle(InputReceived(JOB, 0, now=T0))
    assert isinstance(r[0], SendError) and r[0].error.code == "bad-award"
    won(state, request(deadline=T0 + 1))
    r = state.handle(InputReceived(JOB, 1, now=T0 + 0.5))
    assert isinstance(r[0], SendError) and "beyond" in r[0].error.message
    r = state.handle(InputReceived(JOB, 0, now=T0 + 1))
    assert isinstance(r[0], SendError) and r[0].error.code == "deadline"


def test_failed_execution_sends_error_and_frees_the_slot() -> None:
    state = ExecutorState(config())
    won(state, request())
    state.handle(InputReceived(JOB, 0, now=T0 + 0.4))
    actions = state.handle(ExecutionFailed(JOB, 0, "onnxruntime: bad shape", now=T0 + 0.5))
    assert isinstance(actions[0], SendError) and actions[0].error.code == "internal"
    assert actions[1] == Abandon(JOB, "the job failed")
    assert state.active == 0
    # A late finish for the failed job is ignored.
    assert state.handle(ExecutionFinished(JOB, 0, b"\0" * 32, b"\0" * 32, 1, T0 + 0.6)) == []


def test_connection_lost_frees_the_slot_and_drops_results() -> None:
    state = ExecutorState(config())
    won(state, request())
    state.handle(InputReceived(JOB, 0, now=T0 + 0.4))
    assert state.handle(ConnectionLost(JOB, now=T0 + 0.45)) == []
    assert state.active == 0
    assert state.handle(ExecutionFinished(JOB, 0, b"\0" * 32, b"\0" * 32, 1, T0 + 0.5)) == []


def test_tick_abandons_awards_past_deadline() -> None:
    state = ExecutorState(config())
    won(state, request(deadline=T0 + 1))
    assert state.handle(Tick(now=T0 + 0.9)) == []
    assert state.handle(Tick(now=T0 + 1.1)) == [Abandon(JOB, "the award's deadline passed")]
    assert state.active == 0


# --- leases ---------------------------------------------------------------------------------


def test_lease_batch_commitment() -> None:
    state = ExecutorState(config())
    req = request(lease=LeaseTerms(max_jobs=5, until=T0 + 8))
    aw = won(state, req)
    ins = [content_digest(("in", i)) for i in range(3)]
    outs = [content_digest(("out", i)) for i in range(3)]
    for i in range(3):
        assert state.handle(InputReceived(JOB, i, now=T0 + 1)) == [StartExecution(JOB, i)]
    # Finishing out of order is fine: digests are folded in job order.
    for i in (2, 0, 1):
        assert state.handle(ExecutionFinished(JOB, i, ins[i], outs[i], 10, T0 + 2)) == [
            SendResult(JOB, i)
        ]
    r = state.handle(BatchCloseReceived(JOB, 2, now=T0 + 2))
    assert isinstance(r[0], SendError) and "close says 2" in r[0].error.message
    actions = state.handle(BatchCloseReceived(JOB, 3, now=T0 + 2))
    assert len(actions) == 1 and isinstance(actions[0], SendCommitment)
    c = actions[0].commitment
    assert c.count == 3 and c.price == 3 * aw.price and c.compute_ms == 30
    assert c.input_digest == batch_digest(ins) and c.output_digest == batch_digest(outs)
    assert state.active == 0


def test_lease_commits_when_full_and_stops_at_until() -> None:
    state = ExecutorState(config())
    won(state, request(lease=LeaseTerms(max_jobs=2, until=T0 + 4)))
    state.handle(InputReceived(JOB, 0, now=T0 + 1))
    state.handle(InputReceived(JOB, 1, now=T0 + 1))
    state.handle(ExecutionFinished(JOB, 0, b"\1" * 32, b"\2" * 32, 1, T0 + 1))
    actions = state.handle(ExecutionFinished(JOB, 1, b"\3" * 32, b"\4" * 32, 1, T0 + 1))
    assert isinstance(actions[-1], SendCommitment) and actions[-1].commitment.count == 2
    other = request(b"\x33" * 16, lease=LeaseTerms(max_jobs=9, until=T0 + 4))
    won(state, other)
    r = state.handle(InputReceived(other.job_id, 0, now=T0 + 4))
    assert isinstance(r[0], SendError) and "lease is over" in r[0].error.message


def test_lease_with_a_failed_job_commits_the_rest() -> None:
    state = ExecutorState(config())
    won(state, request(lease=LeaseTerms(max_jobs=5, until=T0 + 8)))
    for i in range(3):
        state.handle(InputReceived(JOB, i, now=T0 + 1))
    state.handle(ExecutionFinished(JOB, 0, b"\1" * 32, b"\2" * 32, 1, T0 + 1))
    failed = state.handle(ExecutionFailed(JOB, 1, "bad input", T0 + 1, code="bad-input"))
    assert isinstance(failed[0], SendError) and failed[0].error.seq == 1
    assert state.active == 1  # a lease goes on after one failed job
    state.handle(ExecutionFinished(JOB, 2, b"\5" * 32, b"\6" * 32, 1, T0 + 1))
    actions = state.handle(BatchCloseReceived(JOB, 2, now=T0 + 2))
    assert isinstance(actions[0], SendCommitment) and actions[0].commitment.count == 2


def test_bad_config() -> None:
    with pytest.raises(LocalProtocolError):
        config(max_concurrent=0)
    with pytest.raises(LocalProtocolError):
        config(bid_validity_s=0)


def test_rejected_input_is_refused_and_never_runs() -> None:
    state = ExecutorState(config())
    won(state, request(lease=LeaseTerms(max_jobs=5, until=T0 + 8)))
    actions = state.handle(InputRejected(JOB, 0, "x: expected float32, got int64", now=T0 + 1))
    assert isinstance(actions[0], SendError) and actions[0].error.code == "bad-input"
    assert "float32" in actions[0].error.message and actions[0].error.seq == 0
    again = state.handle(InputReceived(JOB, 0, now=T0 + 1))
    assert isinstance(again[0], SendError) and again[0].error.code == "duplicate"
    # The lease goes on with the next job.
    assert state.handle(InputReceived(JOB, 1, now=T0 + 1)) == [StartExecution(JOB, 1)]


def test_execution_finished_is_validated() -> None:
    with pytest.raises(LocalProtocolError):
        ExecutionFinished(JOB, 0, b"short", b"\0" * 32, 1, T0)
    with pytest.raises(LocalProtocolError):
        ExecutionFinished(JOB, 0, b"\0" * 32, b"\0" * 32, -1, T0)


# --- fair exchange: a lease's window of unaccepted work ----------------------------------


def test_a_lease_never_starts_more_than_its_window_past_the_last_acceptance() -> None:
    state = ExecutorState(config())
    won(state, request(lease=LeaseTerms(max_jobs=50, until=T0 + 8, window=4)))
    starts = []
    for i in range(10):
        starts += state.handle(InputReceived(JOB, i, now=T0 + 1))
    assert starts == [StartExecution(JOB, i) for i in range(4)]  # 6 wait for an acceptance
    d = [(content_digest(("in", i)), content_digest(("out", i))) for i in range(10)]
    a0 = state.handle(ExecutionFinished(JOB, 0, *d[0], 5, T0 + 2))
    assert a0 == [SendResult(JOB, 0)]
    a1 = state.handle(ExecutionFinished(JOB, 1, *d[1], 5, T0 + 2))
    # At half the window: a cumulative commitment to accept (2 results).
    assert a1[0] == SendResult(JOB, 1) and isinstance(a1[1], SendInterim)
    interim = a1[1].commitment
    assert interim.count == 2 and interim.output_digest == batch_digest([d[0][1], d[1][1]])
    for i in (2, 3):
        assert state.handle(ExecutionFinished(JOB, i, *d[i], 5, T0 + 2)) == [SendResult(JOB, i)]
    # Nothing more starts until the requester accepts; an acceptance of another count is a bug.
    with pytest.raises(LocalProtocolError):
        state.handle(AcceptanceReceived(JOB, 3, T0 + 3))
    after = state.handle(AcceptanceReceived(JOB, 2, T0 + 3))
    assert after[:2] == [StartExecution(JOB, 4), StartExecution(JOB, 5)]
    assert isinstance(after[2], SendInterim) and after[2].commitment.count == 4


def test_the_executor_caps_a_lease_window_with_its_own_bound() -> None:
    state = ExecutorState(config(max_unaccepted=3))
    won(state, request(lease=LeaseTerms(max_jobs=50, until=T0 + 8, window=40)))
    starts = [a for i in range(10) for a in state.handle(InputReceived(JOB, i, now=T0 + 1))]
    assert starts == [StartExecution(JOB, i) for i in range(3)]
