"""The settlement service: pays receipts, witnesses others' payments, spreads ledger facts.

``open_settlement(peer, store)`` runs, in one nursery:

* the ``/edgeswarm/ledger/1`` stream handler, answering
  ``certify`` (the witness side, ``protocols.witness``: the lock is committed
  durably by the store *before* the vote is written back), ``push`` (facts
  sent to us), ``sync`` (range-based reconciliation, ``protocols.reconcile``)
  and ``get`` (fetch facts by id);
* the payer (``protocols.payment``): ``pay(receipt)`` signs the next transfer,
  stores it, asks the committee in parallel and returns the certificate;
  with ``auto_pay`` every receipt this peer owes (``ingest_receipt``) is paid in
  the background, and transfers left over from a crash are resent unchanged;
* gossip of certificates and proofs on the pubsub topic ``GOSSIP_TOPIC`` (when
  the peer has pubsub), and anti-entropy with a random connected neighbour
  every ``sync_interval`` seconds.

Wire: each frame is ``uvarint(len) || canonical CBOR`` (``protocols.codec``),
at most ``MAX_FRAME`` bytes. Requests are ``{"v": 1, "op": ..., ...}``, one
reply frame per request, many requests per stream:

=========  ===========================  ==================================
op         request fields               reply fields
=========  ===========================  ==================================
certify    ``req``: TransferRequest     ``r``: witness reply (vote/refusal/proof)
push       ``items``: [ledger item]     ``new``, ``bad``: counts
sync       ``m``: reconcile message     ``m``: reply message or null
get        ``ids``: [32-byte fact id]   ``items``: [ledger item]
=========  ===========================  ==================================

An error reply is ``{"v": 1, "err": "what was expected and what came"}``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peer.ledger_store import LedgerStore, StoreError, fact_bytes, open_ledger_store
from protocols.certificate import Certificate
from protocols.codec import FrameDecoder, decode, encode, frame
from protocols.committee import CommitteeRule
from protocols.errors import ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, IdentityProof, solve_pow
from protocols.ledger_state import FactKind, LedgerState, decode_item, encode_item
from protocols.market_fields import want_peer_id
from protocols.payment import Certified, Failed, PaymentSession, SendRequest
from protocols.proofs import FraudProof, PayableReceipt
from protocols.reconcile import ID_SIZE, Reconciler
from protocols.witness import (
    MAX_HISTORY,
    PersistLock,
    Refusal,
    Refuse,
    ReplyVote,
    ReportEquivocation,
    TransferRequest,
    Witness,
    encode_reply,
)

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/edgeswarm/ledger/1")
GOSSIP_TOPIC = "edgeswarm/ledger/facts/1"
VERSION = 1
MAX_FRAME = 1 << 20
# Items in one push/get, and bytes of items packed into one frame (room for the envelope).
MAX_ITEMS = 512
MAX_ITEM_PAYLOAD = MAX_FRAME - 64 * 1024
MAX_SYNC_ROUNDS = 256
MAX_SYNC_SESSIONS = 8  # answered at once; more get a "busy" error
# Facts fetched per `get` while syncing: each batch is verified in one go on the event
# loop (~4 signatures per certificate), so small batches keep the loop responsive.
FETCH_CHUNK = 128
MAX_REQUESTS_PER_STREAM = 100_000
OPS = ("certify", "push", "sync", "get")
# Seconds before the DHT is asked again for the addresses of a peer we cannot reach.
LOOKUP_BACKOFF = 30.0


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


@dataclass(frozen=True)
class SyncResult:
    peer: str
    rounds: int
    fetched: int  # new facts we got
    pushed: int  # facts we sent
    refused: int  # facts the peer sent that did not verify


# --- framing over a libp2p stream ----------------------------------------------------------


def _error(message: str) -> dict[str, Any]:
    return {"v": VERSION, "err": message[:400]}


def _check_message(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValidationError(f"{what} must be a CBOR map, got {type(raw).__name__}")
    if raw.get("v") != VERSION:
        raise ValidationError(f"{what} version must be {VERSION}, got {raw.get('v')!r}")
    return raw


class _Channel:
    """One stream, used for request/reply frames in order (one caller at a time)."""

    def __init__(self, stream: Any, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.decoder = FrameDecoder(max_size=MAX_FRAME)
        self.lock = trio.Lock()
        self.broken = False

    async def read_frame(self) -> bytes | None:
        """The next frame, or None at a clean end of stream."""
        while True:
            data = self.decoder.next_frame()
            if data is not None:
                return data
            try:
                chunk = await self.stream.read(65536)
            except Exception as exc:  # StreamEOF / StreamReset / closed connection
                if self.decoder.buffered:
                    raise SettlementError(f"{self.peer} closed the stream mid-frame") from exc
                return None
            if not chunk:
                return None
            self.decoder.feed(chunk)

    async def write(self, body: dict[str, Any]) -> None:
        await self.stream.write(frame(encode(body), max_size=MAX_FRAME))

    async def call(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return its reply (raises SettlementError on any failure)."""
        async with self.lock:
            try:
                await self.write(body)
                data = await self.read_frame()
                if data is None:
                    raise SettlementError(f"{self.peer} closed the stream without answering")
                reply = _check_message(decode(data, max_size=MAX_FRAME), "reply")
            except (SettlementError, trio.Cancelled):
                self.broken = True  # a late reply would be read as the next one's: drop it
                raise
            except ProtocolError as exc:
                self.broken = True
                raise SettlementError(f"bad reply from {self.peer}: {exc}") from exc
            except Exception as exc:
                self.broken = True
                raise SettlementError(f"stream to {self.peer} failed: {exc!r}") from exc
        if "err" in reply:
            raise SettlementError(f"{self.peer} answered with an error: {reply['err']}")
        return reply

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):  # bounded even when shielded
            try:
                await self.stream.close()
            except Exception:
                log.debug("closing ledger stream to %s failed", self.peer, exc_info=True)


