"""``Lease``: many jobs over one held executor, batch by batch (``MarketService.lease``).

A batch is one ``RequesterJob`` with ``LeaseTerms``: one auction, one award,
one stream, one commitment for its jobs. ``infer`` sends a job's inputs under
the seq the machine allocates (``JobRun.send_input``) and waits for its
result; ``map`` keeps a window of jobs in flight and yields results in order.
When the executor goes away the jobs in flight move to the next bidder or a
new auction; a used-up or expiring batch is renewed transparently.

A batch opened over a relay (a NATed executor) moves off it once a direct
connection to its executor is up (a hole punch, ``peer.reach.dcutr``): the
next job starts a new batch, whose stream the swarm puts on the direct
connection, and the relayed batch is closed (its jobs in flight finish there,
its receipt comes back as usual). A batch's stream cannot change connections
mid-batch (one stream per award in the job protocol), so this costs one
auction, which closes as soon as the held executor bids. ``route`` tells
which connection the held batch uses.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import numpy.typing as npt
import trio
from libp2p.peer.id import ID

from edge_models.spec import ModelEntry
from peer import metrics
from peer.market.auction import Auctions
from peer.market.clock import Clock, system_clock
from peer.market.jobspec import JobSpec
from peer.market.receipts import ReceiptBook
from peer.market.referee import Claim
from peer.market.requester import Attempt, JobFailed, JobRun, _Waiter, declared_problem, new_request
from peer.market.spot_check import SpotChecker
from peer.reach.dcutr import conn_addr, direct_connection, is_relayed
from protocols import requester as rq
from protocols.errors import ProtocolError
from protocols.market import LeaseTerms
from protocols.proofs import FraudProof
from protocols.receipt import Receipt, content_digest
from protocols.tensor import TensorLimits, decode_tensors, encode_tensors
from protocols.verification import compare_outputs

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
CheckInputs = Callable[[ModelEntry | None, Mapping[str, Any]], Arrays]

DEFAULT_WINDOW = 8
MAX_MOVES = 2  # batches moved off a relay per executor and lease (a direct one that breaks)


class Lease:
    """Jobs over one held executor. Made by ``MarketService.lease``."""

    MAX_TRIES = 6

    def __init__(
        self,
        *,
        auctions: Auctions,
        checker: SpotChecker,
        receipts: ReceiptBook,
        nursery: trio.Nursery,
        spec: JobSpec,
        check_inputs: CheckInputs,
        limits: TensorLimits,
        job_timeout: float,
        max_jobs: int,
        seconds: float,
        spot_check: float | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.auctions = auctions
        self.checker = checker
        self.book = receipts
        self.nursery = nursery
        self.spec = spec
        self.cid = spec.cid
        self.entry = spec.entry
        self.check_inputs = check_inputs
        self.limits = limits
        self.job_timeout = job_timeout
        self.max_jobs = max_jobs
        self.seconds = seconds
        self.max_price = spec.max_price
        self.bid_window = spec.bid_window
        self.clock = clock
        self.receipts: list[Receipt] = []
        self.errors: list[rq.MarketFailure] = []
        self.spot_check = spot_check
        self.spot_checks: list[str] = []  # outcome of each check: "agree" or what happened
        self.fraud_proofs: list[FraudProof] = []
        self.jobs_done = 0
        self._current: JobRun | None = None
        self._runs: list[JobRun] = []
        self._lock = trio.Lock()
        self._closed = False
        self._until = 0.0
        self._direct: Attempt | None = None  # the last attempt seen on a direct connection
        self._leaving: JobRun | None = None  # a relayed batch to end: a direct path is up
        self.moves: dict[str, int] = {}  # executor -> batches moved off a relay

    @property
    def executor(self) -> str | None:
        run = self._current
        att = run.attempt if run is not None else None
        return att.executor if att is not None else None

    @property
    def route(self) -> str | None:
        """The address of the connection the held batch's job stream is on (it holds
        ``/p2p-circuit`` while relayed); None while no stream is held."""
        run = self._current
        att = run.attempt if run is not None else None
        if att is None or att.fs is None:
            return None
        return conn_addr(getattr(att.fs.stream, "muxed_conn", None))

    async def _run(self, wire: Any) -> JobRun:
        """The batch to send on: the current one, or a new auction (``wire``: a job's
        inputs, whose names/shapes the JobRequest announces)."""
        run = self._current
        if self._usable(run):
            assert run is not None
            return run
        async with self._lock:  # one auction at a time, however many callers
            run = self._current
            if self._usable(run):
                assert run is not None
                return run
            until = self.clock() + self.seconds
            self._until = until
            deadline = until + max(5.0, self.job_timeout / 3)
            await self.auctions.prepare(self.cid, deadline)
            request = new_request(
                requester=self.auctions.peer_id,
                cid=self.cid,
                wire=wire,
                max_price=self.max_price,
                deadline=deadline,
                bid_window=self.bid_window,
                lease=LeaseTerms(max_jobs=self.max_jobs, until=until),
            )
            run = self.auctions.new_run(self.spec, request)
            await self.nursery.start(self._drive, run)
            old = self._current
            if old is not None and not old.done.is_set() and old.can_send(self.max_jobs):
                # A used-up batch commits by itself after its last job; an expiring one is closed.
                self.nursery.start_soon(old.close_batch)
            self._current = run
            self._runs.append(run)
            return run

    def _usable(self, run: JobRun | None) -> bool:
        return (
            run is not None
            and not run.done.is_set()
            and self.clock() < self._until - 0.5
            and (run.attempt is None or run.can_send(self.max_jobs))
            and not self._off_relay(run)
        )

    def _off_relay(self, run: JobRun) -> bool:
        """Whether ``run``'s stream goes through a relay while a direct connection to its
        executor is up: then the next job starts a new batch, which goes direct."""
        if run is self._leaving:
            return True
        att = run.attempt
        if att is None or att.fs is None or att is self._direct or not att.ready.is_set():
            return False
        if not is_relayed(getattr(att.fs.stream, "muxed_conn", None)):
            self._direct = att
            return False
        if self.moves.get(att.executor, 0) >= MAX_MOVES:
            return False
        host = getattr(self.auctions.dialer, "host", None)
        try:
            conn = direct_connection(host, ID.from_base58(att.executor)) if host else None
        except Exception:  # a peer id we cannot parse, a host without a swarm
            conn = None
        if conn is None:
            return False
        self.moves[att.executor] = self.moves.get(att.executor, 0) + 1
        self._leaving = run
        log.info(
            "lease: %s is reachable directly at %s now: its next jobs leave the relay",
            att.executor,
            conn_addr(conn),
        )
        return True

    async def _drive(self, run: JobRun, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            outcome = await run.run(task_status=task_status)
        except rq.MarketFailure as exc:
            self.auctions.record(self.cid, run.job.expected, run.job.bidders)
            if not self._closed:
                self.errors.append(exc)
            return
        self.auctions.record(self.cid, run.job.expected, run.job.bidders)
        assert outcome.receipt is not None  # a lease never runs on our own executor
        self.receipts.append(outcome.receipt)
        self.book.add(outcome.receipt, "requester")

    async def _send(self, wire: Any, digest: bytes) -> tuple[JobRun, Attempt, int, _Waiter] | str:
        """Send one job on the held executor (after an auction if none is held): the run,
        attempt, seq and waiter; or why not (the caller retries)."""
        run = await self._run(wire)
        att = await run.current_attempt()
        if att is None:
            if run.error is not None and run.outcome is None:
                if self._current is run:
                    self._current = None
                if isinstance(run.error, rq.NoExecutors | rq.DeadlineExceeded):
                    raise run.error
                return str(run.error)
            return "no executor held the lease"
        if not run.can_send(self.max_jobs) or not run.holds(att):
            return "batch used up"
        try:
            seq, waiter = await run.send_input(att, wire, digest)
        except Exception as exc:  # stream gone under us: fail over
            self._report(run, att, f"job stream failed: {exc}")
            return f"{att.executor}: {exc}"
        return run, att, seq, waiter

    async def _collect(
        self, run: JobRun, att: Attempt, seq: int, waiter: _Waiter, wire: Any
    ) -> Arrays | str:
        """Wait for job ``seq``'s result and check it: the outputs, or why they are unusable."""
        budget = max(1.0, self.job_timeout)
        eta = att.bid.eta_ms / 1000.0
        with trio.move_on_after(max(budget, eta * 4 + 1.0)) as cs:
            await waiter.done.wait()
        if cs.cancelled_caught:
            why = f"{att.executor}: no result for job {seq} in time"
            self._report(run, att, why)
            return why
        if waiter.error is not None:
            raise JobFailed(waiter.error)
        if waiter.lost or waiter.wire is None:
            return f"{att.executor}: {att.failure or 'executor went away'}"
        try:
            outputs = decode_tensors(waiter.wire, limits=self.limits)
        except ProtocolError as exc:
            self._report(run, att, f"outputs do not decode: {exc}")
            return f"{att.executor}: outputs do not decode: {exc}"
        problem = declared_problem(outputs, self.entry)
        if problem:
            self._report(run, att, f"outputs of job {seq}: {problem}")
            return f"{att.executor}: outputs of job {seq}: {problem}"
        self.jobs_done += 1
        if self.spot_check is not None and self.checker.sampler.want(
            self.spot_check, first_lease_job=seq == 0
        ):
            outputs = await self._check(run, att, seq, wire, waiter.wire, outputs)
        return outputs

    def _prepare_inputs(self, inputs: Mapping[str, Any]) -> tuple[Any, bytes]:
        if self._closed:
            raise RuntimeError("this lease is closed")
        wire = encode_tensors(self.check_inputs(self.entry, inputs))
        metrics.JOBS_REQUESTED.labels("lease").inc()
        return wire, content_digest(wire)

    async def infer(self, inputs: Mapping[str, Any]) -> Arrays:
        """Run one job on the leased executor; returns its outputs."""
        wire, digest = self._prepare_inputs(inputs)
        with metrics.LEASE_JOB_SECONDS.time():
            return await self._infer_wire(wire, digest)

    async def _infer_wire(self, wire: Any, digest: bytes, last: str = "") -> Arrays:
        last = last or "no executor held the lease"
        for _ in range(self.MAX_TRIES):
            sent = await self._send(wire, digest)
            if isinstance(sent, str):
                last = sent
                continue
            got = await self._collect(*sent, wire)
            if isinstance(got, str):
                last = got
                continue
            return got
        raise rq.ExecutorsFailed(model_cid=self.cid, job_id=b"\0" * 16, attempts=(("lease", last),))

    async def map(
        self, inputs: Iterable[Mapping[str, Any]], *, window: int = DEFAULT_WINDOW
    ) -> AsyncIterator[Arrays]:
        """Run every job of ``inputs`` on the leased executor with up to ``window`` in flight;
        yields the outputs in input order. The executor runs them as its slots allow (one
        at a time with ``max_concurrent_jobs = 1``) while the next inputs already travel.
        A job whose executor fails is retried like ``infer`` (the order is kept)."""
        if window < 1:
            raise ValueError("window must be >= 1")
        pending: deque[tuple[Any, bytes, tuple[JobRun, Attempt, int, _Waiter] | str]] = deque()
        it = iter(inputs)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                wire, digest = self._prepare_inputs(item)
                pending.append((wire, digest, await self._send(wire, digest)))
            if not pending:
                return
            wire, digest, sent = pending.popleft()
            got: Arrays | str = sent if isinstance(sent, str) else await self._collect(*sent, wire)
            yield got if not isinstance(got, str) else await self._infer_wire(wire, digest, got)

    async def _check(
        self, run: JobRun, att: Attempt, seq: int, wire: Any, out_wire: Any, outputs: Arrays
    ) -> Arrays:
        """Spot-check job ``seq`` of the held executor; returns the outputs to trust."""
        until = self.clock() + max(1.0, self.job_timeout)
        spec = JobSpec(self.cid, self.entry, self.max_price, until, self.bid_window)
        check = await self.checker.second_opinion(spec, wire, att.award.job_id, att.executor)
        if isinstance(check, str):
            self.spot_checks.append(check)
            return outputs
        verdict = compare_outputs(outputs, check.outputs)
        if verdict.agree:
            self.spot_checks.append("agree")
            return outputs
        log.warning(
            "lease spot check: %s and %s disagree: %s", att.executor, check.executor, verdict.reason
        )
        # Stop sending to it, and get its signed commitment for what it ran: the evidence.
        if self._current is run:
            self._current = None
        await run.close_batch()
        with trio.move_on_after(max(1.0, until - self.clock())):
            await run.done.wait()
        outcome = run.outcome
        if outcome is None:  # it never committed: it is not paid, there is nothing to prove
            self.spot_checks.append(f"{verdict.reason}; the executor did not commit")
            return check.outputs
        seqs = sorted(outcome.wires)
        # Neither runs locally: leases never do, second opinions ban our own executor.
        assert outcome.receipt is not None and check.receipt is not None
        claim = Claim(
            outcome.receipt.commitment,
            out_wire,
            seq=seqs.index(seq),
            ins=tuple(att.inputs[s] for s in seqs),
            outs=tuple(content_digest(outcome.wires[s]) for s in seqs),
        )
        claims = [claim, Claim(check.receipt.commitment, check.wire)]
        proofs, why = await self.checker.referee(claims, wire, verdict.reason, until)
        self.fraud_proofs += proofs
        self.spot_checks.append(why)
        return check.outputs if att.executor in {p.offender for p in proofs} else outputs

    def _report(self, run: JobRun, att: Attempt, reason: str) -> None:
        if run.attempt is att:
            att.failure = reason
            att.scope.cancel()
            run.post(rq.AwardFailed(att.executor, reason, self.clock()))

    async def aclose(self) -> None:
        """Close the open batch (its receipt comes back) and wait for every run to end."""
        self._closed = True
        for run in self._runs:
            if not run.done.is_set():
                await run.close_batch()
        for run in self._runs:
            with trio.move_on_after(5.0):
                await run.done.wait()
