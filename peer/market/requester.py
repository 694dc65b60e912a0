"""The requester's I/O: auctions on gossip, awards and payloads on job streams, receipts.

``protocols.requester.RequesterJob`` decides (which bid wins, when to fall
back, when to re-auction, when to give up); ``JobRun`` feeds it events from
three sources through one channel (bids from gossip, its single timer, and
the award task of the current winner) and performs its actions:

- ``Publish`` -> sign the JobRequest and publish it on the model's topic;
- ``StartTimer`` -> (re)arm the one timer (a task in a cancel scope);
- ``SendAward`` -> an award task: dial the winner, open ``/edgeswarm/job/1``,
  send the signed Award and the inputs, read results, check them, report
  ``ResultReceived`` / ``AwardFailed``;
- ``CancelAward`` -> cancel that task (the stream is reset: never paid);
- ``Complete`` -> sign the Acceptance, send it, keep the Receipt;
- ``Fail`` -> raise the ``MarketFailure``.

Self-award: with a ``LocalRunner`` (this peer serves the model), every
auction round also feeds the machine our own executor's quote (``LocalBid``);
if it wins, ``RunLocally`` runs the job in our own worker (no stream, nothing
signed) and ``CompleteLocally`` ends it with an ``Outcome`` whose ``receipt``
and ``award`` are None: nothing is owed, nothing reaches the ledger.

A lease is the same machine with ``LeaseTerms``: its award task keeps the
stream open and ``Lease.infer`` sends JobInput frames on it; ``BatchClose``
ends the batch and one commitment covers it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import nacl.signing
import numpy as np
import numpy.typing as npt
import trio

from edge_models.errors import EdgeModelError
from edge_models.spec import ModelEntry
from peer import metrics
from peer.job_stream import FrameStream, JobStreamClosed
from peer.market.clock import Clock, sleep_until, system_clock
from peer.market.stream_pool import StreamPool
from protocols import requester as rq
from protocols.errors import ProtocolError
from protocols.market import (
    Award,
    BatchClose,
    Bid,
    JobError,
    JobForwarded,
    JobFrame,
    JobInput,
    JobRequest,
    JobResult,
    LeaseTerms,
    TensorMeta,
)
from protocols.receipt import Receipt, ResultCommitment, content_digest
from protocols.signed import Signed, sign_message
from protocols.tensor import (
    STRING,
    TensorLimits,
    as_strings,
    decode_tensors,
    dtype_name,
    encode_tensors,
    numpy_dtype,
)

log = logging.getLogger(__name__)

EVENT_QUEUE = 4096

Arrays = dict[str, npt.NDArray[Any]]
OpenStream = Callable[[str, float], Any]  # (executor, until) -> awaitable FrameStream


class LocalRunner(Protocol):
    """This peer's own executor, as a bidder in its own auctions (``ExecutorService``)."""

    def local_quote(self, request: JobRequest) -> tuple[int, int] | None:
        """(price micro-credits, eta ms) it would bid for ``request``, or None (not served,
        over the max price, no capacity, too slow)."""
        ...

    async def run_local(self, cid: str, inputs: Arrays, *, deadline: float) -> Arrays:
        """Run the job in our own worker (raises ``EdgeModelError`` & co. on failure)."""
        ...


class JobFailed(ProtocolError):
    """The executor refused one lease job's inputs (e.g. ``bad-input``); not retried."""

    def __init__(self, error: JobError) -> None:
        super().__init__(
            f"executor {error.executor} refused the job ({error.code}): {error.message}"
        )
        self.error = error


def input_meta(wire: Mapping[str, Any]) -> tuple[tuple[TensorMeta, ...], int]:
    metas = tuple(
        TensorMeta(name=n, dtype=t["dtype"], shape=tuple(t["shape"])) for n, t in wire.items()
    )
    return metas, sum(len(t["data"]) for t in wire.values())


