"""Checkpoints in the SQLite store: pruning bounds the rows, reopen and verify after pruning."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nacl.signing
import pytest
from settlement_helpers import key, make_receipt, make_transfer, pid, policy, rule_for

from peer import ledger_store
from peer.ledger_store import StoreError, open_ledger_store, read_snapshot, verify_snapshot
from peer.settlement.checkpointer import Checkpointer, CheckpointVoteFiles
from protocols.certificate import Certificate, make_certificate, sign_vote
from protocols.checkpoint import (
    Checkpoint,
    CheckpointHeader,
    checkpoint_committee,
    make_checkpoint,
    open_checkpoint_vote,
    rule_id,
    sign_checkpoint,
    verify_chain,
)
from protocols.committee import CommitteeRule
from protocols.errors import ValidationError
from protocols.ledger_rpc import SignCheckpoint
from protocols.ledger_state import FactKind, LedgerState
from protocols.receipt import Receipt
from protocols.witness import LockRecord

WITNESSES = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESSES)
POLICY = policy()
PAYERS = [key(1), key(3)]
PAYEE = key(2)
T0 = 1_700_000_000_000


def certified(
    payer: nacl.signing.SigningKey, seq: int, job: int, time_ms: int, rule: CommitteeRule = RULE
) -> tuple[Receipt, Certificate]:
    r = make_receipt(payer, PAYEE, 10 + job % 7, job)
    t = make_transfer(payer, r, seq, time_ms=time_ms)
    committee = rule.committee_for(pid(payer))
    votes = [sign_vote(k, t) for k in WITNESSES if pid(k) in committee][: committee.quorum]
    return r, make_certificate(t, votes)


def signed(header: CheckpointHeader, rule: CommitteeRule = RULE) -> Checkpoint:
    committee = checkpoint_committee(rule, header.epoch)
    votes = [sign_checkpoint(k, header) for k in WITNESSES if pid(k) in committee]
    return make_checkpoint(header, votes[: committee.quorum])


def facts_rows(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path / "ledger.sqlite3")
    try:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("facts", "locks", "checkpoints", "balances")
        }
    finally:
        conn.close()


async def test_rows_stay_bounded_as_checkpoints_prune_and_the_ledger_reopens(
    tmp_path: Path,
) -> None:
    """Ten rounds of 60 payments with a checkpoint after each: the facts table holds the
    last round's facts plus one checkpoint per round, never the history."""
    job = 0
    seqs = dict.fromkeys(PAYERS, 1)
    rows_after: list[int] = []
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        for rnd in range(10):
            items = []
            for i in range(30):
                for p in PAYERS:
                    job += 1
                    r, c = certified(p, seqs[p], job, T0 + rnd * 10_000 + i)
                    seqs[p] += 1
                    items += [
                        (FactKind.CERTIFICATE, c.to_bytes()),
                        (FactKind.RECEIPT, r.to_bytes()),
                    ]
                    if i == 0:  # a witness lock for that seq (pruned with it)
                        await store.put_lock(LockRecord(c.transfer))
            assert all(x is True for x in await store.add_facts(items))
            balances = store.ledger.balances()
            header, _ = store.ledger.checkpoint_draft(T0 + rnd * 10_000 + 10_000, rule_id(RULE))
            adoption = await store.adopt_checkpoint(signed(header))
            assert len(adoption.pruned) == 120
            assert store.ledger.balances() == balances
            assert store.ledger.next_seq(pid(PAYERS[0])) == seqs[PAYERS[0]]
            rows_after.append(store.fact_count())
        state = store.ledger.state_hash()
        balances = store.ledger.balances()
        # A receipt paid before a checkpoint, delivered again, is not held (nor owed) again.
        old_r, old_c = certified(PAYERS[0], 1, 1, T0)
        assert await store.add_facts(
            [(FactKind.RECEIPT, old_r.to_bytes()), (FactKind.CERTIFICATE, old_c.to_bytes())]
        ) == [False, False]
        assert store.ledger.unpaid_for(pid(PAYERS[0])) == []
    # Only the checkpoints remain as facts (one per round); locks of covered seqs are gone.
    assert rows_after == list(range(1, 11))
    rows = facts_rows(tmp_path)
    assert rows["facts"] == 10 and rows["locks"] == 0 and rows["checkpoints"] == 1
    # Reopen: the adopted checkpoint is restored and the state is the same.
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert store.ledger.state_hash() == state
        assert store.ledger.balances() == balances
        assert store.ledger.checkpoint is not None and store.ledger.checkpoint.epoch == 10
        r, c = certified(PAYERS[0], seqs[PAYERS[0]], 10**6, T0 + 200_000)
        assert await store.add_facts(
            [(FactKind.CERTIFICATE, c.to_bytes()), (FactKind.RECEIPT, r.to_bytes())]
        ) == [True, True]
    report = verify_snapshot(read_snapshot(tmp_path))
    assert report.ok, report.problems


