"""``/edgeswarm/stage/1``: pipeline stage executors pass intermediates straight on.

The rules are ``protocols.pipeline`` (``StageRoute``, ``check_route``,
``check_forward``); this module is their I/O, on both sides of a stage:

- The requester sends each stage executor a signed ``StageRoute`` for its award
  (``send_route``): who forwards it inputs, where its outputs go.
- A stage executor with a downstream forwards each result (``forward``): a
  small ``StageForward`` header carrying its signed ``StageOutput`` (its job and
  seq, the payload's digest), then the payload; the requester gets only the
  digest (``JobForwarded``). What it
  forwarded is held a while (bounded) so that the requester can re-route it to
  another executor when the next one dies (a later route for the same job).
- A stage executor with an upstream takes a forward (``_on_stream``) only from
  the executor the route names (``check_forward`` against the stream's
  authenticated remote peer) and whose signed output names exactly this
  forward, before it reads the payload; then the payload must have the signed
  digest (``check_payload``). It keeps the signed output (``received``: who
  produced each intermediate it ran on) and feeds the payload to the award's
  session like a ``JobInput`` (same decoding limits, same model checks).
- Seqs: the downstream's seq of a result is ``forward_seq(route, seq)`` (the
  route's ``seq_shift``, non-zero once a stage failed over mid-lease); a result
  the downstream does not take (before its takeover) goes back to the requester.

A forward that fails (the next executor is gone or refuses) is not retried
here: the executor returns the outputs to the requester on the job stream
(``JobResult``), which re-runs only the next stage elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from peer.caps import caps_for
from peer.market.clock import Clock, system_clock
from protocols.codec import FrameDecoder, frame
from protocols.errors import ProtocolError
from protocols.market import JobInput
from protocols.pipeline import (
    MAX_TAKEN,
    STAGE_CONTROL_MAX,
    STAGE_PROTOCOL_ID,
    STAGE_REPLY_MAX,
    ForwardRefused,
    StageFetch,
    StageForward,
    StageFrame,
    StageOutput,
    StagePayload,
    StageReply,
    StageRoute,
    check_forward,
    check_payload,
    check_route,
    decode_stage_frame,
    encode_stage_frame,
    forward_seq,
)
from protocols.receipt import content_digest
from protocols.signed import Signed, sign_message

if TYPE_CHECKING:
    from peer.market.executor import ExecutorService, _Session

log = logging.getLogger(__name__)

STAGE_PROTOCOL = STAGE_PROTOCOL_ID
READ_CHUNK = 256 * 1024
REPLY_WAIT_S = 10.0  # a route or forward answered within this
SESSION_WAIT_S = 10.0  # a route may overtake the award it is for: wait this long for it
MAX_HELD = 64  # jobs whose forwarded outputs are kept for re-routing, oldest dropped first
MAX_HELD_SEQS = 64  # per job (a lease): its latest results; a take-over re-feeds from these
MAX_HELD_BYTES = 256 * 1024 * 1024  # in all: the oldest results are dropped first
MAX_FORWARDS_PER_STREAM = 1 << 20  # a lease's jobs (MAX_BATCH) fit many times
MAX_REFUSALS_KEPT = 100
MAX_RECEIVED = 4096  # signed outputs of forwards taken, kept (oldest dropped first)
IDLE_S = 300.0  # a kept-open forward stream with nothing on it this long is closed


class StageStream:
    """One ``/edgeswarm/stage/1`` stream, framed; control frames capped small."""

    def __init__(self, stream: Any, *, max_frame: int = STAGE_CONTROL_MAX) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_size=max_frame)

    @property
    def remote_peer(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    def set_max_frame(self, max_frame: int) -> None:
        self._decoder.max_size = max_frame

    async def send(self, *items: StageFrame) -> None:
        data = b"".join(frame(encode_stage_frame(i), max_size=2**31) for i in items)
        await self.stream.write(data)

    async def receive(self) -> StageFrame:
        while True:
            raw = self._decoder.next_frame()
            if raw is not None:
                return decode_stage_frame(raw, max_size=self._decoder.max_size)
            chunk = await self.stream.read(READ_CHUNK)
            if not chunk:
                raise EOFError("stage stream ended")
            self._decoder.feed(chunk)

    async def close(self) -> None:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(2.0),
            contextlib.suppress(Exception),  # already gone: nothing to close
        ):
            await self.stream.close()


def _nbytes(wire: Any) -> int:
    return sum(len(t.get("data", b"")) for t in wire.values() if isinstance(t, dict))


@dataclass
class _Link:
    """A kept-open stream to one downstream stage job; one forward at a time on it."""

    ss: StageStream | None = None
    from_job: bytes = b""
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class _Held:
    requester: str
    route: StageRoute
    wires: dict[int, Any] = field(default_factory=dict)
    nbytes: int = 0


class StageLinks:
    """One peer's end of stage streams: its executor's routes and forwards, and the
    requester's ``send_route``."""

    def __init__(self, host: Any, dialer: Any, *, clock: Clock = system_clock) -> None:
        self.host = host
        self.dialer = dialer
        self.clock = clock
        self.executor: ExecutorService | None = None
        self.held: OrderedDict[bytes, _Held] = OrderedDict()
        self.held_bytes = 0
        self.refused: list[str] = []  # why forwards/routes were refused (tests, logs)
        # (to_job, seq) -> the upstream executor's signed output for the inputs we took.
        self.received: OrderedDict[tuple[bytes, int], Signed[StageOutput]] = OrderedDict()
        self.forwards = 0  # payloads forwarded on
        self.forwarded = trio.Event()  # set (and renewed) at each forward taken downstream
        self.sessions_changed = trio.Event()
        self._links: dict[tuple[str, bytes], _Link] = {}  # (downstream, its job) -> stream
        # Per stage job: held from checking a forward to feeding it, and while a route is
        # taken, so that a route's answer reports every forward taken before it (``taken``).
        self._intake: dict[bytes, trio.Lock] = {}

    def attach(self, executor: ExecutorService) -> None:
        self.executor = executor
        executor.links = self
        self.host.set_stream_handler(
            STAGE_PROTOCOL, caps_for(self.host).guarded(STAGE_PROTOCOL, self._on_stream)
        )

    def session_added(self) -> None:
        self.sessions_changed.set()
        self.sessions_changed = trio.Event()

    # --- requester side ----------------------------------------------------------------

    async def send_route(self, executor: str, route: Signed[StageRoute], until: float) -> str:
        """Give ``executor`` its route; "" once it took it, else why not."""
        why, _ = await self.route_taken(executor, route, until)
        return why

    async def route_taken(
        self, executor: str, route: Signed[StageRoute], until: float
    ) -> tuple[str, tuple[Signed[StageOutput], ...]]:
        """``send_route``, and the signed outputs of the forwards the executor had taken
        before this route, when it changes the upstream (``StageReply.taken``)."""
        try:
            with trio.fail_after(max(0.1, min(REPLY_WAIT_S, until - self.clock()))):
                stream = await self.dialer.open_stream(executor, until, STAGE_PROTOCOL)
                ss = StageStream(stream, max_frame=STAGE_REPLY_MAX)
                try:
                    await ss.send(route)
                    reply = await ss.receive()
                finally:
                    await ss.close()
        except Exception as exc:  # dial/negotiation errors of py-libp2p have no common base
            return f"cannot give {executor} its route: {str(exc) or type(exc).__name__}", ()
        if not isinstance(reply, StageReply):
            return f"{executor} answered a route with {type(reply).__name__}", ()
        return ("" if reply.ok else f"{executor} refused its route: {reply.why}"), reply.taken

    async def fetch(
        self, executor: str, job_id: bytes, seq: int, until: float, max_bytes: int
    ) -> Any:
        """The outputs of ``executor``'s job ``seq`` of stage job ``job_id`` that it forwarded
        on and holds (a spot check needs them), or why not (a str). The caller checks them
        against the digest it recorded."""
        try:
            with trio.fail_after(
                max(0.1, min(REPLY_WAIT_S + max_bytes / 1e6, until - self.clock()))
            ):
                stream = await self.dialer.open_stream(executor, until, STAGE_PROTOCOL)
                ss = StageStream(stream, max_frame=max_bytes + STAGE_CONTROL_MAX)
                try:
                    await ss.send(StageFetch(job_id, seq))
                    reply = await ss.receive()
                finally:
                    await ss.close()
        except Exception as exc:  # dial/negotiation errors of py-libp2p have no common base
            return f"cannot fetch job {seq} from {executor}: {str(exc) or type(exc).__name__}"
        if isinstance(reply, StagePayload):
            return reply.tensors
        if isinstance(reply, StageReply):
            return f"{executor} has no outputs of job {seq} to give: {reply.why}"
        return f"{executor} answered a fetch with {type(reply).__name__}"

    async def _give_held(self, ask: StageFetch, ss: StageStream) -> None:
        """A fetch: the held outputs, only to the requester of the job they belong to."""
        held = self.held.get(ask.job_id)
        if held is None or held.requester != ss.remote_peer:
            await self._reply(ss, f"no held outputs of job {ask.job_id.hex()[:12]} for you")
            return
        wire = held.wires.get(ask.seq)
        if wire is None:
            await self._reply(ss, f"job {ask.seq}'s outputs are not held")
            return
        await ss.send(StagePayload(wire))

    # --- executor side: forwarding on ------------------------------------------------------

    async def forward(self, s: _Session, seq: int, wire: Any) -> str:
        """Send job ``seq``'s outputs of ``s`` to its route's downstream; "" once taken."""
        route = s.route
        assert route is not None and route.downstream and self.executor is not None
        if forward_seq(route, seq) is None:
            return f"job {seq} is before the next stage's executor took over"
        why = await self._send_forward(route, seq, wire, s.award.deadline, self.executor.key)
        if not why:
            self._hold(s.award.requester, route, seq, wire)
            self._count_forward()
        return why

    def _count_forward(self) -> None:
        self.forwards += 1
        self.forwarded.set()
        self.forwarded = trio.Event()

    async def _send_forward(
        self, route: StageRoute, seq: int, wire: Any, until: float, key: Any
    ) -> str:
        """One forward of our job ``seq`` on the kept-open stream to the route's downstream
        (opened on first use): the header with our signed output (``key``: ours), the
        payload right behind it (the receiver checks the header before it reads the
        payload), then its answer. A failed stream is dropped, never retried."""
        to_seq = forward_seq(route, seq)
        if to_seq is None:
            return f"job {seq} is not forwarded on this route"
        output = StageOutput(
            job_id=route.job_id,
            seq=seq,
            requester=route.requester,
            executor=route.executor,
            output_digest=content_digest(wire),
            to_job=route.downstream_job,
            to_seq=to_seq,
        )
        header = StageForward(
            route.downstream_job,
            route.job_id,
            to_seq,
            max(1, _nbytes(wire)),
            sign_message(key, output),
        )
        key = (route.downstream, route.downstream_job)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link()
        try:
            async with link.lock:
                with trio.fail_after(max(0.1, min(REPLY_WAIT_S, until - self.clock()))):
                    if link.ss is None:
                        stream = await self.dialer.open_stream(
                            route.downstream, until, STAGE_PROTOCOL
                        )
                        link.ss = StageStream(stream)
                        link.from_job = route.job_id
                    await link.ss.send(header, StagePayload(wire))
                    reply = await link.ss.receive()
        except Exception as exc:  # dial/negotiation errors of py-libp2p have no common base
            await self._drop(key)
            return f"cannot forward to {route.downstream}: {str(exc) or type(exc).__name__}"
        if not isinstance(reply, StageReply):
            await self._drop(key)
            return f"{route.downstream} answered a forward with {type(reply).__name__}"
        if not reply.ok:
            await self._drop(key)
            return f"{route.downstream} refused the forward: {reply.why}"
        return ""

    async def _drop(self, key: tuple[str, bytes]) -> None:
        link = self._links.pop(key, None)
        if link is not None and link.ss is not None:
            await link.ss.close()

    async def close_links(self, from_job: bytes) -> None:
        """Stage job ``from_job``'s award ended: close the streams its forwards went on."""
        lock = self._intake.get(from_job)
        if lock is not None and not lock.locked():
            del self._intake[from_job]
        for key in [k for k, link in self._links.items() if link.from_job == from_job]:
            await self._drop(key)

    def _hold(self, requester: str, route: StageRoute, seq: int, wire: Any) -> None:
        held = self.held.get(route.job_id)
        if held is None:
            held = self.held[route.job_id] = _Held(requester, route)
        held.route = route
        size = _nbytes(wire)
        held.wires[seq] = wire
        held.nbytes += size
        self.held_bytes += size
        self.held.move_to_end(route.job_id)
        if len(held.wires) > MAX_HELD_SEQS:  # a lease: only its latest results can be lost
            self._drop_oldest_seq(route.job_id)
        now = self.clock()
        while self.held and (
            len(self.held) > MAX_HELD or next(iter(self.held.values())).route.expires < now
        ):
            _, old = self.held.popitem(last=False)
            self.held_bytes -= old.nbytes
        while self.held and self.held_bytes > MAX_HELD_BYTES:  # oldest results first
            self._drop_oldest_seq(next(iter(self.held)))

    def _drop_oldest_seq(self, job_id: bytes) -> None:
        held = self.held[job_id]
        if held.wires:
            size = _nbytes(held.wires.pop(min(held.wires)))
            held.nbytes -= size
            self.held_bytes -= size
        if not held.wires:
            del self.held[job_id]

    async def _reforward(self, held: _Held, route: StageRoute) -> str:
        """A new route for a job whose outputs went on already: send them to its new
        downstream (the previous one died)."""
        held.route = route
        if not route.downstream:
            return "the new route has no downstream"
        assert self.executor is not None
        for seq, wire in sorted(held.wires.items()):
            if forward_seq(route, seq) is None:
                continue  # a job the downstream's predecessor answered already
            why = await self._send_forward(route, seq, wire, route.expires, self.executor.key)
            if why:
                return why
            self._count_forward()
        if self.executor is None or route.job_id not in self.executor.sessions:
            await self.close_links(route.job_id)  # its award is over: nothing else goes on them
        return ""

    # --- executor side: taking routes and forwards -----------------------------------------

    async def _on_stream(self, stream: Any) -> None:
        ss = StageStream(stream)
        try:
            with trio.fail_after(REPLY_WAIT_S):
                first = await ss.receive()
            if isinstance(first, Signed) and isinstance(first.message, StageRoute):
                taken: list[Signed[StageOutput]] = []
                why = await self._take_route(first.message, ss.remote_peer, taken)
                await self._reply(ss, why, tuple(taken))
                return
            if isinstance(first, StageFetch):
                await self._give_held(first, ss)
                return
            item: StageFrame = first
            for _ in range(MAX_FORWARDS_PER_STREAM):  # one stream carries a lease's forwards
                if not isinstance(item, StageForward):
                    await self._reply(ss, f"unexpected frame {type(item).__name__}")
                    return
                why = await self._take_forward(item, ss)
                await self._reply(ss, why)
                if why:
                    return  # its payload was never read: the stream cannot go on
                with trio.fail_after(IDLE_S):
                    item = await ss.receive()  # the next header, or the end
        except (ProtocolError, EOFError, trio.TooSlowError, OSError) as exc:
            log.debug("stage stream ended: %s", exc)
        except Exception as exc:  # a broken stream of py-libp2p has no common base
            log.debug("stage stream failed: %s", exc)
        finally:
            await ss.close()

    async def _reply(
        self, ss: StageStream, why: str, taken: tuple[Signed[StageOutput], ...] = ()
    ) -> None:
        if why:
            self.refused.append(why)
            del self.refused[:-MAX_REFUSALS_KEPT]
            log.info("stage stream from %s refused: %s", ss.remote_peer, why)
        await ss.send(StageReply(not why, why[:512], taken if not why else ()))

    def intake(self, job_id: bytes) -> trio.Lock:
        """Stage job ``job_id``'s intake lock (see ``_intake``)."""
        lock = self._intake.get(job_id)
        if lock is None:
            if len(self._intake) >= MAX_RECEIVED:  # bounded: drop idle ones, oldest first
                for old in [j for j, lk in self._intake.items() if not lk.locked()][:64]:
                    del self._intake[old]
            lock = self._intake[job_id] = trio.Lock()
        return lock

    def taken(self, job_id: bytes) -> tuple[Signed[StageOutput], ...]:
        """The signed outputs of the latest forwards taken for ``job_id`` (at most
        ``MAX_TAKEN``, oldest first)."""
        out: list[Signed[StageOutput]] = []
        for (to_job, _), signed in reversed(self.received.items()):
            if to_job == job_id:
                out.append(signed)
                if len(out) == MAX_TAKEN:
                    break
        return tuple(reversed(out))

    async def _session(self, job_id: bytes) -> _Session | None:
        """The award session of ``job_id``, waiting a while for one still being set up."""
        if self.executor is None:
            return None
        with trio.move_on_after(SESSION_WAIT_S):
            while job_id not in self.executor.sessions:
                await self.sessions_changed.wait()
        return self.executor.sessions.get(job_id)

    async def _take_route(
        self, route: StageRoute, sender: str, taken: list[Signed[StageOutput]] | None = None
    ) -> str:
        """Take a route; ``taken`` gets what ``StageReply.taken`` reports when the route
        changes this stage's upstream (the requester re-routes around a dead one)."""
        if route.expires < self.clock():
            return "the route has expired"
        held = self.held.get(route.job_id)
        if held is not None and (
            self.executor is None or route.job_id not in self.executor.sessions
        ):
            try:
                check_route(
                    route,
                    sender=sender,
                    award_requester=held.requester,
                    award_executor=held.route.executor,
                )
            except ForwardRefused as exc:
                return str(exc)
            return await self._reforward(held, route)
        s = await self._session(route.job_id)
        if s is None:
            return f"no award for job {route.job_id.hex()[:12]}"
        try:
            check_route(
                route,
                sender=sender,
                award_requester=s.award.requester,
                award_executor=s.award.executor,
            )
        except ForwardRefused as exc:
            return str(exc)
        # Under the intake lock: a forward from the old upstream is either taken before
        # (and reported in ``taken``) or refused after. Under the session's forward lock: no
        # result leaves on the old route meanwhile, and none is forwarded both by the
        # session and again here.
        async with self.intake(route.job_id):
            if (
                taken is not None
                and s.route is not None
                and s.route.upstream
                and s.route.upstream != route.upstream
            ):
                taken.extend(self.taken(route.job_id))
            await s.forward_lock.acquire()
            s.route = route
            s.route_set.set()
        try:  # forwards in may go on while held outputs are sent anew (not under intake)
            if held is not None and route.downstream:  # sent on already: send it anew
                return await self._reforward(held, route)
        finally:
            s.forward_lock.release()
        return ""

    async def _take_forward(self, header: StageForward, ss: StageStream) -> str:
        assert self.executor is not None
        s = await self._session(header.to_job)
        if s is None:
            return f"no award for job {header.to_job.hex()[:12]}"
        with trio.move_on_after(SESSION_WAIT_S):
            await s.route_set.wait()  # the requester routes every stage before it starts
        async with self.intake(header.to_job):  # a new route waits until this one is kept
            why, payload = await self._take_checked(s, header, ss)
        if payload is not None:  # fed outside the lock (it may wait for a free input slot)
            await self.executor.forwarded_input(s, JobInput(header.to_job, header.seq, payload))
        return why

    async def _take_checked(
        self, s: _Session, header: StageForward, ss: StageStream
    ) -> tuple[str, Any]:
        """Check a forward, read its payload, keep its signed output: "" and the payload, or
        why not and None."""
        assert self.executor is not None
        try:
            check_forward(s.route, sender=ss.remote_peer, header=header)
        except ForwardRefused as exc:
            return str(exc), None
        if header.size > self.executor.limits.max_total_bytes:
            return f"a forward of {header.size} bytes is over the input limit", None
        ss.set_max_frame(self.executor.max_frame)  # now, and only now, the payload is read
        try:
            with trio.fail_after(REPLY_WAIT_S + header.size / 1e6):
                payload = await ss.receive()
        finally:
            ss.set_max_frame(STAGE_CONTROL_MAX)
        if not isinstance(payload, StagePayload):
            return f"expected the payload, got {type(payload).__name__}", None
        try:
            check_payload(header, content_digest(payload.tensors))
        except ForwardRefused as exc:
            return str(exc), None
        self.received[(header.to_job, header.seq)] = header.output
        while len(self.received) > MAX_RECEIVED:
            self.received.popitem(last=False)
        return "", payload.tensors
