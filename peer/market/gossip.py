"""Market gossip: one topic per model cid, a validator in front of it, and a dispatcher.

Requesters publish signed ``JobRequest``\\s on ``edgeswarm/jobs/1/<cid>``;
executors that serve the cid are subscribed and publish signed ``Bid``\\s on
the same topic. ``GossipGuard`` is installed with ``set_topic_validator`` on
every market topic we join, so a message is dropped *before* it is forwarded
or delivered unless it parses within its cap, its signature checks, its
signer is the gossip originator (no re-publishing others' bids), it has not
expired, it is not a duplicate, and its signer is within its rate. A failed
validation makes py-libp2p's GossipSub score the forwarding peer down
(``scorer.on_invalid_message``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from protocols.codec import decode
from protocols.errors import ProtocolError
from protocols.market import BID_DOMAIN, CLOCK_SKEW_S, JOB_REQUEST_DOMAIN, Bid, JobRequest
from protocols.signed import Signed

log = logging.getLogger(__name__)

TOPIC_PREFIX = "edgeswarm/jobs/1/"


def topic_for(cid: str) -> str:
    return TOPIC_PREFIX + cid


MarketMessage = Signed[JobRequest] | Signed[Bid]


def parse_market_message(data: bytes, now: float) -> MarketMessage:
    """A signed JobRequest or Bid from untrusted gossip bytes (``ProtocolError`` otherwise)."""
    if len(data) > JobRequest.MAX_BYTES:
        raise ProtocolError(
            f"market message is {len(data)} bytes, the cap is {JobRequest.MAX_BYTES}"
        )
    raw = decode(data, max_size=JobRequest.MAX_BYTES)
    domain = raw.get("d") if isinstance(raw, dict) else None
    if domain == BID_DOMAIN:
        return Bid.from_bytes(data, now=now)
    if domain == JOB_REQUEST_DOMAIN:
        # The deadline is the requester's clock: allow for skew between the two clocks.
        return JobRequest.from_bytes(data, now=now - CLOCK_SKEW_S)
    raise ProtocolError(f"expected a job request or a bid on a market topic, got {domain!r:.60}")


_GOSSIP = "gossip"
_DIRECT = "direct"


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class GuardStats:
    accepted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    _changed: trio.Event = field(default_factory=trio.Event)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self._changed.set()
        self._changed = trio.Event()

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    async def wait_dropped(self, count: int) -> None:
        """Until at least ``count`` messages were dropped in all (tests, tools)."""
        while self.total_dropped < count:
            await self._changed.wait()


class GossipGuard:
    """The topic validator (sync, so it runs inline before forwarding)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        requests_per_s: float = 200.0,
        bids_per_s: float = 500.0,
        burst: float = 400.0,
        max_seen: int = 65536,
        max_peers: int = 4096,
    ) -> None:
        self.clock = clock
        self.rates = {"request": requests_per_s, "bid": bids_per_s}
        self.burst = burst
        self.max_seen = max_seen
        self.max_peers = max_peers
        self._seen: OrderedDict[tuple[Any, ...], str] = OrderedDict()  # key -> path
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self.stats = GuardStats()
        # Called with (topic, message) for every message that passes. Routing here,
        # not from the subscription channel, matters: py-libp2p's subscription
        # channel holds 32 messages and silently drops the rest of a burst.
        self.on_valid: Callable[[str, MarketMessage], None] | None = None

    def __call__(self, forwarder: ID, msg: Any) -> bool:
        now = self.clock()
        try:
            parsed = parse_market_message(bytes(msg.data), now)
        except ProtocolError as exc:
            self.stats.drop(type(exc).__name__)
            log.debug("dropped market message from %s: %s", forwarder, exc)
            return False
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:
            self.stats.drop("bad-origin")
            return False
        m = parsed.message
        if m.signer != origin:
            # Someone re-publishing another peer's signed message (a replay).
            self.stats.drop("signer-not-origin")
            return False
        topics = list(msg.topicIDs)
        if isinstance(m, JobRequest):
            kind = "request"
            if topics != [topic_for(m.model_cid)]:
                self.stats.drop("wrong-topic")
                return False
            key: tuple[Any, ...] = ("r", m.job_id, m.round)
        else:
            kind = "bid"
            key = ("b", m.job_id, m.executor, m.price, m.eta_ms, m.expires_at)
        if self._seen.get(key, False) == _DIRECT:
            # It came straight to us first (``admit_direct``) and was handled then: the
            # gossip copy is the same valid message (forwarded as usual), not a replay.
            self._seen[key] = _GOSSIP
            return True
        if key in self._seen:
            self.stats.drop("duplicate")
            return False
        if not self._take(origin, kind, now):
            self.stats.drop("rate")
            return False
        self._remember(key, _GOSSIP)
        self.stats.accepted += 1
        if self.on_valid is not None:
            self.on_valid(topics[0], parsed)
        return True

    def admit_direct(self, origin: str, data: bytes) -> MarketMessage | None:
        """A signed JobRequest or Bid that came straight from ``origin`` on an auction
        stream (``peer.market.direct``), under the rules gossip gets: size cap, strict
        CBOR, signature, signer = the stream's authenticated peer, not expired, not seen
        before (on either path), within the signer's rate. The message, or None (dropped)."""
        now = self.clock()
        try:
            parsed = parse_market_message(data, now)
        except ProtocolError as exc:
            self.stats.drop(type(exc).__name__)
            return None
        m = parsed.message
        if m.signer != origin:
            self.stats.drop("signer-not-origin")
            return None
        if isinstance(m, JobRequest):
            kind = "request"
            key: tuple[Any, ...] = ("r", m.job_id, m.round)
        else:
            kind = "bid"
            key = ("b", m.job_id, m.executor, m.price, m.eta_ms, m.expires_at)
        if key in self._seen:
            return None  # already had it (the gossip copy came first): not an offence
        if not self._take(origin, kind, now):
            self.stats.drop("rate")
            return None
        self._remember(key, _DIRECT)
        self.stats.accepted += 1
        return parsed

    def _remember(self, key: tuple[Any, ...], path: str) -> None:
        self._seen[key] = path
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)

    def _take(self, peer: str, kind: str, now: float) -> bool:
        rate = self.rates[kind]
        bucket = self._buckets.get((peer, kind))
        if bucket is None:
            bucket = self._buckets[(peer, kind)] = _Bucket(tokens=self.burst, at=now)
            if len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end((peer, kind))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