def check_outputs(
    wire_by_seq: Mapping[int, Any], entry: ModelEntry | None, limits: TensorLimits
) -> tuple[bool, str, dict[int, Arrays]]:
    """Outputs decode within limits and match the model's declared outputs. (That the
    commitment covers exactly these outputs and the inputs sent, by digest, is the
    machine's check: ``RequesterJob`` gets ``InputSent``/``ResultArrived``.)"""
    decoded: dict[int, Arrays] = {}
    for seq in sorted(wire_by_seq):
        try:
            arrays = decode_tensors(wire_by_seq[seq], limits=limits)
        except ProtocolError as exc:
            return False, f"outputs of job {seq} do not decode: {exc}", {}
        problem = declared_problem(arrays, entry)
        if problem:
            return False, f"outputs of job {seq}: {problem}", {}
        decoded[seq] = arrays
    return True, "", decoded


def declared_problem(arrays: Arrays, entry: ModelEntry | None) -> str:
    if entry is None:
        return ""
    want = {o.name: o for o in entry.outputs}
    if set(arrays) != set(want):
        return f"expected outputs {sorted(want)}, got {sorted(arrays)}"
    for name, arr in arrays.items():
        spec = want[name]
        if numpy_dtype(spec.dtype) != arr.dtype:
            return f"output {name!r} should be {spec.dtype}, got {arr.dtype}"
        if spec.shape is not None:
            if len(spec.shape) != arr.ndim:
                return f"output {name!r} should have rank {len(spec.shape)}, got {arr.shape}"
            for d, n in zip(spec.shape, arr.shape, strict=True):
                if isinstance(d, int) and d != n:
                    return f"output {name!r} should have shape {spec.shape}, got {arr.shape}"
    return ""


class _Timer:
    """The job's single timer: a new ``set`` replaces the previous one."""

    def __init__(
        self, nursery: trio.Nursery, send: trio.MemorySendChannel[rq.Event], clock: Clock
    ) -> None:
        self.nursery = nursery
        self.send = send
        self.clock = clock
        self.scope: trio.CancelScope | None = None

    def set(self, at: float) -> None:
        if self.scope is not None:
            self.scope.cancel()
        self.scope = trio.CancelScope()
        self.nursery.start_soon(self._fire, at, self.scope)

    async def _fire(self, at: float, scope: trio.CancelScope) -> None:
        with scope:
            await sleep_until(self.clock, at)  # never before `at` by the market's clock
            await self.send.send(rq.TimerFired(self.clock()))


@dataclass
class Attempt:
    """One award in flight: its stream, what was sent and what came back."""

    executor: str
    award: Award
    bid: Bid
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    fs: FrameStream | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    inputs: dict[int, bytes] = field(default_factory=dict)  # seq -> input digest (claims)
    outputs: dict[int, Any] = field(default_factory=dict)  # seq -> wire outputs
    forwarded: dict[int, bytes] = field(default_factory=dict)  # seq -> digest (pipelines)
    inputs_changed: trio.Event = field(default_factory=trio.Event)
    decoded: dict[int, Arrays] = field(default_factory=dict)  # checked outputs, at commit
    waiters: dict[int, _Waiter] = field(default_factory=dict)
    decided: trio.Event = field(default_factory=trio.Event)
    acceptance: Signed[Any] | None = None
    interim: Receipt | None = None  # our last cumulative Acceptance of a lease (fair exchange)
    closing: bool = False
    failure: str = ""


class _Undelivered(Exception):
    """No job stream could be opened: no byte of the award left (``rq.AwardUndelivered``)."""


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    wire: Any = None
    error: JobError | None = None
    lost: bool = False
    forwarded: bytes | None = None  # the outputs went to the next stage: their digest


