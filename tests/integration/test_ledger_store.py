"""The SQLite ledger store: round-trip, verify-before-write, schema versions, reopen, verify."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
import trio
from settlement_helpers import (
    certify_offline,
    key,
    make_receipt,
    make_transfer,
    pid,
    policy,
    rule_for,
)

from peer import ledger_store
from peer.ledger_store import (
    DB_NAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    StoreBusy,
    StoreError,
    open_ledger_store,
    read_snapshot,
    verify_snapshot,
)
from protocols.errors import SignatureError, ValidationError
from protocols.ledger_state import FactKind
from protocols.receipt import Receipt
from protocols.signed import Signed
from protocols.witness import LockRecord

WITNESSES = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESSES)
POLICY = policy()
PAYER, PAYEE = key(1), key(2)


def _certificates(n: int) -> tuple[list[Receipt], list]:
    receipts, certs = [], []
    for seq in range(1, n + 1):
        r = make_receipt(PAYER, PAYEE, 1000 * seq, seq)
        t = make_transfer(PAYER, r, seq)
        certs.append(certify_offline(WITNESSES, RULE, POLICY, t, r, certs))
        receipts.append(r)
    return receipts, certs


async def test_round_trip_and_reopen(tmp_path: Path) -> None:
    receipts, certs = _certificates(3)
    lock = LockRecord(make_transfer(key(3), make_receipt(key(3), PAYEE, 5, 99), 1))
    extra = make_receipt(PAYER, PAYEE, 7, 50)
    out_t = make_transfer(PAYER, extra, 4)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert await store.add(receipts[0]) is True
        assert await store.add(receipts[0]) is False  # known facts are not new
        results = await store.add_facts(
            [(FactKind.RECEIPT, r.to_bytes()) for r in receipts[1:]]
            + [(FactKind.CERTIFICATE, c.to_bytes()) for c in certs]
        )
        assert results == [True] * 5
        await store.put_lock(lock)
        await store.put_outgoing(out_t, extra)
        balances, state_hash = store.ledger.balances(), store.ledger.state_hash()
        assert balances == {pid(PAYER): -6000, pid(PAYEE): 6000}
        assert store.history_for(pid(PAYER), 2) == certs[1:]
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert store.ledger.balances() == balances
        assert store.ledger.state_hash() == state_hash
        assert store.ledger.next_seq(pid(PAYER)) == 4
        assert [r.digest for r in store.locks()] == [lock.digest]
        [(t, r)] = store.outgoing()
        assert t.digest == out_t.digest and r.receipt_id == extra.receipt_id
        assert {x.receipt_id for x in store.receipts()} == {r.receipt_id for r in receipts}
        await store.drop_outgoing(4)
        assert store.outgoing() == []
    snap = read_snapshot(tmp_path)
    assert snap.schema_version == SCHEMA_VERSION
    assert snap.balances == balances and snap.state_hash == state_hash
    assert snap.outgoing == []
    report = verify_snapshot(snap)
    assert report.ok, report.problems
    assert (report.facts, report.locks) == (6, 1)


async def test_forged_receipt_is_refused_and_not_written(tmp_path: Path) -> None:
    good = make_receipt(PAYER, PAYEE, 1000, 1)
    # The requester's acceptance of another commitment, glued to this one: a forgery.
    other = make_receipt(PAYER, PAYEE, 1, 2)
    forged = Receipt(commitment=good.commitment, acceptance=other.acceptance)
    # A commitment whose price was raised after the executor signed it.
    env = dataclasses.replace(
        good.commitment.envelope,
        body=good.commitment.envelope.body.replace(b"\x19\x03\xe8", b"\x19\x27\x10"),
    )
    tampered = Receipt(
        commitment=Signed(dataclasses.replace(good.commitment.message, price=10_000), env),
        acceptance=good.acceptance,
    )
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        results = await store.add_facts(
            [
                (FactKind.RECEIPT, forged.to_bytes()),
                (FactKind.RECEIPT, tampered.to_bytes()),
                (FactKind.RECEIPT, b"\xa0"),
                (FactKind.RECEIPT, good.to_bytes()),
            ]
        )
        assert isinstance(results[0], SignatureError)
        assert isinstance(results[1], SignatureError)
        assert not isinstance(results[2], bool)
        assert results[3] is True
        with pytest.raises(SignatureError):
            await store.add(forged)
        assert len(store.ledger) == 1
    snap = read_snapshot(tmp_path)
    assert [f[0] for f in snap.facts] == [good.receipt_id]


async def test_certificate_with_too_few_votes_is_refused(tmp_path: Path) -> None:
    _, [cert] = _certificates(1)
    short = dataclasses.replace(cert, votes=cert.votes[:2])
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        [result] = await store.add_facts([(FactKind.CERTIFICATE, short.to_bytes())])
        assert not isinstance(result, bool) and "quorum" in str(result)
        assert store.ledger.balances() == {}


async def test_conflicting_lock_and_outgoing_are_refused(tmp_path: Path) -> None:
    a = make_receipt(PAYER, PAYEE, 10, 1)
    t1, t2 = make_transfer(PAYER, a, 1, time_ms=1000), make_transfer(PAYER, a, 1, time_ms=2000)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        await store.put_lock(LockRecord(t1))
        await store.put_lock(LockRecord(t1))  # the same lock again is harmless
        with pytest.raises(StoreError, match="different lock"):
            await store.put_lock(LockRecord(t2))
        await store.put_outgoing(t1, a)
        with pytest.raises(StoreError, match="another transfer"):
            await store.put_outgoing(t2, a)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert [r.digest for r in store.locks()] == [t1.digest]


async def test_group_commit_batches_concurrent_writers(tmp_path: Path) -> None:
    receipts = [make_receipt(PAYER, PAYEE, 1, i) for i in range(200)]
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        async with trio.open_nursery() as nursery:
            for r in receipts:
                nursery.start_soon(store.add, r)
        assert len(store.ledger) == 200
        assert store.commits < 50  # many writers share one fsync'd transaction
    assert len(read_snapshot(tmp_path).facts) == 200


async def test_schema_migration_and_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    with sqlite3.connect(path) as conn:  # a v1 database, as the first release wrote it
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        await store.add(make_receipt(PAYER, PAYEE, 1, 1))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "facts_by_kind" in names
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="upgrade edgeswarm"):
        async with open_ledger_store(tmp_path, RULE, POLICY):
            pass


async def test_other_network_rule_is_refused(tmp_path: Path) -> None:
    async with open_ledger_store(tmp_path, RULE, POLICY):
        pass
    with pytest.raises(StoreError, match="another network"):
        async with open_ledger_store(tmp_path, rule_for([*WITNESSES[:3], key(9)]), POLICY):
            pass


async def test_verify_finds_tampering(tmp_path: Path) -> None:
    receipts, certs = _certificates(2)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        for fact in [*receipts, *certs]:
            await store.add(fact)
    assert verify_snapshot(read_snapshot(tmp_path)).ok
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE balances SET balance = balance + 5 WHERE account = ?", (pid(PAYEE),))
        row = conn.execute("SELECT id, data FROM facts WHERE kind = 3 LIMIT 1").fetchone()
        data = bytearray(row[1])
        data[-5] ^= 1  # flip one bit inside a vote signature
        conn.execute("UPDATE facts SET data = ? WHERE id = ?", (bytes(data), row[0]))
    report = verify_snapshot(read_snapshot(tmp_path))
    text = "\n".join(report.problems)
    assert "does not verify" in text and "stored balances differ" in text
    with pytest.raises(StoreError, match="invalid"):
        async with open_ledger_store(tmp_path, RULE, POLICY):
            pass


def test_read_snapshot_of_missing_ledger(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no ledger"):
        read_snapshot(tmp_path)


async def test_write_behind_facts_commit_with_the_next_write(tmp_path: Path) -> None:
    _, certs = _certificates(2)
    lock = LockRecord(make_transfer(PAYER, make_receipt(PAYER, PAYEE, 5, 77), 3))
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        results = store.add_facts_nowait(
            [(FactKind.CERTIFICATE, c.to_bytes()) for c in certs] + [(FactKind.RECEIPT, b"\x00")]
        )
        assert results[:2] == [True, True] and not isinstance(results[2], bool)
        assert store.ledger.next_seq(pid(PAYER)) == 3  # usable at once, before any fsync
        await store.put_lock(lock)  # queued after them: its commit holds them too
        assert store.commits <= 2
    snap = read_snapshot(tmp_path)
    assert {c.digest for c in certs} <= {f[0] for f in snap.facts}
    assert verify_snapshot(snap).ok


async def test_a_payers_certificate_is_durable_before_its_next_transfer(tmp_path: Path) -> None:
    """``add_nowait(cert, drop_outgoing=seq)``: the pending transfer is forgotten in memory
    at once, and on disk the certificate and the drop land no later than the next
    transfer's row: a durable seq n+1 never exists without seq n's certificate (else a
    crash would leave n pending with n+1 signed). A refused certificate drops nothing."""
    receipts, certs = _certificates(2)
    t1, t2 = certs[0].transfer, certs[1].transfer
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        await store.put_outgoing(t1, receipts[0])
        forged = dataclasses.replace(certs[0], votes=certs[0].votes[:1])
        with pytest.raises(ValidationError, match="quorum"):
            store.add_nowait(forged, drop_outgoing=1)
        assert [t.message.seq for t, _ in store.outgoing()] == [1]
        assert store.add_nowait(certs[0], drop_outgoing=1) is True
        assert store.outgoing() == []  # at once, in memory
        assert store.ledger.next_seq(pid(PAYER)) == 2
        await store.put_outgoing(t2, receipts[1])  # queued after: commits no earlier
        snap = read_snapshot(tmp_path)
        assert [row[0] for row in snap.outgoing] == [2]
        assert certs[0].digest in {f[0] for f in snap.facts}


async def test_a_second_writer_of_one_ledger_is_refused(tmp_path: Path) -> None:
    # Two writers would share one account and could sign two transfers for one seq.
    from peer.ledger_store import LedgerInUse

    async with open_ledger_store(tmp_path, RULE, POLICY):
        with pytest.raises(LedgerInUse, match="in use by another edgeswarm process"):
            async with open_ledger_store(tmp_path, RULE, POLICY):
                pass  # pragma: no cover - never opened
    async with open_ledger_store(tmp_path, RULE, POLICY):  # free again once closed
        pass


async def test_a_full_write_queue_refuses_and_the_store_keeps_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remote input (a witness learning history) can fill the queue: it is refused before it
    reaches memory, and the store goes on (it used to shut down for good)."""
    monkeypatch.setattr(ledger_store, "_QUEUE", 4)
    receipts = [make_receipt(PAYER, PAYEE, 10, 700 + n) for n in range(8)]
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        # No checkpoint between the calls: the writer cannot drain the queue (it takes
        # one request straight away, 4 wait in the queue).
        refused = None
        for r in receipts[:7]:
            try:
                assert store.add_facts_nowait([(FactKind.RECEIPT, r.to_bytes())]) == [True]
            except StoreBusy as exc:
                assert "queue is full" in str(exc)
                refused = r
                break
        assert refused is receipts[5]
        assert not store.ledger.has(refused.receipt_id)  # nothing half-taken
        assert await store.add(receipts[7]) is True  # still open, still writing
        assert await store.add(refused) is True
        receipts = [*receipts[:6], receipts[7]]
    ids = {f[0] for f in read_snapshot(tmp_path).facts}
    assert {r.receipt_id for r in receipts} <= ids


