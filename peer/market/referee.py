"""``/edgeswarm/referee/1``: referees re-run a disputed job and sign a verdict.

When a spot check disagrees (``protocols.verification.compare_outputs``) the
requester sends both executors' signed commitments, the job's inputs and the
outputs each one returned to the referee panel of each claim
(``protocols.proofs.referee_panel``: drawn from the serving pool of the current
epoch checkpoint, seeded by the executor's signed commitment). A referee that
serves the model runs it once, ``judge``s every claim against its own outputs and
signs a ``RefereeResult`` per claim, naming the checkpoint; ``decide`` turns a
panel majority into a ``FraudProof`` (the loser) or an ``ArbitratedReceipt``.

Wire (length-prefixed canonical CBOR frames, ``protocols.codec``), one request
per stream:

1. requester -> referee, header (at most ``HEADER_MAX`` bytes):
   ``{"v": 2, "c": [claim, 1..2], "cp": k}``, a claim being ``{"c": signed ResultCommitment
   bytes}`` for a single job, or for one job ``seq`` of a lease batch
   ``{"c": ..., "seq": k, "ins": [input digest per job], "outs": [output digest per
   job]}`` (at most ``MAX_REFEREE_BATCH`` jobs; the lists must hash to the
   commitment's batch digests). The referee checks the signatures and digests,
   that all claims are about one requester's job on one model and one input,
   that it serves the model and (when it knows the committee rule) that ``k`` is
   its current checkpoint or the one current an epoch ago and that it sits on the
   panel (under ``k``) of at least one claim, *before* it accepts a payload;
2. requester -> referee, payload (at most ``(1 + claims) x max_total_bytes +
   64 KiB``): ``{"v": 2, "in": inputs wire, "out": [outputs wire per claim]}``;
3. referee -> requester: ``{"v": 2, "r": [result bytes or null per claim]}``
   (null: the forwarded outputs do not hash to that commitment, so there is
   nothing to judge) or ``{"v": 2, "err": "<what was expected, what came>"}``.

Referee runs share the executor's worker (its ``CapacityLimiter``) and at most
``MAX_ACTIVE`` referee requests are served at once (others get ``busy``). Per
requester (the remote peer): at most ``MAX_ACTIVE_PER_PEER`` at once and a budget
of ``RUNS_BURST`` requests refilled at ``RUNS_PER_S`` (``peer.caps.RateBudget``);
a request over either is refused with ``busy``/``budget`` before its payload is
read, so nobody can make a referee run models for nothing at will. Streams beyond
the per-peer stream cap (``peer.caps``) are reset.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import trio
from libp2p.custom_types import TProtocol

from edge_models.errors import EdgeModelError
from peer.caps import RateBudget, StreamSlot, caps_for
from peer.host import retire_stream_handler
from peer.worker import Worker
from protocols.codec import FrameDecoder, decode, encode, frame
from protocols.committee import CommitteeRule, RefereePanel
from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.proofs import (
    MAX_CP,
    ArbitratedReceipt,
    FraudProof,
    RefereeResult,
    open_referee_result,
    referee_panel,
    sign_referee_result,
)
from protocols.receipt import ResultCommitment, batch_digest, content_digest
from protocols.signed import Signed, open_message
from protocols.tensor import TensorLimits, decode_tensors
from protocols.verification import decide, judge, outputs_digest, should_spot_check

log = logging.getLogger(__name__)

REFEREE_PROTOCOL = TProtocol("/edgeswarm/referee/1")
VERSION = 2  # 2: the header names the checkpoint ``cp`` the panels are drawn under
MAX_REFEREE_BATCH = 4096  # a lease batch is refereed up to this size (checked batches are small)
HEADER_MAX = 8192 + 2 * MAX_REFEREE_BATCH * 34
REPLY_MAX = 8192
MAX_CLAIMS = 2
MAX_ACTIVE = 4
MAX_ACTIVE_PER_PEER = 1
# Referee requests one requester may make at once, then one every 2 s. A dispute asks
# each panel referee once; spot checks (p = 0.05) on a busy requester with cheaters
# about dispute a few jobs a minute, well inside this.
RUNS_BURST = 8.0
RUNS_PER_S = 0.5
READ_WAIT_S = 10.0  # each frame of a request must arrive within this
RUN_BUDGET_S = 30.0  # one referee model run
READ_CHUNK = 256 * 1024
PAYLOAD_OVERHEAD = 64 * 1024

Evidence = FraudProof | ArbitratedReceipt | None


class RefereeError(ProtocolError):
    """A referee request or reply broke the protocol (the message says what and why)."""


# --- spot-check draws --------------------------------------------------------------------------


@dataclass
class SpotChecks:
    """The requester's spot-check decisions from one random source (seedable for tests)."""

    rng: random.Random = field(default_factory=random.Random)
    asked: int = 0
    checked: int = 0

    def want(self, probability: float, *, first_lease_job: bool = False) -> bool:
        self.asked += 1
        hit = should_spot_check(probability, self.rng.random(), is_first_lease_job=first_lease_job)
        self.checked += hit
        return hit


