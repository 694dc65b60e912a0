"""The market's clock: POSIX seconds, injected so tests can run on trio's MockClock.

Messages carry absolute POSIX times (deadlines, bid expiry), so the market needs a
wall clock; trio's sleeps run on its own (monotonic) clock. ``system_clock`` is the
real one. ``trio_clock(epoch)`` reads trio's clock shifted to ``epoch``: under
``trio.testing.MockClock`` every timer and every deadline in the market then move
together, with no real time passing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

Clock = Callable[[], float]  # -> POSIX seconds now

system_clock: Clock = time.time


def trio_clock(epoch: float = 1_800_000_000.0) -> Clock:
    """POSIX time as ``epoch`` + trio's clock (use inside ``trio.run``, e.g. with MockClock)."""

    def now() -> float:
        return epoch + trio.current_time()

    return now


async def sleep_until(clock: Clock, at: float, *, max_steps: int = 1000) -> None:
    """Sleep until ``clock() >= at``, bounded (wall clocks can step; never fires early)."""
    for _ in range(max_steps):
        left = at - clock()
        if left <= 0:
            return
        await trio.sleep(left + 0.0005)