async def test_facts_are_read_back_from_disk_and_indexed_per_account(tmp_path: Path) -> None:
    receipts, certs = _certificates(3)
    owed = make_receipt(PAYER, PAYEE, 9, 800)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        await store.add_facts([(FactKind.RECEIPT, r.to_bytes()) for r in [*receipts, owed]])
        assert [r.receipt_id for r in store.unpaid_for(pid(PAYER))] == [
            r.receipt_id for r in [*receipts, owed]
        ]
        await store.add_facts([(FactKind.CERTIFICATE, c.to_bytes()) for c in certs])
        assert store._blobs.pending == {}  # committed: memory keeps no fact bytes
        assert [r.receipt_id for r in store.unpaid_for(pid(PAYER))] == [owed.receipt_id]
        assert store.certificate(pid(PAYER), 2) == certs[1]
        assert store.ledger.item(certs[0].digest) == (FactKind.CERTIFICATE, certs[0].to_bytes())
        hash_before = store.ledger.state_hash()
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert store.ledger.state_hash() == hash_before
        assert [r.receipt_id for r in store.unpaid_for(pid(PAYER))] == [owed.receipt_id]
        assert store.ledger.earned_from(pid(PAYEE), 10**13) == {pid(PAYER): 6000}
    snap = read_snapshot(tmp_path)
    assert snap.state_hash == hash_before and verify_snapshot(snap).ok


