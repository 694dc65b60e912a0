"""FactSync: how ledger facts spread between peers.

* ``spread(items, to)``: push new facts to the peers that need them now (if
  connected) and publish them on the gossip topic ``GOSSIP_TOPIC``;
* gossip in: facts published by others are verified and stored;
* anti-entropy: every ``sync_interval`` seconds (jittered) range-based
  reconciliation (``protocols.reconcile``) with a random connected neighbour,
  fetching what we lack and pushing what it lacks;
* checkpoints: after a sync, adopt the newest checkpoint held, fetching its account
  rows from the peer when the facts here do not give them (a new peer, or one that was
  offline: it then holds the checkpoint chain and only the facts after it);
* the server side of ``push``, ``sync``, ``get``, ``ckpt`` and ``ckpt_sign`` on
  ``/edgeswarm/ledger/1``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.pubsub.pubsub import Pubsub

from peer.ledger_store import StoreError, parse_fact
from peer.settlement.base import LedgerFacts, SettlementConfig, SettlementError, Stats, SyncResult
from peer.settlement.budget import PeerBudget
from peer.settlement.checkpointer import Checkpointer
from peer.settlement.ledger_rpc import Channel, LedgerClient, pack
from protocols.checkpoint import ACCOUNTS_PAGE, AccountSummary
from protocols.errors import ProtocolError, ValidationError
from protocols.ledger_rpc import (
    MAX_ITEM_PAYLOAD,
    MAX_ITEMS,
    MAX_PAGES,
    CheckpointReply,
    Get,
    GetCheckpoint,
    GetReply,
    Push,
    PushReply,
    SignCheckpoint,
    Sync,
    SyncReply,
    VoteReply,
)
from protocols.ledger_state import (
    NETWORK_WIDE,
    FactKind,
    IrrelevantFact,
    NeedAccounts,
    decode_item,
    encode_item,
)
from protocols.reconcile import Reconciler

log = logging.getLogger(__name__)

GOSSIP_TOPIC = "edgeswarm/ledger/facts/1"
MAX_SYNC_ROUNDS = 256
MAX_SYNC_SESSIONS = 8  # answered at once; more get a "busy" error
# Facts fetched per `get` while syncing: each batch is verified in one go on the event
# loop (~4 signatures per certificate), so small batches keep the loop responsive.
FETCH_CHUNK = 128
MAX_GOSSIP_MESSAGE = 1 << 20
# What one peer may make us parse and verify (pushed facts, gossip it forwards): a
# sustained rate and a burst (an honest peer's push after a long partition fits a burst).
FACT_BUDGET_RATE = 2000.0  # facts per second
FACT_BUDGET_BURST = 20_000.0
# Receipts refused in one sync session for lack of the certificate that pays them, kept
# for one retry at its end (their certificate may come in a later chunk).
MAX_RETRY_ITEMS = 4096
# Certificates first: a receipt or an identity proof is relevant once a payment is held.
_INGEST_ORDER = {k: n for n, k in enumerate(sorted(FactKind, key=lambda k: k not in NETWORK_WIDE))}


class SyncSession:
    """The answering side of one reconciliation (one per stream)."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self.rounds = 0


