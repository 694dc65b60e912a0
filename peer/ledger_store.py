"""The SQLite ledger store: the only module that touches the ledger database.

``open_ledger_store(path, rule, policy)`` opens ``ledger.sqlite3`` through
aiosqlite under trio-asyncio (WAL mode, ``synchronous=FULL``) and keeps an
in-memory ``LedgerState`` that mirrors what is on disk. All writes go through
one writer task: callers enqueue a request and wait until the transaction that
holds it is committed (fsync'd), so anything a caller acknowledges afterwards
(a witness's vote, a payer's transfer, a printed receipt id) survives kill -9.
Requests that arrive while a commit is in flight are grouped into the next
transaction (group commit).

Every row is verified with the pure rules before it is written: facts go
through ``LedgerState.ingest_*`` (signatures, quorum, referee panel), witness
locks and outgoing transfers have their payer signature checked. The
``balances`` table and the ``state_hash`` are rewritten in the same
transaction as the facts they fold, so a reader (``edgeswarm ledger``) always
sees a consistent snapshot.

The schema is versioned with ``PRAGMA user_version`` and upgraded by the
``MIGRATIONS`` list; a database newer than this code is refused. The
committee rule and credit policy are pinned in ``meta`` on first open so
``verify`` can re-check certificates offline, and a peer cannot silently
reopen its ledger under another network's rule.

Reading without the writer (CLI, while the peer runs): ``read_snapshot`` opens
the file read-only (WAL readers never block the writer) and ``verify_snapshot``
replays it through the pure rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import trio
import trio_asyncio

from peer.dirlock import exclusive_lock
from peer.logging_setup import reraise_lone_error
from protocols.certificate import Certificate
from protocols.checkpoint import (
    AccountSummary,
    Checkpoint,
    decode_accounts,
    encode_accounts,
    verify_chain,
)
from protocols.codec import decode, encode
from protocols.committee import CommitteeRule
from protocols.errors import DecodeError, ProtocolError
from protocols.ledger import CreditPolicy, IdentityProof, Transfer, open_transfer
from protocols.ledger_state import Adoption, FactKind, LedgerState
from protocols.proofs import ArbitratedReceipt, EquivocationProof, FraudProof, PayableReceipt
from protocols.receipt import Receipt
from protocols.signed import Signed
from protocols.signing import signing_bytes
from protocols.witness import LockRecord

log = logging.getLogger(__name__)

DB_NAME = "ledger.sqlite3"
# Requests waiting for the writer at most (one commit takes everything queued).
_QUEUE = 4096

# Index i upgrades user_version i -> i+1. Never edit a released entry: append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE facts (
        id BLOB PRIMARY KEY, kind INTEGER NOT NULL, data BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE locks (
        account TEXT NOT NULL, seq INTEGER NOT NULL, digest BLOB NOT NULL,
        transfer BLOB NOT NULL, PRIMARY KEY (account, seq)
    ) WITHOUT ROWID;
    CREATE TABLE outgoing (
        seq INTEGER PRIMARY KEY, transfer BLOB NOT NULL,
        receipt_kind INTEGER NOT NULL, receipt BLOB NOT NULL
    );
    CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL) WITHOUT ROWID;
    """,
    # v2: list facts of one kind (receipts for the CLI) without a full scan.
    "CREATE INDEX facts_by_kind ON facts (kind);",
    # v3: facts in arrival order (rowid), found through a unique index on id. A write then
    # appends its ~700-byte row instead of inserting it at a random place of a B-tree keyed
    # by a hash: about 5x less SQLite CPU per row, growing less with the table
    # (docs/benchmarks.md, issue 11).
    """
    CREATE TABLE facts_v3 (
        rid INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE,
        kind INTEGER NOT NULL, data BLOB NOT NULL
    );
    INSERT INTO facts_v3 (id, kind, data) SELECT id, kind, data FROM facts;
    DROP TABLE facts;
    ALTER TABLE facts_v3 RENAME TO facts;
    CREATE INDEX facts_by_kind ON facts (kind);
    """,
    # v4: checkpoints (issue 11). The adopted checkpoints' account rows (the checkpoint
    # itself is a fact), and the receipt ids / commitment digests paid by certificates a
    # checkpoint covers (their rows are deleted; a receipt paid there must not be paid again).
    """
    CREATE TABLE checkpoints (
        epoch INTEGER PRIMARY KEY, id BLOB NOT NULL, accounts BLOB NOT NULL
    );
    CREATE TABLE paid (key BLOB PRIMARY KEY) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The ledger database cannot be used (newer schema, other network, corrupt, closed)."""


class StoreBusy(StoreError):
    """The write queue is full: try again later (the store keeps running)."""


class LedgerInUse(StoreError):
    """Another process already writes this ledger (one writer per data dir)."""