# --- messages (pure functions) -----------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One executor's signed commitment and the outputs it returned for the disputed job.

    For a lease batch, ``seq`` is the disputed job and ``ins``/``outs`` are the per-job
    digests the commitment's batch digests cover (``outputs`` is job ``seq``'s wire).
    """

    commitment: Signed[ResultCommitment]
    outputs: Any = None  # tensor wire map (not sent in the header)
    seq: int | None = None
    ins: tuple[bytes, ...] = ()
    outs: tuple[bytes, ...] = ()

    @property
    def job_input_digest(self) -> bytes:
        c = self.commitment.message
        return c.input_digest if self.seq is None else self.ins[self.seq]

    def output_digest_of(self, outputs: Mapping[str, Any]) -> bytes:
        """What the commitment's output digest would be with ``outputs`` for the disputed job."""
        d = outputs_digest(outputs)
        if self.seq is None:
            return d
        return batch_digest([*self.outs[: self.seq], d, *self.outs[self.seq + 1 :]])

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"c": self.commitment.to_bytes()}
        if self.seq is not None:
            h.update(seq=self.seq, ins=list(self.ins), outs=list(self.outs))
        return h


def _digests(name: str, value: Any) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_REFEREE_BATCH:
        raise DecodeError(f"claim.{name} must be a list of 1..{MAX_REFEREE_BATCH} digests")
    if not all(isinstance(d, bytes) and len(d) == 32 for d in value):
        raise DecodeError(f"claim.{name} must hold 32-byte digests")
    return tuple(value)


def _decode_claim(item: Any) -> Claim:
    if not isinstance(item, dict) or set(item) not in ({"c"}, {"c", "seq", "ins", "outs"}):
        raise DecodeError(f"a claim must be {{c}} or {{c, seq, ins, outs}}, got {item!r:.80}")
    raw = item["c"]
    if not isinstance(raw, bytes) or len(raw) > ResultCommitment.MAX_BYTES:
        raise DecodeError("a commitment must be signed bytes within its size cap")
    signed = open_message(ResultCommitment, raw)
    c = signed.message
    if "seq" not in item:
        if c.count != 1:
            raise ValidationError(f"a batch of {c.count} jobs needs seq, ins and outs")
        return Claim(signed)
    ins, outs, seq = _digests("ins", item["ins"]), _digests("outs", item["outs"]), item["seq"]
    if not len(ins) == len(outs) == c.count:
        raise ValidationError(f"the batch has {c.count} jobs, got {len(ins)}/{len(outs)} digests")
    if type(seq) is not int or not 0 <= seq < c.count:
        raise ValidationError(f"seq must be a job of the batch (0..{c.count - 1}), got {seq!r}")
    if batch_digest(ins) != c.input_digest or batch_digest(outs) != c.output_digest:
        raise ValidationError("the job digests do not hash to the commitment's batch digests")
    return Claim(signed, seq=seq, ins=ins, outs=outs)


def encode_header(claims: Sequence[Claim], cp: int = 0) -> bytes:
    return encode({"v": VERSION, "c": [c.header() for c in claims], "cp": cp})


