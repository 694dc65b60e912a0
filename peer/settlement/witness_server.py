"""The witness side of payments: vote for other peers' transfers (``protocols.witness``).

A vote is only written back after the lock it implies is committed durably by
the store (PersistLock -> fsync -> lock_persisted), so a witness that crashes
and restarts can never vote for two transfers with one (account, seq).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import nacl.signing
import trio

from peer.ledger_store import fact_bytes
from peer.settlement.base import LedgerFacts, Stats
from peer.settlement.payer import Spread
from protocols.errors import ProtocolError, RemoteProtocolError
from protocols.ledger_rpc import Certify, CertifyMany, CertifyManyReply, CertifyReply
from protocols.proofs import PayableReceipt
from protocols.witness import (
    MAX_HISTORY,
    LockRecord,
    PersistLock,
    Refuse,
    ReplyVote,
    ReportEquivocation,
    TransferRequest,
    Witness,
    WitnessAction,
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
        [answer] = await self._certify([request.req])
        if isinstance(answer, str):
            raise RemoteProtocolError(answer)
        return CertifyReply(answer)

    async def certify_many(self, request: CertifyMany) -> CertifyManyReply:
        """Several TransferRequests (a payer's pipelined seqs), decided in order; every new
        lock among them is committed in one fsync'd transaction before any of their votes
        exists. A member that cannot be read is answered with its error alone: the others
        are decided as if it were not there (a later seq of its payer then lacks its lock
        here and is refused as missing history)."""
        return CertifyManyReply(tuple(await self._certify(request.reqs)))

    async def _certify(self, requests: Sequence[bytes]) -> list[bytes | str]:
        answers: list[bytes | str] = []
        pending: list[tuple[int, LockRecord, PayableReceipt]] = []
        for data in requests:
            try:
                req = TransferRequest.from_bytes(data)
                action = self._decide(req)
            except ProtocolError as exc:
                answers.append(str(exc))
                continue
            if isinstance(action, PersistLock):
                pending.append((len(answers), action.record, req.receipt))
                answers.append(b"")  # the vote, once the lock is durable
            else:
                answers.append(await self._answer(action))
        if pending:
            records = [record for _, record, _ in pending]
            try:
                # The locks (and the receipts they pay) are fsync'd before any vote exists;
                # shielded so a cancel cannot leave memory and disk disagreeing.
                with trio.CancelScope(shield=True):
                    await self.store.put_locks(records, facts=[r for _, _, r in pending])
            except Exception:
                for record in records:
                    self.witness.lock_failed(record)
                raise
            for i, record, _ in pending:
                answers[i] = await self._answer(self.witness.lock_persisted(record))
        return answers

    def _decide(self, req: TransferRequest) -> WitnessAction:
        ledger = self.facts.ledger
        history = [c for c in req.history[:MAX_HISTORY] if not ledger.has(c.digest)]
        if history:
            # Verified and in memory now, on disk with the next commit (with our lock):
            # nobody was promised these, so they need no fsync of their own.
            self.facts.add_facts_nowait([fact_bytes(c) for c in history])
        return self.witness.handle_transfer(req.transfer, req.receipt, ledger, self.now_ms())

    async def _answer(self, action: ReplyVote | Refuse | ReportEquivocation) -> bytes:
        if isinstance(action, ReportEquivocation) and await self.facts.add(action.proof):
            self.spread([fact_bytes(action.proof)], ())
        if isinstance(action, ReplyVote):
            self.stats.votes += 1
        else:
            self.stats.refusals += 1
        return encode_reply(action)