# --- the service ---------------------------------------------------------------------------


@dataclass
class _Stats:
    """Counters for tests, benchmarks and logs."""

    certified: int = 0  # our payments certified
    votes: int = 0  # votes we gave as a witness
    refusals: int = 0  # refusals (and equivocation reports) we gave
    syncs: int = 0  # anti-entropy sessions we initiated and finished
    pushed_in: int = 0  # new facts peers pushed to us
    gossiped_in: int = 0  # new facts from the gossip topic
    handler_errors: int = 0  # streams closed for a protocol error


class SettlementService:
    """One peer's settlement: payer, witness, gossip and anti-entropy. Use ``open_settlement``."""

    def __init__(
        self,
        peer: Any,
        store: LedgerStore,
        config: SettlementConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.peer = peer
        self.host = peer.host
        self.key = peer.key
        self.peer_id = peer_id_from_public_key(bytes(self.key.verify_key))
        self.store = store
        self.config = config
        self.clock = clock
        self.witness = Witness(self.key, durable_locks=store.locks())
        self.stats = _Stats()
        self._pubsub = getattr(peer, "pubsub", None) if config.gossip else None
        self._pool: dict[str, _Channel] = {}
        self._introduced: set[str] = set()
        self._pay_lock = trio.Lock()
        self._changed = trio.Event()
        self._wake_payer = trio.Event()
        self._handlers: set[trio.CancelScope] = set()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._identity: IdentityProof | None = None
        self._lookups: dict[str, float] = {}  # peer id -> when we last asked the DHT
        self._sync_sessions = 0  # sync sessions we are answering right now

    # --- state ----------------------------------------------------------------------------

    @property
    def ledger(self) -> LedgerState:
        return self.store.ledger

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def balances(self) -> dict[str, int]:
        return self.ledger.balances()

    def state_hash(self) -> bytes:
        return self.ledger.state_hash()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever a new fact lands."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def add_facts(
        self, items: Iterable[tuple[FactKind, bytes]]
    ) -> list[bool | ProtocolError]:
        """Verify and store facts (from anywhere); wakes waiters and the payer on news."""
        results = await self.store.add_facts(list(items))
        if any(r is True for r in results):
            self._notify()
            self._wake_payer.set()
        return results

    async def add(self, obj: Any) -> bool:
        [result] = await self.add_facts([fact_bytes(obj)])
        if isinstance(result, ProtocolError):
            raise result
        return result

    # --- receipts from the market ---------------------------------------------------------

    async def ingest_receipt(self, receipt: PayableReceipt) -> bool:
        """A receipt from the job market (either side): verify, store, and if we owe it and
        ``auto_pay`` is on, pay it in the background. Returns True if it was new."""
        new = await self.add(receipt)
        if receipt.requester == self.peer_id:
            self._wake_payer.set()
        return new

    async def on_market_receipt(self, receipt: PayableReceipt, role: str) -> None:
        """Hook for the job market: ``market.on_receipt.append(service.on_market_receipt)``.

        Both sides call it; the requester's side also pays (``auto_pay``)."""
        await self.ingest_receipt(receipt)

    async def ingest_fraud_proof(self, proof: FraudProof) -> bool:
        """A fraud proof found by this peer's spot checks: store it and spread it."""
        new = await self.add(proof)
        if new:
            self._spread([fact_bytes(proof)])
        return new

    # --- payer ----------------------------------------------------------------------------

    def unpaid(self) -> list[PayableReceipt]:
        """Receipts this peer owes that no certificate pays yet (arrival order)."""
        pending = {r.receipt_id for _, r in self.store.outgoing()}
        return [
            r
            for r in self.store.receipts()
            if r.requester == self.peer_id
            and not self.ledger.is_paid(r)
            and r.receipt_id not in pending
        ]

    def _paying_certificate(self, receipt_id: bytes) -> Certificate | None:
        for seq in range(self.ledger.next_seq(self.peer_id) - 1, 0, -1):
            cert = self.store.certificate(self.peer_id, seq)
            if cert is not None and cert.transfer.message.receipt_id == receipt_id:
                return cert
        return None

    async def pay(self, receipt: PayableReceipt) -> Certificate:
        """Pay ``receipt`` (we must be its requester): first any transfer left pending, then a
        new one with our next seq. Returns the certificate; raises ``PaymentFailed``."""
        if receipt.requester != self.peer_id:
            raise SettlementError(f"{self.peer_id} is not the requester of this receipt")
        await self.add(receipt)
        async with self._pay_lock:
            for transfer, pending in self.store.outgoing():
                await self._finish(transfer, pending)
            done = self._paying_certificate(receipt.receipt_id)
            if done is not None:
                return done
            if self.ledger.is_paid(receipt):
                raise PaymentFailed("another receipt for the same commitment is already paid")
            session, persist = PaymentSession.start(
                self.key, receipt, self.ledger, self.now_ms(), history_for=self.store.history_for
            )
            await self.store.put_outgoing(persist.transfer, receipt)  # durable before it leaves
            return await self._run_session(session)

    async def _finish(self, transfer: Any, receipt: PayableReceipt) -> Certificate:
        """Resend a stored transfer unchanged (never sign another one for its seq)."""
        t = transfer.message
        cert = self.store.certificate(t.payer, t.seq)
        if cert is not None:
            if cert.digest != transfer.digest:  # cannot happen for an honest key
                log.error("our seq %d was certified for another transfer", t.seq)
            await self.store.drop_outgoing(t.seq)
            return cert
        session, _ = PaymentSession.resume(
            transfer, receipt, self.ledger, history_for=self.store.history_for
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
                reply = await self._call(
                    req.witness, {"v": VERSION, "op": "certify", "req": req.data}
                )
                r = reply.get("r")
                if type(r) is not bytes:
                    raise SettlementError(f"{req.witness}: certify reply without 'r' bytes")
                answer: bytes | Exception = r
            except SettlementError as exc:
                answer = exc
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send_ch.send_nowait((req.witness, answer))

        async with contextlib.AsyncExitStack() as stack:
            # Requests run in the service's nursery: the ones still in flight when a quorum
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
            await self.add(session.equivocation)
            self._spread([fact_bytes(session.equivocation)])
        if cert is not None:
            await self.store.add(cert, drop_outgoing=cert.seq)  # one transaction
            self._notify()
            self.stats.certified += 1
            self._spread(
                [fact_bytes(cert)], to=[*session.committee.members, cert.transfer.message.payee]
            )
            return cert
        t = session.transfer.message
        refusals = failed.refusals if failed is not None else dict(session.refusals)
        for witness, refusal in refusals.items():
            if refusal.reason is Refusal.OVER_LIMIT:
                self._introduced.discard(witness)  # it may have lost our identity proof
        why = "; ".join(
            [f"{w[-8:]}: {r.reason} ({r.message})" for w, r in refusals.items()]
            + [f"{w[-8:]}: {e}" for w, e in errors.items()]
        )
        raise PaymentFailed(
            f"transfer seq {t.seq} of {t.amount} to {t.payee} not certified: {why}", refusals
        )

    async def _payer(self) -> None:
        """Background: resend pending transfers and pay what we owe, with backoff."""
        delay = self.config.retry_interval
        while True:
            work = [r for _, r in self.store.outgoing()] + self.unpaid()
            if not work:
                await self._wake_payer.wait()
                self._wake_payer = trio.Event()
                continue
            try:
                await self.pay(work[0])
                delay = self.config.retry_interval
            except (PaymentFailed, SettlementError, StoreError) as exc:
                log.warning("payment failed, retrying in %.1f s: %s", delay, exc)
                with trio.move_on_after(delay * random.uniform(0.8, 1.2)):
                    await self._wake_payer.wait()  # news (a certificate, a refill) retries early
                self._wake_payer = trio.Event()
                delay = min(delay * 2, self.config.max_retry_interval)

    # --- client side of /edgeswarm/ledger/1 -----------------------------------------------

    async def _open(self, peer_id: str) -> _Channel:
        pid = ID.from_base58(peer_id)
        try:
            stream = await self.host.new_stream(pid, [PROTOCOL_ID])
        except Exception as exc:
            # Not connected and no address known: look the peer up in the DHT once.
            if not await self._find_addrs(pid):
                raise SettlementError(f"cannot open {PROTOCOL_ID} to {peer_id}: {exc!r}") from exc
            try:
                stream = await self.host.new_stream(pid, [PROTOCOL_ID])
            except Exception as exc2:
                raise SettlementError(f"cannot open {PROTOCOL_ID} to {peer_id}: {exc2!r}") from exc2
        return _Channel(stream, peer_id)

    async def _find_addrs(self, pid: ID) -> bool:
        dht = getattr(self.peer, "dht", None)
        if dht is None:
            return False
        now = trio.current_time()
        if self._lookups.get(str(pid), -math.inf) > now - LOOKUP_BACKOFF:
            return False  # looked up recently: let the caller's retry/backoff decide
        if len(self._lookups) > 10_000:
            self._lookups.clear()
        self._lookups[str(pid)] = now
        try:
            info = await dht.find_peer(pid)
        except Exception as exc:
            log.debug("DHT lookup of %s failed: %r", pid, exc)
            return False
        if info is None or not info.addrs:
            return False
        # py-libp2p dials only the first TCP address it knows: drop stale ones.
        self.host.get_peerstore().clear_addrs(info.peer_id)
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
        return True

    async def _pooled(self, peer_id: str) -> _Channel:
        ch = self._pool.get(peer_id)
        if ch is None or ch.broken:
            if ch is not None:
                await ch.close()
            ch = await self._open(peer_id)
            self._pool[peer_id] = ch
        return ch

    async def _call(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request on the kept-open stream to ``peer_id`` (reopened once if it broke)."""
        if peer_id == self.peer_id:
            raise SettlementError("a peer does not call itself")
        with trio.move_on_after(self.config.request_timeout) as scope:
            await self._introduce(peer_id)
            for attempt in (1, 2):
                ch = await self._pooled(peer_id)
                try:
                    return await ch.call(body)
                except SettlementError:
                    if attempt == 2 or not ch.broken:
                        raise
        assert scope.cancelled_caught
        raise SettlementError(f"{peer_id} did not answer within {self.config.request_timeout} s")

    async def _introduce(self, peer_id: str) -> None:
        """Send our identity proof once per peer (witnesses need it to grant credit)."""
        if self._identity is None or peer_id in self._introduced:
            return
        self._introduced.add(peer_id)
        ch = await self._pooled(peer_id)
        item = encode_item(FactKind.IDENTITY_PROOF, self._identity.to_bytes())
        try:
            await ch.call({"v": VERSION, "op": "push", "items": [item]})
        except SettlementError:
            self._introduced.discard(peer_id)
            raise

    async def push(self, peer_id: str, items: list[tuple[FactKind, bytes]]) -> int:
        """Send facts to a peer; returns how many were new to it."""
        new = 0
        for chunk in _pack([encode_item(k, d) for k, d in items]):
            reply = await self._call(peer_id, {"v": VERSION, "op": "push", "items": chunk})
            n = reply.get("new")
            new += n if type(n) is int else 0
        return new

    def _spread(self, items: list[tuple[FactKind, bytes]], to: Iterable[str] = ()) -> None:
        """In the background: push to those of ``to`` we are connected to, and publish on
        the gossip topic. Others get the facts by gossip or anti-entropy: a push is not
        worth a dial (or a DHT walk) per fact."""
        if self._nursery is None:
            return
        connected = {str(p) for p in self.host.get_connected_peers()}
        for peer_id in (set(to) & connected) - {self.peer_id}:
            self._nursery.start_soon(self._push_quietly, peer_id, items)
        if self._pubsub is not None:
            self._nursery.start_soon(self._publish, items)

    async def _push_quietly(self, peer_id: str, items: list[tuple[FactKind, bytes]]) -> None:
        for attempt in range(3):  # anti-entropy repairs what all three miss
            try:
                await self.push(peer_id, items)
                return
            except SettlementError as exc:
                log.debug("push to %s failed (attempt %d): %s", peer_id, attempt + 1, exc)
                await trio.sleep(0.1 * 2**attempt)

    async def _publish(self, items: list[tuple[FactKind, bytes]]) -> None:
        for kind, data in items:
            try:
                assert self._pubsub is not None
                await self._pubsub.publish(GOSSIP_TOPIC, encode_item(kind, data))
            except Exception as exc:
                log.debug("gossip publish failed: %r", exc)

    async def sync_with(self, peer_id: str) -> SyncResult:
        """Anti-entropy with one peer: reconcile fact ids, fetch what we lack, push the rest."""
        ch = await self._open(peer_id)
        try:
            with trio.fail_after(self.config.request_timeout * 4):
                rec = Reconciler(list(self.ledger.fact_ids()))
                msg: bytes | None = rec.initiate()
                rounds = 0
                while msg is not None and rounds < MAX_SYNC_ROUNDS:
                    rounds += 1
                    reply = await ch.call({"v": VERSION, "op": "sync", "m": msg})
                    m = reply.get("m")
                    if m is None:
                        break
                    if type(m) is not bytes:
                        raise SettlementError(f"{peer_id}: sync reply 'm' must be bytes or null")
                    try:
                        msg = rec.receive(m).reply
                    except ProtocolError as exc:
                        raise SettlementError(f"{peer_id}: bad reconcile message: {exc}") from exc
                fetched = refused = 0
                need = rec.need
                for i in range(0, len(need), FETCH_CHUNK):
                    reply = await ch.call(
                        {"v": VERSION, "op": "get", "ids": need[i : i + FETCH_CHUNK]}
                    )
                    items = reply.get("items")
                    if type(items) is not list or len(items) > MAX_ITEMS:
                        raise SettlementError(f"{peer_id}: get reply needs a list of items")
                    got, bad = await self._ingest_items(items)
                    fetched += got
                    refused += bad
                pushed = 0
                have = [x for x in (self.ledger.item(i) for i in rec.have) if x is not None]
                for chunk in _pack([encode_item(k, d) for k, d in have]):
                    await ch.call({"v": VERSION, "op": "push", "items": chunk})
                    pushed += len(chunk)
        except trio.TooSlowError:
            raise SettlementError(f"sync with {peer_id} timed out") from None
        finally:
            await ch.close()
        self.stats.syncs += 1
        return SyncResult(peer_id, rounds, fetched, pushed, refused)

    async def sync_random(self) -> SyncResult | None:
        """Anti-entropy with one random connected peer (None if there is none)."""
        peers = [str(p) for p in self.host.get_connected_peers() if str(p) != self.peer_id]
        random.shuffle(peers)
        for peer_id in peers[:3]:  # peers without the ledger protocol (bootstrap) are skipped
            try:
                return await self.sync_with(peer_id)
            except SettlementError as exc:
                log.debug("anti-entropy with %s failed: %s", peer_id, exc)
        return None

    async def _anti_entropy(self) -> None:
        interval = self.config.sync_interval
        delay = interval
        while True:
            await trio.sleep(delay * random.uniform(0.5, 1.5))
            result = await self.sync_random()
            # A peer that just learned something passes it on soon (rumor spreading);
            # one in agreement with its neighbour goes back to the slow beat.
            news = result is not None and (result.fetched > 0 or result.pushed > 0)
            delay = interval / 8 if news else interval

    async def _ingest_items(self, items: list[Any]) -> tuple[int, int]:
        parsed: list[tuple[FactKind, bytes]] = []
        bad = 0
        for item in items:
            try:
                if type(item) is not bytes:
                    raise ValidationError("a ledger item must be bytes")
                parsed.append(decode_item(item))
            except ProtocolError:
                bad += 1
        results = await self.add_facts(parsed)
        new = sum(1 for r in results if r is True)
        return new, bad + sum(1 for r in results if isinstance(r, ProtocolError))

    # --- server side ----------------------------------------------------------------------

    async def _handle_stream(self, stream: Any) -> None:
        remote = "?"
        with suppress(Exception):
            remote = str(stream.muxed_conn.peer_id)
        ch = _Channel(stream, remote)
        state: dict[str, Any] = {}
        with trio.CancelScope() as scope:
            self._handlers.add(scope)
            try:
                for _ in range(MAX_REQUESTS_PER_STREAM):
                    if self._closed:
                        break
                    data = None
                    with trio.move_on_after(self.config.stream_idle_timeout):
                        data = await ch.read_frame()
                    if data is None:
                        break  # end of stream, or idle for too long
                    await ch.write(await self._answer(data, state, remote))
            except ProtocolError as exc:  # oversize or malformed frame: say why, then close
                self.stats.handler_errors += 1
                with suppress(Exception):
                    await ch.write(_error(str(exc)))
            except (SettlementError, StoreError) as exc:
                self.stats.handler_errors += 1
                log.debug("ledger stream from %s: %s", remote, exc)
            except Exception as exc:  # a libp2p stream error: the peer went away
                log.debug("ledger stream from %s failed: %r", remote, exc)
            finally:
                self._handlers.discard(scope)
                if "rec" in state:
                    self._sync_sessions -= 1
                await ch.close()

    async def _answer(self, data: bytes, state: dict[str, Any], remote: str) -> dict[str, Any]:
        try:
            req = _check_message(decode(data, max_size=MAX_FRAME), "request")
            op = req.get("op")
            if op == "certify":
                body = req.get("req")
                if type(body) is not bytes:
                    raise ValidationError("certify needs 'req': TransferRequest bytes")
                return {"v": VERSION, "r": await self._certify(body)}
            if op == "push":
                items = req.get("items")
                if type(items) is not list or len(items) > MAX_ITEMS:
                    raise ValidationError(f"push needs 'items': a list of at most {MAX_ITEMS}")
                new, bad = await self._ingest_items(items)
                self.stats.pushed_in += new
                return {"v": VERSION, "new": new, "bad": bad}
            if op == "sync":
                m = req.get("m")
                if type(m) is not bytes:
                    raise ValidationError("sync needs 'm': reconcile message bytes")
                rec = state.get("rec")
                if rec is None:
                    # Each session snapshots our ids (O(n)): bound how many run at once.
                    if self._sync_sessions >= MAX_SYNC_SESSIONS:
                        raise ValidationError(
                            f"busy: {MAX_SYNC_SESSIONS} sync sessions running, try later"
                        )
                    self._sync_sessions += 1
                    rec = state["rec"] = Reconciler(list(self.ledger.fact_ids()))
                    state["rounds"] = 0
                state["rounds"] += 1
                if state["rounds"] > MAX_SYNC_ROUNDS:
                    raise ValidationError(f"more than {MAX_SYNC_ROUNDS} sync rounds on one stream")
                return {"v": VERSION, "m": rec.receive(m).reply}
            if op == "get":
                ids = req.get("ids")
                if type(ids) is not list or len(ids) > MAX_ITEMS:
                    raise ValidationError(f"get needs 'ids': a list of at most {MAX_ITEMS}")
                out: list[bytes] = []
                size = 0
                for fid in ids:
                    if type(fid) is not bytes or len(fid) != ID_SIZE:
                        raise ValidationError(f"fact ids are {ID_SIZE} bytes")
                    item = self.ledger.item(fid)
                    if item is not None:
                        enc = encode_item(*item)
                        if size + len(enc) > MAX_ITEM_PAYLOAD:
                            break  # the asker fetches the rest in its next sync
                        out.append(enc)
                        size += len(enc)
                return {"v": VERSION, "items": out}
            raise ValidationError(f"unknown op {op!r}, expected one of {', '.join(OPS)}")
        except ProtocolError as exc:
            return _error(str(exc))

    async def _certify(self, data: bytes) -> bytes:
        """The witness side of one TransferRequest."""
        req = TransferRequest.from_bytes(data)
        history = [c for c in req.history[:MAX_HISTORY] if self.ledger.item(c.digest) is None]
        if history:
            # Verified and in memory now, on disk with the next commit (with our lock):
            # nobody was promised these, so they need no fsync of their own.
            results = self.store.add_facts_nowait([fact_bytes(c) for c in history])
            if any(r is True for r in results):
                self._notify()
        action = self.witness.handle_transfer(req.transfer, req.receipt, self.ledger, self.now_ms())
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
        if isinstance(action, ReportEquivocation) and await self.add(action.proof):
            self._spread([fact_bytes(action.proof)])
        if isinstance(action, ReplyVote):
            self.stats.votes += 1
        else:
            self.stats.refusals += 1
        assert not isinstance(action, PersistLock)
        return encode_reply(action)

    # --- gossip in ------------------------------------------------------------------------

    async def _gossip_in(self, sub: Any) -> None:
        while True:
            msg = await sub.get()
            data = getattr(msg, "data", b"")
            if not isinstance(data, bytes) or len(data) > MAX_FRAME:
                continue
            # _ingest_items counts bad items instead of raising; a StoreError is fatal.
            new, _bad = await self._ingest_items([data])
            self.stats.gossiped_in += new

    # --- lifecycle ------------------------------------------------------------------------

    async def _ensure_identity(self) -> None:
        pol = self.ledger.policy
        if self.peer_id in pol.genesis:
            return
        if not self.ledger.has_identity(self.peer_id):
            nonce = await trio.to_thread.run_sync(solve_pow, self.peer_id, pol.pow_bits)
            if nonce is None:
                raise SettlementError(f"no identity proof of {pol.pow_bits} bits found")
            await self.add(IdentityProof(self.peer_id, nonce))
        for fid in self.ledger.fact_ids():
            item = self.ledger.item(fid)
            if item is not None and item[0] is FactKind.IDENTITY_PROOF:
                proof = IdentityProof.from_bytes(item[1])
                if proof.peer_id == self.peer_id:
                    self._identity = proof
                    return

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._ensure_identity()
            self.host.set_stream_handler(PROTOCOL_ID, self._handle_stream)
            sub = None
            try:
                if self._pubsub is not None:
                    sub = await self._pubsub.subscribe(GOSSIP_TOPIC)
                    nursery.start_soon(self._gossip_in, sub)
                if self.config.sync_interval > 0:
                    nursery.start_soon(self._anti_entropy)
                if self.config.auto_pay:
                    nursery.start_soon(self._payer)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._closed = True
                with trio.CancelScope(shield=True):
                    try:
                        self.host.remove_stream_handler(PROTOCOL_ID)
                    except Exception:
                        log.debug("removing the ledger handler failed", exc_info=True)
                    for scope in list(self._handlers):
                        scope.cancel()
                    for ch in list(self._pool.values()):
                        await ch.close()
                    self._pool.clear()
                    if sub is not None and self._pubsub is not None:
                        with trio.move_on_after(2):
                            try:
                                await self._pubsub.unsubscribe(GOSSIP_TOPIC)
                            except Exception:
                                log.debug("unsubscribe failed", exc_info=True)


def _pack(items: list[bytes]) -> list[list[bytes]]:
    """Split encoded items into frames of at most MAX_ITEMS items / MAX_ITEM_PAYLOAD bytes."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for item in items:
        if cur and (len(cur) >= MAX_ITEMS or size + len(item) > MAX_ITEM_PAYLOAD):
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += len(item)
    if cur:
        out.append(cur)
    return out


@asynccontextmanager
async def open_settlement(
    peer: Any,
    store: LedgerStore,
    config: SettlementConfig | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[SettlementService]:
    """Run settlement for ``peer`` (``.host``, ``.key``, optional ``.pubsub``) over ``store``.

    Everything it starts stops when the block exits; the store stays open (its owner
    closes it after this)."""
    service = SettlementService(peer, store, config or SettlementConfig(), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield service
        finally:
            nursery.cancel_scope.cancel()


def committee_rule_from_config(config: Any) -> CommitteeRule:
    """The network's committee rule from a ``peer.config.Config``: fallback witnesses are
    ``ledger_witnesses``, or the peer ids of the ``bootstrap`` addresses."""
    witnesses = set(config.ledger_witnesses)
    if not witnesses:
        for address in config.bootstrap:
            part = address.rsplit("/p2p/", 1)
            if len(part) == 2 and part[1]:
                witnesses.add(part[1])
    if not witnesses:
        raise SettlementError(
            "no ledger witnesses: set ledger_witnesses (EDGESWARM_LEDGER_WITNESSES) or give "
            "--bootstrap addresses, whose peers then witness payments"
        )
    for w in witnesses:
        want_peer_id("Config", "ledger_witnesses[]", w)
    return CommitteeRule(
        beacon=config.ledger_beacon.encode(), fallback=frozenset(witnesses), f=config.ledger_f
    )


def credit_policy_from_config(config: Any) -> CreditPolicy:
    """The network's credit policy: defaults, with ``ledger_base_limit`` credits for a new
    identity (every peer of a network must use the same value)."""
    return CreditPolicy(base_limit=round(config.ledger_base_limit * 1_000_000))


@asynccontextmanager
async def open_peer_settlement(
    peer: Any,
    config: Any,
    *,
    policy: CreditPolicy | None = None,
    settings: SettlementConfig | None = None,
    optional: bool = False,
) -> AsyncIterator[SettlementService | None]:
    """Ledger store in ``config.data_dir`` + settlement service for a running ``peer``.

    ::

        async with (
            open_peer(config) as peer,
            open_market(peer) as market,
            open_peer_settlement(peer, config, optional=True) as settlement,
        ):
            if settlement is not None:
                market.on_receipt.append(settlement.on_market_receipt)

    ``optional``: when the config names no witnesses (a lone peer with no bootstrap),
    log a warning and yield None instead of raising ``SettlementError``.
    """
    try:
        rule = committee_rule_from_config(config)
    except SettlementError as exc:
        if not optional:
            raise
        log.warning("settlement is off: %s", exc)
        yield None
        return
    settings = settings or SettlementConfig(sync_interval=config.ledger_sync_interval)
    async with (
        open_ledger_store(
            config.data_dir, rule, policy or credit_policy_from_config(config)
        ) as store,
        open_settlement(peer, store, settings) as service,
    ):
        yield service


__all__ = [
    "GOSSIP_TOPIC",
    "PROTOCOL_ID",
    "PaymentFailed",
    "SettlementConfig",
    "SettlementError",
    "SettlementService",
    "SyncResult",
    "committee_rule_from_config",
    "credit_policy_from_config",
    "open_peer_settlement",
    "open_settlement",
]