def decode_header(data: bytes) -> tuple[tuple[Claim, ...], int]:
    """Parse and verify a request header: 1..2 claims about one requester's job input, and
    the checkpoint their panels are drawn under."""
    body = decode(data, max_size=HEADER_MAX)
    if not isinstance(body, dict) or set(body) != {"v", "c", "cp"} or body["v"] != VERSION:
        raise DecodeError(
            f"referee header must be {{v: {VERSION}, c: [...], cp}}, got {body!r:.80}"
        )
    cp = body["cp"]
    if type(cp) is not int or not 0 <= cp <= MAX_CP:
        raise DecodeError(f"referee header cp must be an epoch in [0, {MAX_CP}], got {cp!r:.40}")
    raw = body["c"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CLAIMS:
        raise DecodeError(f"referee header needs 1..{MAX_CLAIMS} claims, got {raw!r:.80}")
    out = [_decode_claim(item) for item in raw]
    first = out[0]
    for claim in out:
        c = claim.commitment.message
        if (c.model_cid, c.requester, claim.job_input_digest) != (
            first.commitment.message.model_cid,
            first.commitment.message.requester,
            first.job_input_digest,
        ):
            raise ValidationError("the claims must be one requester's job: same model and input")
    if len({c.commitment.digest for c in out}) != len(out):
        raise ValidationError("the same commitment was sent twice")
    return tuple(out), cp


def encode_payload(inputs: Any, outputs: Sequence[Any]) -> bytes:
    return encode({"v": VERSION, "in": inputs, "out": list(outputs)})


def decode_payload(data: bytes, claims: int, max_size: int) -> tuple[Any, list[Any]]:
    body = decode(data, max_size=max_size)
    if not isinstance(body, dict) or set(body) != {"v", "in", "out"} or body["v"] != VERSION:
        raise DecodeError(f"referee payload must be {{v, in, out}}, got {type(body).__name__}")
    outs = body["out"]
    if not isinstance(outs, list) or len(outs) != claims:
        raise DecodeError(f"referee payload needs {claims} outputs, one per commitment")
    return body["in"], outs


def encode_reply(results: Sequence[Signed[RefereeResult] | None]) -> bytes:
    return encode({"v": VERSION, "r": [None if r is None else r.to_bytes() for r in results]})


def encode_error(message: str) -> bytes:
    return encode({"v": VERSION, "err": message[:1024]})


def decode_reply(data: bytes, claims: int) -> list[Signed[RefereeResult] | None]:
    body = decode(data, max_size=REPLY_MAX)
    if isinstance(body, dict) and set(body) == {"v", "err"} and isinstance(body["err"], str):
        raise RefereeError(f"referee refused: {body['err']}")
    if not isinstance(body, dict) or set(body) != {"v", "r"} or body["v"] != VERSION:
        raise DecodeError(f"referee reply must be {{v, r}} or {{v, err}}, got {body!r:.80}")
    raw = body["r"]
    if not isinstance(raw, list) or len(raw) != claims:
        raise DecodeError(f"referee reply needs {claims} results, got {raw!r:.80}")
    out: list[Signed[RefereeResult] | None] = []
    for item in raw:
        if item is None:
            out.append(None)
        elif isinstance(item, bytes) and len(item) <= RefereeResult.MAX_BYTES:
            out.append(open_referee_result(item))
        else:
            raise DecodeError("a referee result must be signed bytes within its size cap")
    return out


# --- framing on a libp2p stream ----------------------------------------------------------------


class _Frames:
    def __init__(self, stream: Any, max_size: int) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_size=max_size)

    async def read(self, max_size: int) -> bytes:
        self.decoder.max_size = max_size
        while True:
            raw = self.decoder.next_frame()
            if raw is not None:
                return raw
            chunk = await self.stream.read(READ_CHUNK)
            if not chunk:
                raise RefereeError("the referee stream ended before a whole frame came")
            self.decoder.feed(chunk)

    async def write(self, payload: bytes, max_size: int) -> None:
        await self.stream.write(frame(payload, max_size=max_size))


async def _close(stream: Any, *, reset: bool = False) -> None:
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(2.0),
        contextlib.suppress(Exception),  # already gone: nothing left to close
    ):
        await (stream.reset() if reset else stream.close())


# --- the referee (server side) -----------------------------------------------------------------


