"""The whole market in memory: requester and executors wired through real signed bytes.

This is the shape ``peer/market`` takes, minus gossip and streams: every
message is signed, encoded, decoded and verified on the way, as it will be on
the wire. It shows how actions map to I/O and checks the pieces fit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from protocols.executor import (
    AcceptAward,
    AwardReceived,
    BatchCloseReceived,
    ExecutionFinished,
    ExecutorConfig,
    ExecutorState,
    InputReceived,
    ModelOffer,
    PublishBid,
    RejectAward,
    RequestSeen,
    SendCommitment,
    SendResult,
    StartExecution,
)
from protocols.identity import peer_id_from_public_key
from protocols.market import (
    Award,
    BatchClose,
    Bid,
    JobInput,
    JobRequest,
    JobResult,
    LeaseTerms,
    TensorMeta,
    decode_frame,
    encode_frame,
)
from protocols.receipt import Receipt, ResultCommitment, batch_digest, commit, content_digest
from protocols.requester import (
    AwardFailed,
    BidReceived,
    Complete,
    Fail,
    NoExecutors,
    Publish,
    RequesterJob,
    ResultReceived,
    SendAward,
    StartTimer,
    TimerFired,
)
from protocols.signed import Signed, sign_message

CID = hashlib.sha256(b"doubler").hexdigest()
T0 = 10_000.0


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


def model(inputs: dict[str, Any]) -> dict[str, Any]:
    """Stand-in for ONNX Runtime: doubles each byte of input "x"."""
    data = inputs["x"]["data"]
    return {"y": {"dtype": "uint8", "shape": [len(data)], "data": bytes(2 * b % 256 for b in data)}}


@dataclass
class Executor:
    key: nacl.signing.SigningKey
    state: ExecutorState
    alive: bool = True
    inputs: dict[tuple[bytes, int], Any] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    pending: Signed[ResultCommitment] | None = None


class Swarm:
    """One requester and some executors, with a clock and byte-level message passing."""

    def __init__(self, prices: list[int]) -> None:
        self.now = T0
        self.req_key = key(1)
        self.executors: dict[str, Executor] = {}
        for i, price in enumerate(prices):
            k = key(10 + i)
            # No fair-exchange window here (its interims are tested in test_executor.py and
            # tests/unit/test_market_memory.py): this flow sends a whole batch at once.
            cfg = ExecutorConfig(
                peer_id=pid(k),
                models={CID: ModelOffer(price=price, p50_ms=5)},
                max_unaccepted=100_000,
            )
            self.executors[pid(k)] = Executor(key=k, state=ExecutorState(cfg))
        self.timer: float | None = None
        self.outbox: list[bytes] = []  # frames executor -> requester

    def request(self, job_id: bytes, lease: LeaseTerms | None = None) -> JobRequest:
        return JobRequest(
            job_id=job_id,
            requester=pid(self.req_key),
            model_cid=CID,
            inputs=(TensorMeta("x", "uint8", (4,)),),
            input_bytes=4,
            max_price=1_000,
            deadline=T0 + 30,
            bid_window=0.25,
            nonce=b"\x09" * 16,
            lease=lease,
        )

    # --- requester side I/O -----------------------------------------------------------

    def run(self, job: RequesterJob, inputs: list[dict[str, Any]]) -> Complete | Fail:
        pending = job.start()
        for _ in range(100):  # bounded: every step makes progress or the job ends
            for action in pending:
                self.requester_do(job, action, inputs)
            if job.outcome is not None:
                return job.outcome
            assert self.timer is not None
            self.now = max(self.now, self.timer)
            pending = job.handle(TimerFired(now=self.now))
        raise AssertionError("job did not end")

    def requester_do(self, job: RequesterJob, action: Any, inputs: list[dict[str, Any]]) -> None:
        if isinstance(action, StartTimer):
            self.timer = action.at
        elif isinstance(action, Publish):
            wire = sign_message(self.req_key, action.request).to_bytes()
            for ex in self.executors.values():
                for bid_bytes in self.executor_gossip(ex, wire):
                    bid = Bid.from_bytes(bid_bytes, now=self.now).message
                    assert job.handle(BidReceived(bid, now=self.now)) == []
        elif isinstance(action, SendAward):
            ex = self.executors[action.executor]
            if not ex.alive:
                for a in job.handle(AwardFailed(action.executor, "dial failed", now=self.now)):
                    self.requester_do(job, a, inputs)
                return
            self.now += 0.001
            frames = [encode_frame(sign_message(self.req_key, action.award))]
            frames += [
                encode_frame(JobInput(action.award.job_id, i, x)) for i, x in enumerate(inputs)
            ]
            if action.award.lease is not None:
                frames.append(encode_frame(BatchClose(action.award.job_id, len(inputs))))
            outputs: dict[int, Any] = {}
            committed: Signed[ResultCommitment] | None = None
            for raw in self.executor_stream(ex, frames):
                frame = decode_frame(raw)
                if isinstance(frame, JobResult):
                    outputs[frame.seq] = frame.outputs
                elif isinstance(frame, Signed) and isinstance(frame.message, ResultCommitment):
                    # A single job's commitment comes before its result: judged once both are in.
                    committed = frame  # type: ignore[assignment]
                else:
                    reason = getattr(frame.message, "message", "?")  # type: ignore[union-attr]
                    for a in job.handle(AwardFailed(action.executor, reason, now=self.now)):
                        self.requester_do(job, a, inputs)
            if committed is not None:
                ok = self.outputs_match(committed.message, outputs, len(inputs))
                for a in job.handle(ResultReceived(committed, ok, now=self.now)):
                    self.requester_do(job, a, inputs)
        elif isinstance(action, Complete):
            receipt = Receipt.create(self.req_key, action.commitment)
            # Send the acceptance back; the executor keeps the same receipt.
            ex = self.executors[action.commitment.message.executor]
            acc = decode_frame(encode_frame(receipt.acceptance))
            assert isinstance(acc, Signed)
            ex.receipts.append(Receipt(commitment=action.commitment, acceptance=acc))  # type: ignore[arg-type]
            self.receipt = receipt

    @staticmethod
    def outputs_match(c: ResultCommitment, outputs: dict[int, Any], n: int) -> bool:
        if sorted(outputs) != list(range(n)):
            return False
        digests = [content_digest(outputs[i]) for i in range(n)]
        expected = digests[0] if c.count == 1 else batch_digest(digests)
        return c.output_digest == expected

    # --- executor side I/O ------------------------------------------------------------

    def executor_gossip(self, ex: Executor, wire: bytes) -> list[bytes]:
        if not ex.alive:
            return []
        req = JobRequest.from_bytes(wire, now=self.now).message
        out = []
        for a in ex.state.handle(RequestSeen(req, now=self.now)):
            if isinstance(a, PublishBid):
                out.append(sign_message(ex.key, a.bid).to_bytes())
        return out

    def executor_stream(self, ex: Executor, frames: list[bytes]) -> list[bytes]:
        replies: list[bytes] = []
        for raw in frames:
            frame = decode_frame(raw)
            if isinstance(frame, Signed) and isinstance(frame.message, Award):
                event: Any = AwardReceived(frame.message, now=self.now)
            elif isinstance(frame, JobInput):
                ex.inputs[(frame.job_id, frame.seq)] = frame.inputs
                event = InputReceived(frame.job_id, frame.seq, now=self.now)
            else:
                assert isinstance(frame, BatchClose)
                event = BatchCloseReceived(frame.job_id, frame.count, now=self.now)
            queue = ex.state.handle(event)
            while queue:
                a = queue.pop(0)
                if isinstance(a, RejectAward):
                    replies.append(encode_frame(sign_message(ex.key, a.error)))
                    return replies
                if isinstance(a, StartExecution):
                    x = ex.inputs[(a.job_id, a.seq)]
                    y = model(x)
                    ex.inputs[(a.job_id, a.seq)] = (x, y)
                    queue += ex.state.handle(
                        ExecutionFinished(
                            a.job_id, a.seq, content_digest(x), content_digest(y), 2, self.now
                        )
                    )
                elif isinstance(a, SendResult):
                    _, y = ex.inputs[(a.job_id, a.seq)]
                    replies.append(encode_frame(JobResult(a.job_id, a.seq, y, 2)))
                elif isinstance(a, SendCommitment):
                    replies.append(encode_frame(commit(ex.key, a.commitment)))
                else:
                    assert isinstance(a, AcceptAward)
        return replies


def x(i: int) -> dict[str, Any]:
    return {"x": {"dtype": "uint8", "shape": [4], "data": bytes([i, i + 1, i + 2, i + 3])}}


def test_cheapest_executor_runs_the_job_and_both_hold_the_receipt() -> None:
    swarm = Swarm(prices=[300, 120, 200])
    job = RequesterJob(swarm.request(b"\x01" * 16), now=T0, input_digest=content_digest(x(1)))
    outcome = swarm.run(job, [x(1)])
    assert isinstance(outcome, Complete)
    receipt = swarm.receipt
    receipt.verify()
    assert receipt.price == 120
    winner = swarm.executors[receipt.executor]
    assert winner.state.config.models[CID].price == 120
    assert [r.receipt_id for r in winner.receipts] == [receipt.receipt_id]
    assert Receipt.from_bytes(receipt.to_bytes()) == receipt


def test_dead_winner_falls_back_to_next_bidder() -> None:
    swarm = Swarm(prices=[100, 150])
    cheapest = next(e for e in swarm.executors.values() if e.state.config.models[CID].price == 100)
    # It bid, then died before the award.
    job = RequesterJob(swarm.request(b"\x02" * 16), now=T0)
    actions = job.start()
    swarm.requester_do(job, actions[0], [x(2)])
    cheapest.alive = False
    swarm.requester_do(job, actions[1], [x(2)])
    swarm.now = swarm.timer  # type: ignore[assignment]
    for a in job.handle(TimerFired(now=swarm.now)):
        swarm.requester_do(job, a, [x(2)])
    assert isinstance(job.outcome, Complete)
    assert swarm.receipt.price == 150
    assert job.attempts == [(cheapest.state.config.peer_id, "dial failed")]


def test_unserved_model_fails_with_no_executors() -> None:
    swarm = Swarm(prices=[])
    job = RequesterJob(swarm.request(b"\x03" * 16), now=T0)
    outcome = swarm.run(job, [x(3)])
    assert isinstance(outcome, Fail) and isinstance(outcome.error, NoExecutors)
    assert CID in str(outcome.error)


def test_lease_runs_many_jobs_for_one_batch_receipt() -> None:
    swarm = Swarm(prices=[40, 90])
    n = 200
    lease = LeaseTerms(max_jobs=n, until=T0 + 20)
    job = RequesterJob(swarm.request(b"\x04" * 16, lease=lease), now=T0)
    outcome = swarm.run(job, [x(i % 250) for i in range(n)])
    assert isinstance(outcome, Complete)
    receipt = swarm.receipt
    receipt.verify()
    assert (receipt.count, receipt.price) == (n, 40 * n)
    assert receipt.commitment.message.input_digest == batch_digest(
        [content_digest(x(i % 250)) for i in range(n)]
    )
