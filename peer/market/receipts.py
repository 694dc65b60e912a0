"""Receipts this peer holds, and the hook settlement subscribes to.

Both sides of a job end up with the same ``Receipt`` (the requester builds it
when it signs the Acceptance; the executor when that Acceptance arrives).
``ReceiptBook.add`` keeps it in memory (bounded) and calls every coroutine in
``on_receipt`` with ``(receipt, role)``; hooks run in the market's nursery, so
a slow ledger write never holds up a job, and a failing hook is logged, never
fatal.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

import trio

from peer import metrics
from protocols.receipt import Receipt

log = logging.getLogger(__name__)

Role = Literal["requester", "executor"]
ReceiptHook = Callable[[Receipt, Role], Awaitable[None]]


class ReceiptBook:
    def __init__(self, *, keep: int = 100_000) -> None:
        self.receipts: deque[Receipt] = deque(maxlen=keep)
        self.on_receipt: list[ReceiptHook] = []
        self.count = 0
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    def attach(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery

    def add(self, receipt: Receipt, role: Role) -> None:
        self.receipts.append(receipt)
        self.count += 1
        metrics.JOBS_RUN.labels(role).inc(receipt.count)
        self._changed.set()
        self._changed = trio.Event()
        if self._nursery is None:
            return
        for hook in list(self.on_receipt):
            self._nursery.start_soon(self._call, hook, receipt, role)

    async def wait_for(self, count: int) -> None:
        """Wait until at least ``count`` receipts were added (for tests and tools)."""
        while self.count < count:
            await self._changed.wait()

    @staticmethod
    async def _call(hook: ReceiptHook, receipt: Receipt, role: Role) -> None:
        try:
            await hook(receipt, role)
        except Exception:
            log.exception("receipt hook %r failed for job %s", hook, receipt.job_id.hex())
