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
from protocols.ledger_rpc import MAX_BATCH, Certify, CertifyMany, CertifyManyReply, CertifyReply
from protocols.ledger_state import FactKind
from protocols.payment import Certified, Failed, PaymentSession, SendRequest
from protocols.proofs import ArbitratedReceipt, PayableReceipt
from protocols.witness import MAX_PIPELINE, Refusal, TransferRequest

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


# Receipts paid together: one request per witness and one fsync on each side for all of
# them (their seqs are pipelined: protocols.witness, rule 3). Half of MAX_PIPELINE, so a
# witness that has not yet heard the previous batch's certificates still votes this one.
BATCH = MAX_PIPELINE // 2
assert BATCH <= MAX_BATCH


@dataclass(eq=False)  # compared by identity (queues of thousands)
class _Waiter:
    """One ``pay()`` call waiting for its batch."""

    receipt: PayableReceipt
    outcome: Certificate | PaymentFailed | None = None


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
        self._queue: list[_Waiter] = []  # pay() calls waiting for a batch
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
        for seq in range(self._free_seq() - 1, 0, -1):
            cert = self.store.certificate(self.peer_id, seq)
            if cert is not None and cert.transfer.message.receipt_id == receipt_id:
                return cert
        return None

    async def pay(self, receipt: PayableReceipt) -> Certificate:
        """Pay ``receipt`` (we must be its requester): first any transfer left pending, then a
        new one. Returns the certificate; raises ``PaymentFailed``.

        Payments asked for while a batch is in flight are certified together in the next
        one (up to ``BATCH`` pipelined seqs, one fsync on each side and one request per
        witness for the whole batch)."""
        [outcome] = await self.pay_all([receipt])
        if isinstance(outcome, Certificate):
            return outcome
        raise outcome

    async def pay_all(self, receipts: list[PayableReceipt]) -> list[Certificate | PaymentFailed]:
        """Pay several receipts, in this order (their seqs follow it): each one's certificate,
        or why it was not certified (``PaymentFailed``)."""
        for receipt in receipts:
            if receipt.requester != self.peer_id:
                raise SettlementError(f"{self.peer_id} is not the requester of this receipt")
        for receipt in receipts:
            await self._add_soon(receipt)
        await self.identity_ready.wait()
        waiters = [_Waiter(r) for r in receipts]
        self._queue.extend(waiters)
        try:
            async with self._lock:  # FIFO: the holder pays the queue's head, its own included
                while any(w.outcome is None for w in waiters):
                    batch = self._queue[:BATCH]
                    del self._queue[:BATCH]
                    await self._pay_batch(batch)
        finally:
            mine = {id(w) for w in waiters}
            self._queue = [w for w in self._queue if id(w) not in mine]
        return [
            w.outcome or PaymentFailed("the payment was interrupted; it is retried")
            for w in waiters
        ]

    async def _pay_batch(self, batch: list[_Waiter]) -> None:
        """Resend what is pending; if all of it is certified, sign, store (one fsync) and
        certify the batch's receipts with consecutive seqs. Sets the waiters' outcomes; those
        left without one (more pending transfers than a batch) go back to the queue's head."""
        try:
            leftovers = self.store.outgoing()[:BATCH]
            if leftovers:
                done = await self._certify(
                    [
                        PaymentSession(t, r, self.facts.ledger, history_for=self.store.history_for)
                        for t, r in leftovers
                        if self.facts.ledger.cert_digest(t.message.payer, t.message.seq) is None
                    ]
                )
                for t, _ in leftovers:  # certified meanwhile (e.g. learned by sync)
                    cert = self.store.certificate(t.message.payer, t.message.seq)
                    if cert is not None:
                        if cert.digest != t.digest:  # cannot happen for an honest key
                            log.error("our seq %d was certified for another transfer", cert.seq)
                        await self.store.drop_outgoing(t.message.seq)
                failed = [x for x in done if not isinstance(x, Certificate)]
                if failed or len(leftovers) == BATCH:
                    # Nothing new is signed behind a pending transfer that failed (it cannot be
                    # skipped, and the seqs behind it would wait for it anyway).
                    for w in batch:
                        w.outcome = self._settled(w.receipt) or (failed[0] if failed else None)
                    return
            fresh: dict[bytes, PayableReceipt] = {}
            for w in batch:
                settled = self._settled(w.receipt)
                if settled is not None:
                    w.outcome = settled
                else:
                    fresh.setdefault(w.receipt.receipt_id, w.receipt)
            if not fresh:
                return
            now = self.now_ms()
            seq = self._free_seq()
            sessions = []
            for receipt in fresh.values():
                session, _ = PaymentSession.start(
                    self.key,
                    receipt,
                    self.facts.ledger,
                    now,
                    history_for=self.store.history_for,
                    seq=seq,
                )
                sessions.append(session)
                seq += 1
            # Durable before any of them leaves.
            await self.store.put_outgoing_many([(s.transfer, s.receipt) for s in sessions])
            outcomes = await self._certify(sessions)
            by_receipt = {s.receipt.receipt_id: o for s, o in zip(sessions, outcomes, strict=True)}
            for w in batch:
                if w.outcome is None:
                    w.outcome = by_receipt.get(w.receipt.receipt_id)
        except BaseException:
            for w in batch:
                if w.outcome is None:
                    w.outcome = PaymentFailed("the payment was interrupted; it is retried")
            raise
        self._queue[:0] = [w for w in batch if w.outcome is None]

    def _settled(self, receipt: PayableReceipt) -> Certificate | PaymentFailed | None:
        """A receipt's outcome without a new transfer: its certificate, or a refusal when
        another receipt for its commitment is paid; None if it still needs paying."""
        done = self._paying_certificate(receipt)
        if done is not None:
            return done
        if self.facts.ledger.is_paid(receipt):
            return PaymentFailed("another receipt for the same commitment is already paid")
        return None

    def _free_seq(self) -> int:
        """The next seq never signed: above the certified ones and every pending transfer.
        Certified seqs above the first gap are at most a pipeline deep (witnesses lock at
        most MAX_PIPELINE ahead), so the walk is bounded."""
        me = self.peer_id
        pending = [t.message.seq for t, _ in self.store.outgoing()]
        seq = max([self.facts.ledger.next_seq(me), *(s + 1 for s in pending)])
        while self.facts.ledger.cert_digest(me, seq) is not None:
            seq += 1
        return seq

    def _first_requests(self, sessions: list[PaymentSession]) -> dict[str, list[tuple[int, bytes]]]:
        """Per witness, (session index, request) in seq order. The first carries the previous
        certificate: a witness that missed it then needs no retry."""
        out: dict[str, list[tuple[int, bytes]]] = {}
        for i, session in enumerate(sessions):
            t = session.transfer.message
            prev = self.store.history_for(t.payer, t.seq - 1)[:1] if i == 0 and t.seq > 1 else []
            for send in session.persisted():
                data = send.data
                if prev:
                    data = TransferRequest(
                        session.transfer, session.receipt, tuple(prev)
                    ).to_bytes()
                out.setdefault(send.witness, []).append((i, data))
        return out

    async def _ask_many(self, witness: str, reqs: list[tuple[int, bytes]], send: Any) -> None:
        """One ``certify_many`` (or ``certify`` for one request) to ``witness``; each answer
        goes to ``send`` as (witness, session index, reply bytes or error)."""
        answers: list[bytes | Exception]
        try:
            if len(reqs) == 1:
                reply = await self.client.call(witness, Certify(reqs[0][1]), CertifyReply)
                answers = [reply.r]
            else:
                many = await self.client.call(
                    witness, CertifyMany(tuple(d for _, d in reqs)), CertifyManyReply
                )
                if len(many.rs) != len(reqs):
                    raise SettlementError(f"{witness} answered {len(many.rs)} of {len(reqs)}")
                answers = [SettlementError(r) if isinstance(r, str) else r for r in many.rs]
        except SettlementError as exc:
            if "unknown op" in str(exc) and len(reqs) > 1:  # a witness from before batches
                for one in reqs:
                    await self._ask_many(witness, [one], send)
                return
            answers = [exc] * len(reqs)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for (i, _), answer in zip(reqs, answers, strict=True):
                send.send_nowait((witness, i, answer))

    async def _certify(self, sessions: list[PaymentSession]) -> list[Certificate | PaymentFailed]:
        """Get stored transfers certified: one request per witness for all of them, retries
        (with the history a witness lacks) one by one. Stores and spreads the certificates."""
        if not sessions:
            return []
        send_ch, recv_ch = trio.open_memory_channel[tuple[str, int, bytes | Exception]](math.inf)
        errors: list[dict[str, str]] = [{} for _ in sessions]
        outcome: list[Certificate | Failed | None] = [None] * len(sessions)
        open_ = [0] * len(sessions)  # requests in flight per session

        async with contextlib.AsyncExitStack() as stack:
            # Requests run in the payer's nursery: the ones still in flight when a quorum
            # is reached finish on their own instead of being cancelled mid-stream.
            nursery = self._nursery
            if nursery is None:
                nursery = await stack.enter_async_context(trio.open_nursery())
            with recv_ch:
                for witness, reqs in self._first_requests(sessions).items():
                    for i, _ in reqs:
                        open_[i] += 1
                    nursery.start_soon(self._ask_many, witness, reqs, send_ch)
                while any(n and o is None for n, o in zip(open_, outcome, strict=True)):
                    witness, i, answer = await recv_ch.receive()
                    open_[i] -= 1
                    if outcome[i] is not None:
                        continue
                    if isinstance(answer, Exception):
                        errors[i][witness] = str(answer)
                        continue
                    try:
                        actions = sessions[i].on_reply(witness, answer)
                    except ProtocolError as exc:
                        errors[i][witness] = f"bad answer: {exc}"
                        continue
                    for action in actions:
                        if isinstance(action, SendRequest):
                            open_[i] += 1
                            nursery.start_soon(
                                self._ask_many, action.witness, [(i, action.data)], send_ch
                            )
                        elif isinstance(action, Certified):
                            outcome[i] = action.certificate
                        elif isinstance(action, Failed):
                            outcome[i] = action
        results: list[Certificate | PaymentFailed] = []
        certs: list[Certificate] = []
        for session, out, errs in zip(sessions, outcome, errors, strict=True):
            for witness, refusal in session.refusals.items():
                if refusal.reason is Refusal.OVER_LIMIT:
                    # It may have lost our identity proof (or never got it): introduce us
                    # again next time, also when the others certified this one.
                    self.client.forget_introduction(witness)
            if session.equivocation is not None:
                await self.facts.add(session.equivocation)
                self.spread([fact_bytes(session.equivocation)], ())
            if isinstance(out, Certificate):
                await self._keep(out)
                certs.append(out)
                results.append(out)
            else:
                results.append(self._failure(session, out, errs))
        if certs:
            self.facts.notify()
            to = {w for s in sessions for w in s.committee.members}
            to |= {c.transfer.message.payee for c in certs}
            self.spread([fact_bytes(c) for c in certs], to)
        return results

    async def _keep(self, cert: Certificate) -> None:
        """In memory now, durable with the next commit (our next transfer's, at the latest):
        a crash before it resends the transfer and gets it certified again."""
        try:
            self.store.add_nowait(cert, drop_outgoing=cert.seq)
        except StoreBusy:
            await self.store.add(cert, drop_outgoing=cert.seq)  # one transaction
        self.stats.certified += 1
        metrics.PAYMENTS_CERTIFIED.inc()

    def _failure(
        self, session: PaymentSession, failed: Failed | None, errors: dict[str, str]
    ) -> PaymentFailed:
        t = session.transfer.message
        refusals = failed.refusals if failed is not None else dict(session.refusals)
        why = "; ".join(
            [f"{w[-8:]}: {r.reason} ({r.message})" for w, r in refusals.items()]
            + [f"{w[-8:]}: {e}" for w, e in errors.items()]
        )
        return PaymentFailed(
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
                # In order (arbitrated debts first), up to a batch at once.
                failed = [
                    o for o in await self.pay_all(work[:BATCH]) if isinstance(o, PaymentFailed)
                ]
                if failed:
                    raise failed[0]
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
