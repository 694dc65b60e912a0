"""The requester's side of one job (or one lease): a sans-IO state machine.

Drive it like h11: call ``start()`` once, then ``handle(event)`` for every
bid, timer, award failure or result; each call returns the actions the I/O
layer must perform, in order. The machine never reads a clock (every event
carries ``now``) and never signs: ``Publish``/``SendAward``/``Complete`` hand
the I/O layer the message to sign with its key.

Guarantees (checked by the stateful tests):
- exactly one terminal action per job, ``Complete``, ``CompleteLocally`` or ``Fail``; after it
  every event is ignored, so a job is never paid twice;
- at most one award outstanding: a new ``SendAward`` only after the previous
  one failed (``AwardFailed``/``ExecutorGone``) or was revoked (``CancelAward``);
- no award at or past the deadline, and no ``Complete`` for a result that
  arrives after it.

Phases: COLLECTING (bid window of auction ``round``) -> AWARDED (waiting for
the winner's result, timer at ``min(deadline, now + eta * slack + grace)``) ->
DONE. A failed award falls back to the next ranked bid; with none left a new
auction (round + 1) is published while one more bid window fits before the
deadline and ``max_rounds`` allows, else the job fails.

Self-award: a requester that serves the model itself reports its own quote
with ``LocalBid`` (price and eta from its executor's offer). It is ranked with
the remote bids by the same rules, so it wins only when it is the best bid
(and always when it is the only one). The winning local bid gives
``RunLocally`` instead of ``SendAward`` (no Award is signed: an Award and a
commitment between a peer and itself are invalid), and the job ends with
``CompleteLocally``: no commitment, no receipt, nothing paid. A local run that
fails or is too slow falls back to the next bid like any award. Bids from the
wire that name the requester as executor are dropped (only ``LocalBid`` makes
one), and leases never run locally (their ``LocalBid`` is ignored).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace
from typing import assert_never

from protocols.errors import LocalProtocolError, ProtocolError
from protocols.market import MAX_ROUND, Award, Bid, JobRequest
from protocols.receipt import ResultCommitment, batch_digest
from protocols.selection import DEFAULT_WEIGHTS, Weights, rank_bids
from protocols.signed import Signed

# --- failures (raised to the user by the I/O layer) -----------------------------


class MarketFailure(ProtocolError):
    """A job ended without a result. Nothing is owed for it."""

    def __init__(self, message: str, *, model_cid: str, job_id: bytes) -> None:
        super().__init__(message)
        self.model_cid = model_cid
        self.job_id = job_id


class NoExecutors(MarketFailure):
    """No usable bid arrived for the model in any auction."""

    def __init__(
        self, *, model_cid: str, job_id: bytes, waited_s: float, rounds: int, bids_seen: int = 0
    ) -> None:
        why = (
            "no peer serving it answered"
            if bids_seen == 0
            else f"all {bids_seen} bids were over the max price, expired or too slow"
        )
        super().__init__(
            f"no executor for model {model_cid} within {waited_s:.1f} s "
            f"({rounds} auction{'s' if rounds != 1 else ''}): {why}",
            model_cid=model_cid,
            job_id=job_id,
        )
        self.waited_s = waited_s
        self.rounds = rounds
        self.bids_seen = bids_seen


class ExecutorsFailed(MarketFailure):
    """Executors bid but every award failed, and no new auction fits."""

    def __init__(
        self, *, model_cid: str, job_id: bytes, attempts: tuple[tuple[str, str], ...]
    ) -> None:
        tried = "; ".join(f"{ex}: {why}" for ex, why in attempts) or "none"
        super().__init__(
            f"every executor for model {model_cid} failed ({tried})",
            model_cid=model_cid,
            job_id=job_id,
        )
        self.attempts = attempts


class DeadlineExceeded(MarketFailure):
    """The deadline passed before an acceptable result arrived."""

    def __init__(
        self,
        *,
        model_cid: str,
        job_id: bytes,
        deadline: float,
        attempts: tuple[tuple[str, str], ...],
    ) -> None:
        tried = "; ".join(f"{ex}: {why}" for ex, why in attempts) or "no award was made"
        super().__init__(
            f"job on model {model_cid} missed its deadline ({tried})",
            model_cid=model_cid,
            job_id=job_id,
        )
        self.deadline = deadline
        self.attempts = attempts


# --- events -------------------------------------------------------------------


@dataclass(frozen=True)
class BidReceived:
    """A bid whose signature the I/O layer checked (``Signed[Bid].message``)."""

    bid: Bid
    now: float


@dataclass(frozen=True)
class TimerFired:
    """The timer from the last ``StartTimer`` fired (early or spurious fires are ignored)."""

    now: float


@dataclass(frozen=True)
class AwardFailed:
    """The award to ``executor`` failed: unreachable, refused (JobError), stream broke."""

    executor: str
    reason: str
    now: float


@dataclass(frozen=True)
class AwardUndelivered:
    """No stream to ``executor`` could be opened, so no byte of the award reached it (a dial
    or protocol negotiation that timed out on a busy peer). Not the executor's fault: the
    same award is sent again while ``policy.max_opens`` and the deadline allow, else it
    counts as ``AwardFailed``. Report ``AwardFailed`` instead once anything was written."""

    executor: str
    reason: str
    now: float


@dataclass(frozen=True)
class ExecutorGone:
    """The awarded executor disconnected."""

    executor: str
    now: float


@dataclass(frozen=True)
class ResultReceived:
    """The executor's signed commitment (signature checked) and whether its outputs check out.

    ``outputs_ok`` is the I/O layer's verdict: outputs decode, match the
    model's declared outputs, and their digest (batch digest for a lease)
    equals ``commitment.output_digest``. ``problem`` says why not.
    """

    commitment: Signed[ResultCommitment]
    outputs_ok: bool
    now: float
    problem: str = ""


@dataclass(frozen=True)
class DeadlineReached:
    now: float


@dataclass(frozen=True)
class InputSent:
    """The I/O layer sent job ``seq``'s inputs (``content_digest`` ``digest``) to the awarded
    ``executor``. ``seq`` must be ``RequesterJob.next_seq``: the machine allocates seqs."""

    executor: str
    seq: int
    digest: bytes
    now: float

    def __post_init__(self) -> None:
        if len(self.digest) != 32 or self.seq < 0:
            raise LocalProtocolError("InputSent needs seq >= 0 and a 32-byte digest")


@dataclass(frozen=True)
class ResultArrived:
    """A JobResult for ``seq`` came from ``executor``; ``digest`` is ``content_digest`` of its
    outputs as received. The commitment is later checked against these digests."""

    executor: str
    seq: int
    digest: bytes
    now: float

    def __post_init__(self) -> None:
        if len(self.digest) != 32 or self.seq < 0:
            raise LocalProtocolError("ResultArrived needs seq >= 0 and a 32-byte digest")


@dataclass(frozen=True)
class LocalBid:
    """The requester's own executor serves the model and quotes ``price`` (micro-credits,
    its offer to others) and ``eta_ms`` for this job (single jobs only)."""

    price: int
    eta_ms: int
    now: float


@dataclass(frozen=True)
class LocalFinished:
    """The local run (after ``RunLocally``) ended with outputs; ``outputs_ok`` is the I/O
    layer's verdict that they decode and match the model's declared outputs. A local run
    that raised is reported as ``AwardFailed`` with the requester as executor."""

    outputs_ok: bool
    now: float
    problem: str = ""


@dataclass(frozen=True)
class InterimReceived:
    """A lease executor's signed cumulative commitment to the results delivered so far
    (fair exchange: it starts no job past its window until we accept)."""

    commitment: Signed[ResultCommitment]
    now: float


Event = (
    BidReceived
    | TimerFired
    | AwardFailed
    | AwardUndelivered
    | ExecutorGone
    | ResultReceived
    | DeadlineReached
    | InputSent
    | ResultArrived
    | InterimReceived
    | LocalBid
    | LocalFinished
)

# --- actions ------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Sign ``request`` and publish it on the model's gossip topic."""

    request: JobRequest