class RefereeService:
    """Answers ``/edgeswarm/referee/1`` for the models this peer's worker serves."""

    def __init__(
        self,
        *,
        key: nacl.signing.SigningKey,
        peer_id: str,
        host: Any,
        worker: Worker,
        limits: TensorLimits,
        rule: Callable[[], CommitteeRule | None] = lambda: None,
    ) -> None:
        self.key = key
        self.peer_id = peer_id
        self.host = host
        self.worker = worker
        self.limits = limits
        self.rule = rule  # None: committee rule unknown, answer any requester
        self.active = 0
        self.active_by_peer: dict[str, int] = {}
        self.budget = RateBudget(rate=RUNS_PER_S, burst=RUNS_BURST)
        self.clock: Callable[[], float] = time.monotonic
        self.stats: dict[str, int] = {"asked": 0, "judged": 0, "refused": 0, "over_budget": 0}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.set_stream_handler(REFEREE_PROTOCOL, self._on_stream)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                retire_stream_handler(self.host, REFEREE_PROTOCOL)
                nursery.cancel_scope.cancel()

    async def _on_stream(self, stream: Any) -> None:
        if self._nursery is None:
            await _close(stream, reset=True)
            return
        slot = await caps_for(self.host).admit(REFEREE_PROTOCOL, stream)  # over the cap: reset
        if slot is not None:
            self._nursery.start_soon(self._serve_in, slot, stream)

    async def _serve_in(self, slot: StreamSlot, stream: Any) -> None:
        with slot:
            await self._serve(stream)

    def _admit(self, remote: str) -> None:
        """Refuse (RefereeError) a request over the global or the requester's own limits."""
        if self.active >= MAX_ACTIVE:
            raise RefereeError(f"busy: {self.active} referee runs in progress")
        if self.active_by_peer.get(remote, 0) >= MAX_ACTIVE_PER_PEER:
            raise RefereeError(f"busy: {MAX_ACTIVE_PER_PEER} request(s) of yours in progress")
        if not self.budget.take(remote, self.clock()):
            self.stats["over_budget"] += 1
            raise RefereeError(
                f"budget: over {RUNS_BURST:.0f} referee requests at once or one per "
                f"{1 / RUNS_PER_S:.0f} s; try again in {self.budget.wait_s(remote):.0f} s"
            )

    async def _serve(self, stream: Any) -> None:
        self.stats["asked"] += 1
        frames = _Frames(stream, HEADER_MAX)
        remote = str(stream.muxed_conn.peer_id)
        try:
            self._admit(remote)
            self.active += 1
            self.active_by_peer[remote] = self.active_by_peer.get(remote, 0) + 1
            try:
                reply = await self._judge(frames, remote)
            finally:
                self.active -= 1
                left = self.active_by_peer.pop(remote) - 1
                if left:
                    self.active_by_peer[remote] = left
        except (ProtocolError, EdgeModelError, trio.TooSlowError) as exc:
            self.stats["refused"] += 1
            log.info("referee request refused: %s", exc)
            reply = encode_error(str(exc) or type(exc).__name__)
        except Exception as exc:  # the stream broke: nobody to answer
            log.debug("referee stream failed: %s", exc)
            await _close(stream, reset=True)
            return
        with contextlib.suppress(Exception), trio.move_on_after(READ_WAIT_S):
            await frames.write(reply, REPLY_MAX)
        await _close(stream)

    def panel_for(self, commitment: Signed[ResultCommitment], cp: int) -> RefereePanel | None:
        """The claim's panel under checkpoint ``cp`` (None: no committee rule here). An
        honest referee draws only under a checkpoint that is current now or was an epoch
        ago, so the party asking cannot pick an old checkpoint whose draw suits it."""
        rule = self.rule()
        if rule is None:
            return None
        if cp not in rule.panel_cps():
            raise ValidationError(
                f"panels are drawn under checkpoint {sorted(rule.panel_cps())} here, not {cp}"
            )
        return referee_panel(rule, commitment, cp)

    async def _judge(self, frames: _Frames, remote: str) -> bytes:
        with trio.fail_after(READ_WAIT_S):
            claims, cp = decode_header(await frames.read(HEADER_MAX))
        first = claims[0].commitment.message
        # The requester disputes; an executor whose result was never accepted may ask
        # about its own single claim (arbitration: protocols.proofs.ArbitratedReceipt).
        own_claim = len(claims) == 1 and first.executor == remote
        if first.requester != remote and not own_claim:
            raise ValidationError(
                f"only the job's requester {first.requester} (or the executor, about its "
                f"own result) may ask, not {remote}"
            )
        self.worker.entry(first.model_cid)  # ModelNotFound: we do not serve it
        panels = [self.panel_for(c.commitment, cp) for c in claims]
        if all(p is not None for p in panels) and not any(
            p is not None and self.peer_id in p for p in panels
        ):
            raise ValidationError(f"{self.peer_id} is not on the referee panel of these jobs")
        cap = (1 + len(claims)) * self.limits.max_total_bytes + PAYLOAD_OVERHEAD
        with trio.fail_after(READ_WAIT_S):
            inputs_wire, outputs_wires = decode_payload(await frames.read(cap), len(claims), cap)
        if content_digest(inputs_wire) != claims[0].job_input_digest:
            raise ValidationError("the inputs do not hash to the disputed job's input digest")
        inputs = decode_tensors(inputs_wire, limits=self.limits)
        self.worker.check(first.model_cid, inputs)
        mine, _ = await self.worker.run(
            first.model_cid, inputs, deadline=time.time() + RUN_BUDGET_S
        )
        mine_digest = outputs_digest(mine)
        now_ms = int(time.time() * 1000)
        results: list[Signed[RefereeResult] | None] = []
        for claim, wire in zip(claims, outputs_wires, strict=True):
            signed = claim.commitment
            c = signed.message
            if self.peer_id in (c.requester, c.executor):
                results.append(None)  # a party cannot referee its own job
                continue
            try:
                claimed = decode_tensors(wire, limits=self.limits)
                verdict = judge(c, claimed, mine, digest=claim.output_digest_of)
            except ProtocolError as exc:  # forwarded outputs are not what it committed to
                log.info("referee: claim of %s not judged: %s", c.executor, exc)
                results.append(None)
                continue
            results.append(
                sign_referee_result(
                    self.key,
                    signed,
                    output_digest=mine_digest,
                    verdict=verdict,
                    time_ms=now_ms,
                    cp=cp,
                )
            )
            self.stats["judged"] += 1
        return encode_reply(results)


