"""The payer: signs, stores and gets certified the transfers that pay our receipts.

``pay(receipt)`` signs the next transfer (``protocols.payment``), stores it durably
before it leaves, asks the committee in parallel and returns the certificate. With
``auto_pay`` the background loop (``run``) pays every receipt this peer owes and
resends transfers left over from a crash unchanged (never re-signed: a second
transfer for one seq is an equivocation).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import nacl.signing
import trio

from peer import metrics
from peer.ledger_store import StoreBusy, StoreError, fact_bytes
from peer.settlement.base import (
    LedgerFacts,
    PaymentFailed,
    SettlementConfig,
    SettlementError,
    Stats,
)
from peer.settlement.ledger_rpc import LedgerClient
from protocols.certificate import Certificate
from protocols.errors import ProtocolError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import Transfer
from protocols.ledger_rpc import Certify, CertifyReply
from protocols.ledger_state import FactKind
from protocols.payment import Certified, Failed, PaymentSession, SendRequest
from protocols.proofs import ArbitratedReceipt, PayableReceipt
from protocols.signed import Signed
from protocols.witness import Refusal, TransferRequest

log = logging.getLogger(__name__)

# Failed attempts of one payment before it is reported stuck; it is then retried only
# every max_retry_interval, whatever news arrives (a signed seq cannot be skipped).
STUCK_AFTER = 5


@dataclass(frozen=True)
class StuckPayment:
    """A payment the witnesses keep refusing (what ``Payer.stuck`` reports)."""

    receipt_id: bytes
    attempts: int
    error: str
    since: float  # clock() when it was first reported


# Spreads facts to some peers and the gossip topic (FactSync.spread).
Spread = Callable[[list[tuple[FactKind, bytes]], Iterable[str]], None]


class Payer:
    """Pays the receipts this peer owes, one seq at a time."""

    def __init__(
        self,
        key: nacl.signing.SigningKey,
        facts: LedgerFacts,
        client: LedgerClient,
        spread: Spread,
        config: SettlementConfig,
        stats: Stats,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.peer_id = peer_id_from_public_key(bytes(key.verify_key))
        self.facts = facts
        self.store = facts.store
        self.client = client
        self.spread = spread
        self.config = config
        self.stats = stats
        self.clock = clock
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Set when this identity may owe (its proof-of-work is done): payments wait for it.
        self.identity_ready = trio.Event()
        self.identity_ready.set()
        facts.on_new.append(self.wake)
        # The payment that blocks the others after STUCK_AFTER refusals (None: none), and
        # an event set whenever that changes.
        self.stuck: StuckPayment | None = None
        self.stuck_changed = trio.Event()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def wake(self) -> None:
        """Look for work now (news: a receipt we owe, a certificate, a refill)."""
        self._wake.set()

    def unpaid(self) -> list[PayableReceipt]:
        """Receipts this peer owes that no certificate pays yet: arbitrated debts first
        (witnesses certify nothing else of ours while one is unpaid), then arrival order."""
        pending = {r.receipt_id for _, r in self.store.outgoing()}
        # The ledger's per-payer index: cost grows with what we owe, not with history.
        owed = [r for r in self.store.unpaid_for(self.peer_id) if r.receipt_id not in pending]
        return sorted(owed, key=lambda r: not isinstance(r, ArbitratedReceipt))

    async def _add_soon(self, receipt: PayableReceipt) -> None:
        """Store a receipt we pay: in memory now, on disk in the commit that stores our
        transfer for it (no fsync of its own); awaited when the write queue is full."""
        try:
            [result] = self.facts.add_facts_nowait([fact_bytes(receipt)])
        except StoreBusy:
            await self.facts.add(receipt)
            return
        if isinstance(result, ProtocolError):
            raise result

    def _paying_certificate(self, receipt: PayableReceipt) -> Certificate | None:
        if not self.facts.ledger.is_paid(receipt):
            return None  # the common case: no walk over our history
        receipt_id = receipt.receipt_id
        for seq in range(self.facts.ledger.next_seq(self.peer_id) - 1, 0, -1):
            cert = self.store.certificate(self.peer_id, seq)
            if cert is not None and cert.transfer.message.receipt_id == receipt_id:
                return cert
        return None

    async def pay(self, receipt: PayableReceipt) -> Certificate:
        """Pay ``receipt`` (we must be its requester): first any transfer left pending, then a
        new one with our next seq. Returns the certificate; raises ``PaymentFailed``."""
        if receipt.requester != self.peer_id:
            raise SettlementError(f"{self.peer_id} is not the requester of this receipt")
        await self._add_soon(receipt)
        await self.identity_ready.wait()
        async with self._lock:
            for transfer, pending in self.store.outgoing():
                await self._finish(transfer, pending)
            done = self._paying_certificate(receipt)
            if done is not None:
                return done
            if self.facts.ledger.is_paid(receipt):
                raise PaymentFailed("another receipt for the same commitment is already paid")
            session, persist = PaymentSession.start(
                self.key,
                receipt,
                self.facts.ledger,
                self.now_ms(),
                history_for=self.store.history_for,
            )
            await self.store.put_outgoing(persist.transfer, receipt)  # durable before it leaves
            return await self._run_session(session)

    async def _finish(self, transfer: Signed[Transfer], receipt: PayableReceipt) -> Certificate:
        """Resend a stored transfer unchanged (never sign another one for its seq)."""
        t = transfer.message
        cert = self.store.certificate(t.payer, t.seq)
        if cert is not None:
            if cert.digest != transfer.digest:  # cannot happen for an honest key
                log.error("our seq %d was certified for another transfer", t.seq)
            await self.store.drop_outgoing(t.seq)
            return cert
        session, _ = PaymentSession.resume(
            transfer, receipt, self.facts.ledger, history_for=self.store.history_for
        )
        return await self._run_session(session)

    def _first_requests(self, session: PaymentSession) -> list[SendRequest]:
        sends = session.persisted()
        t = session.transfer.message
        # Carry the previous certificate: a witness that missed it then needs no retry.
        prev = self.store.history_for(t.payer, t.seq - 1)[:1] if t.seq > 1 else []
        if not prev:
            return sends
        data = TransferRequest(session.transfer, session.receipt, tuple(prev)).to_bytes()
        return [SendRequest(s.witness, data) for s in sends]

    async def _run_session(self, session: PaymentSession) -> Certificate:
        sends = self._first_requests(session)
        send_ch, recv_ch = trio.open_memory_channel[tuple[str, bytes | Exception]](math.inf)
        errors: dict[str, str] = {}
        cert: Certificate | None = None
        failed: Failed | None = None

        async def ask(req: SendRequest) -> None:
            try:
                reply = await self.client.call(req.witness, Certify(req.data), CertifyReply)
                answer: bytes | Exception = reply.r
            except SettlementError as exc:
                answer = exc
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send_ch.send_nowait((req.witness, answer))

        async with contextlib.AsyncExitStack() as stack:
            # Requests run in the payer's nursery: the ones still in flight when a quorum
            # is reached finish on their own instead of being cancelled mid-stream.
            nursery = self._nursery
            if nursery is None:
                nursery = await stack.enter_async_context(trio.open_nursery())
            with recv_ch:
                outstanding = 0
                for req in sends:
                    nursery.start_soon(ask, req)
                    outstanding += 1
                while outstanding and cert is None and failed is None:
                    witness, answer = await recv_ch.receive()
                    outstanding -= 1
                    if isinstance(answer, Exception):
                        errors[witness] = str(answer)
                        continue
                    try:
                        actions = session.on_reply(witness, answer)
                    except ProtocolError as exc:
                        errors[witness] = f"bad answer: {exc}"
                        continue
                    for action in actions:
                        if isinstance(action, SendRequest):
                            nursery.start_soon(ask, action)
                            outstanding += 1
                        elif isinstance(action, Certified):
                            cert = action.certificate
                        elif isinstance(action, Failed):
                            failed = action
        if session.equivocation is not None:
            await self.facts.add(session.equivocation)
            self.spread([fact_bytes(session.equivocation)], ())
        if cert is not None:
            # In memory now, durable with the next commit (our next transfer's, at the
            # latest): a crash before it resends this transfer and gets it certified again.
            try:
                self.store.add_nowait(cert, drop_outgoing=cert.seq)
            except StoreBusy:
                await self.store.add(cert, drop_outgoing=cert.seq)  # one transaction
            self.facts.notify()
            self.stats.certified += 1
            metrics.PAYMENTS_CERTIFIED.inc()
            self.spread(
                [fact_bytes(cert)], [*session.committee.members, cert.transfer.message.payee]
            )
            return cert
        t = session.transfer.message
        refusals = failed.refusals if failed is not None else dict(session.refusals)
        for witness, refusal in refusals.items():
            if refusal.reason is Refusal.OVER_LIMIT:
                self.client.forget_introduction(witness)  # it may have lost our identity proof
        why = "; ".join(
            [f"{w[-8:]}: {r.reason} ({r.message})" for w, r in refusals.items()]
            + [f"{w[-8:]}: {e}" for w, e in errors.items()]
        )
        raise PaymentFailed(
            f"transfer seq {t.seq} of {t.amount} to {t.payee} not certified: {why}", refusals
        )

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery of in-flight requests; with ``auto_pay``, pay what we owe."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                if self.config.auto_pay:
                    await self._pay_forever()
                else:
                    await trio.sleep_forever()
            finally:
                self._nursery = None

    def _set_stuck(self, stuck: StuckPayment | None) -> None:
        self.stuck = stuck
        self.stuck_changed.set()
        self.stuck_changed = trio.Event()

    async def _pay_forever(self) -> None:
        """Resend pending transfers and pay what we owe, with backoff. A payment refused
        ``STUCK_AFTER`` times is reported (``stuck``, an error log) and then retried only
        every ``max_retry_interval``: our later payments wait behind it, since a transfer
        we signed must be certified before the next seq (skipping it would mean signing
        another transfer for its seq, an equivocation)."""
        delay = self.config.retry_interval
        failing: bytes | None = None
        failures = 0
        await self.identity_ready.wait()
        while True:
            work = [r for _, r in self.store.outgoing()] + self.unpaid()
            if not work:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            rid = work[0].receipt_id
            try:
                await self.pay(work[0])
                delay = self.config.retry_interval
                failing, failures = None, 0
                if self.stuck is not None:
                    log.warning(
                        "the stuck payment %s is certified", self.stuck.receipt_id.hex()[:16]
                    )
                    self._set_stuck(None)
            except (PaymentFailed, SettlementError, StoreError) as exc:
                if rid != failing:
                    failing, failures = rid, 0
                failures += 1
                if failures >= STUCK_AFTER:
                    if self.stuck is None or self.stuck.receipt_id != rid:
                        log.error(
                            "payment of receipt %s refused %d times, retrying every %.0f s; "
                            "later payments wait for it: %s",
                            rid.hex()[:16],
                            failures,
                            self.config.max_retry_interval,
                            exc,
                        )
                    since = self.stuck.since if self.stuck is not None else self.clock()
                    self._set_stuck(StuckPayment(rid, failures, str(exc)[:400], since))
                    # Bounded: news (any new fact wakes the payer) no longer retries early.
                    await trio.sleep(self.config.max_retry_interval * random.uniform(0.8, 1.2))
                    self._wake = trio.Event()
                    continue
                log.warning("payment failed, retrying in %.1f s: %s", delay, exc)
                with trio.move_on_after(delay * random.uniform(0.8, 1.2)):
                    await self._wake.wait()  # news (a certificate, a refill) retries early
                self._wake = trio.Event()
                delay = min(delay * 2, self.config.max_retry_interval)
