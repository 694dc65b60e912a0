"""The client side of ``/edgeswarm/ledger/1``: framed request/reply over libp2p streams.

The wire (ops, fields, caps) is defined once, sans-IO, in ``protocols.ledger_rpc``;
this module moves its frames. ``LedgerClient`` keeps one open stream per peer
(a ``Channel``), reopens it once when it broke, looks a peer's addresses up in the
DHT when it cannot be reached, and introduces our identity proof to each peer
before the first request (witnesses need it to grant us credit).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID

from peer.settlement.base import SettlementError
from protocols.codec import FrameDecoder, decode, encode, frame
from protocols.errors import ProtocolError
from protocols.ledger import IdentityProof
from protocols.ledger_rpc import (
    MAX_FRAME,
    MAX_ITEM_PAYLOAD,
    MAX_ITEMS,
    ErrorReply,
    Push,
    PushReply,
    R,
    Request,
    decode_reply,
)
from protocols.ledger_state import FactKind, encode_item

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/edgeswarm/ledger/1")
# Seconds before the DHT is asked again for the addresses of a peer we cannot reach.
LOOKUP_BACKOFF = 30.0


class Channel:
    """One stream, used for request/reply frames in order (one caller at a time)."""

    def __init__(self, stream: INetStream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.decoder = FrameDecoder(max_size=MAX_FRAME)
        self.lock = trio.Lock()
        self.broken = False

    async def read_frame(self) -> bytes | None:
        """The next frame, or None at a clean end of stream."""
        while True:
            data = self.decoder.next_frame()
            if data is not None:
                return data
            try:
                chunk = await self.stream.read(65536)
            except Exception as exc:  # StreamEOF / StreamReset / closed connection
                if self.decoder.buffered:
                    raise SettlementError(f"{self.peer} closed the stream mid-frame") from exc
                return None
            if not chunk:
                return None
            self.decoder.feed(chunk)

    async def write(self, body: dict[str, Any]) -> None:
        await self.stream.write(frame(encode(body), max_size=MAX_FRAME))

    async def call(self, request: Request, expected: type[R]) -> R:
        """Send one request, return its typed reply (raises SettlementError on any failure)."""
        async with self.lock:
            try:
                await self.write(request.to_wire())
                data = await self.read_frame()
                if data is None:
                    raise SettlementError(f"{self.peer} closed the stream without answering")
                reply = decode_reply(decode(data, max_size=MAX_FRAME), expected)
            except (SettlementError, trio.Cancelled):
                self.broken = True  # a late reply would be read as the next one's: drop it
                raise
            except ProtocolError as exc:
                self.broken = True
                raise SettlementError(f"bad reply from {self.peer}: {exc}") from exc
            except Exception as exc:
                self.broken = True
                raise SettlementError(f"stream to {self.peer} failed: {exc!r}") from exc
        if isinstance(reply, ErrorReply):
            raise SettlementError(f"{self.peer} answered with an error: {reply.err}")
        return reply

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):  # bounded even when shielded
            try:
                await self.stream.close()
            except Exception:
                log.debug("closing ledger stream to %s failed", self.peer, exc_info=True)


def pack(items: list[bytes]) -> list[tuple[bytes, ...]]:
    """Split encoded items into frames of at most MAX_ITEMS items / MAX_ITEM_PAYLOAD bytes."""
    out: list[tuple[bytes, ...]] = []
    cur: list[bytes] = []
    size = 0
    for item in items:
        if cur and (len(cur) >= MAX_ITEMS or size + len(item) > MAX_ITEM_PAYLOAD):
            out.append(tuple(cur))
            cur, size = [], 0
        cur.append(item)
        size += len(item)
    if cur:
        out.append(tuple(cur))
    return out


class LedgerClient:
    """Requests to other peers' ledger service, on kept-open streams (one per peer)."""

    def __init__(
        self,
        host: IHost,
        peer_id: str,
        *,
        request_timeout: float,
        dht: KadDHT | None = None,
    ) -> None:
        self.host = host
        self.peer_id = peer_id
        self.request_timeout = request_timeout
        self.dht = dht
        # Our identity proof, sent once to each peer before the first request (set at start).
        self.identity: IdentityProof | None = None
        self._pool: dict[str, Channel] = {}
        self._opening: dict[str, trio.Lock] = {}
        # Peers that acknowledged our identity proof, and one introducer per peer (others
        # calling it meanwhile wait, so no request of ours reaches it before the proof).
        self._introduced: set[str] = set()
        self._introducing: dict[str, trio.Lock] = {}
        self._lookups: dict[str, float] = {}  # peer id -> when we last asked the DHT

    async def open(self, peer_id: str) -> Channel:
        """A new stream to ``peer_id`` (the caller closes it)."""
        pid = ID.from_base58(peer_id)
        try:
            stream = await self.host.new_stream(pid, [PROTOCOL_ID])
        except Exception as exc:
            # Not connected and no address known: look the peer up in the DHT once.
            if not await self._find_addrs(pid):
                raise SettlementError(f"cannot open {PROTOCOL_ID} to {peer_id}: {exc!r}") from exc
            try:
                stream = await self.host.new_stream(pid, [PROTOCOL_ID])
            except Exception as exc2:
                raise SettlementError(f"cannot open {PROTOCOL_ID} to {peer_id}: {exc2!r}") from exc2
        return Channel(stream, peer_id)

    async def _find_addrs(self, pid: ID) -> bool:
        if self.dht is None:
            return False
        now = trio.current_time()
        if self._lookups.get(str(pid), -math.inf) > now - LOOKUP_BACKOFF:
            return False  # looked up recently: let the caller's retry/backoff decide
        if len(self._lookups) > 10_000:
            self._lookups.clear()
        self._lookups[str(pid)] = now
        try:
            info = await self.dht.find_peer(pid)
        except Exception as exc:
            log.debug("DHT lookup of %s failed: %r", pid, exc)
            return False
        if info is None or not info.addrs:
            return False
        # py-libp2p dials only the first TCP address it knows: drop stale ones.
        self.host.get_peerstore().clear_addrs(info.peer_id)
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
        return True

    async def _pooled(self, peer_id: str) -> Channel:
        # One opener per peer: concurrent callers share the stream it opens (a stream each
        # would run into the peer's per-peer stream cap and be reset).
        lock = self._opening.setdefault(peer_id, trio.Lock())
        async with lock:
            ch = self._pool.get(peer_id)
            if ch is None or ch.broken:
                if ch is not None:
                    await ch.close()
                ch = await self.open(peer_id)
                self._pool[peer_id] = ch
        return ch

    async def call(self, peer_id: str, request: Request, expected: type[R]) -> R:
        """One request on the kept-open stream to ``peer_id`` (reopened once if it broke)."""
        if peer_id == self.peer_id:
            raise SettlementError("a peer does not call itself")
        with trio.move_on_after(self.request_timeout) as scope:
            await self._introduce(peer_id)
            for attempt in (1, 2):
                ch = await self._pooled(peer_id)
                try:
                    return await ch.call(request, expected)
                except SettlementError:
                    if attempt == 2 or not ch.broken:
                        raise
        assert scope.cancelled_caught
        raise SettlementError(f"{peer_id} did not answer within {self.request_timeout} s")

    async def _introduce(self, peer_id: str) -> None:
        """Send our identity proof to a peer before anything else (witnesses need it to
        grant credit). A peer counts as introduced only once it answered the push: a failed
        dial, a lost stream or a timeout (a cancel) leaves the introduction to the next call."""
        if self.identity is None or peer_id in self._introduced:
            return
        lock = self._introducing.setdefault(peer_id, trio.Lock())
        async with lock:
            if peer_id in self._introduced:
                return
            ch = await self._pooled(peer_id)
            item = encode_item(FactKind.IDENTITY_PROOF, self.identity.to_bytes())
            reply = await ch.call(Push((item,)), PushReply)
            if reply.bad:  # the same bytes would be refused again: say so once
                log.warning("%s refused our identity proof: it will refuse us credit", peer_id)
            self._introduced.add(peer_id)

    def forget_introduction(self, peer_id: str) -> None:
        """Introduce ourselves again next time (the peer may have lost our proof)."""
        self._introduced.discard(peer_id)

    async def push(self, peer_id: str, items: list[tuple[FactKind, bytes]]) -> int:
        """Send facts to a peer; returns how many were new to it."""
        new = 0
        for chunk in pack([encode_item(k, d) for k, d in items]):
            reply = await self.call(peer_id, Push(chunk), PushReply)
            new += reply.new
        return new

    async def close(self) -> None:
        """Close every kept-open stream."""
        for ch in list(self._pool.values()):
            await ch.close()
        self._pool.clear()