async def test_verify_reports_a_broken_checkpoint_chain(tmp_path: Path) -> None:
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        _r, c = certified(PAYERS[0], 1, 1, T0)
        await store.add_facts([(FactKind.CERTIFICATE, c.to_bytes())])
        header, _ = store.ledger.checkpoint_draft(T0 + 1, rule_id(RULE))
        await store.adopt_checkpoint(signed(header))
    assert verify_snapshot(read_snapshot(tmp_path)).ok
    # Drop the checkpoint's votes to one (below quorum) behind the store's back.
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    cp = signed(header)
    weak = make_checkpoint(cp.header, cp.votes[:1])
    conn.execute("UPDATE facts SET data = ? WHERE kind = ?", (weak.to_bytes(), 7))
    conn.commit()
    conn.close()
    report = verify_snapshot(read_snapshot(tmp_path))
    assert not report.ok
    assert "checkpoint chain does not verify" in report.problems[0]


async def test_a_prune_that_dies_before_its_commit_leaves_the_old_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable order: the checkpoint, the deletions and the balances are one transaction. A
    failure after the deletions ran but before the commit (a crash there) rolls all of it
    back: the ledger reopens with every fact and no checkpoint, and can adopt it again."""
    items = []
    for seq in range(1, 21):
        r, c = certified(PAYERS[0], seq, seq, T0 + seq)
        items += [(FactKind.CERTIFICATE, c.to_bytes()), (FactKind.RECEIPT, r.to_bytes())]
    real = ledger_store._transaction

    def dies_after_deleting(db: Any, statements: list[tuple[str, list[Any]]]) -> None:
        if not any(sql.startswith("DELETE FROM facts") for sql, _ in statements):
            return real(db, statements)
        conn = db._conn
        conn.execute("BEGIN IMMEDIATE")
        for sql, rows in statements:
            conn.executemany(sql, rows)
        assert conn.execute("SELECT count(*) FROM facts").fetchone()[0] < 40
        conn.execute("ROLLBACK")  # what a crash before COMMIT leaves: nothing of it
        raise OSError("power cut")

    refused: list[BaseException] = []
    with pytest.raises(BaseException, match=r"power cut|exceptions"):  # the store fail-stops
        async with open_ledger_store(tmp_path, RULE, POLICY) as store:
            await store.add_facts(items)
            balances = store.ledger.balances()
            header, _ = store.ledger.checkpoint_draft(T0 + 15, rule_id(RULE))
            cp = signed(header)
            monkeypatch.setattr(ledger_store, "_transaction", dies_after_deleting)
            try:
                await store.adopt_checkpoint(cp)
            except StoreError as exc:
                refused.append(exc)
    assert refused, "the adopting caller is told that its write failed"
    monkeypatch.setattr(ledger_store, "_transaction", real)
    assert facts_rows(tmp_path)["facts"] == 40
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert store.ledger.checkpoint is None
        assert store.ledger.balances() == balances
        await store.adopt_checkpoint(cp)
        assert store.fact_count() == 2 * 6 + 1
        assert store.ledger.balances() == balances
    assert verify_snapshot(read_snapshot(tmp_path)).ok


def test_a_member_signs_only_the_header_it_computes_itself() -> None:
    """``ckpt_sign``: the rules a committee member applies before voting, each refused."""
    ledger = LedgerState(RULE, POLICY)
    for seq in range(1, 6):
        _r, c = certified(PAYERS[0], seq, seq, T0 + seq * 1000)
        ledger.ingest_certificate(c)
    now = T0 + 10_000 + POLICY.fraud_window_ms + POLICY.max_clock_skew_ms
    facts: Any = SimpleNamespace(ledger=ledger)

    def member(k: nacl.signing.SigningKey) -> Checkpointer:
        return Checkpointer(
            k, facts, None, lambda *a: None, clock=lambda: now / 1000, interval_ms=1000
        )  # type: ignore[arg-type]

    inside = next(k for k in WITNESSES if pid(k) in checkpoint_committee(RULE, 1))
    m = member(inside)
    cut = m.cut_for(now)
    header, _ = ledger.checkpoint_draft(cut, rule_id(RULE))
    assert header.covered_count == 5
    vote = open_checkpoint_vote(m.answer_sign(SignCheckpoint(header)).vote)
    assert vote.message.header == header.digest
    lie = dataclasses.replace(header, covered_count=4)
    # (each refusal asked of a member that has not voted yet: no vote lock involved)
    with pytest.raises(ValidationError, match="differs"):
        member(inside).answer_sign(SignCheckpoint(lie))
    with pytest.raises(ValidationError, match="this peer is at 1"):
        member(inside).answer_sign(
            SignCheckpoint(dataclasses.replace(header, epoch=2, prev=bytes(range(32))))
        )
    with pytest.raises(ValidationError, match="not this round"):
        member(inside).answer_sign(SignCheckpoint(dataclasses.replace(header, cut_ms=cut + 1000)))
    with pytest.raises(ValidationError, match="not this round"):  # older than 16 rounds
        member(inside).answer_sign(SignCheckpoint(dataclasses.replace(header, cut_ms=cut - 17_000)))
    with pytest.raises(ValidationError, match="another network"):
        member(inside).answer_sign(SignCheckpoint(dataclasses.replace(header, network=bytes(32))))
    with pytest.raises(ValidationError, match="not a member"):
        member(key(77)).answer_sign(SignCheckpoint(header))


def test_a_member_votes_for_one_header_per_checkpoint_epoch_even_after_a_restart(
    tmp_path: Path,
) -> None:
    """The per-epoch vote lock: two proposers with different cuts (both honest summaries)
    cannot both get this member's vote, and the lock is on disk before the vote leaves."""
    ledger = LedgerState(RULE, POLICY)
    for seq in range(1, 6):
        _r, c = certified(PAYERS[0], seq, seq, T0 + seq * 1000)
        ledger.ingest_certificate(c)
    now = T0 + 10_000 + POLICY.fraud_window_ms + POLICY.max_clock_skew_ms
    facts: Any = SimpleNamespace(ledger=ledger)
    inside = next(k for k in WITNESSES if pid(k) in checkpoint_committee(RULE, 1))

    def member(votes: Path) -> Checkpointer:
        return Checkpointer(
            inside,
            facts,
            None,  # type: ignore[arg-type]
            lambda *a: None,
            clock=lambda: now / 1000,
            interval_ms=1000,
            votes=CheckpointVoteFiles(votes),
        )

    m = member(tmp_path / "votes")
    cut = m.cut_for(now)
    first, _ = ledger.checkpoint_draft(cut, rule_id(RULE))
    second, _ = ledger.checkpoint_draft(cut - 1000, rule_id(RULE))  # the other proposer's
    assert first.digest != second.digest and first.covered_count == second.covered_count == 5
    # Without a lock, the member would sign either one (another dir: no lock held there).
    assert open_checkpoint_vote(member(tmp_path / "fresh").answer_sign(SignCheckpoint(second)).vote)
    vote = open_checkpoint_vote(m.answer_sign(SignCheckpoint(first)).vote)
    assert vote.message.header == first.digest
    with pytest.raises(ValidationError, match="already voted for another checkpoint 1"):
        m.answer_sign(SignCheckpoint(second))
    again = open_checkpoint_vote(m.answer_sign(SignCheckpoint(first)).vote)  # same vote
    assert again.message.header == first.digest

    restarted = member(tmp_path / "votes")  # a new process: only the files remain
    with pytest.raises(ValidationError, match="already voted for another checkpoint 1"):
        restarted.answer_sign(SignCheckpoint(second))
    assert open_checkpoint_vote(restarted.answer_sign(SignCheckpoint(first)).vote)

    # A vote whose lock cannot be stored is not given, and leaves no lock behind.
    (tmp_path / "blocked").write_bytes(b"")  # a file where the directory should be
    blocked = member(tmp_path / "blocked")
    with pytest.raises(ValidationError, match="cannot store the checkpoint vote"):
        blocked.answer_sign(SignCheckpoint(first))
    assert blocked.lock.locked == {}
    # An unreadable lock file refuses every header of its epoch.
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "1").write_bytes(b"\xff")
    with pytest.raises(ValidationError, match="already voted"):
        member(tmp_path / "torn").answer_sign(SignCheckpoint(first))


