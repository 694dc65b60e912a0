"""The executor's side of the market: a sans-IO state machine for all its jobs.

``ExecutorState.handle(event)`` takes what the I/O layer saw (a job request
on gossip, an award on a job stream, an input frame, an execution that
finished, a closed stream, a clock tick) and returns actions (publish a bid,
accept or reject an award, start an execution, send a result, an error or a
commitment to sign). It never reads the clock and never signs.

Rules it enforces:
- bid only for served models, within ``max_price``, with capacity left, and
  when the eta (measured p50 x queue position + margin) fits the deadline;
- accept an award only if it matches this executor's own live bid (job id,
  requester, model, price, lease terms), the bid has not expired, the
  deadline has not passed, and a slot is free;
- never start the same ``(job_id, seq)`` twice, nor any job of a finished
  award, even if the job id is requested again later (the last
  ``max_finished`` finished ids are remembered);
- one ``ResultCommitment`` per award: per job, or per lease batch with
  ``count``, total price and ``batch_digest`` over the per-job digests.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import assert_never

from protocols.errors import LocalProtocolError
from protocols.market import MAX_ETA_MS, Award, Bid, JobError, JobRequest
from protocols.market_fields import want_int, want_peer_id
from protocols.receipt import MAX_COMPUTE_MS, ResultCommitment, batch_digest

# --- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelOffer:
    """What this executor charges for one job of a model and how fast it ran it (p50)."""

    price: int
    p50_ms: int

    def __post_init__(self) -> None:
        want_int("ModelOffer", "price", self.price)
        want_int("ModelOffer", "p50_ms", self.p50_ms, hi=MAX_ETA_MS)


@dataclass(frozen=True)
class ExecutorConfig:
    peer_id: str
    models: Mapping[str, ModelOffer]
    max_concurrent: int = 1
    max_queue: int = 4
    bid_validity_s: float = 5.0
    # Added to every eta for transfer and scheduling.
    eta_margin_ms: int = 20
    max_input_bytes: int = 64 * 1024 * 1024
    # Bound on remembered bids, so a gossip flood cannot grow memory.
    max_open_bids: int = 4096
    # Finished job ids remembered (oldest forgotten first) so none runs twice.
    max_finished: int = 100_000
    # Deadlines and lease ends come from the requester's clock: judged with this allowance.
    # 0 here (exact rules); the peer sets ``protocols.market.CLOCK_SKEW_S``. A bid's
    # expiry is written that much later too, so a requester whose clock is ahead still
    # finds it valid.
    clock_skew_s: float = 0.0
    # Fair exchange on leases: jobs started (and results delivered) beyond the last
    # cumulative Acceptance, at most; a lease's own ``window`` may only lower it.
    max_unaccepted: int = 32

    def __post_init__(self) -> None:
        want_peer_id("ExecutorConfig", "peer_id", self.peer_id)
        if (
            self.max_concurrent < 1
            or self.max_queue < 0
            or self.max_open_bids < 1
            or self.max_finished < 1
            or self.max_unaccepted < 1
        ):
            raise LocalProtocolError(
                "ExecutorConfig needs max_concurrent>=1, max_queue>=0, max_open_bids>=1, "
                "max_finished>=1, max_unaccepted>=1"
            )
        if not 0 < self.bid_validity_s <= 3600:
            raise LocalProtocolError("ExecutorConfig.bid_validity_s must be in (0, 3600]")
        if not 0 <= self.clock_skew_s <= 600:
            raise LocalProtocolError("ExecutorConfig.clock_skew_s must be in [0, 600]")

    @property
    def slots(self) -> int:
        return self.max_concurrent + self.max_queue


# --- events -----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSeen:
    """A signature-checked JobRequest from gossip."""

    request: JobRequest
    now: float


@dataclass(frozen=True)
class AwardReceived:
    """A signature-checked Award, the first frame of an incoming job stream."""

    award: Award
    now: float


@dataclass(frozen=True)
class InputReceived:
    """The inputs of job ``seq`` (0 for a single job) arrived and passed the model's limits."""

    job_id: bytes
    seq: int
    now: float


@dataclass(frozen=True)
class InputRejected:
    """The inputs of job ``seq`` failed the model's declared inputs or limits (not run)."""

    job_id: bytes
    seq: int
    reason: str
    now: float