async def test_concurrent_witness_locks_share_fsyncs(tmp_path: Path) -> None:
    """Group commit: 40 locks asked for at once (40 payers' votes) take a few fsync'd
    transactions, not 40, and each caller returns only once its lock is committed."""
    payers = [key(3000 + i) for i in range(40)]
    records = [
        LockRecord(make_transfer(p, make_receipt(p, PAYEE, 5, 900 + i), 1))
        for i, p in enumerate(payers)
    ]
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        before = store.commits
        done: list[int] = []

        async def lock(i: int) -> None:
            await store.put_lock(records[i])
            done.append(store.commits)  # the commit that holds it had already happened

        async with trio.open_nursery() as nursery:
            for i in range(len(records)):
                nursery.start_soon(lock, i)
        assert len(done) == 40 and min(done) > before
        assert store.commits - before <= 3, store.commits - before
    stored = {(a, s) for a, s, _, _ in read_snapshot(tmp_path).locks}
    assert stored == {(r.account, r.seq) for r in records}


async def test_a_ledger_from_before_the_set_digest_verifies_and_is_upgraded(tmp_path: Path) -> None:
    """A v1 state hash (sha256 over the sorted ids) still verifies; reopening rewrites it."""
    import hashlib

    from protocols.signing import signing_bytes

    receipts, certs = _certificates(2)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        await store.add_facts([(FactKind.RECEIPT, r.to_bytes()) for r in receipts])
        await store.add_facts([(FactKind.CERTIFICATE, c.to_bytes()) for c in certs])
        new_hash = store.ledger.state_hash()
    ids = sorted(f[0] for f in read_snapshot(tmp_path).facts)
    h = hashlib.sha256(signing_bytes("edgeswarm/ledger-state/v1", len(ids).to_bytes(8, "big")))
    for fid in ids:
        h.update(fid)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'state_hash'", (h.digest(),))
    assert verify_snapshot(read_snapshot(tmp_path)).ok
    async with open_ledger_store(tmp_path, RULE, POLICY):
        pass
    assert read_snapshot(tmp_path).state_hash == new_hash


async def test_a_v2_ledger_keeps_its_facts_through_the_later_migrations(tmp_path: Path) -> None:
    receipts = [make_receipt(PAYER, PAYEE, 1, 1000 + n) for n in range(3)]
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # v2: facts keyed by id (WITHOUT ROWID)
        conn.executescript(MIGRATIONS[0])
        conn.executescript(MIGRATIONS[1])
        conn.execute("PRAGMA user_version = 2")
        conn.executemany(
            "INSERT INTO facts (id, kind, data) VALUES (?, ?, ?)",
            [(r.receipt_id, int(FactKind.RECEIPT), r.to_bytes()) for r in receipts],
        )
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert all(store.ledger.has(r.receipt_id) for r in receipts)
        assert store.ledger.item(receipts[0].receipt_id) == (
            FactKind.RECEIPT,
            receipts[0].to_bytes(),
        )
        assert await store.add(make_receipt(PAYER, PAYEE, 1, 2000))
        assert not await store.add(receipts[1])  # the unique id still holds
    snap = read_snapshot(tmp_path)
    assert snap.schema_version == SCHEMA_VERSION >= 3
    assert len(snap.facts) == 4 and verify_snapshot(snap).ok