async def test_a_member_locked_on_a_header_proposes_that_header_again() -> None:
    """A round without a quorum leaves its voters locked; they propose the locked header
    (not a fresh cut) in later rounds, whoever's turn it is, so the epoch can still close."""
    ledger = LedgerState(RULE, POLICY)
    for seq in range(1, 6):
        _r, c = certified(PAYERS[0], seq, seq, T0 + seq * 1000)
        ledger.ingest_certificate(c)
    now = T0 + 10_000 + POLICY.fraud_window_ms + POLICY.max_clock_skew_ms
    asked: list[bytes] = []

    class Client:
        async def call(self, member: str, req: SignCheckpoint, _reply: object) -> object:
            asked.append(req.header.digest)
            raise ValidationError("offline")

    facts: Any = SimpleNamespace(ledger=ledger)
    committee = checkpoint_committee(RULE, 1)
    # A member whose turn it is not this round (so only the lock makes it propose).
    turn = committee.members[(now // 1000) % committee.size]
    k = next(k for k in WITNESSES if pid(k) in committee and pid(k) != turn)
    m = Checkpointer(
        k, facts, Client(), lambda *a: None, clock=lambda: now / 1000, interval_ms=1000
    )  # type: ignore[arg-type]
    assert await m.step() is None and asked == []  # not its turn, nothing locked
    old, _ = ledger.checkpoint_draft(m.cut_for(now) - 3000, rule_id(RULE))
    m.vote(old)  # it voted for that header in an earlier round
    assert await m.step() is None  # no quorum: every other member is offline
    assert asked and set(asked) == {old.digest}


async def test_checkpoints_go_on_under_the_pool_committee_once_the_genesis_witness_is_gone(
    tmp_path: Path,
) -> None:
    """With epoch checkpoints naming a pool, the next ledger checkpoint is proposed to and
    signed by the committee of the epoch checkpoint payments are witnessed under now (the
    genesis witness never answers), adopted, and verified offline along the epoch chain;
    a member refuses a header cast under an epoch checkpoint newer than its own."""
    from tests.unit.test_epochs import GENESIS, GENESIS_KEY, KEYS, MEMBERS, grow, new_rules

    def rules() -> Any:
        r = new_rules()
        grow(r, 3, {m: 1 for m in MEMBERS[:5]})
        return r

    def ledger_for() -> LedgerState:
        led = LedgerState(rules(), POLICY)
        for seq in range(1, 4):  # paid in the genesis era, witnessed by the genesis witness
            r = make_receipt(PAYERS[0], PAYEE, 10 + seq, seq)
            t = make_transfer(PAYERS[0], r, seq, time_ms=T0 + seq * 1000)
            led.ingest_certificate(make_certificate(t, [sign_vote(GENESIS_KEY, t)]))
        return led

    now = T0 + 10_000 + POLICY.fraud_window_ms + POLICY.max_clock_skew_ms
    members: dict[str, Checkpointer] = {}
    adopted: list[Checkpoint] = []

    class Client:
        async def call(self, member: str, req: SignCheckpoint, _reply: object) -> object:
            if member not in members:  # the genesis witness and everyone else: gone
                raise ValidationError("unreachable")
            return members[member].answer_sign(req)

    class Store:
        def __init__(self, led: LedgerState) -> None:
            self.led = led

        async def adopt_checkpoint(self, cp: Checkpoint) -> None:
            self.led.adopt_checkpoint(cp)
            adopted.append(cp)

    led0 = ledger_for()
    pool = led0.rule.cp_for(now)
    assert pool == 3
    committee = checkpoint_committee(led0.rule, 1, pool)
    assert GENESIS not in committee
    client: Any = Client()
    for m in committee.members:
        led = ledger_for()
        facts: Any = SimpleNamespace(ledger=led, store=Store(led), notify=lambda: None)
        members[m] = Checkpointer(
            KEYS[m], facts, client, lambda *a: None, clock=lambda: now / 1000, interval_ms=1000
        )
    proposer = members[committee.members[(now // 1000) % committee.size]]
    cp = await proposer.step()
    assert cp is not None and adopted == [cp]
    assert cp.header.pool == 3 and cp.header.covered_count == 3
    assert {v.message.witness for v in cp.votes} <= set(committee.members)
    verify_chain([Checkpoint.from_bytes(cp.to_bytes())], rules())  # offline, epoch chain only
    # A header cast under an epoch checkpoint this member does not count as current yet.
    ahead = dataclasses.replace(cp.header, pool=4)
    other = next(m for m in committee.members if m != proposer.peer_id)
    with pytest.raises(ValidationError, match=r"not one of 0\.\.3"):
        Checkpointer(
            KEYS[other],
            SimpleNamespace(ledger=ledger_for()),
            None,
            lambda *a: None,  # type: ignore[arg-type]
            clock=lambda: now / 1000,
            interval_ms=1000,
        ).answer_sign(SignCheckpoint(ahead))