class MarketGossip:
    """Joins market topics and routes what arrives: requests to the executor, bids to jobs."""

    # GossipSub's own spam gate allows 10 msgs/s per peer per topic by default:
    # far below one busy model's requests and bids. Our guard rate-limits per signer.
    GOSSIPSUB_TOPIC_RATE = 2000.0

    def __init__(
        self,
        pubsub: Any,
        *,
        guard: GossipGuard | None = None,
        on_request: Callable[[JobRequest, Any], None] | None = None,
        max_topics: int = 64,
    ) -> None:
        self.pubsub = pubsub
        self.guard = guard or GossipGuard()
        self.guard.on_valid = self._dispatch
        self.on_request = on_request
        self.max_topics = max_topics
        self.bid_sinks: dict[bytes, Callable[[Bid], None]] = {}
        self.served: set[str] = set()
        self._joined: OrderedDict[str, trio.CancelScope] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._join_lock = trio.Lock()
        router = getattr(pubsub, "router", None)
        if router is not None and hasattr(router, "max_messages_per_topic_per_second"):
            router.max_messages_per_topic_per_second = max(
                router.max_messages_per_topic_per_second, self.GOSSIPSUB_TOPIC_RATE
            )

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for cid in list(self._joined):
                    self.pubsub.remove_topic_validator(topic_for(cid))
                nursery.cancel_scope.cancel()

    def joined(self, cid: str) -> bool:
        return cid in self._joined

    async def join(self, cid: str, *, serve: bool = False) -> str:
        """Subscribe to the cid's topic (idempotent); ``serve`` marks it as ours to bid on."""
        if serve:
            self.served.add(cid)
        topic = topic_for(cid)
        if cid in self._joined:
            self._joined.move_to_end(cid)
            return topic
        async with self._join_lock:  # concurrent first jobs on one cid subscribe once
            if cid not in self._joined:
                await self._subscribe(cid, topic)
        return topic

    async def _subscribe(self, cid: str, topic: str) -> None:
        assert self._nursery is not None, "MarketGossip.run() is not running"
        self.pubsub.set_topic_validator(topic, self.guard, False)
        sub = await self.pubsub.subscribe(topic)
        scope = trio.CancelScope()
        self._joined[cid] = scope
        self._nursery.start_soon(self._read, cid, sub, scope)
        # Requester topics are kept (re-joining within GossipSub's back-off would
        # leave an empty mesh); only the least recently used ones beyond the cap go.
        while len(self._joined) > self.max_topics:
            old = next((c for c in self._joined if c not in self.served), None)
            if old is None:
                break
            await self.leave(old)

    async def leave(self, cid: str) -> None:
        scope = self._joined.pop(cid, None)
        self.served.discard(cid)
        if scope is None:
            return
        scope.cancel()
        topic = topic_for(cid)
        self.pubsub.remove_topic_validator(topic)
        await self.pubsub.unsubscribe(topic)

    async def _read(self, cid: str, sub: Any, scope: trio.CancelScope) -> None:
        # Messages were routed by the validator (_dispatch); keep the channel drained.
        with scope:
            async for _msg in sub:
                pass

    def _dispatch(self, topic: str, parsed: MarketMessage) -> None:
        m = parsed.message
        if isinstance(m, Bid):
            sink = self.bid_sinks.get(m.job_id)
            if sink is not None:
                sink(m)
        elif (
            self.on_request is not None
            and topic == topic_for(m.model_cid)
            and m.model_cid in self.served
        ):
            self.on_request(m, None)

    def deliver_direct(
        self, origin: str, data: bytes, reply: Callable[[Any], Any] | None = None
    ) -> bool:
        """A market message that came straight from ``origin`` (an auction stream): checked
        by the guard, then routed like gossip (a request to our executor, with ``reply``
        to send its bid back on that stream; a bid to its job). False: dropped."""
        parsed = self.guard.admit_direct(origin, data)
        if parsed is None:
            return False
        m = parsed.message
        if isinstance(m, Bid):
            sink = self.bid_sinks.get(m.job_id)
            if sink is not None:
                sink(m)
        elif self.on_request is not None and m.model_cid in self.served:
            self.on_request(m, reply)
        return True

    async def publish(self, cid: str, signed: MarketMessage) -> None:
        await self.pubsub.publish(topic_for(cid), signed.to_bytes())

    def mesh_peers(self, cid: str) -> set[str]:
        mesh = getattr(self.pubsub.router, "mesh", {})
        return {str(p) for p in mesh.get(topic_for(cid), ())}

    def topic_peers(self, cid: str) -> set[str]:
        return {str(p) for p in self.pubsub.peer_topics.get(topic_for(cid), ())}

    async def wait_for_mesh(self, cid: str, candidates: list[ID], limit: float) -> bool:
        """Wait until one of ``candidates`` is in our mesh for the cid's topic (bounded)."""
        if self.mesh_peers(cid):
            return True
        if not candidates:
            return False
        topic = topic_for(cid)
        done = trio.Event()

        async def one(peer: ID) -> None:
            try:
                await self.pubsub.wait_for_mesh(peer, topic, timeout=limit)
            except (trio.TooSlowError, TypeError):
                return
            done.set()

        with trio.move_on_after(limit):
            async with trio.open_nursery() as nursery:
                for p in candidates[:16]:
                    nursery.start_soon(one, p)
                await done.wait()
                nursery.cancel_scope.cancel()
        return bool(self.mesh_peers(cid))