@dataclass
class Outcome:
    receipt: Receipt | None  # None: run by our own executor (self-award), nothing owed
    executor: str
    award: Award | None  # None likewise: no Award between a peer and itself
    outputs: dict[int, Arrays]
    attempts: list[tuple[str, str]]
    wires: dict[int, Any] = field(default_factory=dict)  # seq -> outputs as received (referees)


class JobRun:
    """Drives one RequesterJob (a single job, or one lease batch) to its end."""

    def __init__(
        self,
        *,
        key: nacl.signing.SigningKey,
        request: JobRequest,
        publish: Callable[[Signed[JobRequest]], Any],
        open_stream: OpenStream,
        bid_sinks: dict[bytes, Callable[[Bid], None]],
        entry: ModelEntry | None,
        limits: TensorLimits,
        policy: rq.RequesterPolicy,
        single_input: Any = None,
        banned: Container[str] = frozenset(),
        reputation: Mapping[str, float] | None = None,
        expected: frozenset[str] = frozenset(),
        expected_complete: bool = False,
        local: LocalRunner | None = None,
        pool: StreamPool | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.key = key
        # Our own executor bids only on single jobs (never on leases).
        self.local = local if single_input is not None and request.lease is None else None
        self._local_scope = trio.CancelScope()
        self._local_result: tuple[Arrays, Any] | None = None  # decoded outputs, wire
        self.clock = clock
        self.publish = publish
        self.open_stream = open_stream
        self.bid_sinks = bid_sinks
        self.entry = entry
        self.limits = limits
        self.single_input = single_input
        # Single jobs only: a lease keeps its stream for its whole batch anyway.
        self.pool = pool if single_input is not None else None
        digest = content_digest(single_input) if single_input is not None else None
        self._input_digest = digest  # once per job, not once per attempt
        self.job = rq.RequesterJob(
            request,
            now=clock(),
            policy=policy,
            input_digest=digest,
            banned=banned,
            reputation=reputation or {},
            expected=expected,
            expected_complete=expected_complete,
        )
        self.attempt: Attempt | None = None
        self.attempt_changed = trio.Event()
        # A pipeline stage whose inputs come from the previous stage's executor (``expect_input``).
        self.inputs_forwarded = False
        self.outcome: Outcome | None = None
        self.done = trio.Event()
        self.error: rq.MarketFailure | None = None
        # Bounded: a bid flood is dropped here (the machine keeps the best bids anyway).
        self._send, self._recv = trio.open_memory_channel[rq.Event](EVENT_QUEUE)
        self._bids_dropped = 0
        self._auction_t0 = self.clock()

    @property
    def request(self) -> JobRequest:
        return self.job.request

    @property
    def lease(self) -> LeaseTerms | None:
        return self.job.request.lease

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> Outcome:
        """Run to the end; returns the outcome or raises the MarketFailure."""
        job_id = self.request.job_id
        self.bid_sinks[job_id] = self._on_bid
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._timer = _Timer(nursery, self._send, self.clock)
                task_status.started()
                try:
                    await self._act(self.job.start())
                    while self.job.outcome is None:
                        event = await self._recv.receive()
                        await self._act(self.job.handle(event))
                    if self.attempt is not None and isinstance(self.job.outcome, rq.Complete):
                        with trio.move_on_after(2.0):  # let the acceptance go out
                            await self.attempt.ended.wait()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.bid_sinks.pop(job_id, None)
            self.done.set()
            self._set_attempt(None)
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome

    def _on_bid(self, bid: Bid) -> None:
        metrics.BIDS.labels("received").inc()
        try:
            self._send.send_nowait(rq.BidReceived(bid, self.clock()))
        except trio.WouldBlock:
            self._bids_dropped += 1

    def post(self, event: rq.Event) -> None:
        """Queue an event from outside the run (lease jobs); never blocks, never drops."""
        if self.done.is_set():
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._nursery.start_soon(self._send.send, event)

    def _set_attempt(self, attempt: Attempt | None) -> None:
        self.attempt = attempt
        self.attempt_changed.set()
        self.attempt_changed = trio.Event()

    async def _act(self, actions: list[rq.Action]) -> None:
        for a in actions:
            if isinstance(a, rq.Publish):
                self._auction_t0 = self.clock()  # metrics: auction latency
                await self.publish(sign_message(self.key, a.request))
                self._quote_locally(a.request)
            elif isinstance(a, rq.RunLocally):
                metrics.AUCTION_SECONDS.observe(self.clock() - self._auction_t0)
                self._local_scope = trio.CancelScope()
                self._nursery.start_soon(self._local_task, self._local_scope)
            elif isinstance(a, rq.StartTimer):
                self._timer.set(a.at)
            elif isinstance(a, rq.SendAward):
                metrics.AUCTION_SECONDS.observe(self.clock() - self._auction_t0)
                attempt = Attempt(executor=a.executor, award=a.award, bid=a.bid)
                self._set_attempt(attempt)
                self._nursery.start_soon(self._award_task, attempt)
            elif isinstance(a, rq.CancelAward):
                if a.executor == self.request.requester:
                    log.info("giving up on the local run: %s", a.reason)
                    self._local_scope.cancel()
                elif self.attempt is not None and self.attempt.executor == a.executor:
                    log.info("giving up on %s: %s", a.executor, a.reason)
                    self.attempt.failure = a.reason
                    self.attempt.scope.cancel()
                    self._fail_waiters(self.attempt)
                    self._set_attempt(None)
            elif isinstance(a, rq.Complete):
                receipt = Receipt.create(self.key, a.commitment)
                att = self.attempt
                outputs: dict[int, Arrays] = {}
                wires: dict[int, Any] = {}
                if att is not None and att.executor == a.commitment.message.executor:
                    att.acceptance = receipt.acceptance
                    att.decided.set()
                    outputs = att.decoded
                    wires = dict(att.outputs)
                self.outcome = Outcome(
                    receipt=receipt,
                    executor=a.commitment.message.executor,
                    award=a.award,
                    outputs=outputs,
                    attempts=list(self.job.attempts),
                    wires=wires,
                )
            elif isinstance(a, rq.CompleteLocally):
                assert self._local_result is not None  # LocalFinished follows it
                decoded, wire = self._local_result
                self.outcome = Outcome(
                    receipt=None,
                    executor=a.bid.executor,
                    award=None,
                    outputs={0: decoded},
                    attempts=list(self.job.attempts),
                    wires={0: wire},
                )
            elif isinstance(a, rq.SendAcceptance):
                att = self.attempt
                fs = att.fs if att is not None else None
                if (
                    att is not None
                    and fs is not None
                    and att.executor == a.commitment.message.executor
                ):
                    att.interim = Receipt.create(self.key, a.commitment)
                    # A gone stream: the award task sees it and reports it.
                    with contextlib.suppress(JobStreamClosed):
                        await fs.send(att.interim.acceptance)
            elif isinstance(a, rq.Fail):
                self.error = a.error
                self._local_scope.cancel()
                if self.attempt is not None:
                    self.attempt.scope.cancel()
                    self._fail_waiters(self.attempt)

    def _quote_locally(self, request: JobRequest) -> None:
        """Our own executor's bid for this auction round, if it would bid (self-award)."""
        if self.local is None:
            return
        quote = self.local.local_quote(request)
        if quote is not None:
            self.post(rq.LocalBid(price=quote[0], eta_ms=quote[1], now=self.clock()))

    async def _local_task(self, scope: trio.CancelScope) -> None:
        """Run the job in our own worker and report it (``RunLocally``)."""
        assert self.local is not None
        me = self.request.requester
        with scope:
            try:
                arrays = decode_tensors(self.single_input, limits=self.limits)
                outputs = await self.local.run_local(
                    self.request.model_cid, arrays, deadline=self.request.deadline
                )
                wire = encode_tensors(outputs)
            except (EdgeModelError, ProtocolError, trio.TooSlowError) as exc:
                why = f"local run failed: {exc or type(exc).__name__}"
                await self._send.send(rq.AwardFailed(me, why, self.clock()))
                return
            ok, problem, decoded = check_outputs({0: wire}, self.entry, self.limits)
            if ok:
                self._local_result = (decoded[0], wire)
            await self._send.send(rq.LocalFinished(ok, self.clock(), problem))

    @staticmethod
    def _fail_waiters(att: Attempt) -> None:
        for w in att.waiters.values():
            if not w.done.is_set():
                w.lost = True
                w.done.set()

    async def _decide(self, att: Attempt, signed_c: Signed[ResultCommitment]) -> str:
        """The final commitment: the machine decides; the Acceptance goes out if it accepts."""
        assert att.fs is not None
        held = {seq: w for seq, w in att.outputs.items() if seq not in att.forwarded}
        ok, problem, decoded = check_outputs(held, self.entry, self.limits)
        att.decoded = decoded
        await self._send.send(rq.ResultReceived(signed_c, ok, self.clock(), problem))
        await att.decided.wait()  # Complete sets it; CancelAward cancels us
        if att.acceptance is not None:
            await att.fs.send(att.acceptance)
        return ""

    async def _award_task(self, att: Attempt) -> None:
        reason = ""
        undelivered = False
        try:
            with att.scope:
                try:
                    reason = await self._award(att)
                except _Undelivered as exc:
                    reason, undelivered = f"cannot open a job stream: {exc}", True
        finally:
            att.ended.set()
            self._fail_waiters(att)
            if att.fs is not None:
                if att.acceptance is None:
                    await att.fs.reset()
                elif self.pool is not None and not reason:
                    await self.pool.give(att.executor, att.fs)  # the next award reuses it
                else:
                    await att.fs.close()
        if undelivered:  # the machine may send the same award again
            await self._send.send(rq.AwardUndelivered(att.executor, reason, self.clock()))
        elif reason:
            await self._send.send(rq.AwardFailed(att.executor, reason, self.clock()))

    async def _award(self, att: Attempt) -> str:
        """Returns a failure reason, or "" once the result was reported."""
        job_id = att.award.job_id
        try:
            pending = await self._start(att)
            assert att.fs is not None
            att.ready.set()
            early: Signed[ResultCommitment] | None = None  # a single job commits first
            while True:
                item = pending if pending is not None else await att.fs.receive()
                pending = None
                if isinstance(item, JobResult | JobForwarded) and item.job_id == job_id:
                    fwd = isinstance(item, JobForwarded)
                    out = None if isinstance(item, JobForwarded) else item.outputs
                    digest = (
                        item.output_digest
                        if isinstance(item, JobForwarded)
                        else content_digest(item.outputs)
                    )
                    if self.inputs_forwarded:  # the previous stage's digest may come after
                        await self._await_input(att, item.seq)
                    # The machine checks the seq (asked for, not twice); a bad one revokes us.
                    await self._send.send(
                        rq.ResultArrived(att.executor, item.seq, digest, self.clock())
                    )
                    if item.seq in att.inputs and item.seq not in att.outputs:
                        att.outputs[item.seq] = out
                        if fwd:
                            att.forwarded[item.seq] = digest
                        w = att.waiters.get(item.seq)
                        if w is not None:
                            w.wire = out
                            w.forwarded = digest if fwd else None
                            w.done.set()
                    if early is not None and 0 in att.outputs:
                        return await self._decide(att, early)
                elif isinstance(item, Signed) and isinstance(item.message, ResultCommitment):
                    signed_c: Signed[ResultCommitment] = item
                    c = signed_c.message
                    if self.lease is None and 0 not in att.outputs:
                        early = signed_c  # judged against the result that follows it
                    elif (
                        self.lease is not None and not att.closing and c.count < att.award.max_jobs
                    ):
                        # Fair exchange: a cumulative commitment mid-lease; the machine checks
                        # it against what arrived and answers with SendAcceptance.
                        await self._send.send(rq.InterimReceived(signed_c, self.clock()))
                    else:
                        return await self._decide(att, signed_c)
                elif isinstance(item, Signed) and isinstance(item.message, JobError):
                    err = item.message
                    w = att.waiters.get(err.seq)
                    if self.lease is not None and err.code == "bad-input" and w is not None:
                        w.error = err
                        w.done.set()  # that job's inputs are bad; the lease goes on
                        continue
                    return f"{err.code}: {err.message}"
                else:
                    return f"unexpected frame {type(item).__name__} from the executor"
        except _Undelivered:
            raise
        except JobStreamClosed as exc:
            return str(exc)
        except ProtocolError as exc:
            return f"bad frame from the executor: {exc}"
        except (OSError, trio.TooSlowError) as exc:
            return f"cannot reach the executor: {str(exc) or type(exc).__name__}"
        except Exception as exc:  # py-libp2p dial/negotiation errors have no common base
            return f"cannot open a job stream: {str(exc) or type(exc).__name__}"

    async def _start(self, att: Attempt) -> JobFrame | None:
        """Get a stream to the winner and send the Award (and a single job's inputs, in the
        same write). A pooled stream is tried first; if it turns out closed before anything
        came back on it (the executor let it go idle), the same frames go out on a fresh
        stream. Returns the first frame already read from a pooled stream, or None."""
        frames: list[JobFrame] = [sign_message(self.key, att.award)]
        pooled = await self.pool.take(att.executor) if self.pool is not None else None
        if pooled is None:
            # Nothing written yet: a stream that cannot be opened never carried the award.
            try:
                att.fs = await self.open_stream(att.executor, self.request.deadline)
            except Exception as exc:  # dial/negotiation errors have no common base
                raise _Undelivered(str(exc) or type(exc).__name__) from exc
        if self.single_input is not None:
            assert self._input_digest is not None
            self.job.handle(rq.InputSent(att.executor, 0, self._input_digest, self.clock()))
            att.inputs[0] = self._input_digest
            att.waiters[0] = _Waiter()
            frames.append(JobInput(att.award.job_id, 0, self.single_input))
        if pooled is not None:
            att.fs = pooled
            try:
                await pooled.send_many(frames)
                return await pooled.receive()
            except JobStreamClosed:
                assert self.pool is not None
                self.pool.stale += 1
                await pooled.reset()
            att.fs = await self.open_stream(att.executor, self.request.deadline)
        assert att.fs is not None
        await att.fs.send_many(frames)
        return None

    # --- lease side ------------------------------------------------------------------

    def holds(self, att: Attempt) -> bool:
        """Whether ``att`` is still the machine's live award (inputs may go to it)."""
        return self.attempt is att and self.job.awarded_to == att.executor and not att.closing

    async def send_input(self, att: Attempt, wire: Any, digest: bytes) -> tuple[int, _Waiter]:
        """Send one job's inputs on ``att``'s stream under the next seq the machine allocates;
        returns the seq and the waiter its result wakes. ``JobStreamClosed`` if the stream is
        gone, ``LocalProtocolError`` if ``att`` is no longer the live award (check ``holds``)."""
        fs = att.fs
        if fs is None or fs.closed or att.ended.is_set():
            raise JobStreamClosed(f"the job stream to {att.executor} is closed")
        seq = self.job.next_seq
        self.job.handle(rq.InputSent(att.executor, seq, digest, self.clock()))  # no actions
        att.inputs[seq] = digest
        waiter = att.waiters[seq] = _Waiter()
        await fs.send(JobInput(att.award.job_id, seq, wire))
        if att.ended.is_set():  # the award task ended while we wrote: nobody reads a result
            self._fail_waiters(att)
        return seq, waiter

    def expect_input(self, att: Attempt, digest: bytes) -> tuple[int, _Waiter]:
        """A pipeline stage whose inputs the previous stage's executor forwards straight to
        ``att``'s: record their digest (from that stage's ``JobForwarded``) under the next
        seq, as ``send_input`` does for inputs we send; the commitment must name it."""
        if att.ended.is_set() or not self.holds(att):
            raise JobStreamClosed(f"the award to {att.executor} has ended")
        seq = self.job.next_seq
        self.job.handle(rq.InputSent(att.executor, seq, digest, self.clock()))  # no actions
        att.inputs[seq] = digest
        waiter = att.waiters[seq] = _Waiter()
        att.inputs_changed.set()
        att.inputs_changed = trio.Event()
        return seq, waiter

    async def _await_input(self, att: Attempt, seq: int) -> None:
        """A forwarded stage's result may overtake the previous stage's digest (another
        connection): wait for it a while; a result still unasked-for then revokes."""
        with trio.move_on_after(max(0.1, min(10.0, self.request.deadline - self.clock()))):
            while seq not in att.inputs:
                await att.inputs_changed.wait()

    def can_send(self, max_jobs: int) -> bool:
        """Another input fits in this batch (which has not ended)."""
        return self.job.phase is not rq.Phase.DONE and self.job.next_seq < max_jobs

    async def current_attempt(self) -> Attempt | None:
        """The attempt whose stream is ready, waiting through fail-overs; None once ended."""
        while not self.done.is_set():
            att = self.attempt
            if att is not None and att.ready.is_set() and not att.closing:
                if not att.ended.is_set():
                    return att
                await self.attempt_changed.wait()  # set on the next award, and at the end
                continue
            changed = self.attempt_changed
            if att is not None and not att.ready.is_set():
                with trio.move_on_after(0.05):
                    await att.ready.wait()
                continue
            await changed.wait()
        return None

    async def close_batch(self) -> None:
        """End a lease batch: BatchClose for the jobs done, or just cancel if none were."""
        att = self.attempt
        if att is None or att.fs is None or not att.ready.is_set():
            self._cancel_all()
            return
        att.closing = True
        with trio.move_on_after(max(1.0, self.request.deadline - self.clock())):
            for w in list(att.waiters.values()):  # jobs in flight finish first
                await w.done.wait()
        done = len(att.outputs)
        if done == 0 or self.job.outcome is not None:
            self._cancel_all()
            return
        try:
            await att.fs.send(BatchClose(att.award.job_id, done))
        except JobStreamClosed:
            self._cancel_all()

    def _cancel_all(self) -> None:
        if self.job.outcome is None and not self.done.is_set():
            self.post(rq.DeadlineReached(self.clock()))


def new_request(
    *,
    requester: str,
    cid: str,
    wire: Mapping[str, Any],
    max_price: int,
    deadline: float,
    bid_window: float,
    spot_check: float = 0.0,
    lease: LeaseTerms | None = None,
) -> JobRequest:
    metas, nbytes = input_meta(wire)
    return JobRequest(
        job_id=os.urandom(16),
        requester=requester,
        model_cid=cid,
        inputs=metas,
        input_bytes=nbytes,
        max_price=max_price,
        deadline=deadline,
        bid_window=bid_window,
        spot_check=spot_check,
        nonce=os.urandom(16),
        lease=lease,
    )


def to_arrays(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """User inputs as numpy arrays (lists and scalars are converted; dtypes must be ours)."""
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        kind = dtype_name(arr.dtype)
        if kind is None:
            raise ValueError(f"input {name!r} has dtype {arr.dtype}, which the wire cannot carry")
        if kind == STRING:  # str/bytes elements -> an object array of str, as ONNX wants
            try:
                arr = as_strings(arr, f"input {name!r}")
            except ProtocolError as exc:
                raise ValueError(str(exc)) from None
        out[name] = arr
    return out
