"""Auction streams: JobRequests straight to the servers an auction expects, bids back.

Gossip alone makes every bid wait on the mesh: the request goes out over
GossipSub, each server validates and publishes its bid to the topic, and the
bid is forwarded through the mesh back to us (tens to hundreds of ms on a busy
box). The servers an auction expects are known before it starts (provider
records and ads, ``Auctions.expected_bidders``), so the requester keeps one
``/edgeswarm/auction/1`` stream to each (``DirectRequests``): the signed
JobRequest goes out on it as well as on gossip, and the server's signed Bid
comes back on the same stream. Both ends check what arrives with the gossip
guard's rules (``GossipGuard.admit_direct``: signature, signer = the stream's
peer, expiry, duplicates on either path, rate), so a request that arrives both
ways is bid on once.

A stream is opened in the background to each server that bid, once that
auction is over (``Auctions.record`` calls ``warm``): an auction never waits
on a stream open, and the opens never compete with its award on a busy server;
the next auctions use the streams once they are there. Bounded: ``MAX_LINKS``
streams (the least recently used goes), each closed after ``IDLE_S`` without a
request; a stream that fails is dropped and opened again when next needed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from peer.job_stream import FrameStream, JobStreamClosed
from peer.market.clock import Clock, system_clock
from protocols.errors import ProtocolError
from protocols.market import AUCTION_PROTOCOL_ID, JobRequest
from protocols.signed import Signed

log = logging.getLogger(__name__)

AUCTION_PROTOCOL = AUCTION_PROTOCOL_ID
MAX_LINKS = 64
IDLE_S = 60.0  # a link with no request for this long is closed (the server keeps it longer)
OPEN_TIMEOUT = 5.0
WRITE_TIMEOUT = 0.5  # a server that does not take a request this fast loses its link
MAX_FRAMES = 1_000_000  # frames read on one stream before it is closed (reopened on demand)
FRAME_MAX = JobRequest.MAX_BYTES  # requests and bids are small signed messages

OpenStream = Callable[[str, float, str], Awaitable[Any]]  # (peer, until, protocol) -> stream
Deliver = Callable[[str, bytes], object]  # (origin peer, message bytes) -> routed or dropped


class _Link:
    def __init__(self, fs: FrameStream, at: float) -> None:
        self.fs = fs
        self.used = at
        self.scope = trio.CancelScope()


class DirectRequests:
    """The requester's auction streams, one per known server."""

    def __init__(
        self, *, open_stream: OpenStream, deliver: Deliver | None, clock: Clock = system_clock
    ) -> None:
        self.open_stream = open_stream
        self.deliver = deliver  # None: no direct path (e.g. a gossip double without one)
        self.clock = clock
        self._links: OrderedDict[str, _Link] = OrderedDict()
        self._opening: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self.sent = 0  # requests that went out on a stream (tests, the bench)
        self._changed = trio.Event()  # set (and replaced) whenever a stream opens

    def __contains__(self, peer: object) -> bool:
        return peer in self._links

    async def wait_linked(self, peers: Iterable[str]) -> None:
        """Until every one of ``peers`` has a stream (tests, tools: bound it yourself)."""
        want = set(peers)
        while not want <= set(self._links):
            await self._changed.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                links, self._links = list(self._links.values()), OrderedDict()
                for link in links:
                    await link.fs.close()
                nursery.cancel_scope.cancel()

    def warm(self, peers: Iterable[str], until: float) -> None:
        """Open a stream to each of ``peers`` that has none, in the background."""
        if self._nursery is None or self.deliver is None:
            return
        for peer in peers:
            if peer not in self._links and peer not in self._opening:
                self._opening.add(peer)
                self._nursery.start_soon(self._open, peer, until)

    async def send(self, signed: Signed[JobRequest], peers: Iterable[str]) -> set[str]:
        """``signed`` on the stream of each of ``peers`` that has one (``warm`` opens them).
        Returns who it went to."""
        peers = list(peers)
        data = signed.to_bytes()
        reached: set[str] = set()

        async def one(peer: str, link: _Link) -> None:
            with trio.move_on_after(WRITE_TIMEOUT):
                try:
                    await link.fs.send_bytes(data)
                except JobStreamClosed:
                    pass
                else:
                    reached.add(peer)
                    link.used = self.clock()
                    if peer in self._links:
                        self._links.move_to_end(peer)
            if peer not in reached:  # closed, or a write cut off mid-frame: start over
                await self._drop(peer, link)

        async with trio.open_nursery() as nursery:  # one slow server holds up no other
            for peer in peers:
                link = self._links.get(peer)
                if link is not None:
                    nursery.start_soon(one, peer, link)
        self.sent += len(reached)
        await self._expire()
        return reached

    async def _open(self, peer: str, until: float) -> None:
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                stream = await self.open_stream(peer, until, AUCTION_PROTOCOL)
        except Exception as exc:  # py-libp2p dial/negotiation errors have no common base
            log.debug("no auction stream to %s: %s", peer, exc)
            return
        finally:
            self._opening.discard(peer)
        fs = FrameStream(stream, max_frame=FRAME_MAX)
        if self._nursery is None or peer in self._links:
            await fs.close()
            return
        link = _Link(fs, self.clock())
        self._links[peer] = link
        while len(self._links) > MAX_LINKS:
            old_peer, old = next(iter(self._links.items()))
            await self._drop(old_peer, old)
        self._nursery.start_soon(self._read, peer, link)
        self._changed.set()
        self._changed = trio.Event()

    async def _read(self, peer: str, link: _Link) -> None:
        """Bids from ``peer``, to the guard and on to their jobs, until the stream ends."""
        assert self.deliver is not None
        with link.scope:
            try:
                for _ in range(MAX_FRAMES):
                    self.deliver(peer, await link.fs.receive_bytes())
            except (JobStreamClosed, ProtocolError) as exc:
                log.debug("auction stream to %s ended: %s", peer, exc)
        await self._drop(peer, link)

    async def _drop(self, peer: str, link: _Link) -> None:
        if self._links.get(peer) is link:
            del self._links[peer]
        link.scope.cancel()
        await link.fs.reset()

    async def _expire(self) -> None:
        now = self.clock()
        for peer, link in list(self._links.items()):
            if now - link.used > IDLE_S:
                await self._drop(peer, link)
