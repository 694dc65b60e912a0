"""Spot checks of a pipeline lease (``PipelineLease._spot_check``), as a single-model
lease's: the checked job's inputs and outputs are the requester's own or fetched from the
stage executors that forwarded them (``StageLinks.fetch``, checked against the digests
the requester recorded), the job runs again on another executor; on disagreement the
stage's batch is closed, its claim for the job (seq and per-job digests of its batch
commitment) goes to the referees, and the lease stops streaming. In-process, with fakes:
deterministic. Also: held outputs go only to the job's requester (``_give_held``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import trio

from peer.market.pipeline import PipelineLease
from peer.market.requester import _Waiter
from peer.market.stage_link import StageLinks
from protocols.pipeline import StageFetch, StagePayload, StageReply, StageRoute
from protocols.receipt import content_digest
from protocols.requester import MarketFailure
from protocols.tensor import TensorLimits, encode_tensors

REQ = "12D3KooWRequester"
J = [bytes([i + 1]) * 16 for i in range(3)]


def wire(v: float) -> Any:
    return encode_tensors({"h": np.full((2,), v, dtype=np.float32)})


IN, MID, OUT = wire(1.0), wire(2.0), wire(3.0)


@dataclass
class Att:
    executor: str
    waiters: dict[int, _Waiter] = field(default_factory=dict)
    inputs: dict[int, bytes] = field(default_factory=dict)
    forwarded: dict[int, bytes] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)


@dataclass
class Commitment:
    count: int


@dataclass
class Signed:
    message: Commitment


@dataclass
class Receipt:
    commitment: Any


@dataclass
class Outcome:
    receipt: Receipt | None


class Run:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: Outcome | None = None
        self.closed = False

    async def close_batch(self) -> None:
        self.closed = True
        self.outcome = Outcome(Receipt(Signed(Commitment(2))))
        self.done.set()


@dataclass
class Spec:
    cid: str = "stage"


class Stage:
    def __init__(self, k: int) -> None:
        self.job_id = J[k]
        self.att = Att(executor=f"E{k}")
        self.run = Run()
        self.spec = Spec()


class FakeStreamer:
    def __init__(self) -> None:
        self.stages = [Stage(k) for k in range(3)]
        self.base = [0, 1, 0]  # stage 2's executor took over at job 1: its seq 0 is job 1
        self.until = 1e9


@dataclass
class Result:
    outputs: Any
    receipt: Any = None
    wire: Any = None
    executor: str = "E9"


class Checker:
    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs
        self.asked: list[tuple[Any, bytes, str]] = []
        self.claims: list[Any] = []

    async def second_opinion(self, spec: Any, wire: Any, job_id: bytes, executor: str) -> Any:
        self.asked.append((wire, job_id, executor))
        return Result(self.outputs, receipt=Receipt("check-commitment"), wire=OUT)

    async def referee(self, claims: list[Any], wire: Any, reason: str, until: float) -> Any:
        self.claims = claims
        return ["proof"], f"{reason}; referees proved E1 wrong"


class Links:
    def __init__(self, held: dict[tuple[str, bytes, int], Any]) -> None:
        self.held = held
        self.fetched: list[tuple[str, bytes, int]] = []

    async def fetch(self, executor: str, job_id: bytes, seq: int, until: float, mx: int) -> Any:
        self.fetched.append((executor, job_id, seq))
        return self.held.get((executor, job_id, seq), "not held")


@dataclass
class Settings:
    limits: TensorLimits = field(default_factory=TensorLimits)


@dataclass
class Market:
    checker: Checker
    links: Links
    settings: Settings = field(default_factory=Settings)

    def clock(self) -> float:
        return 0.0


@dataclass
class Entry:
    name: str = "p"


def lease(check_outputs: Any, held: dict[tuple[str, bytes, int], Any]) -> PipelineLease:
    m = Market(Checker(check_outputs), Links(held))
    pl = PipelineLease(m, Entry(), FakeStreamer(), spot_check=0.5)  # type: ignore[arg-type]
    # Job 2 at stage 2 (index 1): its inputs were forwarded by stage 1's E0 (its seq 2), its
    # outputs forwarded on by E1 (its seq 1, base 1) to stage 3.
    pl._given[1][2] = None
    pl.cut_digests[1][2] = content_digest(MID)
    st = pl.s.stages[1]
    st.att.inputs = {0: content_digest(wire(0.5)), 1: content_digest(MID)}
    st.att.forwarded = {0: content_digest(wire(0.7)), 1: content_digest(OUT)}
    return pl


def answer(pl: PipelineLease) -> _Waiter:
    w = _Waiter(forwarded=content_digest(OUT))
    w.done.set()
    pl.s.stages[1].att.waiters[1] = w  # type: ignore[attr-defined]
    return w


HELD = {("E0", J[0], 2): MID, ("E1", J[1], 1): OUT}


async def test_a_checked_job_runs_again_on_the_intermediates_fetched_from_the_stage_executors() -> (
    None
):
    pl = lease({"h": np.full((2,), 3.0, dtype=np.float32)}, HELD)
    with trio.fail_after(10):
        await pl._spot_check(1, 2, answer(pl))
    assert pl.spot_checks == ["stage 2 job 2: agree"]
    assert pl.market.links.fetched == [("E0", J[0], 2), ("E1", J[1], 1)]  # type: ignore[attr-defined]
    assert pl.market.checker.asked == [(MID, J[1], "E1")]  # type: ignore[attr-defined]
    assert not pl.s.stages[1].run.closed


async def test_fetched_intermediates_must_be_the_ones_recorded() -> None:
    """An executor that gives other tensors than it forwarded cannot get them judged."""
    pl = lease({}, {("E0", J[0], 2): MID, ("E1", J[1], 1): wire(9.0)})
    with trio.fail_after(10):
        await pl._spot_check(1, 2, answer(pl))
    (why,) = pl.spot_checks
    assert "not checked" in why and "other outputs of job 2 than it forwarded" in why
    assert pl.market.checker.asked == []  # type: ignore[attr-defined]


async def test_a_disagreement_closes_the_stage_and_goes_to_the_referees() -> None:
    pl = lease({"h": np.full((2,), -3.0, dtype=np.float32)}, HELD)
    with trio.fail_after(10), pytest.raises(MarketFailure, match="spot check of job 2"):
        await pl._spot_check(1, 2, answer(pl))
    st = pl.s.stages[1]
    assert st.run.closed and pl.fraud_proofs == ["proof"]  # type: ignore[comparison-overlap]
    claim, second = pl.market.checker.claims  # type: ignore[attr-defined]
    assert claim.seq == 1 and claim.outputs == OUT
    assert claim.ins == (content_digest(wire(0.5)), content_digest(MID))
    assert claim.outs == (content_digest(wire(0.7)), content_digest(OUT))
    assert second.commitment == "check-commitment"
    assert "referees proved E1 wrong" in pl.spot_checks[0]


async def test_a_job_a_lost_executor_answered_is_not_checked() -> None:
    pl = lease({}, HELD)
    with trio.fail_after(10):
        await pl._spot_check(1, 0, answer(pl))  # job 0 is before stage 2's take-over at 1
    assert pl.spot_checks == ["stage 2 job 0: not checked: its executor was lost"]


class SS:
    def __init__(self, remote: str) -> None:
        self.remote_peer = remote
        self.sent: list[Any] = []

    async def send(self, *items: Any) -> None:
        self.sent += items


async def test_held_outputs_go_only_to_the_jobs_requester() -> None:
    sl = StageLinks(host=None, dialer=None, clock=lambda: 0.0)
    r = StageRoute(
        job_id=J[0],
        requester="12D3KooWDXqxPPpbCXBBnhh5aLGPtXJTRNNKMBHuZSi8yt6rxdbd",
        executor="12D3KooWKrqGDX8Cc3W4oWzKSWFuYpMKKfVYXrJ6A1h9GqEDcFqA",
        upstream="",
        upstream_job=b"",
        downstream="12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf",
        downstream_job=J[1],
        expires=1e9,
    )
    sl._hold(r.requester, r, 3, MID)
    ok = SS(r.requester)
    await sl._give_held(StageFetch(J[0], 3), ok)  # type: ignore[arg-type]
    assert ok.sent == [StagePayload(MID)]
    for who, seq in ((r.downstream, 3), (r.requester, 4)):
        other = SS(who)
        await sl._give_held(StageFetch(J[0], seq), other)  # type: ignore[arg-type]
        (reply,) = other.sent
        assert isinstance(reply, StageReply) and not reply.ok