# --- the requester's side ----------------------------------------------------------------------

OpenStream = Callable[[str, float], Awaitable[Any]]  # (peer id, until) -> libp2p stream


async def ask_referee(
    open_stream: OpenStream,
    referee: str,
    claims: Sequence[Claim],
    inputs_wire: Any,
    *,
    limits: TensorLimits,
    until: float,
    cp: int = 0,
) -> list[Signed[RefereeResult] | None]:
    """One referee's verdicts on ``claims`` under checkpoint ``cp`` (results signed by
    someone else, or about another commitment or checkpoint, are dropped)."""
    stream = await open_stream(referee, until)
    ok = False
    try:
        frames = _Frames(stream, REPLY_MAX)
        await frames.write(encode_header(claims, cp), HEADER_MAX)
        cap = (1 + len(claims)) * limits.max_total_bytes + PAYLOAD_OVERHEAD
        await frames.write(encode_payload(inputs_wire, [c.outputs for c in claims]), cap)
        results = decode_reply(await frames.read(REPLY_MAX), len(claims))
        ok = True
    finally:
        await _close(stream, reset=not ok)
    return [
        r
        if r is not None
        and r.message.referee == referee
        and r.message.commitment == c.commitment.digest
        and r.message.cp == cp
        else None
        for r, c in zip(results, claims, strict=True)
    ]


async def arbitrate(
    open_stream: OpenStream,
    claims: Sequence[Claim],
    inputs_wire: Any,
    panels: Sequence[RefereePanel],
    *,
    limits: TensorLimits,
    wait_s: float,
) -> list[Evidence]:
    """Ask every referee on the claims' panels at once; per claim, what ``decide`` makes of the
    verdicts (a ``FraudProof``, an ``ArbitratedReceipt`` or None) once all are decided or
    ``wait_s`` passes."""
    if len({p.cp for p in panels}) > 1:
        raise ValueError("one referee request draws every panel under one checkpoint")
    cp = panels[0].cp if panels else 0
    verdicts: list[list[Signed[RefereeResult]]] = [[] for _ in claims]
    evidence: list[Evidence] = [None] * len(claims)
    referees = sorted({m for p in panels for m in p.members})
    until = time.time() + wait_s

    async def one(referee: str, cancel: trio.CancelScope) -> None:
        try:
            results = await ask_referee(
                open_stream, referee, claims, inputs_wire, limits=limits, until=until, cp=cp
            )
        except Exception as exc:  # unreachable or refusing referee: the others may decide
            log.info("referee %s gave no verdict: %s", referee, exc)
            return
        for i, r in enumerate(results):
            if r is not None:
                verdicts[i].append(r)
                evidence[i] = decide(claims[i].commitment, verdicts[i], panels[i])
        if all(e is not None for e in evidence):
            cancel.cancel()

    with trio.move_on_after(wait_s):
        async with trio.open_nursery() as nursery:
            for referee in referees:
                nursery.start_soon(one, referee, nursery.cancel_scope)
    return evidence


__all__ = [
    "REFEREE_PROTOCOL",
    "Claim",
    "RefereeError",
    "RefereeService",
    "SpotChecks",
    "arbitrate",
    "ask_referee",
    "decode_header",
    "decode_payload",
    "decode_reply",
    "encode_header",
    "encode_payload",
    "encode_reply",
]
