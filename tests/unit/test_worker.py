"""peer.worker.Worker: thread hop for ordinary models, the loop thread for sub-ms ones."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import trio
import trio.testing

from peer.worker import INLINE_MAX_S, Worker


class Backend:
    registry: Any = None
    limits: Any = None

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.timeouts: list[float | None] = []

    def run(self, ref: str, inputs: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        self.threads.append(threading.get_ident())
        self.timeouts.append(timeout)
        return {"z": np.asarray(inputs["x"]) * 2}


async def test_sub_millisecond_models_run_on_the_loop_thread_others_in_a_worker_thread() -> None:
    backend = Backend()
    worker = Worker(backend, max_concurrent=1, job_timeout=30.0)
    worker.inline.add("fast")
    x = {"x": np.ones(2, np.float32)}
    deadline = 1e12  # far in the future (POSIX seconds)
    out, _ = await worker.run("fast", x, deadline=deadline)
    await worker.run("slow", x, deadline=deadline)
    loop = threading.get_ident()
    assert backend.threads[0] == loop and backend.threads[1] != loop
    assert out["z"].tolist() == [2.0, 2.0] and worker.inline_runs == 1
    # The inline run is bounded by the runtime's watchdog, and never for long.
    assert backend.timeouts[0] == INLINE_MAX_S and backend.timeouts[1] is not None
    assert backend.timeouts[1] > INLINE_MAX_S


async def test_an_inline_run_waits_for_a_free_slot_without_blocking_the_loop() -> None:
    backend = Backend()
    worker = Worker(backend, max_concurrent=1, job_timeout=30.0)
    worker.inline.add("fast")
    x = {"x": np.ones(2, np.float32)}
    ran = trio.Event()
    async with trio.open_nursery() as nursery:
        await worker.limiter.acquire()  # someone holds the only slot

        async def job() -> None:
            await worker.run("fast", x, deadline=1e12)
            ran.set()

        nursery.start_soon(job)
        await trio.testing.wait_all_tasks_blocked()
        assert not ran.is_set() and backend.threads == []  # waiting in trio, not in the runtime
        worker.limiter.release()
        with trio.fail_after(5):
            await ran.wait()