@dataclass(frozen=True)
class StartTimer:
    """(Re)arm this job's single timer for ``at``; replaces any earlier one."""

    at: float


@dataclass(frozen=True)
class SendAward:
    """Sign ``award``, open ``/edgeswarm/job/1`` to ``executor``, send it and the payload."""

    executor: str
    award: Award
    bid: Bid


@dataclass(frozen=True)
class RunLocally:
    """Run the job on this peer's own executor: its bid won the auction. No Award is
    signed and no stream opened; report ``LocalFinished`` or ``AwardFailed``."""

    bid: Bid


@dataclass(frozen=True)
class CompleteLocally:
    """Terminal: the requester's own executor ran the job. Nothing is signed or paid and
    no receipt exists (a receipt between a peer and itself would mint credit)."""

    bid: Bid


@dataclass(frozen=True)
class CancelAward:
    """Give up on the award to ``executor`` (close the stream); it will not be paid."""

    executor: str
    reason: str


@dataclass(frozen=True)
class Complete:
    """Terminal: sign the Acceptance of ``commitment``, send it, keep the Receipt."""

    commitment: Signed[ResultCommitment]
    award: Award


@dataclass(frozen=True)
class Fail:
    """Terminal: the job failed with ``error``; nothing is paid."""

    error: MarketFailure