@dataclass(frozen=True)
class ExecutionFinished:
    """Job ``seq`` ran; digests are ``content_digest`` of its inputs and outputs wire maps."""

    job_id: bytes
    seq: int
    input_digest: bytes
    output_digest: bytes
    compute_ms: int
    now: float

    def __post_init__(self) -> None:
        if len(self.input_digest) != 32 or len(self.output_digest) != 32:
            raise LocalProtocolError("ExecutionFinished digests must be 32-byte sha256 digests")
        if self.compute_ms < 0:
            raise LocalProtocolError("ExecutionFinished.compute_ms must be >= 0")


@dataclass(frozen=True)
class ExecutionFailed:
    job_id: bytes
    seq: int
    reason: str
    now: float
    code: str = "internal"


@dataclass(frozen=True)
class BatchCloseReceived:
    """The requester ends a lease after ``count`` jobs."""

    job_id: bytes
    count: int
    now: float


@dataclass(frozen=True)
class ConnectionLost:
    """The job stream for ``job_id`` closed or broke; uncommitted work is lost."""

    job_id: bytes
    now: float


@dataclass(frozen=True)
class AcceptanceReceived:
    """The requester's signed Acceptance of our last interim (cumulative) commitment of a
    lease arrived and verified; it covers the first ``count`` results."""

    job_id: bytes
    count: int
    now: float


@dataclass(frozen=True)
class Tick:
    """Periodic clock: prunes expired bids and abandons awards past their deadline."""

    now: float


Event = (
    RequestSeen
    | AwardReceived
    | InputReceived
    | InputRejected
    | ExecutionFinished
    | ExecutionFailed
    | BatchCloseReceived
    | ConnectionLost
    | AcceptanceReceived
    | Tick
)

# --- actions ----------------------------------------------------------------------


@dataclass(frozen=True)
class PublishBid:
    """Sign ``bid`` and publish it on the request's topic."""

    bid: Bid


@dataclass(frozen=True)
class Declined:
    """No bid for this request (for logs and metrics only)."""

    job_id: bytes
    reason: str


@dataclass(frozen=True)
class AcceptAward:
    """Keep the job stream open and read inputs for ``award``."""

    award: Award


@dataclass(frozen=True)
class RejectAward:
    """Sign ``error``, send it on the stream, close it."""

    error: JobError


@dataclass(frozen=True)
class StartExecution:
    """Run the inputs of ``(job_id, seq)`` in a worker thread."""

    job_id: bytes
    seq: int


@dataclass(frozen=True)
class SendResult:
    """Send the outputs of ``(job_id, seq)`` (a JobResult frame)."""

    job_id: bytes
    seq: int


@dataclass(frozen=True)
class SendError:
    """Sign ``error`` and send it on the job stream (the stream stays usable for leases)."""

    error: JobError


@dataclass(frozen=True)
class SendCommitment:
    """Sign ``commitment`` (``protocols.receipt.commit``) and send it; the award is finished."""

    commitment: ResultCommitment


@dataclass(frozen=True)
class SendInterim:
    """Sign ``commitment`` (cumulative: every result delivered so far of a lease) and send
    it; the award goes on, and no job past the window starts until it is accepted."""

    commitment: ResultCommitment


@dataclass(frozen=True)
class Abandon:
    """Close the stream of ``job_id``: its award is over without a commitment."""

    job_id: bytes
    reason: str


Action = (
    PublishBid
    | Declined
    | AcceptAward
    | RejectAward
    | StartExecution
    | SendResult
    | SendError
    | SendCommitment
    | SendInterim
    | Abandon
)

# --- state ------------------------------------------------------------------------


class JobPhase(enum.Enum):
    """One job id's phase at this executor (``ExecutorState.job_phase``)."""

    UNKNOWN = "unknown"
    BIDDING = "bidding"  # an open bid, no award yet
    RUNNING = "running"  # award accepted: inputs run, results go out
    FINISHED = "finished"  # committed or ended; never awarded again


@dataclass
class _OpenBid:
    request: JobRequest
    bid: Bid


@dataclass
class _Job:
    award: Award
    started: set[int] = field(default_factory=set)
    results: dict[int, tuple[bytes, bytes, int]] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    window: int = 1  # see LeaseTerms.window (a single job: 1)
    accepted: int = 0  # results the requester's last cumulative Acceptance covers
    interim: int = 0  # count of the interim commitment awaiting its Acceptance (0: none)
    deferred: list[int] = field(default_factory=list)  # inputs past the window, not started

    @property
    def unaccepted(self) -> int:
        """Jobs started (running or delivered, not failed) beyond the last Acceptance."""
        return len(self.started) - len(self.failed) - self.accepted