def _writer_lock(db: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``<db>.lock`` while this process writes the ledger.

    Two writers of one ledger would share one account and could sign two transfers
    for one sequence number (an equivocation that gets the account banned), so a
    second writer is refused up front.
    """
    return exclusive_lock(
        db.with_name(db.name + ".lock"),
        lambda holder: LedgerInUse(
            f"the ledger {db} is in use by another edgeswarm process (pid {holder}); "
            "run one peer per data dir, or give this one its own --data-dir"
        ),
    )


# --- rule / policy pinning -----------------------------------------------------------------


def encode_rule(rule: CommitteeRule) -> bytes:
    return encode(
        {
            "beacon": rule.beacon,
            "pool": sorted(rule.pool),
            "fallback": sorted(rule.fallback),
            "f": rule.f,
            "panel": rule.referee_panel_size,
        }
    )


def decode_rule(data: bytes) -> CommitteeRule:
    raw = decode(data, max_size=1 << 22)
    return CommitteeRule(
        beacon=raw["beacon"],
        pool=frozenset(raw["pool"]),
        fallback=frozenset(raw["fallback"]),
        f=raw["f"],
        referee_panel_size=raw["panel"],
    )


_POLICY_INTS = (
    "base_limit",
    "earn_num",
    "earn_den",
    "max_limit",
    "pow_bits",
    "fraud_window_ms",
    "max_clock_skew_ms",
)


def encode_policy(policy: CreditPolicy) -> bytes:
    body: dict[str, Any] = {name: getattr(policy, name) for name in _POLICY_INTS}
    body["genesis"] = sorted(policy.genesis)
    return encode(body)


def decode_policy(data: bytes) -> CreditPolicy:
    raw = decode(data, max_size=1 << 22)
    return CreditPolicy(
        **{name: raw[name] for name in _POLICY_INTS}, genesis=frozenset(raw["genesis"])
    )


# --- parsing facts -------------------------------------------------------------------------


def parse_fact(kind: FactKind, data: bytes) -> tuple[Any, bytes]:
    """Parse one fact's bytes (shape only; ``LedgerState.ingest_*`` verifies) -> (obj, id)."""
    if kind is FactKind.RECEIPT:
        r = Receipt.from_bytes(data, verify=False)
        return r, r.receipt_id
    if kind is FactKind.ARBITRATED_RECEIPT:
        a = ArbitratedReceipt.from_bytes(data)
        return a, a.receipt_id
    if kind is FactKind.CERTIFICATE:
        c = Certificate.from_bytes(data)
        return c, c.digest
    if kind is FactKind.FRAUD_PROOF:
        f = FraudProof.from_bytes(data)
        return f, f.fact_id
    if kind is FactKind.EQUIVOCATION_PROOF:
        e = EquivocationProof.from_bytes(data)
        return e, e.fact_id
    if kind is FactKind.CHECKPOINT:
        cp = Checkpoint.from_bytes(data)
        return cp, cp.fact_id
    p = IdentityProof.from_bytes(data)
    return p, p.fact_id


def _parse_untrusted(kind: int, data: bytes) -> tuple[Any, bytes]:
    """``parse_fact`` for bytes from the network: any failure is a ``DecodeError``."""
    try:
        return parse_fact(FactKind(kind), data)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise DecodeError(f"ledger fact of kind {kind} does not parse: {exc!r}") from exc


def ingest_parsed(ledger: LedgerState, obj: Any) -> bool:
    """Verify ``obj`` with the pure rules and add it to ``ledger`` (True if new)."""
    if isinstance(obj, Receipt | ArbitratedReceipt):
        return ledger.ingest_payable(obj)
    if isinstance(obj, Certificate):
        return ledger.ingest_certificate(obj)
    if isinstance(obj, FraudProof):
        return ledger.ingest_fraud_proof(obj)
    if isinstance(obj, EquivocationProof):
        return ledger.ingest_equivocation_proof(obj)
    if isinstance(obj, IdentityProof):
        return ledger.ingest_identity_proof(obj)
    if isinstance(obj, Checkpoint):
        return ledger.ingest_checkpoint(obj)
    raise TypeError(f"not a ledger fact: {type(obj).__name__}")


def receipt_kind(receipt: PayableReceipt) -> FactKind:
    if isinstance(receipt, Receipt):
        return FactKind.RECEIPT
    if isinstance(receipt, ArbitratedReceipt):
        return FactKind.ARBITRATED_RECEIPT
    raise TypeError(f"not a receipt: {type(receipt).__name__}")


def fact_bytes(obj: Any) -> tuple[FactKind, bytes]:
    """(kind, bytes) of a fact object, the form the store and the wire carry."""
    kinds: tuple[tuple[type, FactKind], ...] = (
        (Receipt, FactKind.RECEIPT),
        (ArbitratedReceipt, FactKind.ARBITRATED_RECEIPT),
        (Certificate, FactKind.CERTIFICATE),
        (FraudProof, FactKind.FRAUD_PROOF),
        (EquivocationProof, FactKind.EQUIVOCATION_PROOF),
        (IdentityProof, FactKind.IDENTITY_PROOF),
        (Checkpoint, FactKind.CHECKPOINT),
    )
    for cls, kind in kinds:
        if isinstance(obj, cls):
            data: bytes = obj.to_bytes()  # type: ignore[attr-defined]
            return kind, data
    raise TypeError(f"not a ledger fact: {type(obj).__name__}")


def _receipt_from(kind: int, data: bytes) -> PayableReceipt:
    if kind == FactKind.RECEIPT:
        return Receipt.from_bytes(data)
    if kind == FactKind.ARBITRATED_RECEIPT:
        return ArbitratedReceipt.from_bytes(data)
    raise StoreError(f"outgoing row has receipt kind {kind}, expected 1 or 2")


# --- fact bytes on disk -------------------------------------------------------------------


class _DiskBlobs:
    """``FactBlobs`` backed by the ``facts`` table: facts not committed yet stay in memory
    (``pending``) until the writer's commit holds them, then they are read back by id.

    Reads use their own read-only connection (a WAL reader: it never blocks the writer
    and sees every committed row); each is a primary-key lookup (~10 µs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: dict[bytes, tuple[FactKind, bytes]] = {}
        self.pending_paid: set[bytes] = set()
        self.loading = False  # replaying rows that are already on disk
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def get(self, fact_id: bytes) -> tuple[FactKind, bytes] | None:
        held = self.pending.get(fact_id)
        if held is not None:
            return held
        rows = self._conn.execute(
            "SELECT kind, data FROM facts WHERE id = ?", (fact_id,)
        ).fetchall()
        return (FactKind(rows[0][0]), bytes(rows[0][1])) if rows else None

    def put(self, fact_id: bytes, kind: FactKind, data: bytes) -> None:
        if not self.loading:
            self.pending[fact_id] = (kind, data)

    def committed(self, fact_ids: Iterable[bytes]) -> None:
        for fid in fact_ids:
            self.pending.pop(fid, None)
        self.pending_paid.clear()

    def forget(self, fact_ids: Iterable[bytes]) -> None:
        for fid in fact_ids:  # the writer deletes the rows in the adopting transaction
            self.pending.pop(fid, None)

    def mark_paid(self, keys: Iterable[bytes]) -> None:
        self.pending_paid.update(keys)  # written by the adopting transaction

    def was_paid(self, key: bytes) -> bool:
        if key in self.pending_paid:
            return True
        return bool(self._conn.execute("SELECT 1 FROM paid WHERE key = ?", (key,)).fetchall())

    def of_kinds(self, kinds: Sequence[FactKind]) -> list[tuple[FactKind, bytes]]:
        """Every stored fact of these kinds (O(history): for the CLI and tests)."""
        marks = ",".join("?" * len(kinds))
        rows = self._conn.execute(
            f"SELECT kind, data FROM facts WHERE kind IN ({marks})", [int(k) for k in kinds]
        ).fetchall()
        out = [(FactKind(k), bytes(d)) for k, d in rows]
        return out + [v for v in self.pending.values() if v[0] in kinds]

    def rows(self) -> Iterator[tuple[bytes, int, bytes]]:
        """Every stored fact row, streamed (replay at start)."""
        for fid, kind, data in self._conn.execute("SELECT id, kind, data FROM facts"):
            yield bytes(fid), int(kind), bytes(data)

    def close(self) -> None:
        self._conn.close()


class _ShadowBlobs(_DiskBlobs):
    """The blobs of a copy of the ledger that adopts a checkpoint in a worker thread: the
    same database (its own read-only connection, made and used in that thread), the live
    ledger's uncommitted facts as they were when the copy started, and a record of what
    the copy forgot, marked paid and put, to hand over to the live blobs afterwards."""

    def __init__(self, path: Path, pending: dict[bytes, tuple[FactKind, bytes]]) -> None:
        super().__init__(path)
        self.pending = dict(pending)
        self.put_new: dict[bytes, tuple[FactKind, bytes]] = {}
        self.forgotten: set[bytes] = set()
        self.paid_new: set[bytes] = set()

    def put(self, fact_id: bytes, kind: FactKind, data: bytes) -> None:
        super().put(fact_id, kind, data)
        self.put_new[fact_id] = (kind, data)

    def forget(self, fact_ids: Iterable[bytes]) -> None:
        ids = set(fact_ids)
        super().forget(ids)
        self.forgotten |= ids

    def mark_paid(self, keys: Iterable[bytes]) -> None:
        keys = set(keys)
        super().mark_paid(keys)
        self.paid_new |= keys

    def hand_over(self, live: _DiskBlobs) -> None:
        for fid, (kind, data) in self.put_new.items():
            live.put(fid, kind, data)
        live.forget(self.forgotten)
        live.mark_paid(self.paid_new)


@dataclass
class _Shadow:
    """A copy of the ledger with a checkpoint adopted (or the error that refused it)."""

    ledger: LedgerState
    blobs: _ShadowBlobs
    adoption: Adoption | ProtocolError
    checkpoint_is_new: bool


def _adopt_in_copy(
    live: LedgerState,
    path: Path,
    pending: dict[bytes, tuple[FactKind, bytes]],
    paid: set[bytes],
    cp: Checkpoint,
    accounts: list[AccountSummary] | None,
) -> _Shadow:
    """(Worker thread.) Rebuild the ledger from its stored rows and ``pending`` facts onto
    its adopted checkpoint, then adopt ``cp`` there. Reads of ``live``: its rule, policy,
    adopted checkpoint and rows (replaced, never mutated, on the event loop)."""
    blobs = _ShadowBlobs(path, pending)
    blobs.pending_paid = set(paid)
    try:
        copy = LedgerState(live.rule, live.policy, blobs=blobs)
        base = live.checkpoint
        if base is not None:
            copy.restore_checkpoint(base, live.checkpoint_accounts())
        stored = ((FactKind(kind), data) for _fid, kind, data in blobs.rows())
        copy.replay_verified(stored)
        copy.replay_verified(pending.values())
        copy.take_changes()
        blobs.put_new.clear()  # nothing replayed is new
        try:
            is_new = not copy.has(cp.digest) and copy.ingest_checkpoint(cp)
            adoption: Adoption | ProtocolError = copy.adopt_checkpoint(cp, accounts)
        except ProtocolError as exc:
            return _Shadow(copy, blobs, exc, False)
        return _Shadow(copy, blobs, adoption, is_new)
    finally:
        blobs.close()


# --- the writer's requests -----------------------------------------------------------------


@dataclass
class _Request:
    facts: list[tuple[FactKind, Any, bytes]] = field(default_factory=list)  # kind, obj, id
    locks: list[LockRecord] = field(default_factory=list)
    outgoing: list[tuple[Signed[Transfer], PayableReceipt]] = field(default_factory=list)
    drop_outgoing: int | None = None
    dropped: int | None = None  # a pending transfer already forgotten in memory (add_nowait)
    # Rows of facts already verified and ingested by ``add_facts_nowait``.
    ready: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    # Facts from another peer: refuse those this peer has no reason to hold (see
    # ``LedgerState.check_relevant``), before their signatures are checked.
    relevant_to: str | None = None
    # Adopt this checkpoint (with its account rows, if given) after the facts above.
    adopt: tuple[Checkpoint, list[AccountSummary] | None] | None = None
    adoption: Adoption | None = None
    # The ledger copy that adopted ``adopt`` in a worker thread (see ``_adopt_off_loop``).
    shadow: _Shadow | None = None
    done: trio.Event = field(default_factory=trio.Event)
    results: list[bool | ProtocolError] = field(default_factory=list)
    error: BaseException | None = None


FactResult = bool | ProtocolError


class LedgerStore:
    """A ledger database plus its verified in-memory mirror. Made by ``open_ledger_store``."""

    def __init__(
        self,
        path: Path,
        db: aiosqlite.Connection,
        ledger: LedgerState,
        send: Any,
        blobs: _DiskBlobs,
    ) -> None:
        self.path = path
        self.ledger = ledger
        self._db = db
        self._send: trio.MemorySendChannel[_Request] = send
        self._blobs = blobs
        self._locks: dict[tuple[str, int], LockRecord] = {}
        self._outgoing: dict[int, tuple[Signed[Transfer], PayableReceipt]] = {}
        self._closed = False
        self.commits = 0  # transactions committed (for tests and benchmarks)
        # Where a checkpoint is adopted (a worker thread; tests wrap it to act meanwhile).
        self._to_thread: Any = trio.to_thread.run_sync

    @property
    def rule(self) -> CommitteeRule:
        return self.ledger.rule

    @property
    def policy(self) -> CreditPolicy:
        return self.ledger.policy

    # --- reads (memory) -------------------------------------------------------------------

    def locks(self) -> list[LockRecord]:
        """Every witness lock this peer has committed."""
        return list(self._locks.values())

    def outgoing(self) -> list[tuple[Signed[Transfer], PayableReceipt]]:
        """Transfers this peer signed and stored but has not seen certified, by seq."""
        return [self._outgoing[s] for s in sorted(self._outgoing)]

    def certificate(self, account: str, seq: int) -> Certificate | None:
        """The (canonical) certificate for ``account``'s ``seq``, read back by its digest."""
        digest = self.ledger.cert_digest(account, seq)
        item = None if digest is None else self.ledger.item(digest)
        return None if item is None else Certificate.from_bytes(item[1])

    def history_for(self, account: str, from_seq: int) -> list[Certificate]:
        """Certificates of ``account`` for seqs ``from_seq..`` (what a lagging witness lacks)."""
        out: list[Certificate] = []
        seq = from_seq
        while len(out) < 16 and (c := self.certificate(account, seq)) is not None:
            out.append(c)
            seq += 1
        return out

    def receipts(self) -> list[PayableReceipt]:
        """Every receipt (plain or arbitrated) held: the unpaid ones first, in arrival order,
        then the rest. Reads them all (O(history)): for the CLI and tests; a payer asks
        ``unpaid_for``."""
        kinds = (FactKind.RECEIPT, FactKind.ARBITRATED_RECEIPT)
        unpaid = [r for payer in self.ledger.payers_owing() for r in self.unpaid_for(payer)]
        first = {r.receipt_id for r in unpaid}
        rest = [_receipt_from(k, d) for k, d in self._blobs.of_kinds(kinds)]
        return unpaid + [r for r in rest if r.receipt_id not in first]

    def unpaid_for(self, payer: str) -> list[PayableReceipt]:
        """Receipts ``payer`` owes that no certificate pays, in arrival order (cost: those
        receipts only, from the ledger's per-payer index)."""
        out = []
        for rid in self.ledger.unpaid_for(payer):
            r = self.ledger.receipt(rid)
            if r is not None:
                out.append(r)
        return out

    # --- writes ---------------------------------------------------------------------------

    async def _submit(self, req: _Request) -> _Request:
        if self._closed:
            raise StoreError(f"ledger store {self.path} is closed")
        await self._send.send(req)
        await req.done.wait()
        if req.error is not None:
            raise StoreError(f"ledger write failed: {req.error}") from req.error
        return req

    async def add_facts(
        self, items: Iterable[tuple[FactKind, bytes]], *, relevant_to: str | None = None
    ) -> list[FactResult]:
        """Parse, verify and durably store facts; per item: True (new), False (known) or the
        ``ProtocolError`` that refused it (nothing is written for a refused item).

        ``relevant_to``: facts from another peer, for this account: each is first checked
        to be one it has a reason to hold (``IrrelevantFact`` otherwise, no signature
        checked). Items are taken in order: a certificate before the receipt it pays."""
        req = _Request(relevant_to=relevant_to)
        early: dict[int, ProtocolError] = {}
        for n, (kind, data) in enumerate(items):
            try:
                obj, fid = _parse_untrusted(kind, data)
            except ProtocolError as exc:
                early[n] = exc
                continue
            req.facts.append((FactKind(kind), obj, fid))
        done = await self._submit(req) if req.facts else req
        results = iter(done.results)
        total = len(req.facts) + len(early)
        return [early[n] if n in early else next(results) for n in range(total)]

    async def add(self, obj: Any, *, drop_outgoing: int | None = None) -> bool:
        """Store one fact object (Receipt, Certificate, FraudProof, ...); raises if invalid.

        ``drop_outgoing``: in the same transaction, forget our pending transfer with that
        seq (the certificate being stored pays it)."""
        kind, data = fact_bytes(obj)
        parsed, fid = parse_fact(kind, data)
        req = _Request(facts=[(kind, parsed, fid)], drop_outgoing=drop_outgoing)
        [result] = (await self._submit(req)).results
        if isinstance(result, ProtocolError):
            raise result
        return result

    def add_nowait(self, obj: Any, *, drop_outgoing: int | None = None) -> bool:
        """``add`` without waiting for the commit: verified and in memory now, on disk with
        the next commit (which is no later than that of any request queued after this).

        For a payer's own certificate: ``drop_outgoing`` forgets the pending transfer at
        once in memory, and its row leaves in the same commit as the certificate's. A crash
        before that commit keeps the transfer pending, so it is resent unchanged and
        certified again; a later transfer's row can never be durable without this one.
        Raises the ``ProtocolError`` that refused ``obj``, or ``StoreBusy``."""
        [result] = self.add_facts_nowait([fact_bytes(obj)], drop_outgoing=drop_outgoing)
        if isinstance(result, ProtocolError):
            raise result
        return result

    def add_facts_nowait(
        self, items: Iterable[tuple[FactKind, bytes]], *, drop_outgoing: int | None = None
    ) -> list[FactResult]:
        """Verify and ingest facts into memory *now*, and queue their rows without waiting.

        For facts nobody acknowledges (a witness learning a payer's history before it
        decides): a crash may lose them, and sync brings them back. The writer always
        commits them no later than any request queued after this call, and the
        stored balances never include a fact whose row is not in the same commit.
        """
        if self._closed:
            raise StoreError(f"ledger store {self.path} is closed")
        stats = self._send.statistics()
        if stats.current_buffer_used >= stats.max_buffer_size:
            # Refuse before anything reaches memory: the caller (a remote peer's request)
            # is told to come back; the store itself keeps running.
            raise StoreBusy(f"ledger write queue is full ({stats.max_buffer_size} requests)")
        req = _Request()
        out: list[FactResult] = []
        for kind, data in items:
            try:
                obj, fid = _parse_untrusted(kind, data)
                new = not self.ledger.has(fid) and ingest_parsed(self.ledger, obj)
            except ProtocolError as exc:
                out.append(exc)
                continue
            out.append(new)
            if new:
                item = self.ledger.item(fid)
                assert item is not None
                req.ready.append((fid, int(kind), item[1]))
        refused = any(isinstance(r, ProtocolError) for r in out)
        if drop_outgoing is not None and drop_outgoing in self._outgoing and not refused:
            del self._outgoing[drop_outgoing]
            req.dropped = drop_outgoing
        if req.ready or req.dropped is not None:
            self._send.send_nowait(req)  # room was checked above; nothing ran since
        return out

    async def put_lock(self, record: LockRecord, *, facts: Sequence[Any] = ()) -> None:
        """Commit a witness lock (and optional fact objects) durably; returns once fsync'd."""
        await self.put_locks([record], facts=facts)

    async def put_locks(self, records: Sequence[LockRecord], *, facts: Sequence[Any] = ()) -> None:
        """Commit witness locks (and optional fact objects) in one transaction; returns once
        fsync'd (a batch of pipelined transfers costs one fsync)."""
        for record in records:
            record.transfer.verify()
            held = self._locks.get((record.account, record.seq))
            if held is not None and held.digest != record.digest:
                raise StoreError(f"a different lock is stored for ({record.account}, {record.seq})")
        req = _Request(locks=list(records))
        for obj in facts:
            kind, data = fact_bytes(obj)
            parsed, fid = parse_fact(kind, data)
            req.facts.append((kind, parsed, fid))
        await self._submit(req)

    async def put_outgoing(self, transfer: Signed[Transfer], receipt: PayableReceipt) -> None:
        """Commit a transfer this peer signed, before any witness sees it (crash => resend it)."""
        await self.put_outgoing_many([(transfer, receipt)])

    async def put_outgoing_many(
        self, pending: Sequence[tuple[Signed[Transfer], PayableReceipt]]
    ) -> None:
        """Commit transfers this peer signed in one transaction (one fsync), before any
        witness sees them."""
        for transfer, receipt in pending:
            transfer.verify()
            held = self._outgoing.get(transfer.message.seq)
            if held is not None and held[0].digest != transfer.digest:
                raise StoreError(f"another transfer is stored for our seq {transfer.message.seq}")
            receipt_kind(receipt)
        await self._submit(_Request(outgoing=list(pending)))

    async def adopt_checkpoint(
        self, cp: Checkpoint, accounts: list[AccountSummary] | None = None
    ) -> Adoption:
        """Store ``cp`` (if new), make it this ledger's base and delete the facts it covers,
        in one fsync'd transaction. Raises the ``ProtocolError`` that refused it (e.g.
        ``NeedAccounts``: this ledger lacks facts, pass the checkpoint's account rows)."""
        req = await self._submit(_Request(adopt=(cp, accounts)))
        if req.results and isinstance(req.results[-1], ProtocolError):
            raise req.results[-1]
        assert req.adoption is not None
        return req.adoption

    def checkpoint_accounts(self, page: int, size: int) -> tuple[list[AccountSummary], int]:
        """One page of the adopted checkpoint's account rows and the number of pages."""
        rows = self.ledger.checkpoint_accounts()
        pages = max(1, -(-len(rows) // size))
        return rows[page * size : (page + 1) * size], pages

    def fact_count(self) -> int:
        """Rows in the facts table (what pruning bounds; for tests and benchmarks)."""
        return int(self._blobs._conn.execute("SELECT count(*) FROM facts").fetchone()[0])

    async def drop_outgoing(self, seq: int) -> None:
        """The transfer for ``seq`` is certified (its certificate is stored): forget it."""
        if seq in self._outgoing:
            await self._submit(_Request(drop_outgoing=seq))

    # --- the writer -----------------------------------------------------------------------

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> None:
        await trio_asyncio.aio_as_trio(self._db.execute)(sql, params)

    async def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            await trio_asyncio.aio_as_trio(self._db.executemany)(sql, rows)

    def _apply(
        self, batch: list[_Request], adoptions: list[Adoption]
    ) -> tuple[list[tuple[Any, ...]], ...]:
        """Verify each request against the rules (in memory); return the rows to write
        (and append the checkpoints adopted to ``adoptions``)."""
        fact_rows: list[tuple[Any, ...]] = []
        lock_rows: list[tuple[Any, ...]] = []
        out_rows: list[tuple[Any, ...]] = []
        drop_rows: list[tuple[Any, ...]] = []
        for req in batch:
            # A fact ingested by a nowait write may be gone by its commit: covered by a
            # checkpoint adopted since (pruned, or taken as known). It gets no row.
            fact_rows.extend(r for r in req.ready if self.ledger.has(r[0]))
            for kind, obj, fid in req.facts:
                if self.ledger.has(fid):
                    # Known id: nothing will be written, so skip the signature checks
                    # (gossip and sync deliver most facts more than once).
                    req.results.append(False)
                    continue
                try:
                    if req.relevant_to is not None:
                        self.ledger.check_relevant(obj, req.relevant_to)
                    new = ingest_parsed(self.ledger, obj)
                except ProtocolError as exc:
                    req.results.append(exc)
                    continue
                req.results.append(new)
                if new:
                    item = self.ledger.item(fid)
                    assert item is not None
                    fact_rows.append((fid, int(kind), item[1]))
            for r in req.locks:
                if (r.account, r.seq) not in self._locks:
                    self._locks[(r.account, r.seq)] = r
                    lock_rows.append((r.account, r.seq, r.digest, r.to_bytes()))
            for t, receipt in req.outgoing:
                seq = t.message.seq
                if seq not in self._outgoing:
                    self._outgoing[seq] = (t, receipt)
                    out_rows.append(
                        (seq, t.to_bytes(), int(receipt_kind(receipt)), receipt.to_bytes())  # type: ignore[attr-defined]
                    )
            if req.dropped is not None:
                drop_rows.append((req.dropped,))
            seq_done = req.drop_outgoing
            if seq_done is not None and seq_done in self._outgoing:
                del self._outgoing[seq_done]
                drop_rows.append((seq_done,))
            if req.adopt is not None and req.shadow is not None:
                self._take_shadow(req, req.shadow, fact_rows, adoptions)
            elif req.adopt is not None:
                cp, accounts = req.adopt
                try:
                    if not self.ledger.has(cp.digest) and self.ledger.ingest_checkpoint(cp):
                        fact_rows.append((cp.digest, int(FactKind.CHECKPOINT), cp.to_bytes()))
                    req.adoption = self.ledger.adopt_checkpoint(cp, accounts)
                except ProtocolError as exc:
                    req.results.append(exc)
                else:
                    adoptions.append(req.adoption)
                    # Covered seqs need no lock any more (one pass over the locks).
                    upto = {a.account: a.next_seq for a in req.adoption.accounts}
                    for k in [k for k in self._locks if k[1] < upto.get(k[0], 1)]:
                        del self._locks[k]
        return fact_rows, lock_rows, out_rows, drop_rows

    async def _adopt_off_loop(self, req: _Request) -> None:
        """Adopt ``req.adopt`` in a copy of the ledger built in a worker thread (re-indexing
        every fact held is seconds of CPU for a large ledger), while the event loop keeps
        serving from the live ledger. Facts the live ledger adds meanwhile (nowait writes:
        a witness's history, a payer's certificates) are journaled and replayed into the
        copy before it takes the live ledger's place (``_take_shadow``, in ``_apply``)."""
        assert req.adopt is not None
        cp, accounts = req.adopt
        live = self.ledger
        pending, paid = dict(self._blobs.pending), set(self._blobs.pending_paid)
        live.journal = []
        try:
            req.shadow = await self._to_thread(
                _adopt_in_copy, live, self._blobs.path, pending, paid, cp, accounts
            )
        except BaseException:
            live.journal = None
            raise

    def _take_shadow(
        self, req: _Request, shadow: _Shadow, fact_rows: list[Any], adoptions: list[Adoption]
    ) -> None:
        """(In ``_apply``.) Replay what the live ledger added since the copy started, then
        make the copy the live ledger, or keep the live one if the checkpoint was refused."""
        live = self.ledger
        journal, live.journal = live.journal or [], None
        if isinstance(shadow.adoption, ProtocolError):
            req.results.append(shadow.adoption)
            return
        copy = shadow.ledger
        copy.blobs = self._blobs  # reads on the event loop from now on
        shadow.blobs.hand_over(self._blobs)
        copy.replay_verified(journal)
        cp = shadow.adoption.checkpoint
        if shadow.checkpoint_is_new:
            fact_rows.append((cp.digest, int(FactKind.CHECKPOINT), cp.to_bytes()))
        live.take_state(copy)
        req.adoption = shadow.adoption
        adoptions.append(req.adoption)
        upto = {a.account: a.next_seq for a in req.adoption.accounts}
        for k in [k for k in self._locks if k[1] < upto.get(k[0], 1)]:
            del self._locks[k]

    async def _commit(self, batch: list[_Request]) -> None:
        first_adopt = next((req for req in batch if req.adopt is not None), None)
        if first_adopt is not None:
            await self._adopt_off_loop(first_adopt)
        adoptions: list[Adoption] = []
        fact_rows, lock_rows, out_rows, drop_rows = self._apply(batch, adoptions)
        if adoptions:
            # Facts that came earlier in this batch and that the checkpoint covers: no row,
            # and no bytes kept for them.
            unheld = {r[0] for r in fact_rows if not self.ledger.has(r[0])}
            if unheld:
                fact_rows = [r for r in fact_rows if r[0] not in unheld]
        self._blobs.forget(r[0] for req in batch for r in req.ready if not self.ledger.has(r[0]))
        # Only the accounts these facts moved (O(facts in the batch), not O(accounts)).
        changes = self.ledger.take_changes()
        balance_rows = [(a, b) for a, b in changes.items() if b]
        gone = [(a,) for a, b in changes.items() if not b]
        if adoptions:  # a checkpoint rebuilt the fold: write every balance again
            gone = [("",)]
            balance_rows = list(self.ledger.balances().items())
        if not (fact_rows or lock_rows or out_rows or drop_rows or adoptions):
            return
        statements: list[tuple[str, list[tuple[Any, ...]]]] = [
            ("INSERT OR IGNORE INTO facts (id, kind, data) VALUES (?, ?, ?)", fact_rows),
            (
                "INSERT OR IGNORE INTO locks (account, seq, digest, transfer) VALUES (?, ?, ?, ?)",
                lock_rows,
            ),
            (
                "INSERT OR IGNORE INTO outgoing (seq, transfer, receipt_kind, receipt) "
                "VALUES (?, ?, ?, ?)",
                out_rows,
            ),
            ("DELETE FROM outgoing WHERE seq = ?", drop_rows),
            *self._adoption_statements(adoptions),
            (
                "DELETE FROM balances WHERE account = ?"
                if not adoptions
                else "DELETE FROM balances WHERE account != ?",
                gone,
            ),
            ("INSERT OR REPLACE INTO balances (account, balance) VALUES (?, ?)", balance_rows),
        ]
        if fact_rows or adoptions:
            statements.append(
                (
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('state_hash', ?)",
                    [(self.ledger.state_hash(),)],
                )
            )
        statements = [(sql, rows) for sql, rows in statements if rows]
        run_in_thread = getattr(self._db, "_execute", None)
        if run_in_thread is not None:
            # One hop to aiosqlite's thread for the whole transaction: each awaited call
            # costs a thread round trip (~0.2 ms idle, several ms on a loaded box).
            await trio_asyncio.aio_as_trio(run_in_thread)(_transaction, self._db, statements)
        else:  # pragma: no cover - an aiosqlite without the internal hook
            await self._exec("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    await self._many(sql, rows)
                await self._exec("COMMIT")
            except BaseException:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._exec("ROLLBACK")
                raise
        self._blobs.committed(row[0] for row in fact_rows)
        self.commits += 1

    @staticmethod
    def _adoption_statements(
        adoptions: list[Adoption],
    ) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """Rows an adopted checkpoint changes, all in the transaction that stores it (so a
        crash keeps either the old facts or the checkpoint that covers them, never neither)."""
        if not adoptions:
            return []
        last = adoptions[-1]
        cp = last.checkpoint
        pruned = [(fid,) for a in adoptions for fid in a.pruned]
        paid = [(k,) for a in adoptions for k in a.tombstones]
        locks = [(r.account, r.next_seq) for r in last.accounts if r.next_seq > 1]
        accounts = encode(encode_accounts(last.accounts))
        return [
            ("DELETE FROM facts WHERE id = ?", pruned),
            ("INSERT OR IGNORE INTO paid (key) VALUES (?)", paid),
            ("DELETE FROM locks WHERE account = ? AND seq < ?", locks),
            ("DELETE FROM checkpoints WHERE epoch < ?", [(cp.epoch,)]),
            (
                "INSERT OR REPLACE INTO checkpoints (epoch, id, accounts) VALUES (?, ?, ?)",
                [(cp.epoch, cp.digest, accounts)],
            ),
        ]

    async def _writer(
        self, recv: trio.MemoryReceiveChannel[_Request], task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        async with recv:
            async for first in recv:
                batch = [first]
                # Drain everything queued (the channel bounds it): facts ingested by
                # add_facts_nowait are then always in the commit whose balances fold them.
                while True:
                    try:
                        batch.append(recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    # A commit in flight is finished even if the store is being closed:
                    # its callers are waiting to acknowledge what it holds.
                    with trio.CancelScope(shield=True):
                        await self._commit(batch)
                except BaseException as exc:
                    for req in batch:
                        req.error = exc
                    self._closed = True  # fail-stop: memory and disk may now differ
                    raise
                finally:
                    for req in batch:
                        req.done.set()


def _transaction(db: aiosqlite.Connection, statements: list[tuple[str, list[Any]]]) -> None:
    """Runs in aiosqlite's thread: one fsync'd transaction (synchronous=FULL)."""
    conn = db._conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --- opening -------------------------------------------------------------------------------


async def _migrate(db: aiosqlite.Connection, path: Path) -> int:
    aw = trio_asyncio.aio_as_trio
    cur = await aw(db.execute)("PRAGMA user_version")
    row = await aw(cur.fetchone)()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has ledger schema v{version}, this edgeswarm knows up to "
            f"v{SCHEMA_VERSION}: upgrade edgeswarm"
        )
    for v in range(version, SCHEMA_VERSION):
        await aw(db.execute)("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[v].split(";"):
                if stmt.strip():
                    await aw(db.execute)(stmt)
            await aw(db.execute)(f"PRAGMA user_version = {v + 1}")
            await aw(db.execute)("COMMIT")
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await aw(db.execute)("ROLLBACK")
            raise
        log.info("ledger %s migrated to schema v%d", path, v + 1)
    return SCHEMA_VERSION


async def _fetchall(db: aiosqlite.Connection, sql: str) -> list[Any]:
    aw = trio_asyncio.aio_as_trio
    cur = await aw(db.execute)(sql)
    rows = await aw(cur.fetchall)()
    await aw(cur.close)()
    return list(rows)


@asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[None]:
    """trio-asyncio's loop: reuse the caller's if one is open, else open one for the store."""
    if trio_asyncio.current_loop.get(None) is not None:
        yield
    else:
        async with trio_asyncio.open_loop():
            yield


@asynccontextmanager
async def open_ledger_store(
    path: Path,
    rule: CommitteeRule,
    policy: CreditPolicy | None = None,
) -> AsyncIterator[LedgerStore]:
    """Open (create, migrate) the ledger at ``path`` (a file, or a directory holding
    ``ledger.sqlite3``), replay and re-verify it, start the writer; close it all on exit."""
    policy = policy or CreditPolicy()
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / DB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    body_error: BaseException | None = None
    try:
        with _writer_lock(path):
            async with _open(path, rule, policy) as store:
                try:
                    yield store
                except BaseException as exc:
                    body_error = exc
                    raise
    except BaseExceptionGroup as group:
        # trio-asyncio's loop wraps errors in groups: hand a lone error back as itself.
        reraise_lone_error(group, body_error)
        raise


@asynccontextmanager
async def _open(
    path: Path, rule: CommitteeRule, policy: CreditPolicy
) -> AsyncIterator[LedgerStore]:
    aw = trio_asyncio.aio_as_trio
    async with _asyncio_loop():
        db = await aw(aiosqlite.connect)(str(path), isolation_level=None)
        try:
            await aw(db.execute)("PRAGMA journal_mode=WAL")
            # FULL: every commit fsyncs the WAL, so a committed row survives power loss.
            await aw(db.execute)("PRAGMA synchronous=FULL")
            await aw(db.execute)("PRAGMA busy_timeout=5000")
            await _migrate(db, path)
            meta = dict(await _fetchall(db, "SELECT key, value FROM meta"))
            for key, value in (("rule", encode_rule(rule)), ("policy", encode_policy(policy))):
                if key not in meta:
                    await aw(db.execute)(
                        "INSERT INTO meta (key, value) VALUES (?, ?)", (key, value)
                    )
                elif bytes(meta[key]) != value:
                    raise StoreError(
                        f"{path} was created for another network ({key} differs from the "
                        "configured one); use another data dir or the original settings"
                    )
            blobs = _DiskBlobs(path)
            try:
                ledger = LedgerState(rule, policy, blobs=blobs)
                send, recv = trio.open_memory_channel[_Request](_QUEUE)
                store = LedgerStore(path, db, ledger, send, blobs)
                _load(
                    store,
                    await _fetchall(
                        db,
                        "SELECT epoch, id, accounts FROM checkpoints ORDER BY epoch DESC LIMIT 1",
                    ),
                    await _fetchall(db, "SELECT account, seq, digest, transfer FROM locks"),
                    await _fetchall(
                        db, "SELECT seq, transfer, receipt_kind, receipt FROM outgoing"
                    ),
                )
                ledger.take_changes()  # what replay folded is what the table holds (checked next)
                stored = dict(await _fetchall(db, "SELECT account, balance FROM balances"))
                hashes = await _fetchall(db, "SELECT value FROM meta WHERE key = 'state_hash'")
                if stored != ledger.balances():
                    # Edited by hand or by a broken build: the fold of the facts is the truth.
                    log.warning("ledger %s: stored balances differ from the fold; rewriting", path)
                    await _rewrite_balances(db, ledger)
                elif len(ledger) and [bytes(h[0]) for h in hashes] != [ledger.state_hash()]:
                    # Written by a build with another state-hash definition (v1: sorted ids).
                    log.info("ledger %s: rewriting the stored state hash", path)
                    await _rewrite_balances(db, ledger)
                async with trio.open_nursery() as nursery:
                    await nursery.start(store._writer, recv)
                    try:
                        yield store
                    finally:
                        store._closed = True
                        send.close()  # the writer drains what is queued, then ends
            finally:
                blobs.close()
        finally:
            with trio.CancelScope(shield=True):
                await aw(db.close)()


async def _rewrite_balances(db: aiosqlite.Connection, ledger: LedgerState) -> None:
    aw = trio_asyncio.aio_as_trio
    await aw(db.execute)("BEGIN IMMEDIATE")
    await aw(db.execute)("DELETE FROM balances")
    await aw(db.executemany)(
        "INSERT INTO balances (account, balance) VALUES (?, ?)", list(ledger.balances().items())
    )
    await aw(db.execute)(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('state_hash', ?)", (ledger.state_hash(),)
    )
    await aw(db.execute)("COMMIT")


def _load(store: LedgerStore, checkpoint: list[Any], locks: list[Any], outgoing: list[Any]) -> None:
    """Replay stored rows through the pure rules (a row that fails is a corrupt database).

    The adopted checkpoint comes first (the facts it covers are gone; the rest fold onto
    it). Facts are streamed from disk and not copied into memory (they are there already)."""
    blobs = store._blobs
    blobs.loading = True
    try:
        for _epoch, cp_id, accounts in checkpoint:
            item = blobs.get(bytes(cp_id))
            try:
                if item is None:
                    raise StoreError("its checkpoint fact is missing")
                rows = decode_accounts(decode(bytes(accounts), max_size=1 << 30), limit=1 << 24)
                store.ledger.restore_checkpoint(Checkpoint.from_bytes(item[1]), rows)
            except (ProtocolError, StoreError) as exc:
                raise StoreError(f"{store.path}: the adopted checkpoint is invalid: {exc}") from exc
        for fid, kind, data in blobs.rows():
            try:
                obj, computed = parse_fact(FactKind(kind), data)
                ingest_parsed(store.ledger, obj)
            except (ProtocolError, ValueError) as exc:
                raise StoreError(
                    f"{store.path}: stored fact {fid.hex()[:16]} is invalid: {exc}"
                ) from exc
            if computed != fid:
                raise StoreError(f"{store.path}: stored fact {fid.hex()[:16]} has a wrong id")
    finally:
        blobs.loading = False
    for account, seq, digest, transfer in locks:
        record = LockRecord.from_bytes(bytes(transfer))
        if (record.account, record.seq, record.digest) != (account, seq, bytes(digest)):
            raise StoreError(f"{store.path}: lock ({account}, {seq}) does not match its transfer")
        store._locks[(account, seq)] = record
    for seq, transfer, kind, receipt in outgoing:
        t = open_transfer(bytes(transfer))
        if t.message.seq != seq:
            raise StoreError(f"{store.path}: outgoing row {seq} holds seq {t.message.seq}")
        store._outgoing[seq] = (t, _receipt_from(kind, bytes(receipt)))


# --- read-only access (CLI) ----------------------------------------------------------------


@dataclass(frozen=True)
class LedgerSnapshot:
    """Everything in a ledger database, read in one read transaction."""

    path: Path
    schema_version: int
    rule: CommitteeRule | None
    policy: CreditPolicy | None
    facts: list[tuple[bytes, int, bytes]]
    locks: list[tuple[str, int, bytes, bytes]]
    outgoing: list[tuple[int, bytes, int, bytes]]
    balances: dict[str, int]
    state_hash: bytes | None
    # The adopted checkpoint: (epoch, its fact id, its encoded account rows), if any.
    checkpoint: tuple[int, bytes, bytes] | None = None


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


def read_snapshot(path: Path) -> LedgerSnapshot:
    """Read a ledger without writing to it (safe while the peer runs: a WAL reader)."""
    path = Path(path)
    if path.is_dir():
        path = path / DB_NAME
    if not path.exists():
        raise StoreError(f"no ledger at {path} (has a peer with this data dir ever run?)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from exc
    try:
        conn.execute("BEGIN")  # one consistent snapshot across the selects
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema v{version}, this edgeswarm reads up to v{SCHEMA_VERSION}"
            )
        if version == 0:
            raise StoreError(f"{path} is not an edgeswarm ledger (schema version 0)")
        meta = {k: bytes(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        facts = [
            (bytes(i), int(k), bytes(d))
            for i, k, d in conn.execute("SELECT id, kind, data FROM facts ORDER BY id")
        ]
        locks = [
            (a, int(s), bytes(d), bytes(t))
            for a, s, d, t in conn.execute("SELECT account, seq, digest, transfer FROM locks")
        ]
        outgoing = [
            (int(s), bytes(t), int(k), bytes(r))
            for s, t, k, r in conn.execute(
                "SELECT seq, transfer, receipt_kind, receipt FROM outgoing"
            )
        ]
        balances = {a: int(b) for a, b in conn.execute("SELECT account, balance FROM balances")}
        checkpoint = None
        if version >= 4:
            for e, i, acc in conn.execute(
                "SELECT epoch, id, accounts FROM checkpoints ORDER BY epoch DESC LIMIT 1"
            ):
                checkpoint = (int(e), bytes(i), bytes(acc))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()
    rule = decode_rule(meta["rule"]) if "rule" in meta else None
    policy = decode_policy(meta["policy"]) if "policy" in meta else None
    return LedgerSnapshot(
        path,
        version,
        rule,
        policy,
        facts,
        locks,
        outgoing,
        balances,
        meta.get("state_hash"),
        checkpoint,
    )


@dataclass
class VerifyReport:
    """What ``verify_snapshot`` found: ``problems`` is empty for a sound ledger."""

    facts: int = 0
    locks: int = 0
    outgoing: int = 0
    problems: list[str] = field(default_factory=list)
    ledger: LedgerState | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_snapshot(snap: LedgerSnapshot) -> VerifyReport:
    """Re-check every signature, id, lock and the fold; list every problem found."""
    report = VerifyReport(facts=len(snap.facts), locks=len(snap.locks), outgoing=len(snap.outgoing))
    p = report.problems
    if snap.rule is None or snap.policy is None:
        p.append("meta has no committee rule / credit policy: certificates cannot be checked")
        return report
    ledger = LedgerState(snap.rule, snap.policy)
    report.ledger = ledger
    if not _verify_checkpoints(snap, ledger, p):
        return report
    for fid, kind, data in snap.facts:
        short = fid.hex()[:16]
        try:
            obj, computed = parse_fact(FactKind(kind), data)
            ingest_parsed(ledger, obj)
        except (ProtocolError, ValueError) as exc:
            p.append(f"fact {short} (kind {kind}) does not verify: {exc}")
            continue
        if computed != fid:
            p.append(f"fact {short} is stored under a wrong id ({computed.hex()[:16]})")
    for account, seq, digest, transfer in snap.locks:
        try:
            record = LockRecord.from_bytes(transfer)
        except ProtocolError as exc:
            p.append(f"lock ({account}, {seq}) does not verify: {exc}")
            continue
        if (record.account, record.seq, record.digest) != (account, seq, digest):
            p.append(f"lock ({account}, {seq}) does not match the transfer it holds")
    for seq, transfer, kind, receipt in snap.outgoing:
        try:
            t = open_transfer(transfer)
            _receipt_from(kind, receipt)
        except (ProtocolError, StoreError) as exc:
            p.append(f"outgoing transfer {seq} does not verify: {exc}")
            continue
        if t.message.seq != seq:
            p.append(f"outgoing row {seq} holds a transfer for seq {t.message.seq}")
    folded = ledger.balances()
    if folded != snap.balances:
        accounts = sorted(set(folded) | set(snap.balances))
        bad = [a for a in accounts if folded.get(a, 0) != snap.balances.get(a, 0)]
        p.append(
            f"stored balances differ from the fold of the certificates for {len(bad)} "
            f"account(s), e.g. {bad[0]}: stored {snap.balances.get(bad[0], 0)}, "
            f"fold {folded.get(bad[0], 0)}"
        )
    if sum(folded.values()) != 0:
        p.append(f"balances sum to {sum(folded.values())}, not 0")
    if snap.facts and snap.state_hash not in (ledger.state_hash(), _v1_state_hash(snap.facts)):
        p.append("stored state hash differs from the hash of the stored facts")
    for account, seq in ledger.conflicts():
        p.append(f"{account} seq {seq} has two certificates (more than f byzantine witnesses)")
    return report


def _verify_checkpoints(snap: LedgerSnapshot, ledger: LedgerState, p: list[str]) -> bool:
    """Walk the checkpoint chain back to the first (each signed by a quorum of its epoch's
    committee, each naming the one before) and start ``ledger`` from the adopted one.
    False when the facts cannot be checked on top of it."""
    assert snap.rule is not None
    chain: list[Checkpoint] = []
    for fid, kind, data in snap.facts:
        if kind == FactKind.CHECKPOINT:
            try:
                chain.append(Checkpoint.from_bytes(data))
            except ProtocolError as exc:
                p.append(f"checkpoint {fid.hex()[:16]} does not parse: {exc}")
                return False
    chain.sort(key=lambda c: c.epoch)
    try:
        verify_chain(chain, snap.rule)
    except ProtocolError as exc:
        p.append(f"checkpoint chain does not verify: {exc}")
        return False
    if snap.checkpoint is None:
        return True
    epoch, cp_id, accounts = snap.checkpoint
    held = {c.digest: c for c in chain}
    if cp_id not in held or held[cp_id].epoch != epoch:
        p.append(f"the adopted checkpoint {epoch} is not in the chain held")
        return False
    try:
        rows = decode_accounts(decode(accounts, max_size=1 << 30), limit=1 << 24)
        ledger.restore_checkpoint(held[cp_id], rows)
    except ProtocolError as exc:
        p.append(f"the adopted checkpoint {epoch} does not verify: {exc}")
        return False
    return True


def _v1_state_hash(facts: list[tuple[bytes, int, bytes]]) -> bytes:
    """The state hash as builds before the set digest wrote it (sha256 over sorted ids);
    a peer rewrites it in the new form the next time it opens its ledger."""
    h = hashlib.sha256(signing_bytes("edgeswarm/ledger-state/v1", len(facts).to_bytes(8, "big")))
    for fid in sorted(f[0] for f in facts):
        h.update(fid)
    return h.digest()


def format_credits(micro: int) -> str:
    """Micro-credits as a credits string with 6 decimals."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


__all__ = [
    "DB_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "LedgerSnapshot",
    "LedgerStore",
    "StoreError",
    "VerifyReport",
    "db_path",
    "fact_bytes",
    "format_credits",
    "open_ledger_store",
    "parse_fact",
    "read_snapshot",
    "receipt_kind",
    "verify_snapshot",
]
