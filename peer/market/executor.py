"""The executor's I/O: bids on gossip, awards on ``/edgeswarm/job/1``, runs in the worker.

``protocols.executor.ExecutorState`` decides everything (whether to bid, to
accept an award, to start a seq, when to commit); this module only feeds it
events and carries out its actions:

- a JobRequest on a served topic -> ``RequestSeen`` -> sign and publish the Bid;
- an incoming job stream: first frame must be a signed Award -> accept or send
  a signed JobError; then JobInput frames are decoded under the tensor limits
  (an oversize frame is refused by the frame decoder before its body is read),
  checked against the model's declared inputs (``InputRejected`` -> a
  ``bad-input`` JobError, the stream and the executor go on), and run in the
  worker; results go back as JobResult frames, the signed commitment after the
  last one; the requester's Acceptance completes the Receipt;
- a ``Tick`` every second abandons awards past their deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nacl.signing
import trio

from edge_models.errors import EdgeModelError, ExecutionFailed, ExecutionTimeout, InvalidInput
from peer import metrics
from peer.caps import StreamSlot, caps_for
from peer.job_stream import CONTROL_FRAME_MAX, JOB_PROTOCOL, FrameStream, JobStreamClosed
from peer.market.clock import Clock, system_clock
from peer.market.direct import AUCTION_PROTOCOL, FRAME_MAX, MAX_FRAMES
from peer.market.gossip import MarketGossip
from peer.market.receipts import ReceiptBook
from peer.worker import Arrays, Worker
from protocols import executor as ex
from protocols.errors import FrameTooLarge, ProtocolError
from protocols.market import (
    Award,
    BatchClose,
    JobError,
    JobForwarded,
    JobFrame,
    JobInput,
    JobRequest,
    JobResult,
)
from protocols.pipeline import StageRoute
from protocols.receipt import Acceptance, Receipt, commit, content_digest
from protocols.signed import Signed, sign_message
from protocols.tensor import TensorLimits, decode_tensors, encode_tensors

if TYPE_CHECKING:
    from peer.market.stage_link import StageLinks

log = logging.getLogger(__name__)

Reply = Callable[[Signed[Any]], Awaitable[None]]  # sends our bid back where the request came

AUCTION_IDLE_S = 120.0  # an auction stream with no request for this long is closed
AWARD_WAIT_S = 10.0  # first frame of a new job stream (or the next award on a kept one)
MAX_AWARDS_PER_STREAM = 10_000  # a kept stream is closed after this many awards
ACCEPT_WAIT_S = 10.0  # requester's Acceptance after our commitment
MAX_HELD_WIRES = 16  # refused single jobs whose wires wait for arbitration
LOAD_EVERY_S = 5  # the ad's load figure is refreshed at most this often
FRAME_OVERHEAD = 64 * 1024  # CBOR framing around the tensor bytes of one input frame


@dataclass
class _Session:
    award: Award
    fs: FrameStream
    nursery: trio.Nursery
    inputs: dict[int, tuple[Arrays, bytes]] = field(default_factory=dict)
    outputs: dict[int, tuple[Any, int]] = field(default_factory=dict)
    commitment: Signed[Any] | None = None
    ended: trio.Event = field(default_factory=trio.Event)
    running: int = 0  # inputs read and not yet answered (they hold their arrays)
    slot_freed: trio.Event = field(default_factory=trio.Event)
    interim: Signed[Any] | None = None  # our last cumulative commitment awaiting acceptance
    accepted: Receipt | None = None  # the last one the requester accepted (a lease)
    paid: bool = False  # the final receipt is booked
    route: StageRoute | None = None  # a pipeline stage's neighbours (peer.market.stage_link)
    route_set: trio.Event = field(default_factory=trio.Event)
    forward_lock: trio.Lock = field(default_factory=trio.Lock)  # results leave in order
    # A single job's inputs and outputs wire, kept until it is accepted: what a referee
    # panel needs to arbitrate it if the requester never signs (settlement).
    wires: tuple[Any, Any] | None = None


class ExecutorService:
    def __init__(
        self,
        *,
        key: nacl.signing.SigningKey,
        peer_id: str,
        host: Any,
        gossip: MarketGossip,
        worker: Worker,
        config: ex.ExecutorConfig,
        receipts: ReceiptBook,
        limits: TensorLimits,
        clock: Clock = system_clock,
    ) -> None:
        self.key = key
        self.clock = clock
        self.peer_id = peer_id
        self.host = host
        self.gossip = gossip
        self.worker = worker
        self.state = ex.ExecutorState(config)
        self.receipts = receipts
        self.limits = limits
        self.max_frame = limits.max_total_bytes + FRAME_OVERHEAD
        self.sessions: dict[bytes, _Session] = {}
        # Inputs of one award held at once (decoded, running or being answered); the
        # next JobInput is read only when one is free, so a requester that streams
        # inputs waits on the transport's flow control instead of filling our memory.
        self.inputs_in_flight = config.max_concurrent + 1
        self.backpressured = trio.Event()  # set once a reader waited for a free input slot
        self.award_wait_s = AWARD_WAIT_S
        self.stats: dict[str, int] = {
            "bids": 0,
            "bids_direct": 0,  # of those, sent back on the auction stream they came on
            "awards": 0,
            "rejected": 0,
            "jobs": 0,
            "inputs_high_water": 0,
            "input_waits": 0,
        }
        self._nursery: trio.Nursery | None = None
        # Called when a requester leaves results of ours unaccepted (it refused to sign or
        # went away): (award, our signed commitment it did not accept, why). Settlement
        # arbitrates from here (ArbitratedReceipt); our loss is bounded by the window.
        self.on_refusal: Callable[[Award, Signed[Any], str], None] | None = None
        self.refusals: list[tuple[Award, Signed[Any], str]] = []
        # (inputs wire, outputs wire) of refused single jobs, by job id (the arbiter pops
        # them; the oldest go beyond MAX_HELD_WIRES).
        self.refused_wires: dict[bytes, tuple[Any, Any]] = {}
        # Called with (load, queue) when awards start or end: the ad carries them.
        self.on_load: Callable[[float, int], None] | None = None
        # fetch_on_demand: called with the model cid of an accepted award before it runs.
        self.prepare: Callable[[str], Awaitable[None]] | None = None
        self._last_load: tuple[float, int] = (0.0, 0)
        # Pipeline stages: routes and forwards to/from the neighbouring stages' executors.
        self.links: StageLinks | None = None

    def _report_load(self) -> None:
        """Hand (load, queue) to the ad when it changed; at most every LOAD_EVERY_S (DHT puts)."""
        cfg = self.state.config
        active = self.state.active
        now = (min(active / cfg.slots, 1.0), max(0, active - cfg.max_concurrent))
        if self.on_load is not None and now != self._last_load:
            self._last_load = now
            self.on_load(*now)

    @property
    def offers(self) -> dict[str, ex.ModelOffer]:
        return self.state.config.models  # type: ignore[return-value]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.set_stream_handler(JOB_PROTOCOL, self._on_stream)
            self.host.set_stream_handler(AUCTION_PROTOCOL, self._on_auction_stream)
            task_status.started()
            try:
                for tick in itertools.count(1):
                    await trio.sleep(1.0)
                    self._do_sync(self.state.handle(ex.Tick(self.clock())))
                    if tick % LOAD_EVERY_S == 0:
                        self._report_load()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    # --- gossip ------------------------------------------------------------------

    def on_request(self, request: JobRequest, reply: Reply | None = None) -> None:
        """A JobRequest for a model we serve: bid if the machine says so, on gossip, or
        with ``reply`` on the auction stream it came on (``peer.market.direct``)."""
        for a in self.state.handle(ex.RequestSeen(request, self.clock())):
            if isinstance(a, ex.PublishBid) and self._nursery is not None:
                self.stats["bids"] += 1
                metrics.BIDS.labels("sent").inc()
                bid = sign_message(self.key, a.bid)
                self._nursery.start_soon(self._publish_bid, request.model_cid, bid, reply)
            else:
                self._do_sync([a])

    def _do_sync(self, actions: list[ex.Action]) -> None:
        for a in actions:
            if isinstance(a, ex.Abandon):
                session = self.sessions.get(a.job_id)
                if session is not None:
                    log.info("abandoning job %s: %s", a.job_id.hex()[:12], a.reason)
                    session.nursery.cancel_scope.cancel()
            elif isinstance(a, ex.Declined):
                log.debug("no bid for job %s: %s", a.job_id.hex()[:12], a.reason)

    async def _publish_bid(self, cid: str, bid: Signed[Any], reply: Reply | None = None) -> None:
        if reply is not None:
            try:
                await reply(bid)
                self.stats["bids_direct"] += 1
                return
            except JobStreamClosed:  # the auction stream went away: gossip still carries it
                pass
        try:
            await self.gossip.publish(cid, bid)
        except Exception as exc:  # a lost bid only loses this auction
            log.warning("could not publish bid: %s", exc)

    # --- auction streams (requests straight from a requester) -----------------------

    async def _on_auction_stream(self, stream: Any) -> None:
        if self._nursery is None:
            await stream.reset()
            return
        slot = await caps_for(self.host).admit(AUCTION_PROTOCOL, stream)  # over the cap: reset
        if slot is None:
            return
        self._nursery.start_soon(
            self._serve_requests, FrameStream(stream, max_frame=FRAME_MAX), slot
        )

    async def _serve_requests(self, fs: FrameStream, slot: StreamSlot) -> None:
        """Signed JobRequests from the stream's peer, checked by the gossip guard's rules
        (the signer must be that peer); our bids go back on the stream. Bounded: closed
        after ``AUCTION_IDLE_S`` without a request or ``MAX_FRAMES`` requests."""
        origin = fs.remote_peer

        async def reply(bid: Signed[Any]) -> None:
            await fs.send_bytes(bid.to_bytes())

        try:
            for _ in range(MAX_FRAMES):
                with trio.move_on_after(AUCTION_IDLE_S) as idle:
                    data = await fs.receive_bytes()
                if idle.cancelled_caught:
                    return
                self.gossip.deliver_direct(origin, data, reply)
        except (JobStreamClosed, ProtocolError) as exc:
            log.debug("auction stream from %s ended: %s", origin, exc)
        finally:
            await fs.close()
            slot.release()

    # --- our own jobs (self-award) --------------------------------------------------

    def local_quote(self, request: JobRequest) -> tuple[int, int] | None:
        """(price, eta_ms) we would bid on our own ``request``, by the rules our bids to
        others follow (``ExecutorState.quote``); None when we would not bid."""
        quote = self.state.quote(request, self.clock())
        if isinstance(quote, str):
            log.debug("no local bid for job %s: %s", request.job_id.hex()[:12], quote)
            return None
        return quote

    async def run_local(self, cid: str, inputs: Arrays, *, deadline: float) -> Arrays:
        """A job our own auction awarded to us: run in the worker, no stream, no receipt."""
        if self.prepare is not None:  # a model offered on demand: fetch it first
            try:
                await self.prepare(cid)
            except Exception as exc:  # fetch errors have no common base; the job falls back
                raise ExecutionFailed(f"cannot fetch model {cid[:12]}: {exc}") from exc
        self.worker.check(cid, inputs)
        outputs, _ms = await self.worker.run(cid, inputs, deadline=deadline)
        metrics.JOBS_RUN.labels("local").inc()
        return outputs

    # --- job streams ---------------------------------------------------------------

    async def _on_stream(self, stream: Any) -> None:
        # Runs in libp2p's handler task: hand the stream to our own nursery.
        if self._nursery is None:
            await stream.reset()
            return
        slot = await caps_for(self.host).admit(JOB_PROTOCOL, stream)  # over the cap: reset
        if slot is None:
            return
        # Until an award is accepted only a small signed frame may come: nobody can make
        # us buffer a payload-sized frame without holding one of our bids.
        self._nursery.start_soon(
            self._serve, FrameStream(stream, max_frame=CONTROL_FRAME_MAX), slot
        )

    async def _serve(self, fs: FrameStream, slot: StreamSlot | None = None) -> None:
        """Serve awards on one stream: after a job the requester paid for (its Acceptance
        arrived), the stream waits for the next Award (``peer.market.stream_pool``), so a
        requester's next job to us skips opening a stream. Bounded: ``award_wait_s`` idle,
        ``MAX_AWARDS_PER_STREAM`` awards."""
        try:
            for _ in range(MAX_AWARDS_PER_STREAM):
                fs.set_max_frame(CONTROL_FRAME_MAX)  # no payload-sized frame before an award
                if not await self._serve_award(fs):
                    return
        finally:
            await fs.close()
            if slot is not None:
                slot.release()

    async def _serve_award(self, fs: FrameStream) -> bool:
        """One award on ``fs``; True when it ended paid and the stream may carry another."""
        award: Award | None = None
        try:
            first: Any = None
            with trio.move_on_after(self.award_wait_s):  # a silent stream is dropped
                first = await fs.receive()
            if not (isinstance(first, Signed) and isinstance(first.message, Award)):
                return False  # not a job stream we understand; nothing to sign an error for
            if first.message.requester != fs.remote_peer:
                return False  # an award relayed by someone else
            award = first.message
            actions = self.state.handle(ex.AwardReceived(award, self.clock()))
            for a in actions:
                if isinstance(a, ex.RejectAward):
                    self.stats["rejected"] += 1
                    await fs.send(sign_message(self.key, a.error))
                    return False
            self.stats["awards"] += 1
            if self.prepare is not None:  # a model bid for on demand: fetch it first
                try:
                    await self.prepare(award.model_cid)
                except Exception as exc:  # the requester sees the stream end and retries
                    log.warning("cannot run job %s: %s", award.job_id.hex()[:12], exc)
                    return False
            fs.set_max_frame(self.max_frame)
            return await self._run_award(award, fs)
        except (JobStreamClosed, ProtocolError, trio.TooSlowError) as exc:
            log.debug("job stream ended: %s", exc)
            return False
        finally:
            if award is not None and award.job_id in self.state.awarded_jobs:
                self._do_sync(self.state.handle(ex.ConnectionLost(award.job_id, self.clock())))

    async def _run_award(self, award: Award, fs: FrameStream) -> bool:
        """Serve one award to its end; True when it ended paid (final Acceptance)."""
        job_id = award.job_id
        async with trio.open_nursery() as nursery:
            session = _Session(award=award, fs=fs, nursery=nursery)
            self.sessions[job_id] = session
            if self.links is not None:
                self.links.session_added()
            try:
                # Never hold an award past its deadline (+ time to hear the acceptance).
                with trio.move_on_after(max(0.0, award.deadline - self.clock()) + ACCEPT_WAIT_S):
                    await self._read_frames(session)
            finally:
                self.sessions.pop(job_id, None)
                nursery.cancel_scope.cancel()
                if self.links is not None and session.route is not None:
                    await self.links.close_links(job_id)  # shielded closes
                self._settle_unfinished(session)
        return session.paid

    def _settle_unfinished(self, s: _Session) -> None:
        """The award ended without its final receipt: book the last cumulative receipt the
        requester signed (a lease), and report what it left unaccepted."""
        if s.paid:
            return
        if s.accepted is not None:
            self.receipts.add(s.accepted, "executor")
        unaccepted = s.commitment or s.interim
        covered = s.accepted.count if s.accepted is not None else 0
        if unaccepted is not None and unaccepted.message.count > covered:
            c = unaccepted.message
            why = f"{c.count - covered} result(s) left unaccepted by {c.requester}"
            log.warning("job %s: %s", s.award.job_id.hex()[:12], why)
            self.refusals.append((s.award, unaccepted, why))
            if s.wires is not None and s.award.lease is None:
                self.refused_wires[s.award.job_id] = s.wires
                while len(self.refused_wires) > MAX_HELD_WIRES:
                    self.refused_wires.pop(next(iter(self.refused_wires)))
            if self.on_refusal is not None:
                self.on_refusal(s.award, unaccepted, why)

    async def _read_frames(self, s: _Session) -> None:
        job_id = s.award.job_id
        while True:
            while s.running >= self.inputs_in_flight:  # backpressure: no free input slot
                self.stats["input_waits"] += 1
                self.backpressured.set()
                s.slot_freed = trio.Event()
                await s.slot_freed.wait()
            try:
                item = await s.fs.receive()
            except FrameTooLarge as exc:
                # Cannot resync after a refused frame: say why, end this award.
                await self._error(s, "bad-input", f"input frame refused: {exc}")
                return
            except JobStreamClosed:
                return
            if isinstance(item, JobInput) and item.job_id == job_id:
                await self._on_input(s, item)
            elif isinstance(item, BatchClose) and item.job_id == job_id:
                await self._act(
                    s, self.state.handle(ex.BatchCloseReceived(job_id, item.count, self.clock()))
                )
            elif isinstance(item, Signed) and isinstance(item.message, Acceptance):
                if s.interim is not None and item.message.commitment == s.interim.digest:
                    await self._on_interim_acceptance(s, item)
                    continue
                self._on_acceptance(s, item)
                return
            else:
                await self._error(s, "bad-input", f"unexpected frame {type(item).__name__}")
                return
            if s.commitment is None and job_id not in self.state.awarded_jobs:
                return  # the award ended without a commitment (failed single job)

    async def _on_input(self, s: _Session, item: JobInput) -> None:
        now = self.clock()
        cid = s.award.model_cid
        try:
            arrays = decode_tensors(item.inputs, limits=self.limits)
            self.worker.check(cid, arrays)
        except (ProtocolError, InvalidInput) as exc:
            event: ex.Event = ex.InputRejected(s.award.job_id, item.seq, str(exc), now)
        except EdgeModelError as exc:
            event = ex.InputRejected(s.award.job_id, item.seq, str(exc), now)
        else:
            s.inputs[item.seq] = (arrays, content_digest(item.inputs))
            if s.award.lease is None:
                s.wires = (item.inputs, None)
            event = ex.InputReceived(s.award.job_id, item.seq, now)
        await self._act(s, self.state.handle(event))

    async def _act(self, s: _Session, actions: list[ex.Action]) -> None:
        """Carry out one ``handle`` call's actions; its frames go out in one write, so a
        commitment is never overtaken by a result it does not cover."""
        out: list[JobFrame] = []
        after: list[ex.Action] = []  # Abandon & co. cancel the award: only once it is said
        self._act_into(s, actions, out, after)
        if s.route is not None and s.route.downstream and self.links is not None:
            async with s.forward_lock:  # in order: a commitment never overtakes its results
                await s.fs.send_many(await self._forward_results(s, out))
        else:
            await s.fs.send_many(out)
        self._do_sync(after)

    async def _forward_results(self, s: _Session, out: list[JobFrame]) -> list[JobFrame]:
        """A pipeline stage with a downstream: each result goes to the next stage's executor
        and the requester gets its digest; a failed forward returns the outputs to the
        requester instead (it re-runs the next stage elsewhere)."""
        assert self.links is not None and s.route is not None
        sent: list[JobFrame] = []
        for item in out:
            if isinstance(item, JobResult):
                why = await self.links.forward(s, item.seq, item.outputs)
                if not why:
                    digest = content_digest(item.outputs)
                    to = s.route.downstream
                    item = JobForwarded(item.job_id, item.seq, digest, to, item.compute_ms)
                else:
                    log.info("job %s: %s; outputs go back", s.award.job_id.hex()[:12], why)
            sent.append(item)
        return sent

    async def forwarded_input(self, s: _Session, item: JobInput) -> None:
        """Inputs the previous pipeline stage's executor forwarded (``stage_link`` checked
        who sent them): taken like a JobInput from the requester, under the same bound."""
        while s.running >= self.inputs_in_flight:
            s.slot_freed = trio.Event()
            await s.slot_freed.wait()
        await self._on_input(s, item)

    def _act_into(
        self, s: _Session, actions: list[ex.Action], out: list[JobFrame], after: list[ex.Action]
    ) -> None:
        for a in actions:
            if isinstance(a, ex.StartExecution):
                s.running += 1
                self.stats["inputs_high_water"] = max(self.stats["inputs_high_water"], s.running)
                s.nursery.start_soon(self._execute, s, a.seq)
            elif isinstance(a, ex.SendResult):
                wire, ms = s.outputs.pop(a.seq)
                if s.wires is not None:
                    s.wires = (s.wires[0], wire)
                out.append(JobResult(a.job_id, a.seq, wire, ms))
            elif isinstance(a, ex.SendError):
                s.inputs.pop(a.error.seq, None)
                out.append(sign_message(self.key, a.error))
            elif isinstance(a, ex.SendCommitment):
                s.commitment = commit(self.key, a.commitment)
                self.stats["jobs"] += a.commitment.count
                out.append(s.commitment)
            elif isinstance(a, ex.SendInterim):
                s.interim = commit(self.key, a.commitment)
                out.append(s.interim)
            else:
                after.append(a)

    async def _execute(self, s: _Session, seq: int) -> None:
        try:
            await self._execute_one(s, seq)
        finally:
            s.running -= 1
            s.slot_freed.set()

    async def _execute_one(self, s: _Session, seq: int) -> None:
        arrays, in_digest = s.inputs.pop(seq)
        job_id, cid = s.award.job_id, s.award.model_cid
        deadline = s.award.deadline + self.state.config.clock_skew_s  # the requester's clock
        try:
            outputs, ms = await self.worker.run(cid, arrays, deadline=deadline)
            wire = encode_tensors(outputs)
        except ExecutionTimeout as exc:
            event: ex.Event = ex.ExecutionFailed(
                job_id, seq, str(exc), self.clock(), code="deadline"
            )
        except (EdgeModelError, ProtocolError, trio.TooSlowError) as exc:
            event = ex.ExecutionFailed(job_id, seq, str(exc) or type(exc).__name__, self.clock())
        else:
            s.outputs[seq] = (wire, ms)
            event = ex.ExecutionFinished(
                job_id, seq, in_digest, content_digest(wire), ms, self.clock()
            )
        try:
            await self._act(s, self.state.handle(event))
        except JobStreamClosed:
            s.nursery.cancel_scope.cancel()

    @staticmethod
    def _verified(s: _Session, commitment: Signed[Any], acc: Signed[Acceptance]) -> Receipt | None:
        receipt = Receipt(commitment=commitment, acceptance=acc)
        try:
            receipt.verify()
        except ProtocolError as exc:
            log.warning("bad acceptance for job %s: %s", s.award.job_id.hex()[:12], exc)
            return None
        return receipt

    async def _on_interim_acceptance(self, s: _Session, acc: Signed[Acceptance]) -> None:
        """A cumulative Acceptance of our interim commitment: the receipt we keep in case the
        batch never completes; jobs past the window may start again."""
        assert s.interim is not None
        receipt = self._verified(s, s.interim, acc)
        if receipt is None:
            return
        s.accepted, s.interim = receipt, None
        event = ex.AcceptanceReceived(s.award.job_id, receipt.count, self.clock())
        await self._act(s, self.state.handle(event))

    def _on_acceptance(self, s: _Session, acc: Signed[Acceptance]) -> None:
        if s.commitment is None:
            return
        receipt = self._verified(s, s.commitment, acc)
        if receipt is None:
            return
        s.paid = True
        self.receipts.add(receipt, "executor")

    async def _error(self, s: _Session, code: str, message: str) -> None:
        err = JobError(
            job_id=s.award.job_id, executor=self.peer_id, code=code, message=message[:1024]
        )
        with contextlib.suppress(JobStreamClosed):
            await s.fs.send(sign_message(self.key, err))
