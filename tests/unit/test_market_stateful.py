"""Stateful properties of the market state machines under arbitrary event orders.

Requester: exactly one outcome per job, never two awards outstanding, no
award to the same executor twice, no award at/after the deadline, no
completion after it, nothing at all after the outcome. With self-award
(``LocalBid``) in the mix: a local run counts as an award for all of these,
and a bid from the wire in the requester's name never wins.

Executor: never starts one ``(job_id, seq)`` twice, never accepts an award it
did not bid for (same job, requester, price, before the bid expired and the
deadline), never holds more awards than its slots, commits each award at
most once with a price equal to its bid times the job count.
"""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocols.errors import LocalProtocolError
from protocols.executor import (
    AcceptAward,
    AwardReceived,
    BatchCloseReceived,
    ConnectionLost,
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
    StartExecution,
    Tick,
)
from protocols.identity import peer_id_from_public_key
from protocols.market import Award, Bid, JobRequest, LeaseTerms, TensorMeta
from protocols.receipt import ResultCommitment, commit, content_digest
from protocols.requester import (
    AwardFailed,
    BidReceived,
    CancelAward,
    Complete,
    CompleteLocally,
    DeadlineReached,
    ExecutorGone,
    Fail,
    LocalBid,
    LocalFinished,
    Phase,
    Publish,
    RequesterJob,
    RequesterPolicy,
    ResultReceived,
    RunLocally,
    SendAward,
    StartTimer,
    TimerFired,
)
from protocols.signed import Signed

KEYS = [nacl.signing.SigningKey(bytes([i]) * 32) for i in range(1, 7)]
IDS = [peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS]
REQ = IDS[0]
EXECS = IDS[1:5]
KEY_OF = dict(zip(IDS, KEYS, strict=True))
CID = hashlib.sha256(b"m").hexdigest()
OTHER_CID = hashlib.sha256(b"other").hexdigest()
JOB = b"\x07" * 16
T0 = 1_000.0
DEADLINE = T0 + 8.0
IN_DIGEST = content_digest("in")
SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None)


def _request(job_id: bytes = JOB, **over: Any) -> JobRequest:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "requester": REQ,
        "model_cid": CID,
        "inputs": (TensorMeta("x", "float32", (4,)),),
        "input_bytes": 16,
        "max_price": 1_000,
        "deadline": DEADLINE,
        "bid_window": 0.5,
        "nonce": b"\x00" * 8,
    }
    fields.update(over)
    return JobRequest(**fields)


class RequesterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        # More rounds than fit before the deadline, so the deadline is what ends auctions.
        self.job = RequesterJob(
            _request(), now=T0, input_digest=IN_DIGEST, policy=RequesterPolicy(max_rounds=50)
        )
        self.timer: float | None = None
        self.outstanding: str | None = None
        self.awarded: list[str] = []
        self.award_price: dict[str, int] = {}
        self.terminals = 0
        self.local_bid = False
        self.apply(self.job.start())

    def apply(self, actions: list[Any]) -> None:
        for a in actions:
            assert self.terminals == 0, f"action {a} after the outcome"
            if isinstance(a, StartTimer):
                assert a.at <= DEADLINE
                self.timer = a.at
            elif isinstance(a, Publish):
                assert a.request.job_id == JOB and a.request.deadline == DEADLINE
                assert self.outstanding is None
            elif isinstance(a, SendAward):
                assert self.outstanding is None, "two awards outstanding"
                assert self.now < DEADLINE, "award at or past the deadline"
                assert a.executor not in self.awarded, "same executor awarded twice"
                assert a.award.price <= 1_000 and a.award.deadline == DEADLINE
                assert a.executor != REQ, "an Award to the requester itself"
                self.outstanding = a.executor
                self.awarded.append(a.executor)
                self.award_price[a.executor] = a.award.price
            elif isinstance(a, RunLocally):
                assert self.outstanding is None, "two awards outstanding"
                assert self.now < DEADLINE, "local run at or past the deadline"
                assert REQ not in self.awarded, "ran locally twice"
                assert self.local_bid, "ran locally without a LocalBid"
                self.outstanding = REQ
                self.awarded.append(REQ)
            elif isinstance(a, CompleteLocally):
                assert self.now <= DEADLINE, "completed after the deadline"
                assert self.outstanding == REQ and a.bid.executor == REQ
                self.outstanding = None
                self.terminals += 1
            elif isinstance(a, CancelAward):
                assert a.executor == self.outstanding
                self.outstanding = None
            elif isinstance(a, Complete):
                assert self.now <= DEADLINE, "completed after the deadline"
                c = a.commitment.message
                assert c.executor == self.outstanding
                assert c.price == self.award_price[c.executor]
                assert c.count == 1, "a single job paid as a batch"
                self.outstanding = None
                self.terminals += 1
            elif isinstance(a, Fail):
                assert self.outstanding is None, "failed with an award outstanding"
                self.terminals += 1
            else:  # pragma: no cover
                raise AssertionError(f"unknown action {a}")

    def send(self, event: Any) -> None:
        self.apply(self.job.handle(event))

    def some_executor(self) -> st.SearchStrategy[str]:
        """Mostly the awarded executor, sometimes anyone (stale or unknown reports)."""
        if self.outstanding is None:
            return st.sampled_from(EXECS)
        return st.sampled_from([self.outstanding] * 4 + EXECS)

    @rule(dt=st.floats(0, 0.4) | st.floats(0, 9.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def fire_timer(self) -> None:
        if self.timer is not None:
            self.now = max(self.now, self.timer)
        self.send(TimerFired(now=self.now))

    @rule(
        executor=st.sampled_from([*EXECS, REQ]),
        # Mostly usable bids; hypothesis favours bounds, so the unusable ones are a minority.
        price=st.integers(0, 1_000) | st.integers(0, 1_100),
        eta_ms=st.integers(0, 800) | st.integers(0, 9_000),
        validity=st.floats(0.6, 3.0) | st.floats(-0.1, 3.0),
    )
    def bid(self, executor: str, price: int, eta_ms: int, validity: float) -> None:
        b = Bid(
            job_id=JOB,
            executor=executor,
            price=price,
            eta_ms=eta_ms,
            expires_at=max(self.now + validity, 0.0),
        )
        self.send(BidReceived(b, now=self.now))

    @rule(price=st.integers(0, 1_100), eta_ms=st.integers(0, 800) | st.integers(0, 9_000))
    def local_bid(self, price: int, eta_ms: int) -> None:
        self.local_bid = True
        self.send(LocalBid(price=price, eta_ms=eta_ms, now=self.now))

    @rule(ok=st.sampled_from([True, True, False]))
    def local_finished(self, ok: bool) -> None:
        """The local run reports (also when none runs: a stale report is ignored)."""
        self.send(LocalFinished(outputs_ok=ok, now=self.now))

    @rule(data=st.data(), gone=st.booleans())
    def award_fails(self, data: st.DataObject, gone: bool) -> None:
        executor = data.draw(self.some_executor())
        if executor == self.outstanding:
            self.outstanding = None  # the I/O layer reports it dead
        if gone:
            self.send(ExecutorGone(executor, now=self.now))
        else:
            self.send(AwardFailed(executor, "refused", now=self.now))

    @rule(
        data=st.data(),
        ok=st.sampled_from([True, True, False]),
        price_delta=st.sampled_from([0, 0, 0, 1]),
        count=st.sampled_from([1, 1, 2]),
    )
    def result(self, data: st.DataObject, ok: bool, price_delta: int, count: int) -> None:
        executor = data.draw(self.some_executor())
        if executor == REQ:
            return  # no commitment can name the requester as executor
        price = self.award_price.get(executor, 0) * count + price_delta
        c = ResultCommitment(
            job_id=JOB,
            requester=REQ,
            executor=executor,
            model_cid=CID,
            input_digest=IN_DIGEST,
            output_digest=content_digest("out"),
            price=price,
            compute_ms=1,
            count=count,
        )
        signed: Signed[ResultCommitment] = commit(KEY_OF[executor], c)
        self.send(ResultReceived(signed, outputs_ok=ok, now=self.now))

    @rule()
    def deadline(self) -> None:
        if self.now >= DEADLINE:  # the I/O layer only reports the deadline once it is there
            self.send(DeadlineReached(now=self.now))

    @rule(price_delta=st.sampled_from([1, -1]))
    def overcharging_result(self, price_delta: int) -> None:
        """The awarded executor asks for a different price than agreed."""
        if self.outstanding in (None, REQ) or self.award_price[self.outstanding] + price_delta < 0:
            return
        c = ResultCommitment(
            job_id=JOB,
            requester=REQ,
            executor=self.outstanding,
            model_cid=CID,
            input_digest=IN_DIGEST,
            output_digest=content_digest("out"),
            price=self.award_price[self.outstanding] + price_delta,
            compute_ms=1,
        )
        self.send(ResultReceived(commit(KEY_OF[c.executor], c), outputs_ok=True, now=self.now))

    @rule(stall=st.sampled_from([0.0, 0.0, 0.0, 0.01, 1.0]))
    def good_result(self, stall: float) -> None:
        """The awarded executor delivers what was agreed (the common case).

        With ``stall`` > 0 this process was stalled past the deadline and
        finds the result waiting when it wakes: it must not be accepted.
        """
        if self.outstanding is None:
            return
        if stall:
            self.now = max(self.now, DEADLINE + stall)
        if self.outstanding == REQ:
            self.send(LocalFinished(outputs_ok=True, now=self.now))
            return
        c = ResultCommitment(
            job_id=JOB,
            requester=REQ,
            executor=self.outstanding,
            model_cid=CID,
            input_digest=IN_DIGEST,
            output_digest=content_digest("out"),
            price=self.award_price[self.outstanding],
            compute_ms=1,
        )
        self.send(ResultReceived(commit(KEY_OF[c.executor], c), outputs_ok=True, now=self.now))

    @invariant()
    def consistent(self) -> None:
        assert self.terminals <= 1
        assert (self.terminals == 1) == (self.job.phase is Phase.DONE)
        assert (self.outstanding is not None) == (self.job.phase is Phase.AWARDED)
        assert self.job.awarded_to == self.outstanding

    def teardown(self) -> None:
        # Whatever happened, the deadline ends the job with exactly one outcome.
        if self.job.phase is not Phase.DONE:
            self.now = max(self.now, DEADLINE)
            self.send(TimerFired(now=self.now))
        assert self.terminals == 1
        assert self.job.outcome is not None


TestRequesterMachine = RequesterMachine.TestCase
TestRequesterMachine.settings = SETTINGS


# --- executor -------------------------------------------------------------------------

JOBS = [bytes([i]) * 16 for i in range(1, 9)]


class ExecutorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.me = EXECS[0]
        self.state = ExecutorState(
            ExecutorConfig(
                peer_id=self.me,
                models={CID: ModelOffer(price=100, p50_ms=50)},
                max_concurrent=1,
                max_queue=1,
                bid_validity_s=1.0,
            )
        )
        self.now = T0
        self.bids: dict[bytes, list[tuple[Bid, JobRequest]]] = {}
        self.accepted: dict[bytes, Award] = {}
        self.started: set[tuple[bytes, int]] = set()
        self.committed: set[bytes] = set()
        self.finished: set[tuple[bytes, int]] = set()
        self.rejected: set[tuple[bytes, int]] = set()

    def apply(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, PublishBid):
                assert a.bid.executor == self.me
                self.bids.setdefault(a.bid.job_id, []).append((a.bid, self.last_request))
            elif isinstance(a, AcceptAward):
                aw = a.award
                assert aw.job_id not in self.accepted, "award accepted twice"
                matching = [
                    (b, r)
                    for b, r in self.bids.get(aw.job_id, [])
                    if b.price == aw.price
                    and self.now <= b.expires_at
                    and r.requester == aw.requester
                    and r.model_cid == aw.model_cid
                    and r.lease == aw.lease
                    and aw.deadline <= r.deadline
                ]
                assert matching, "accepted an award it did not bid for"
                assert self.now < aw.deadline
                assert self.state.active <= 2
                self.accepted[aw.job_id] = aw
            elif isinstance(a, StartExecution):
                key = (a.job_id, a.seq)
                assert key not in self.started, "ran a job twice"
                assert key not in self.rejected, "ran a job whose inputs were rejected"
                assert a.job_id in self.accepted and a.job_id not in self.committed
                aw = self.accepted[a.job_id]
                assert a.seq < aw.max_jobs
                cutoff = aw.deadline if aw.lease is None else aw.lease.until
                assert self.now < cutoff, "started a job past its deadline"
                self.started.add(key)
            elif isinstance(a, SendCommitment):
                c = a.commitment
                assert c.job_id not in self.committed, "committed twice"
                aw = self.accepted[c.job_id]
                assert c.price == aw.price * c.count and c.count <= aw.max_jobs
                assert c.executor == self.me and c.requester == aw.requester
                self.committed.add(c.job_id)

    def send(self, event: Any) -> None:
        self.apply(self.state.handle(event))

    @rule(dt=st.floats(0, 0.5) | st.floats(0, 4.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(
        job=st.sampled_from(JOBS),
        max_price=st.sampled_from([100, 500, 50]),
        cid=st.sampled_from([CID, CID, CID, OTHER_CID]),
        lease=st.booleans(),
    )
    def request(self, job: bytes, max_price: int, cid: str, lease: bool) -> None:
        deadline = self.now + 3.0
        terms = LeaseTerms(max_jobs=3, until=deadline - 0.5) if lease else None
        self.last_request = _request(
            job, max_price=max_price, model_cid=cid, deadline=deadline, lease=terms
        )
        self.send(RequestSeen(self.last_request, now=self.now))

    def pick(self, data: st.DataObject, likely: Any) -> bytes:
        """Mostly a job the scenario makes interesting, sometimes any job."""
        pool = sorted(likely)
        return data.draw(st.sampled_from(pool * 3 + JOBS if pool else JOBS))

    @rule(
        data=st.data(),
        price=st.sampled_from([100, 100, 100, 90]),
        to_me=st.sampled_from([True, True, True, False]),
        use_request=st.sampled_from([True, True, True, False]),
        tamper=st.sampled_from(["", "", "", "requester", "model", "lease", "deadline"]),
    )
    def award(
        self, data: st.DataObject, price: int, to_me: bool, use_request: bool, tamper: str
    ) -> None:
        job = self.pick(data, {j for j in JOBS if self.state.open_bid(j) is not None})
        held = self.bids.get(job)
        if held and use_request:
            req = held[-1][1]
            flip_lease = LeaseTerms(max_jobs=2, until=req.deadline) if req.lease is None else None
            aw = Award(
                job_id=job,
                requester=EXECS[2] if tamper == "requester" else req.requester,
                executor=self.me if to_me else EXECS[1],
                model_cid=OTHER_CID if tamper == "model" else req.model_cid,
                price=price,
                deadline=req.deadline + (1 if tamper == "deadline" else 0),
                lease=flip_lease if tamper == "lease" else req.lease,
            )
        else:
            aw = Award(
                job_id=job,
                requester=REQ,
                executor=self.me if to_me else EXECS[1],
                model_cid=CID,
                price=price,
                deadline=self.now + 2,
            )
        actions = self.state.handle(AwardReceived(aw, now=self.now))
        assert len(actions) == 1 and isinstance(actions[0], AcceptAward | RejectAward)
        self.apply(actions)

    @rule(
        job=st.sampled_from(JOBS),
        lease=st.booleans(),
        delay=st.floats(0, 1.5),
        tamper=st.sampled_from(["", "", "", "requester", "model", "lease", "deadline", "price"]),
    )
    def auction_won(self, job: bytes, lease: bool, delay: float, tamper: str) -> None:
        """The common path: a request we can serve, then an award for it (sometimes altered)."""
        self.request(job, 500, CID, lease)
        self.now += delay
        req = self.last_request
        flip_lease = LeaseTerms(max_jobs=2, until=req.deadline) if req.lease is None else None
        aw = Award(
            job_id=job,
            requester=EXECS[2] if tamper == "requester" else req.requester,
            executor=self.me,
            model_cid=OTHER_CID if tamper == "model" else CID,
            price=101 if tamper == "price" else 100,
            deadline=req.deadline + (1 if tamper == "deadline" else 0),
            lease=flip_lease if tamper == "lease" else req.lease,
        )
        self.send(AwardReceived(aw, now=self.now))

    @rule(delay=st.floats(0, 0.5))
    def several_bids_then_awards(self, delay: float) -> None:
        """Bid on more jobs than there are slots, then win them all: slots must hold."""
        fresh = [j for j in JOBS if j not in self.accepted and self.state.open_bid(j) is None]
        requests = []
        for job in fresh[:4]:
            self.request(job, 500, CID, False)
            requests.append(self.last_request)
        self.now += delay
        for req in requests:
            aw = Award(
                job_id=req.job_id,
                requester=req.requester,
                executor=self.me,
                model_cid=CID,
                price=100,
                deadline=req.deadline,
            )
            self.send(AwardReceived(aw, now=self.now))

    @rule(data=st.data())
    def next_input(self, data: st.DataObject) -> None:
        """Feed the next job of an award in progress."""
        if not self.state.awarded_jobs:
            return
        job = data.draw(st.sampled_from(sorted(self.state.awarded_jobs)))
        seq = len([k for k in self.started if k[0] == job])
        self.send(InputReceived(job, seq, now=self.now))

    @rule(data=st.data(), seq=st.integers(0, 3))
    def reject_input(self, data: st.DataObject, seq: int) -> None:
        """The I/O layer found the inputs invalid: that seq must never run afterwards."""
        job = self.pick(data, self.state.awarded_jobs)
        if job in self.state.awarded_jobs and (job, seq) not in self.started:
            self.rejected.add((job, seq))
        self.send(InputRejected(job, seq, "bad dtype", now=self.now))

    @rule(data=st.data())
    def replay_input(self, data: st.DataObject) -> None:
        """A requester (or a confused I/O layer) sends a job's inputs again."""
        if self.started:
            job, seq = data.draw(st.sampled_from(sorted(self.started)))
            self.send(InputReceived(job, seq, now=self.now))

    @rule(data=st.data(), seq=st.integers(0, 3))
    def input(self, data: st.DataObject, seq: int) -> None:
        job = self.pick(data, self.state.awarded_jobs)
        self.send(InputReceived(job, seq, now=self.now))

    @rule(data=st.data())
    def finish_running(self, data: st.DataObject) -> None:
        """A started job of a live award finishes (the common case)."""
        running = sorted(
            k for k in self.started if k[0] in self.state.awarded_jobs and k not in self.finished
        )
        if not running:
            return
        job, seq = data.draw(st.sampled_from(running))
        self.finished.add((job, seq))
        self.send(
            ExecutionFinished(job, seq, content_digest(seq), content_digest(-seq), 3, self.now)
        )

    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def finish(self, data: st.DataObject, ok: bool) -> None:
        if self.started and data.draw(st.booleans()):
            job, seq = data.draw(st.sampled_from(sorted(self.started)))
        else:
            job, seq = data.draw(st.sampled_from(JOBS)), data.draw(st.integers(0, 3))
        event: ExecutionFinished | ExecutionFailed = (
            ExecutionFinished(job, seq, content_digest(seq), content_digest(-seq), 3, self.now)
            if ok
            else ExecutionFailed(job, seq, "boom", self.now)
        )
        live = job in self.state.awarded_jobs
        if live and ((job, seq) not in self.started or (job, seq) in self.finished):
            # Reporting on a seq of a live award that is not running is an I/O bug.
            with pytest.raises(LocalProtocolError, match="not running"):
                self.state.handle(event)
            return
        if live:
            self.finished.add((job, seq))
        self.send(event)  # a report about an award that ended meanwhile is ignored

    @rule(data=st.data(), count=st.integers(1, 3))
    def close(self, data: st.DataObject, count: int) -> None:
        job = self.pick(data, self.state.awarded_jobs)
        self.send(BatchCloseReceived(job, count, now=self.now))

    @rule(job=st.sampled_from(JOBS))
    def lost(self, job: bytes) -> None:
        self.send(ConnectionLost(job, now=self.now))

    @rule()
    def tick(self) -> None:
        self.send(Tick(now=self.now))

    @invariant()
    def within_capacity(self) -> None:
        assert self.state.active <= self.state.config.slots


TestExecutorMachine = ExecutorMachine.TestCase
TestExecutorMachine.settings = SETTINGS


def test_commitments_sign_cleanly() -> None:
    # What SendCommitment hands out is signable by the executor as-is.
    c = ResultCommitment(JOB, REQ, EXECS[0], CID, IN_DIGEST, IN_DIGEST, 100, 1)
    assert commit(KEY_OF[EXECS[0]], c).message == c
