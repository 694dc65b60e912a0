"""Idle job streams, kept per executor so the next award skips opening a stream.

A single job's stream outlives its job: once the requester has sent the
Acceptance it gives the stream back here (``give``), and the executor waits on
it for another Award (up to ``AWARD_WAIT_S``). The next award to that executor
``take``s it: no new yamux stream, no multistream-select round trip. A stream
the executor has closed meanwhile shows only when it is used: ``JobRun`` then
sends the same Award and inputs on a fresh stream (nothing came back on the old
one, so the executor never saw them).

A stream on a relayed connection is not kept: the next award opens a fresh
one, which the dialer puts on the direct connection once a hole is punched
(DCUtR), so job data leaves the relay as soon as it can.

Bounded: one idle stream per executor, ``MAX_IDLE`` in all (the oldest goes
first), none older than ``IDLE_S`` (under the executor's wait, so a stream is
rarely taken just as the executor drops it).
"""

from __future__ import annotations

from collections import OrderedDict

from peer.job_stream import FrameStream
from peer.market.clock import Clock, system_clock
from peer.reach.dcutr import is_relayed

MAX_IDLE = 64
IDLE_S = 8.0  # the executor keeps an idle job stream AWARD_WAIT_S (10 s)


class StreamPool:
    def __init__(
        self, *, clock: Clock = system_clock, idle_s: float = IDLE_S, keep: bool = True
    ) -> None:
        self.clock = clock
        self.idle_s = idle_s
        self.keep = keep  # False: every stream given back is closed (nothing is reused)
        self._idle: OrderedDict[str, tuple[FrameStream, float]] = OrderedDict()
        self.taken = 0  # streams handed out again (counts for tests and the bench)
        self.stale = 0  # of those, found closed by the executor: a fresh stream was opened

    def __len__(self) -> int:
        return len(self._idle)

    async def take(self, executor: str) -> FrameStream | None:
        """The idle stream to ``executor``, if one is fresh enough (it is no longer idle)."""
        held = self._idle.pop(executor, None)
        if held is None:
            return None
        fs, since = held
        if fs.closed or self.clock() - since > self.idle_s:
            await fs.close()
            return None
        self.taken += 1
        return fs

    async def give(self, executor: str, fs: FrameStream) -> None:
        """Keep ``fs`` for the next award to ``executor`` (closing what it displaces)."""
        if fs.closed:
            return
        if not self.keep or is_relayed(getattr(fs.stream, "muxed_conn", None)):
            await fs.close()
            return
        old = self._idle.pop(executor, None)
        self._idle[executor] = (fs, self.clock())
        if old is not None:
            await old[0].close()
        while len(self._idle) > MAX_IDLE:
            _pid, (evicted, _t) = self._idle.popitem(last=False)
            await evicted.close()

    async def close(self) -> None:
        while self._idle:
            _pid, (fs, _t) = self._idle.popitem(last=False)
            await fs.close()
