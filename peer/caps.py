"""Caps on what one peer can cost another: streams per peer and protocol, gossip intake.

Streams. py-libp2p's resource manager counts streams only globally, and a
stream over its limit hangs instead of being refused. ``StreamCaps`` is the
app's own gate: every inbound handler of ours takes a slot for the remote
peer and protocol before it reads a byte (``admit``, or ``guarded`` around a
whole handler) and gives it back when the stream is done. A stream over the
per-peer cap (or over the protocol's total) is **reset at once**, counted in
``refused`` and logged (once per peer and protocol every ``LOG_EVERY_S``), so
the remote sees a clear failure instead of a stream that never answers. Each
host has one ``StreamCaps`` (``caps_for(host)``): the services that register
handlers share it without plumbing.

Gossip. py-libp2p's pubsub starts one task per received message, with no
bound: a peer that streams publish RPCs makes us hold as many messages as it
can send. ``PubsubIntake`` replaces that with a bounded queue (a cap per
forwarding peer and a total) drained by a fixed number of workers that run
pubsub's own ``push_msg`` (signature check, topic validators, forwarding). A
message over a cap is shed: counted in ``shed`` and logged, never silently.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)

JOB = "/edgeswarm/job/1"
LEDGER = "/edgeswarm/ledger/1"
REFEREE = "/edgeswarm/referee/1"
MODEL = "/edgeswarm/model/1"

# Streams one peer may hold open at once, per protocol. An honest requester holds
# at most one stream per award (an executor accepts <= max_concurrent + max_queue
# awards in all); a payer keeps one pooled ledger stream per witness plus sync
# sessions; a requester asks a referee once per dispute.
DEFAULT_PER_PEER: dict[str, int] = {JOB: 16, LEDGER: 8, REFEREE: 2, MODEL: 4}
DEFAULT_PER_PEER_OTHER = 8
DEFAULT_TOTAL = 512  # all peers together, per protocol
LOG_EVERY_S = 10.0
MAX_TRACKED_PEERS = 4096  # refusal counts kept per peer (oldest forgotten)

Handler = Callable[[Any], Awaitable[None]]


class StreamSlot:
    """One admitted stream's place under the caps; ``release`` (or ``with``) gives it back."""

    def __init__(self, caps: StreamCaps, protocol: str, peer: str) -> None:
        self._caps = caps
        self.protocol = protocol
        self.peer = peer
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._caps._release(self.protocol, self.peer)

    def __enter__(self) -> StreamSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remote(stream: Any) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except AttributeError:
        return "?"


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.reset()
        except Exception as exc:  # already gone: nothing left to reset
            log.debug("resetting a refused stream failed: %s", exc)


@dataclass
class StreamCaps:
    """Per-peer and total caps on open inbound streams, per protocol."""

    per_peer: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PER_PEER))
    default_per_peer: int = DEFAULT_PER_PEER_OTHER
    total: int = DEFAULT_TOTAL
    clock: Callable[[], float] = time.monotonic
    open: dict[tuple[str, str], int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    refused_by_peer: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _logged: OrderedDict[tuple[str, str], float] = field(default_factory=OrderedDict)

    def limit(self, protocol: str) -> int:
        return self.per_peer.get(protocol, self.default_per_peer)

    def set_limit(self, protocol: str, per_peer: int) -> None:
        if per_peer < 1:
            raise ValueError(f"a per-peer stream cap must be >= 1, got {per_peer}")
        self.per_peer[protocol] = per_peer

    def try_open(self, protocol: str, peer: str) -> StreamSlot | None:
        """A slot for one more stream of ``peer`` on ``protocol``, or None (counted, logged)."""
        held = self.open.get((protocol, peer), 0)
        total = self.totals.get(protocol, 0)
        if held >= self.limit(protocol) or total >= self.total:
            why = (
                f"{held} already open from this peer (cap {self.limit(protocol)})"
                if held >= self.limit(protocol)
                else f"{total} open in all (cap {self.total})"
            )
            self._refuse(protocol, peer, why)
            return None
        self.open[(protocol, peer)] = held + 1
        self.totals[protocol] = total + 1
        return StreamSlot(self, protocol, peer)

    async def admit(self, protocol: str, stream: Any) -> StreamSlot | None:
        """``try_open`` for an inbound stream; over the cap the stream is reset, None returned."""
        slot = self.try_open(protocol, _remote(stream))
        if slot is None:
            await _reset(stream)
        return slot

    def guarded(self, protocol: str, handler: Handler) -> Handler:
        """``handler`` behind the caps: it runs holding a slot; over the cap the stream is reset."""

        async def guard(stream: Any) -> None:
            slot = await self.admit(protocol, stream)
            if slot is None:
                return
            with slot:
                await handler(stream)

        return guard

    def _release(self, protocol: str, peer: str) -> None:
        key = (protocol, peer)
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)
        self.totals[protocol] = max(0, self.totals.get(protocol, 0) - 1)

    def _refuse(self, protocol: str, peer: str, why: str) -> None:
        self.refused[protocol] = self.refused.get(protocol, 0) + 1
        self.refused_by_peer[peer] = self.refused_by_peer.pop(peer, 0) + 1
        while len(self.refused_by_peer) > MAX_TRACKED_PEERS:
            self.refused_by_peer.popitem(last=False)
        now = self.clock()
        key = (protocol, peer)
        if now - self._logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged.pop(key, None)
            self._logged[key] = now
            while len(self._logged) > MAX_TRACKED_PEERS:
                self._logged.popitem(last=False)
            log.warning(
                "reset a %s stream from %s: %s (%d refused from this peer so far)",
                protocol,
                peer,
                why,
                self.refused_by_peer[peer],
            )