@dataclass
class ExecutorState:
    """All of one executor's bids and awarded jobs."""

    config: ExecutorConfig
    _bids: dict[bytes, _OpenBid] = field(default_factory=dict, init=False)
    _jobs: dict[bytes, _Job] = field(default_factory=dict, init=False)
    # Finished job ids in finishing order (a bounded FIFO): never awarded again.
    _finished: dict[bytes, None] = field(default_factory=dict, init=False)

    @property
    def active(self) -> int:
        """Awards accepted and not finished (they hold the slots)."""
        return len(self._jobs)

    @property
    def awarded_jobs(self) -> frozenset[bytes]:
        """Job ids of the awards in progress."""
        return frozenset(self._jobs)

    def open_bid(self, job_id: bytes) -> Bid | None:
        held = self._bids.get(job_id)
        return None if held is None else held.bid

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns the actions to perform, in order.

        Raises ``LocalProtocolError`` for an event the I/O layer must never send: an
        execution that finished or failed for a seq of a live award that the machine
        never started (or already settled). Remote behaviour (a duplicate input, an
        input or close for an unknown job) is answered with a ``JobError`` instead,
        and events about an award that already ended are ignored.
        """
        match event:
            case RequestSeen(request=request, now=now):
                return self._on_request(request, now)
            case AwardReceived(award=award, now=now):
                return self._on_award(award, now)
            case InputReceived(job_id=job_id, seq=seq, now=now):
                return self._on_input(job_id, seq, now)
            case InputRejected():
                return self._on_rejected(event)
            case ExecutionFinished():
                self._check_running(event.job_id, event.seq)
                return self._on_finished(event)
            case ExecutionFailed():
                self._check_running(event.job_id, event.seq)
                return self._on_failed(event)
            case BatchCloseReceived(job_id=job_id, count=count):
                return self._on_close(job_id, count)
            case ConnectionLost(job_id=job_id):
                return self._end(job_id, None)
            case AcceptanceReceived(job_id=job_id, count=count):
                return self._on_accepted(job_id, count)
            case Tick(now=now):
                return self._on_tick(now)
            case _:
                assert_never(event)

    def _check_running(self, job_id: bytes, seq: int) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return  # the award ended meanwhile (stream lost): a late, legal report
        if seq not in job.started or seq in job.results or seq in job.failed:
            raise LocalProtocolError(
                f"execution report for job {seq} of {job_id.hex()[:12]}, which is not running"
            )

    def job_phase(self, job_id: bytes) -> JobPhase:
        """Where one award is: running here, finished (committed or ended), or unknown."""
        if job_id in self._jobs:
            return JobPhase.RUNNING
        if job_id in self._finished:
            return JobPhase.FINISHED
        return JobPhase.BIDDING if job_id in self._bids else JobPhase.UNKNOWN

    # --- bidding --------------------------------------------------------------------

    def quote(self, request: JobRequest, now: float) -> tuple[int, int] | str:
        """(price, eta_ms) this executor would bid for ``request`` now, or why it would not
        bid. Records nothing: ``RequestSeen`` bids; a requester that serves the model
        itself uses this as its own quote (``protocols.requester.LocalBid``)."""
        offer = self.config.models.get(request.model_cid)
        if offer is None:
            return "model not served"
        if offer.price > request.max_price:
            return f"price {offer.price} is over the max price {request.max_price}"
        if request.input_bytes > self.config.max_input_bytes:
            return f"inputs of {request.input_bytes} bytes are over the limit"
        if self.active >= self.config.slots:
            return "no capacity"
        queue_position = self.active // self.config.max_concurrent
        eta_ms = min(offer.p50_ms * (1 + queue_position) + self.config.eta_margin_ms, MAX_ETA_MS)
        if now + eta_ms / 1000.0 > request.deadline + self.config.clock_skew_s:
            return f"eta {eta_ms} ms misses the deadline"
        return offer.price, eta_ms

    def _on_request(self, request: JobRequest, now: float) -> list[Action]:
        def no(reason: str) -> list[Action]:
            return [Declined(request.job_id, reason)]

        if request.requester == self.config.peer_id:
            return no("own request")  # the requester quotes for itself with ``quote``
        if request.job_id in self._jobs or request.job_id in self._finished:
            return no("job already awarded here")
        quote = self.quote(request, now)
        if isinstance(quote, str):
            return no(quote)
        offer_price, eta_ms = quote
        if request.job_id not in self._bids and len(self._bids) >= self.config.max_open_bids:
            self._prune_bids(now)
            if len(self._bids) >= self.config.max_open_bids:
                return no("too many open bids")
        bid = Bid(
            job_id=request.job_id,
            executor=self.config.peer_id,
            price=offer_price,
            eta_ms=eta_ms,
            expires_at=min(now + self.config.bid_validity_s, request.deadline)
            + self.config.clock_skew_s,
        )
        # A new auction round for the same job replaces the earlier bid.
        self._bids[request.job_id] = _OpenBid(request=request, bid=bid)
        return [PublishBid(bid)]

    # --- awards ---------------------------------------------------------------------

    def _on_award(self, award: Award, now: float) -> list[Action]:
        problem, code = self._award_problem(award, now)
        if problem:
            return [RejectAward(self._error(award.job_id, code, problem))]
        self._bids.pop(award.job_id, None)
        cap = self.config.max_unaccepted
        window = 1 if award.lease is None else min(award.lease.window or cap, cap)
        self._jobs[award.job_id] = _Job(award=award, window=window)
        return [AcceptAward(award)]

    def _award_problem(self, award: Award, now: float) -> tuple[str, str]:
        if award.executor != self.config.peer_id:
            return f"award is for {award.executor}, not this executor", "bad-award"
        if award.job_id in self._jobs or award.job_id in self._finished:
            return "this job was already awarded here", "duplicate"
        held = self._bids.get(award.job_id)
        if held is None:
            return "no bid of ours for this job", "bad-award"
        req, bid = held.request, held.bid
        if award.requester != req.requester or award.model_cid != req.model_cid:
            return "award names another requester or model than the request", "bad-award"
        if award.price != bid.price:
            return f"award price {award.price} is not our bid {bid.price}", "bad-award"
        if award.lease != req.lease:
            return "award lease terms differ from the request's", "bad-award"
        if award.deadline > req.deadline:
            return "award deadline is later than the request's", "bad-award"
        if now > bid.expires_at:
            return f"our bid expired {now - bid.expires_at:.3f} s before the award", "bad-award"
        if now >= award.deadline + self.config.clock_skew_s:
            return "the award's deadline has passed", "deadline"
        if self.active >= self.config.slots:
            return "no capacity left", "busy"
        return "", ""

    # --- execution ------------------------------------------------------------------

    def _on_input(self, job_id: bytes, seq: int, now: float) -> list[Action]:
        job = self._jobs.get(job_id)
        if job is None:
            code = "duplicate" if job_id in self._finished else "bad-award"
            return [SendError(self._error(job_id, code, "no open award for this job", seq))]
        award = job.award
        if seq in job.started or seq in job.deferred:
            return [SendError(self._error(job_id, "duplicate", f"job {seq} already ran", seq))]
        if seq >= award.max_jobs:
            why = f"job {seq} is beyond the award's {award.max_jobs} jobs"
            return [SendError(self._error(job_id, "bad-input", why, seq))]
        cutoff = award.deadline if award.lease is None else award.lease.until
        if now >= cutoff + self.config.clock_skew_s:
            why = "the award's deadline has passed" if award.lease is None else "the lease is over"
            return [SendError(self._error(job_id, "deadline", why, seq))]
        if award.lease is not None and job.unaccepted >= job.window:
            job.deferred.append(seq)  # fair exchange: starts once the requester accepts
            return []
        job.started.add(seq)
        return [StartExecution(job_id, seq)]

    def _on_rejected(self, ev: InputRejected) -> list[Action]:
        job = self._jobs.get(ev.job_id)
        if job is None or ev.seq in job.started:
            return []
        # Counted as started-and-failed, so the same seq can never run later.
        job.started.add(ev.seq)
        return self._on_failed(
            ExecutionFailed(ev.job_id, ev.seq, ev.reason, ev.now, code="bad-input")
        )

    def _on_finished(self, ev: ExecutionFinished) -> list[Action]:
        job = self._jobs.get(ev.job_id)
        if job is None or ev.seq not in job.started or ev.seq in job.results:
            return []  # the award ended meanwhile (stream lost); nothing to send
        job.results[ev.seq] = (ev.input_digest, ev.output_digest, ev.compute_ms)
        if job.award.lease is None:
            # Commitment first, then the result: our claim is fixed before the requester
            # sees the outputs, and the requester accepts against both.
            return [*self._commit(ev.job_id), SendResult(ev.job_id, ev.seq)]
        actions: list[Action] = [SendResult(ev.job_id, ev.seq)]
        if len(job.results) == job.award.max_jobs:
            return actions + self._commit(ev.job_id)
        return actions + self._maybe_interim(job)

    def _maybe_interim(self, job: _Job) -> list[Action]:
        """At half the window of delivered results, ask for a cumulative Acceptance."""
        if job.interim or len(job.results) - job.accepted < max(1, job.window // 2):
            return []
        job.interim = len(job.results)
        return [SendInterim(self._commitment(job))]

    def _on_accepted(self, job_id: bytes, count: int) -> list[Action]:
        job = self._jobs.get(job_id)
        if job is None:
            return []  # the award ended meanwhile
        if job.award.lease is None or count != job.interim:
            raise LocalProtocolError(
                f"acceptance of {count} results, but the interim commitment covers {job.interim}"
            )
        job.accepted, job.interim = count, 0
        actions: list[Action] = []
        while job.deferred and job.unaccepted < job.window:
            seq = job.deferred.pop(0)
            job.started.add(seq)
            actions.append(StartExecution(job_id, seq))
        return actions + self._maybe_interim(job)

    def _on_failed(self, ev: ExecutionFailed) -> list[Action]:
        job = self._jobs.get(ev.job_id)
        if job is None or ev.seq not in job.started or ev.seq in job.results:
            return []
        job.failed.add(ev.seq)
        code = ev.code if ev.code in ("bad-input", "internal", "deadline") else "internal"
        actions: list[Action] = [SendError(self._error(ev.job_id, code, ev.reason, ev.seq))]
        if job.award.lease is None:
            actions += self._end(ev.job_id, "the job failed")
        return actions

    def _on_close(self, job_id: bytes, count: int) -> list[Action]:
        job = self._jobs.get(job_id)
        if job is None:
            return []
        if (
            count != len(job.results)
            or len(job.started) != len(job.results) + len(job.failed)
            or job.deferred
        ):
            why = f"close says {count} jobs, {len(job.results)} finished of {len(job.started)}"
            return [SendError(self._error(job_id, "bad-input", why))]
        return self._commit(job_id)

    def _commit(self, job_id: bytes) -> list[Action]:
        job = self._jobs[job_id]
        if not job.results:
            return self._end(job_id, "no job finished")
        commitment = self._commitment(job)
        self._finish(job_id)
        return [SendCommitment(commitment)]

    def _commitment(self, job: _Job) -> ResultCommitment:
        """The cumulative commitment to every result delivered so far, in seq order."""
        job_id, award = job.award.job_id, job.award
        done = [job.results[s] for s in sorted(job.results)]
        if award.lease is None:
            input_digest, output_digest = done[0][0], done[0][1]
        else:
            input_digest = batch_digest([d[0] for d in done])
            output_digest = batch_digest([d[1] for d in done])
        commitment = ResultCommitment(
            job_id=job_id,
            requester=award.requester,
            executor=self.config.peer_id,
            model_cid=award.model_cid,
            input_digest=input_digest,
            output_digest=output_digest,
            price=award.price * len(done),
            compute_ms=min(sum(d[2] for d in done), MAX_COMPUTE_MS),
            count=len(done),
        )
        return commitment

    # --- endings and housekeeping ---------------------------------------------------

    def _end(self, job_id: bytes, reason: str | None) -> list[Action]:
        """End an award without a commitment; ``reason`` None means the stream is already gone."""
        if job_id not in self._jobs:
            return []
        self._finish(job_id)
        return [] if reason is None else [Abandon(job_id, reason)]

    def _finish(self, job_id: bytes) -> None:
        del self._jobs[job_id]
        self._finished[job_id] = None
        if len(self._finished) > self.config.max_finished:
            del self._finished[next(iter(self._finished))]

    def _on_tick(self, now: float) -> list[Action]:
        self._prune_bids(now)
        actions: list[Action] = []
        for job_id, job in list(self._jobs.items()):
            if now > job.award.deadline + self.config.clock_skew_s:
                actions += self._end(job_id, "the award's deadline passed")
        return actions

    def _prune_bids(self, now: float) -> None:
        for job_id, held in list(self._bids.items()):
            if now > held.bid.expires_at:
                del self._bids[job_id]

    def _error(self, job_id: bytes, code: str, message: str, seq: int = 0) -> JobError:
        return JobError(
            job_id=job_id, executor=self.config.peer_id, code=code, message=message[:1024], seq=seq
        )