@dataclass(frozen=True)
class SendAcceptance:
    """Sign the Acceptance of this cumulative commitment and send it to the executor (the
    lease goes on; the signed receipt is kept only if the batch never completes)."""

    commitment: Signed[ResultCommitment]


Action = (
    Publish
    | StartTimer
    | SendAward
    | RunLocally
    | CancelAward
    | Complete
    | CompleteLocally
    | Fail
    | SendAcceptance
)
Outcome = Complete | CompleteLocally | Fail


class Phase(enum.Enum):
    NEW = "new"
    COLLECTING = "collecting"
    AWARDED = "awarded"
    DONE = "done"


@dataclass(frozen=True)
class RequesterPolicy:
    """Retry and timing knobs (defaults suit interactive jobs)."""

    max_rounds: int = 3
    # The executor gets eta * eta_slack + grace_s, plus ``patience`` times the time then left
    # to the deadline, before we fall back to the next bid. A dead executor is dropped at once
    # (ExecutorGone); the timer only catches a live one that does not deliver, and on a loaded
    # box a slow live one is likelier to finish than a restart elsewhere.
    eta_slack: float = 2.0
    grace_s: float = 1.0
    patience: float = 0.0
    weights: Weights = DEFAULT_WEIGHTS
    # Distinct bidders remembered per job: a bid flood cannot grow memory without bound.
    max_bidders: int = 1024
    # Adaptive bid window: close the auction as soon as every expected bidder has bid
    # (``RequesterJob.expected``), or at once on a bid at or under ``good_enough_price``
    # (micro-credits per job; None: no such rule). The window's end stays the fallback.
    close_early: bool = True
    good_enough_price: int | None = None
    # Stream opens per executor per job: an award that never left (``AwardUndelivered``)
    # goes to the same executor again, up to this many opens in all.
    max_opens: int = 2

    def __post_init__(self) -> None:
        if (
            self.max_rounds < 1
            or self.eta_slack < 1.0
            or self.grace_s < 0.0
            or not 0.0 <= self.patience < 1.0
            or self.max_bidders < 1
            or self.max_opens < 1
            or (self.good_enough_price is not None and self.good_enough_price < 0)
        ):
            raise LocalProtocolError(
                "RequesterPolicy needs max_rounds>=1, eta_slack>=1, grace_s>=0, "
                "0<=patience<1, max_bidders>=1, max_opens>=1"
            )


_BIDS_PER_EXECUTOR = 4


@dataclass
class _Current:
    bid: Bid
    award: Award | None  # None: the requester's own executor runs it (RunLocally)
    awarded_at: float
    result_by: float
    sent: dict[int, bytes] = field(default_factory=dict)  # seq -> input digest
    arrived: dict[int, bytes] = field(default_factory=dict)  # seq -> output digest
    accepted: int = 0  # results our last cumulative Acceptance covers
    opens: int = 1  # streams opened (or tried) for this award