class FactSync:
    """Spreads, gossips and reconciles ledger facts with other peers."""

    def __init__(
        self,
        host: IHost,
        peer_id: str,
        facts: LedgerFacts,
        client: LedgerClient,
        config: SettlementConfig,
        stats: Stats,
        *,
        pubsub: Pubsub | None = None,
    ) -> None:
        self.host = host
        self.peer_id = peer_id
        self.facts = facts
        self.client = client
        self.config = config
        self.stats = stats
        self.pubsub = pubsub if config.gossip else None
        self._nursery: trio.Nursery | None = None
        self._sync_sessions = 0  # sync sessions we are answering right now
        self.budget = PeerBudget(FACT_BUDGET_RATE, FACT_BUDGET_BURST)
        # Answers ``ckpt_sign`` (set by the settlement service; None: this peer never votes).
        self.checkpointer: Checkpointer | None = None

    # --- facts in -------------------------------------------------------------------------

    async def ingest_items(self, items: Iterable[object]) -> tuple[int, int]:
        """Decode, check relevance, verify and store encoded items from another peer:
        (new, bad). Bad items are counted, never raised; a StoreError (the database
        failed) is."""
        new, bad, _ = await self._ingest(items)
        return new, bad

    async def _ingest(self, items: Iterable[object]) -> tuple[int, int, list[bytes]]:
        """``ingest_items``, also returning the items refused as irrelevant."""
        parsed: list[tuple[FactKind, bytes]] = []
        raw: list[bytes] = []
        bad = 0
        for item in items:
            try:
                if type(item) is not bytes:
                    raise ValidationError("a ledger item must be bytes")
                parsed.append(decode_item(item))
                raw.append(item)
            except ProtocolError:
                bad += 1
        order = sorted(range(len(parsed)), key=lambda n: _INGEST_ORDER[parsed[n][0]])
        results = await self.facts.add_facts([parsed[n] for n in order], relevant_to=self.peer_id)
        irrelevant = [
            raw[n] for n, r in zip(order, results, strict=True) if isinstance(r, IrrelevantFact)
        ]
        new = sum(1 for r in results if r is True)
        return new, bad + sum(1 for r in results if isinstance(r, ProtocolError)), irrelevant

    def validate_gossip(self, forwarder: object, msg: Any) -> bool:
        """Topic validator of ``GOSSIP_TOPIC``: only a network-wide fact that verifies, within
        the forwarder's budget, is accepted and forwarded; anything else stops here."""
        data = getattr(msg, "data", b"")
        if not isinstance(data, bytes) or len(data) > MAX_GOSSIP_MESSAGE:
            return False
        sender = str(forwarder)
        if sender != self.peer_id and not self.budget.take(sender):
            self.stats.gossip_rejected += 1
            return False
        try:
            kind, blob = decode_item(data)
            if kind not in NETWORK_WIDE:
                raise ValidationError(f"{kind.name} is not a network-wide fact")
            fact, fid = parse_fact(kind, blob)
            if not self.facts.ledger.has(fid):
                self.facts.ledger.verify_fact(fact)
        except (ProtocolError, ValueError, TypeError) as exc:
            log.debug("gossip from %s rejected: %s", sender, exc)
            self.stats.gossip_rejected += 1
            return False
        return True

    async def _gossip_in(self, sub: Any) -> None:
        while True:
            msg = await sub.get()
            data = getattr(msg, "data", b"")
            if not isinstance(data, bytes) or len(data) > MAX_GOSSIP_MESSAGE:
                continue
            new, _bad = await self.ingest_items([data])
            self.stats.gossiped_in += new
            if new:
                await self._adopt_quietly()

    # --- facts out ------------------------------------------------------------------------

    def spread(self, items: list[tuple[FactKind, bytes]], to: Iterable[str] = ()) -> None:
        """In the background: push to those of ``to`` we are connected to, and publish on
        the gossip topic. Others get the facts by gossip or anti-entropy: a push is not
        worth a dial (or a DHT walk) per fact."""
        if self._nursery is None:
            return
        connected = {str(p) for p in self.host.get_connected_peers()}
        for peer_id in (set(to) & connected) - {self.peer_id}:
            self._nursery.start_soon(self._push_quietly, peer_id, items)
        if self.pubsub is not None:
            self._nursery.start_soon(self._publish, items)

    async def _push_quietly(self, peer_id: str, items: list[tuple[FactKind, bytes]]) -> None:
        for attempt in range(3):  # anti-entropy repairs what all three miss
            try:
                await self.client.push(peer_id, items)
                return
            except SettlementError as exc:
                log.debug("push to %s failed (attempt %d): %s", peer_id, attempt + 1, exc)
                await trio.sleep(0.1 * 2**attempt)

    async def _publish(self, items: list[tuple[FactKind, bytes]]) -> None:
        assert self.pubsub is not None
        for kind, data in items:
            try:
                await self.pubsub.publish(GOSSIP_TOPIC, encode_item(kind, data))
            except Exception as exc:
                log.debug("gossip publish failed: %r", exc)

    # --- anti-entropy (initiator) ---------------------------------------------------------

    async def sync_with(self, peer_id: str) -> SyncResult:
        """Anti-entropy with one peer: reconcile fact ids, fetch what we lack, push the rest."""
        ledger = self.facts.ledger
        ch = await self.client.open(peer_id)
        try:
            with trio.fail_after(self.config.request_timeout * 4):
                rec = Reconciler(list(ledger.fact_ids()))
                msg: bytes | None = rec.initiate()
                rounds = 0
                while msg is not None and rounds < MAX_SYNC_ROUNDS:
                    rounds += 1
                    reply = await ch.call(Sync(msg), SyncReply)
                    if reply.m is None:
                        break
                    try:
                        msg = rec.receive(reply.m).reply
                    except ProtocolError as exc:
                        raise SettlementError(f"{peer_id}: bad reconcile message: {exc}") from exc
                fetched = refused = 0
                need = rec.need
                retry: list[bytes] = []
                for i in range(0, len(need), FETCH_CHUNK):
                    got_reply = await ch.call(Get(tuple(need[i : i + FETCH_CHUNK])), GetReply)
                    got, bad, irrelevant = await self._ingest(got_reply.items)
                    fetched += got
                    refused += bad
                    retry += irrelevant[: MAX_RETRY_ITEMS - len(retry)]
                if retry:  # their certificates may have come in a later chunk
                    got, bad, _ = await self._ingest(retry)
                    fetched += got
                    refused += bad - len(retry)  # they were counted as refused above
                await self.catch_up(ch)  # before pushing: what it covers is not worth sending
                pushed = 0
                have = [x for x in (ledger.item(i) for i in rec.have) if x is not None]
                for chunk in pack([encode_item(k, d) for k, d in have]):
                    await ch.call(Push(chunk), PushReply)
                    pushed += len(chunk)
        except trio.TooSlowError:
            raise SettlementError(f"sync with {peer_id} timed out") from None
        finally:
            await ch.close()
        self.stats.syncs += 1
        return SyncResult(peer_id, rounds, fetched, pushed, refused)

    async def catch_up(self, ch: Channel | None = None) -> bool:
        """Adopt the newest checkpoint held here, if newer than the adopted one: from the
        facts held, or else with its account rows fetched over ``ch`` (the peer serves the
        rows of the checkpoint it adopted). True if one was adopted."""
        ledger = self.facts.ledger
        latest = ledger.latest_checkpoint_epoch()
        adopted = 0 if ledger.checkpoint is None else ledger.checkpoint.epoch
        if latest <= adopted:
            return False
        cp = ledger.held_checkpoint(latest)
        if cp is None:
            return False
        try:
            await self.facts.store.adopt_checkpoint(cp)
        except NeedAccounts:
            if ch is None:
                return False
            accounts = await self._fetch_accounts(ch, cp.digest)
            if accounts is None:
                return False
            try:
                await self.facts.store.adopt_checkpoint(cp, accounts)
            except ProtocolError as exc:
                raise SettlementError(f"{ch.peer}: checkpoint {cp.epoch} refused: {exc}") from exc
        except ProtocolError as exc:
            log.info("checkpoint %d held but not adopted: %s", cp.epoch, exc)
            return False
        self.facts.notify()
        log.info("adopted checkpoint %d (%d accounts)", cp.epoch, cp.header.n_accounts)
        return True

    async def _adopt_quietly(self) -> None:
        """A checkpoint came by gossip or push: adopt it if the facts here give its summary
        (otherwise the next anti-entropy round fetches its rows)."""
        ledger = self.facts.ledger
        adopted = 0 if ledger.checkpoint is None else ledger.checkpoint.epoch
        if ledger.latest_checkpoint_epoch() > adopted:
            await self.catch_up(None)

    async def _fetch_accounts(self, ch: Channel, digest: bytes) -> list[AccountSummary] | None:
        """The account rows of the checkpoint with ``digest``, page by page (None: the peer
        adopted another one)."""
        rows: list[AccountSummary] = []
        page, pages = 0, 1
        while page < min(pages, MAX_PAGES):
            reply = await ch.call(GetCheckpoint(page), CheckpointReply)
            if reply.cp is None or reply.cp.digest != digest:
                return None
            rows += reply.accounts
            pages = reply.pages
            page += 1
        return rows

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
        """Reconcile with a random neighbour every ``sync_interval`` (jittered)."""
        interval = self.config.sync_interval
        delay = interval
        while True:
            await trio.sleep(delay * random.uniform(0.5, 1.5))
            result = await self.sync_random()
            # A peer that just learned something passes it on soon (rumor spreading);
            # one in agreement with its neighbour goes back to the slow beat.
            news = result is not None and (result.fetched > 0 or result.pushed > 0)
            delay = interval / 8 if news else interval

    # --- server side ----------------------------------------------------------------------

    async def answer_push(self, req: Push, peer: str = "?") -> PushReply:
        """Facts a peer pushed: within its budget (else an error reply, nothing parsed),
        and only those we have a reason to hold."""
        if not self.budget.take(peer, max(1, len(req.items))):
            raise ValidationError(
                f"over budget: at most {FACT_BUDGET_RATE:.0f} facts/s per peer "
                f"(bursts of {FACT_BUDGET_BURST:.0f}); try later"
            )
        new, bad = await self.ingest_items(req.items)
        self.stats.pushed_in += new
        if new:
            await self._adopt_quietly()
        return PushReply(new, bad)

    def open_sync_session(self) -> SyncSession:
        """Start answering a reconciliation; ``close_sync_session`` when its stream ends."""
        # Each session snapshots our ids (O(n)): bound how many run at once.
        if self._sync_sessions >= MAX_SYNC_SESSIONS:
            raise ValidationError(f"busy: {MAX_SYNC_SESSIONS} sync sessions running, try later")
        self._sync_sessions += 1
        return SyncSession(Reconciler(list(self.facts.ledger.fact_ids())))

    def close_sync_session(self, session: SyncSession) -> None:
        self._sync_sessions -= 1

    def answer_sync(self, req: Sync, session: SyncSession) -> SyncReply:
        session.rounds += 1
        if session.rounds > MAX_SYNC_ROUNDS:
            raise ValidationError(f"more than {MAX_SYNC_ROUNDS} sync rounds on one stream")
        return SyncReply(session.reconciler.receive(req.m).reply)

    def answer_get(self, req: Get) -> GetReply:
        out: list[bytes] = []
        size = 0
        for fid in req.ids:
            item = self.facts.ledger.item(fid)
            if item is not None:
                enc = encode_item(*item)
                if size + len(enc) > MAX_ITEM_PAYLOAD or len(out) >= MAX_ITEMS:
                    break  # the asker fetches the rest in its next sync
                out.append(enc)
                size += len(enc)
        return GetReply(tuple(out))

    def answer_checkpoint(self, req: GetCheckpoint) -> CheckpointReply:
        """The checkpoint this peer adopted and one page of its account rows."""
        try:
            rows, pages = self.facts.store.checkpoint_accounts(req.page, ACCOUNTS_PAGE)
        except StoreError as exc:
            raise ValidationError(f"no checkpoint: {exc}") from exc
        return CheckpointReply(self.facts.ledger.checkpoint, tuple(rows), pages)

    def answer_sign(self, req: SignCheckpoint) -> VoteReply:
        if self.checkpointer is None:
            raise ValidationError("this peer does not sign checkpoints")
        return self.checkpointer.answer_sign(req)

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Gossip in, anti-entropy, and the nursery that spreads facts in the background."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            subscribed = False
            try:
                if self.pubsub is not None:
                    self.pubsub.set_topic_validator(
                        GOSSIP_TOPIC, self.validate_gossip, is_async_validator=False
                    )
                    sub = await self.pubsub.subscribe(GOSSIP_TOPIC)
                    subscribed = True
                    nursery.start_soon(self._gossip_in, sub)
                if self.config.sync_interval > 0:
                    nursery.start_soon(self._anti_entropy)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                if subscribed and self.pubsub is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        try:
                            await self.pubsub.unsubscribe(GOSSIP_TOPIC)
                        except Exception:
                            log.debug("unsubscribe failed", exc_info=True)
