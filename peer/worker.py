"""Runs awarded jobs through ``edge_models`` without blocking the trio loop.

``ModelRuntime.run`` is synchronous and thread-safe; ``Worker.run`` calls it in
``trio.to_thread.run_sync`` under a ``trio.CapacityLimiter`` (at most
``max_concurrent`` model runs at once) with a per-job budget: the runtime's own
watchdog stops a run past ``timeout``, and a trio cancel (deadline, stream gone)
abandons the wait at once. An abandoned thread keeps its limiter token until
ONNX Runtime returns, so a stuck run can never oversubscribe the machine.

Models in ``inline`` (the market puts there those whose measured p50 is under
``INLINE_P50_MS``) run on the loop thread itself, with no thread hop: a run
that overstays is still stopped by the runtime's watchdog (its own thread), and
the loop is never blocked waiting for a slot, since the run holds a limiter
token (one of the runtime's slots) before it starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy.typing as npt
import trio

from edge_models.errors import ExecutionTimeout, ModelNotFound
from edge_models.runtime import validate_inputs
from edge_models.spec import ModelEntry

Arrays = dict[str, npt.NDArray[Any]]

INLINE_P50_MS = 1.0  # models faster than this run on the loop thread (no thread hop)
INLINE_MAX_S = 1.0  # the longest an inline run may hold the loop


class Backend(Protocol):
    """What the worker needs from a ``ModelRuntime`` (tests may wrap one)."""

    registry: Any
    limits: Any

    def run(
        self, ref: str, inputs: Mapping[str, Any], *, timeout: float | None = None
    ) -> Arrays: ...


class Worker:
    def __init__(
        self,
        runtime: Backend,
        *,
        max_concurrent: int = 1,
        job_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.runtime = runtime
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self.job_timeout = job_timeout
        self.clock = clock  # POSIX seconds (deadlines are absolute), injected for tests
        self.running = 0
        self.inline: set[str] = set()  # cids run on the loop thread (sub-millisecond models)
        self.inline_runs = 0

    def entry(self, cid: str) -> ModelEntry:
        """The registry entry of a served model (``ModelNotFound`` if it is not ours)."""
        entry: ModelEntry = self.runtime.registry.get(cid)
        if entry.cid != cid:
            raise ModelNotFound(f"model {cid} is not in this peer's registry")
        return entry

    def check(self, cid: str, inputs: Mapping[str, Any]) -> None:
        """Inputs against the model's declared inputs and limits (raises ``InvalidInput``)."""
        validate_inputs(self.entry(cid), inputs, self.runtime.limits)

    async def run(self, cid: str, inputs: Arrays, *, deadline: float) -> tuple[Arrays, int]:
        """Outputs and compute ms; ``deadline`` is absolute POSIX time (never run past it)."""
        budget = min(self.job_timeout, deadline - self.clock())
        if budget <= 0:
            raise ExecutionTimeout(f"model {cid[:12]}: no time left before the job's deadline")

        def call() -> Arrays:
            # Computed in the thread: time spent queued for a slot counts against the job.
            left = min(self.job_timeout, deadline - self.clock())
            if left <= 0:
                raise ExecutionTimeout(f"model {cid[:12]}: the deadline passed in the queue")
            return self.runtime.run(cid, inputs, timeout=left)

        if cid in self.inline:
            return await self._run_inline(cid, inputs, budget)
        self.running += 1
        try:
            t0 = time.perf_counter()
            with trio.fail_after(budget + 0.5):  # the runtime's watchdog fires first
                outputs = await trio.to_thread.run_sync(
                    call,
                    limiter=self.limiter,
                    abandon_on_cancel=True,  # type: ignore[call-arg]
                )
            return outputs, int((time.perf_counter() - t0) * 1000)
        finally:
            self.running -= 1

    async def _run_inline(self, cid: str, inputs: Arrays, budget: float) -> tuple[Arrays, int]:
        async with self.limiter:  # a free slot: the runtime never makes the loop wait
            self.running += 1
            try:
                t0 = time.perf_counter()
                # The runtime's watchdog stops the run past the timeout; capped at
                # INLINE_MAX_S so the loop can never be held long (a slot taken by another
                # user of the runtime is waited for at most that long, too).
                outputs = self.runtime.run(cid, inputs, timeout=min(budget, INLINE_MAX_S))
                self.inline_runs += 1
                return outputs, int((time.perf_counter() - t0) * 1000)
            finally:
                self.running -= 1
