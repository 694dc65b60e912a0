"""What the settlement roles share: errors, knobs, counters and the verified facts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from peer.ledger_store import LedgerStore, fact_bytes
from protocols.errors import ProtocolError
from protocols.ledger_state import FactKind, LedgerState
from protocols.witness import Refuse


class SettlementError(Exception):
    """A settlement operation could not complete (peer unreachable, bad answer, ...)."""


class PaymentFailed(SettlementError):
    """No quorum certified the transfer. It stays stored and is resent later unchanged
    (signing another transfer for the same seq would be an equivocation)."""

    def __init__(self, message: str, refusals: dict[str, Refuse] | None = None) -> None:
        super().__init__(message)
        self.refusals = refusals or {}


@dataclass(frozen=True)
class SettlementConfig:
    """Knobs of the service (the committee rule and credit policy live in the store)."""

    sync_interval: float = 10.0  # seconds between anti-entropy rounds (jittered); 0 = never
    request_timeout: float = 10.0  # one request/reply with one peer
    stream_idle_timeout: float = 60.0  # a server stream with no request for this long is closed
    auto_pay: bool = True  # pay receipts we owe as soon as they are ingested
    retry_interval: float = 2.0  # first backoff for a payment that found no quorum
    max_retry_interval: float = 60.0
    gossip: bool = True  # publish certificates and proofs on GOSSIP_TOPIC
    # Epoch checkpoints (peer.settlement.epochs): where they are stored (None: no epoch
    # service), whether this peer stands for the pool, and what a newcomer must have earned.
    epochs_dir: Path | None = None
    stand: bool = False
    eligible_earned: int = 0


@dataclass(frozen=True)
class SyncResult:
    peer: str
    rounds: int
    fetched: int  # new facts we got
    pushed: int  # facts we sent
    refused: int  # facts the peer sent that did not verify


@dataclass
class Stats:
    """Counters for tests, benchmarks and logs (one object shared by the roles)."""

    certified: int = 0  # our payments certified
    votes: int = 0  # votes we gave as a witness
    refusals: int = 0  # refusals (and equivocation reports) we gave
    syncs: int = 0  # anti-entropy sessions we initiated and finished
    pushed_in: int = 0  # new facts peers pushed to us
    gossiped_in: int = 0  # new facts from the gossip topic
    handler_errors: int = 0  # streams closed for a protocol error
    gossip_rejected: int = 0  # gossip messages our topic validator stopped


@dataclass
class LedgerFacts:
    """This peer's verified ledger (store + in-memory state) and who waits for news.

    Every role adds facts through here, so waiters (``wait_until``) and listeners
    (the payer's wake-up) hear of every new fact, whoever brought it."""

    store: LedgerStore
    on_new: list[Callable[[], None]] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def ledger(self) -> LedgerState:
        return self.store.ledger

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever a new fact lands."""
        while not predicate():
            await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _news(self) -> None:
        self.notify()
        for listener in self.on_new:
            listener()

    async def add_facts(
        self, items: Iterable[tuple[FactKind, bytes]], *, relevant_to: str | None = None
    ) -> list[bool | ProtocolError]:
        """Verify and store facts (from anywhere); wakes waiters and listeners on news.
        ``relevant_to``: from another peer, keep only what this account needs (see the store)."""
        results = await self.store.add_facts(list(items), relevant_to=relevant_to)
        if any(r is True for r in results):
            self._news()
        return results

    def add_facts_nowait(
        self, items: Iterable[tuple[FactKind, bytes]]
    ) -> list[bool | ProtocolError]:
        """Verified and in memory now, on disk with the next commit (see the store)."""
        results = self.store.add_facts_nowait(list(items))
        if any(r is True for r in results):
            self.notify()
        return results

    async def add(self, obj: Any) -> bool:
        """Store one fact object; raises its ``ProtocolError`` when it does not verify."""
        [result] = await self.add_facts([fact_bytes(obj)])
        if isinstance(result, ProtocolError):
            raise result
        return result
