"""The witness side of payments: vote for other peers' transfers (``protocols.witness``).

A vote is only written back after the lock it implies is committed durably by
the store (PersistLock -> fsync -> lock_persisted), so a witness that crashes
and restarts can never vote for two transfers with one (account, seq).
"""

from __future__ import annotations

from collections.abc import Callable

import nacl.signing
import trio

from peer.ledger_store import fact_bytes
from peer.settlement.base import LedgerFacts, Stats
from peer.settlement.payer import Spread
from protocols.ledger_rpc import Certify, CertifyReply
from protocols.witness import (
    MAX_HISTORY,
    PersistLock,
    ReplyVote,
    ReportEquivocation,
    TransferRequest,
    Witness,
    encode_reply,
)


class WitnessServer:
    """Answers ``certify`` requests."""

    def __init__(
        self,
        key: nacl.signing.SigningKey,
        facts: LedgerFacts,
        spread: Spread,
        stats: Stats,
        *,
        now_ms: Callable[[], int],
    ) -> None:
        self.facts = facts
        self.store = facts.store
        self.spread = spread
        self.stats = stats
        self.now_ms = now_ms
        self.witness = Witness(key, durable_locks=self.store.locks())

    async def certify(self, request: Certify) -> CertifyReply:
        """The witness side of one TransferRequest."""
        req = TransferRequest.from_bytes(request.req)
        ledger = self.facts.ledger
        history = [c for c in req.history[:MAX_HISTORY] if not ledger.has(c.digest)]
        if history:
            # Verified and in memory now, on disk with the next commit (with our lock):
            # nobody was promised these, so they need no fsync of their own.
            self.facts.add_facts_nowait([fact_bytes(c) for c in history])
        action = self.witness.handle_transfer(req.transfer, req.receipt, ledger, self.now_ms())
        if isinstance(action, PersistLock):
            try:
                # The lock (and the receipt it pays) is fsync'd before the vote exists;
                # shielded so a cancel cannot leave memory and disk disagreeing.
                with trio.CancelScope(shield=True):
                    await self.store.put_lock(action.record, facts=[req.receipt])
            except Exception:
                self.witness.lock_failed(action.record)
                raise
            action = self.witness.lock_persisted(action.record)
        if isinstance(action, ReportEquivocation) and await self.facts.add(action.proof):
            self.spread([fact_bytes(action.proof)], ())
        if isinstance(action, ReplyVote):
            self.stats.votes += 1
        else:
            self.stats.refusals += 1
        assert not isinstance(action, PersistLock)
        return CertifyReply(encode_reply(action))