_CAPS_ATTR = "_edgeswarm_stream_caps"
_INTAKE_ATTR = "_edgeswarm_pubsub_intake"


def caps_for(host: Any) -> StreamCaps:
    """The one ``StreamCaps`` of ``host`` (made with the defaults on first use)."""
    caps: StreamCaps | None = getattr(host, _CAPS_ATTR, None)
    if caps is None:
        caps = StreamCaps()
        setattr(host, _CAPS_ATTR, caps)
    return caps


def guarded(host: Any, protocol: str, handler: Handler) -> Handler:
    """``caps_for(host).guarded(protocol, handler)``: the one-line hook for a stream handler."""
    return caps_for(host).guarded(protocol, handler)


# --- gossip intake ---------------------------------------------------------------------------

INTAKE_PER_PEER = 128  # messages one forwarding peer may have queued
INTAKE_TOTAL = 1024
INTAKE_WORKERS = 8


@dataclass
class IntakeStats:
    accepted: int = 0
    shed: int = 0
    shed_by_peer: OrderedDict[str, int] = field(default_factory=OrderedDict)
    high_water: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def _note_shed(self, peer: str) -> None:
        self.shed += 1
        self.shed_by_peer[peer] = self.shed_by_peer.pop(peer, 0) + 1
        while len(self.shed_by_peer) > MAX_TRACKED_PEERS:
            self.shed_by_peer.popitem(last=False)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_shed(self, count: int) -> None:
        """Until at least ``count`` messages were shed (tests, tools)."""
        while self.shed < count:
            await self._changed.wait()


class PubsubIntake:
    """A bounded queue in front of ``pubsub.push_msg`` (see the module docstring).

    ``install`` swaps the pubsub's ``push_msg`` for ``offer``; until ``run`` is
    started (and after it stops) messages go straight to the original.
    """

    def __init__(
        self,
        pubsub: Any,
        *,
        per_peer: int = INTAKE_PER_PEER,
        total: int = INTAKE_TOTAL,
        workers: int = INTAKE_WORKERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_peer < 1 or total < 1 or workers < 1:
            raise ValueError("intake caps and workers must be >= 1")
        self.pubsub = pubsub
        self.per_peer = per_peer
        self.total = total
        self.workers = workers
        self.clock = clock
        self.stats = IntakeStats()
        self._push: Callable[[Any, Any], Awaitable[None]] = pubsub.push_msg
        self._me = getattr(pubsub, "my_id", None)  # our own publishes are never queued or shed
        self._send, self._receive = trio.open_memory_channel[tuple[Any, Any]](total)
        self._queued: dict[Any, int] = {}
        self._running = False
        self._last_log = -LOG_EVERY_S

    def install(self) -> PubsubIntake:
        self.pubsub.push_msg = self.offer
        return self

    @property
    def queued(self) -> int:
        return sum(self._queued.values())

    async def offer(self, forwarder: Any, msg: Any) -> None:
        """Called by pubsub for each received message (one task each): queue it or shed it."""
        if not self._running or (self._me is not None and forwarder == self._me):
            await self._push(forwarder, msg)
            return
        held = self._queued.get(forwarder, 0)
        if held >= self.per_peer:
            self._shed(forwarder, f"{held} queued from this peer (cap {self.per_peer})")
            return
        try:
            self._send.send_nowait((forwarder, msg))
        except trio.WouldBlock:
            self._shed(forwarder, f"{self.total} queued in all (cap {self.total})")
            return
        self._queued[forwarder] = held + 1
        self.stats.high_water = max(self.stats.high_water, self.queued)

    def _shed(self, forwarder: Any, why: str) -> None:
        peer = str(forwarder)
        self.stats._note_shed(peer)
        now = self.clock()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning(
                "gossip intake full, shedding messages from %s: %s (%d shed so far)",
                peer,
                why,
                self.stats.shed,
            )

    async def _work(self) -> None:
        async for forwarder, msg in self._receive:
            left = self._queued.get(forwarder, 1) - 1
            if left > 0:
                self._queued[forwarder] = left
            else:
                self._queued.pop(forwarder, None)
            self.stats.accepted += 1
            try:
                await self._push(forwarder, msg)
            except Exception as exc:  # one bad message must not stop the intake
                log.debug("gossip message from %s failed: %s", forwarder, exc)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._work)
            self._running = True
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._running = False
                nursery.cancel_scope.cancel()


def intake_for(pubsub: Any, **kw: Any) -> PubsubIntake:
    """The installed ``PubsubIntake`` of ``pubsub`` (installed with ``kw`` on first use)."""
    intake: PubsubIntake | None = getattr(pubsub, _INTAKE_ATTR, None)
    if intake is None:
        intake = PubsubIntake(pubsub, **kw).install()
        setattr(pubsub, _INTAKE_ATTR, intake)
    return intake


# --- budgets ---------------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateBudget:
    """A token bucket per key (a peer): ``burst`` at once, refilled at ``rate`` per second.

    At most ``max_keys`` buckets are kept (the least recently used go first; a
    forgotten key starts again with a full bucket, which is the safe side for
    honest peers and costs a flooder a new identity per ``max_keys`` others).
    """

    rate: float
    burst: float
    max_keys: int = MAX_TRACKED_PEERS
    _buckets: OrderedDict[Any, _Bucket] = field(default_factory=OrderedDict)

    def take(self, key: Any, now: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(tokens=self.burst, at=now)
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    def wait_s(self, key: Any, cost: float = 1.0) -> float:
        """Seconds until ``key`` could spend ``cost`` again (from its last ``take``)."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.tokens >= cost or self.rate <= 0:
            return 0.0
        return (cost - bucket.tokens) / self.rate