@dataclass
class RequesterJob:
    """One job's auction, award, retries and acceptance.

    ``input_digest`` (single jobs) lets the machine check that the commitment
    is about the inputs we sent; for leases the I/O layer checks the batch
    digests and reports through ``ResultReceived.outputs_ok``.

    ``expected``: the executors the I/O layer expects to bid (servers of the
    model found in provider records and ads, reachable on the topic). With
    ``policy.close_early`` the auction closes as soon as each of them that is
    not banned or already tried has bid, instead of waiting out the window.
    ``expected_complete``: the I/O layer's lookup is fresh, so ``expected`` is every
    server it can know of; with nobody left to wait for (none found, or all tried or
    banned) the first usable bid closes the auction: a peer that is the model's only
    server runs its own job (``LocalBid``) at once instead of after the window.
    """

    request: JobRequest
    now: float
    reputation: Mapping[str, float] = field(default_factory=dict)
    banned: Container[str] = frozenset()
    policy: RequesterPolicy = field(default_factory=RequesterPolicy)
    input_digest: bytes | None = None
    expected: frozenset[str] = frozenset()
    expected_complete: bool = False

    phase: Phase = field(default=Phase.NEW, init=False)
    outcome: Outcome | None = field(default=None, init=False)
    attempts: list[tuple[str, str]] = field(default_factory=list, init=False)
    _started: float = field(default=0.0, init=False)
    _window_end: float = field(default=0.0, init=False)
    # Per executor, its few best bids (cheapest, fastest, longest-lived first): bounded,
    # and the same whatever order the bids arrived in.
    _bids: dict[str, list[Bid]] = field(default_factory=dict, init=False)
    _bids_seen: int = field(default=0, init=False)
    _cold_rounds: int = field(default=0, init=False)  # re-auctions before any bid or attempt
    _tried: set[str] = field(default_factory=set, init=False)
    _current: _Current | None = field(default=None, init=False)

    @property
    def bidders(self) -> frozenset[str]:
        """Every executor whose bid this job saw (kept or tried)."""
        return frozenset(self._bids) | frozenset(self._tried)

    @property
    def next_seq(self) -> int:
        """The seq the next input sent to the awarded executor must carry."""
        return 0 if self._current is None else len(self._current.sent)

    @property
    def results_arrived(self) -> int:
        """Results the awarded executor delivered so far (0 when none is awarded)."""
        return 0 if self._current is None else len(self._current.arrived)

    @property
    def awarded_to(self) -> str | None:
        return None if self._current is None else self._current.bid.executor

    @property
    def round(self) -> int:
        return self.request.round

    def start(self) -> list[Action]:
        if self.phase is not Phase.NEW:
            raise LocalProtocolError("RequesterJob.start() may be called only once")
        self._started = self.now
        if self.now >= self.request.deadline:
            return self._fail_no_time()
        return self._open_auction()

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns the actions to perform, in order.

        Raises ``LocalProtocolError`` for an event the I/O layer must never send in
        the current phase (any event before ``start()``; an ``InputSent`` without a
        live award to that executor, with a seq other than ``next_seq``, or past the
        award's jobs). Late events from the network (bids, results, failures after
        the job moved on or ended) are legal and ignored.
        """
        if self.phase is Phase.NEW:
            raise LocalProtocolError("call RequesterJob.start() before handle()")
        if isinstance(event, InputSent):
            self._check_input_sent(event)
        if self.phase is Phase.DONE:
            return []
        self.now = max(self.now, event.now)
        match event:
            case BidReceived(bid=bid):
                return self._on_bid(bid)
            case TimerFired():
                return self._on_timer()
            case AwardFailed(executor=executor, reason=reason):
                return self._on_award_failed(executor, reason)
            case AwardUndelivered(executor=executor, reason=reason):
                return self._on_award_undelivered(executor, reason)
            case ExecutorGone(executor=executor):
                return self._on_award_failed(executor, "executor went away")
            case ResultReceived():
                return self._on_result(event)
            case DeadlineReached():
                return self._fail_no_time()
            case InputSent():
                assert self._current is not None  # checked above
                self._current.sent[event.seq] = event.digest
                return []
            case ResultArrived():
                return self._on_result_arrived(event)
            case InterimReceived():
                return self._on_interim(event)
            case LocalBid():
                return self._on_local_bid(event)
            case LocalFinished():
                return self._on_local_finished(event)
            case _:
                assert_never(event)

    def _check_input_sent(self, event: InputSent) -> None:
        cur = self._current
        if (
            self.phase is not Phase.AWARDED
            or cur is None
            or cur.award is None
            or cur.bid.executor != event.executor
        ):
            raise LocalProtocolError(
                f"InputSent in phase {self.phase.value} without a live award to {event.executor}"
            )
        if event.seq != len(cur.sent):
            raise LocalProtocolError(f"InputSent seq {event.seq}, expected {len(cur.sent)}")
        if event.seq >= cur.award.max_jobs:
            raise LocalProtocolError(
                f"InputSent seq {event.seq} is past the award's {cur.award.max_jobs} jobs"
            )
        if self.request.lease is None and self.input_digest not in (None, event.digest):
            raise LocalProtocolError("InputSent digest is not the job's input digest")

    def _on_result_arrived(self, event: ResultArrived) -> list[Action]:
        cur = self._current
        if self.phase is not Phase.AWARDED or cur is None or cur.bid.executor != event.executor:
            return []  # from a revoked executor: never paid
        if event.seq not in cur.sent or event.seq in cur.arrived:
            problem = f"result for job {event.seq} that was not asked for"
            return [
                CancelAward(event.executor, problem),
                *self._after_failure(event.executor, problem),
            ]
        cur.arrived[event.seq] = event.digest
        return []

    # --- transitions ----------------------------------------------------------

    def _on_bid(self, bid: Bid) -> list[Action]:
        if bid.executor == self.request.requester:
            return []  # self-dealing on the wire: only LocalBid quotes for ourselves
        return self._take_bid(bid)

    def _on_local_bid(self, event: LocalBid) -> list[Action]:
        me = self.request.requester
        if self.request.lease is not None or me in self.banned:
            return []  # leases never run locally; a spot check's second run is not ours
        try:
            bid = Bid(
                job_id=self.request.job_id,
                executor=me,
                price=event.price,
                eta_ms=event.eta_ms,
                expires_at=self.request.deadline,
            )
        except ProtocolError as exc:
            raise LocalProtocolError(f"LocalBid: {exc}") from None
        return self._take_bid(bid)

    def _on_local_finished(self, event: LocalFinished) -> list[Action]:
        cur = self._current
        me = self.request.requester
        if self.phase is not Phase.AWARDED or cur is None or cur.award is not None:
            return []  # a local run that was revoked (too slow) or never awarded
        if self.now > self.request.deadline:
            return self._fail_no_time()  # as for a remote result: too late is too late
        if not event.outputs_ok:
            problem = event.problem or "bad outputs"
            return [CancelAward(me, problem), *self._after_failure(me, problem)]
        done = CompleteLocally(cur.bid)
        self._finish(done)
        return [done]

    def _take_bid(self, bid: Bid) -> list[Action]:
        if bid.job_id != self.request.job_id or bid.executor in self._tried:
            return []
        if bid.executor not in self._bids and len(self._bids) >= self.policy.max_bidders:
            return []
        self._bids_seen += 1
        held = self._bids.setdefault(bid.executor, [])
        if bid not in held:
            held.append(bid)
            held.sort(key=lambda b: (b.price, b.eta_ms, -b.expires_at))
            del held[_BIDS_PER_EXECUTOR:]
        if self.phase is Phase.COLLECTING and self._bids_are_in(bid):
            return self._award_next(early=True)
        return []

    def _bids_are_in(self, bid: Bid) -> bool:
        """Adaptive window: every expected bidder has bid, or ``bid`` is good enough."""
        if not self.policy.close_early or bid.executor in self.banned:
            return False
        good = self.policy.good_enough_price
        if good is not None and bid.price <= good and bid.price <= self.request.max_price:
            return True
        waiting = [
            e
            for e in self.expected
            if e not in self._tried and e not in self.banned and e != self.request.requester
        ]
        if not waiting:
            return self.expected_complete
        return all(e in self._bids for e in waiting)

    def _on_timer(self) -> list[Action]:
        if self.now >= self.request.deadline:
            return self._fail_no_time()
        if self.phase is Phase.COLLECTING and self.now >= self._window_end:
            return self._award_next()
        if self.phase is Phase.AWARDED and self._current and self.now >= self._current.result_by:
            executor = self._current.bid.executor
            reason = f"no result {self.now - self._current.awarded_at:.1f} s after the award"
            return [CancelAward(executor, reason), *self._after_failure(executor, reason)]
        return []

    def _on_award_failed(self, executor: str, reason: str) -> list[Action]:
        if self.phase is not Phase.AWARDED or self.awarded_to != executor:
            return []
        return self._after_failure(executor, reason)

    def _on_award_undelivered(self, executor: str, reason: str) -> list[Action]:
        """The award never reached ``executor``: send it again while opens, the bid and the
        deadline allow (a fresh result timer: the executor has not started), else a failure."""
        cur = self._current
        if self.phase is not Phase.AWARDED or cur is None or cur.bid.executor != executor:
            return []
        why = f"award undelivered: {reason}"
        if (
            cur.award is None  # a local run opens no stream
            or cur.opens >= self.policy.max_opens
            or cur.sent  # inputs were reported sent: not undelivered after all
            or self.now >= min(self.request.deadline, cur.bid.expires_at)
        ):
            return self._after_failure(executor, why)
        self.attempts.append((executor, why))
        cur.opens += 1
        cur.awarded_at = self.now
        cur.result_by = self._result_by(cur.bid)
        return [SendAward(executor, cur.award, cur.bid), StartTimer(cur.result_by)]

    def _on_result(self, event: ResultReceived) -> list[Action]:
        c = event.commitment.message
        if (
            self.phase is not Phase.AWARDED
            or self._current is None
            or self._current.award is None
            or c.executor != self.awarded_to
        ):
            return []  # a revoked or unknown executor's result: never paid
        if self.now > self.request.deadline:
            return self._fail_no_time()
        try:
            # The I/O layer should have checked it; a forged commitment must never be accepted.
            event.commitment.verify()
        except ProtocolError as exc:
            problem = f"commitment does not verify: {exc}"
            return [CancelAward(c.executor, problem), *self._after_failure(c.executor, problem)]
        problem = self._check_commitment(c) or (
            "" if event.outputs_ok else event.problem or "bad outputs"
        )
        if problem:
            return [CancelAward(c.executor, problem), *self._after_failure(c.executor, problem)]
        done = Complete(commitment=event.commitment, award=self._current.award)
        self._finish(done)
        return [done]

    def _on_interim(self, event: InterimReceived) -> list[Action]:
        c = event.commitment.message
        cur = self._current
        if (
            self.phase is not Phase.AWARDED
            or cur is None
            or cur.award is None
            or c.executor != cur.bid.executor
        ):
            return []  # from a revoked executor: never accepted
        problem = ""
        try:
            event.commitment.verify()
        except ProtocolError as exc:
            problem = f"interim commitment does not verify: {exc}"
        if not problem and cur.award.lease is None:
            problem = "an interim commitment on a single job"
        if not problem and c.count <= cur.accepted:
            problem = f"interim commitment of {c.count} results, {cur.accepted} already accepted"
        problem = problem or self._check_commitment(c)
        if problem:
            return [CancelAward(c.executor, problem), *self._after_failure(c.executor, problem)]
        cur.accepted = c.count
        return [SendAcceptance(event.commitment)]

    def _check_commitment(self, c: ResultCommitment) -> str:
        assert self._current is not None and self._current.award is not None
        award = self._current.award
        if c.job_id != award.job_id or c.requester != award.requester:
            return "commitment is for another job or requester"
        if c.model_cid != award.model_cid:
            return "commitment names another model"
        if c.count > award.max_jobs:
            return f"commitment covers {c.count} jobs, the award allows {award.max_jobs}"
        if c.price != award.price * c.count:
            return f"commitment asks {c.price}, the award says {award.price} x {c.count}"
        if (
            self.request.lease is None
            and self.input_digest is not None
            and c.input_digest != self.input_digest
        ):
            return "commitment is about other inputs"
        return self._check_digests(c)

    def _check_digests(self, c: ResultCommitment) -> str:
        """The commitment covers exactly the results that arrived, with the digests of the
        inputs we sent and the outputs we received (batch digests for a lease), once the
        I/O layer reports them (``InputSent``/``ResultArrived``)."""
        assert self._current is not None
        sent, arrived = self._current.sent, self._current.arrived
        if not sent:
            return ""
        seqs = sorted(arrived)
        if c.count != len(seqs):
            return f"commitment covers {c.count} jobs, {len(seqs)} results came"
        if self.request.lease is None:
            want_in, want_out = sent[0], arrived[seqs[0]] if seqs else b""
        else:
            want_in = batch_digest([sent[s] for s in seqs])
            want_out = batch_digest([arrived[s] for s in seqs])
        if c.output_digest != want_out:
            return "the commitment's output digest does not match the outputs received"
        if c.input_digest != want_in:
            return "the commitment's input digest does not match the inputs sent"
        return ""

    # --- helpers ------------------------------------------------------------------

    def _open_auction(self) -> list[Action]:
        self.phase = Phase.COLLECTING
        self._window_end = min(self.now + self.request.bid_window, self.request.deadline)
        return [Publish(self.request), StartTimer(self._window_end)]

    def _award_next(self, *, early: bool = False) -> list[Action]:
        """Award the best untried bid; with none, re-auction or fail (``early``: the window
        is still open, so wait for it instead)."""
        assert self._current is None
        ranked = rank_bids(
            self.request,
            (b for e, held in self._bids.items() if e not in self._tried for b in held),
            now=self.now,
            reputation=self.reputation,
            banned=self.banned,
            weights=self.policy.weights,
            local_ok=True,  # only LocalBid puts a bid of the requester in ``_bids``
        )
        if not ranked:
            return [] if early else self._reauction_or_fail()
        bid = ranked[0]
        self._tried.add(bid.executor)
        result_by = self._result_by(bid)
        self.phase = Phase.AWARDED
        if bid.executor == self.request.requester:  # our own bid won: no Award to sign
            self._current = _Current(bid=bid, award=None, awarded_at=self.now, result_by=result_by)
            return [RunLocally(bid), StartTimer(result_by)]
        award = Award(
            job_id=self.request.job_id,
            requester=self.request.requester,
            executor=bid.executor,
            model_cid=self.request.model_cid,
            price=bid.price,
            deadline=self.request.deadline,
            lease=self.request.lease,
        )
        self._current = _Current(bid=bid, award=award, awarded_at=self.now, result_by=result_by)
        return [SendAward(bid.executor, award, bid), StartTimer(result_by)]

    def _result_by(self, bid: Bid) -> float:
        """When an award made now must have delivered: eta x slack + grace + patience x left."""
        # A lease commits after its last job, sent by lease.until at the latest.
        start = self.now if self.request.lease is None else max(self.now, self.request.lease.until)
        p = self.policy
        left = max(0.0, self.request.deadline - start)
        return min(
            self.request.deadline,
            start + bid.eta_ms / 1000.0 * p.eta_slack + p.grace_s + p.patience * left,
        )

    def _after_failure(self, executor: str, reason: str) -> list[Action]:
        self.attempts.append((executor, reason))
        self._current = None
        self.phase = Phase.COLLECTING
        return self._award_next()

    def _reauction_or_fail(self) -> list[Action]:
        window = self.request.bid_window
        # Servers we expect to bid exist but none has bid yet (a cold gossip mesh right
        # after start): keep auctioning while the deadline allows instead of failing
        # after ``max_rounds``; the deadline bounds the rounds.
        # Rounds that only waited for a cold mesh do not count against ``max_rounds``: a job
        # whose first bids came late still gets its re-auctions after failed awards.
        cold = bool(self.expected) and self._bids_seen == 0 and not self.attempts
        counted = self.request.round - self._cold_rounds
        if (
            (counted + 1 < self.policy.max_rounds or cold)
            and self.request.round < MAX_ROUND
            and self.now + window < self.request.deadline
        ):
            self._cold_rounds += cold
            # Chained from the previous nonce, so the low byte of the round is enough.
            step = bytes([(self.request.round + 1) & 0xFF])
            nonce = hashlib.sha256(self.request.nonce + step).digest()[:16]
            self.request = replace(self.request, round=self.request.round + 1, nonce=nonce)
            self._bids = {e: b for e, b in self._bids.items() if e not in self._tried}
            return self._open_auction()
        if self.now >= self.request.deadline:
            return self._fail_no_time()
        if self.attempts:
            return self._terminal(
                ExecutorsFailed(
                    model_cid=self.request.model_cid,
                    job_id=self.request.job_id,
                    attempts=tuple(self.attempts),
                )
            )
        return self._terminal(self._no_executors())

    def _no_executors(self) -> NoExecutors:
        return NoExecutors(
            model_cid=self.request.model_cid,
            job_id=self.request.job_id,
            waited_s=self.now - self._started,
            rounds=self.request.round + 1,
            bids_seen=self._bids_seen,
        )

    def _fail_no_time(self) -> list[Action]:
        pre: list[Action] = []
        if self._current is not None:
            pre.append(CancelAward(self._current.bid.executor, "deadline reached"))
            self.attempts.append((self._current.bid.executor, "deadline reached"))
        if not self.attempts:
            error: MarketFailure = self._no_executors()
        else:
            error = DeadlineExceeded(
                model_cid=self.request.model_cid,
                job_id=self.request.job_id,
                deadline=self.request.deadline,
                attempts=tuple(self.attempts),
            )
        return [*pre, *self._terminal(error)]

    def _terminal(self, error: MarketFailure) -> list[Action]:
        fail = Fail(error)
        self._finish(fail)
        return [fail]

    def _finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.phase = Phase.DONE
        self._current = None
