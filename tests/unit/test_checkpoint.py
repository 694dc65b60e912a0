"""Checkpoints: summary, adoption (pruning), sync from a checkpoint, forged checkpoints refused.

Each rule that guards a checkpoint has a test here that fails when the rule is removed:
quorum size, committee membership, network, the vote naming the header, the covered digest
checked by a ledger that holds the facts, the account rows' hash, balances summing to zero,
and the chain (each checkpoint follows the one before it).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from settlement_fixtures import NOW_MS, WITNESS_KEYS, key, pid, policy, receipt, rule, transfer

from protocols.certificate import Certificate, make_certificate, sign_vote
from protocols.checkpoint import (
    AccountSummary,
    Checkpoint,
    CheckpointAssembler,
    CheckpointHeader,
    CheckpointVoteLock,
    accounts_hash,
    checkpoint_committee,
    make_checkpoint,
    rule_id,
    sign_checkpoint,
    verify_chain,
)
from protocols.errors import ValidationError
from protocols.ledger_state import FactKind, LedgerState, NeedAccounts
from protocols.receipt import Receipt

RULE = rule()
POL = policy()
NET = rule_id(RULE)
PAYERS = [key(n) for n in range(1, 4)]
PAYEES = [key(n) for n in range(10, 13)]
CUT = NOW_MS + 50_000


def cert_for(r: Receipt, payer_key: object, seq: int, time_ms: int) -> Certificate:
    t = transfer(payer_key, r, seq, time_ms=time_ms)  # type: ignore[arg-type]
    committee = RULE.committee_for(t.message.payer)
    votes = [sign_vote(k, t) for k in WITNESS_KEYS if pid(k) in committee][: committee.quorum]
    return make_certificate(t, votes)


def history(n_per_payer: int = 6) -> list[tuple[Receipt, Certificate]]:
    """Each payer pays seqs 1..n; half of them before CUT, half after."""
    out = []
    job = 0
    for p, payer in enumerate(PAYERS):
        for seq in range(1, n_per_payer + 1):
            job += 1
            r = receipt(payer, PAYEES[(p + seq) % len(PAYEES)], 100 + seq, job)
            when = NOW_MS + seq * 20_000 - 10_000  # seqs 1..2 before CUT, 3.. after
            out.append((r, cert_for(r, payer, seq, when)))
    return out


def ledger_with(facts: list[tuple[Receipt, Certificate]]) -> LedgerState:
    led = LedgerState(RULE, POL)
    for r, c in facts:
        led.ingest_certificate(c)
        led.ingest_receipt(r)
    return led


def sign(header: CheckpointHeader, keys: list[object] | None = None) -> Checkpoint:
    committee = checkpoint_committee(RULE, header.epoch)
    ks = keys if keys is not None else [k for k in WITNESS_KEYS if pid(k) in committee]
    asm_votes = [sign_checkpoint(k, header) for k in ks]  # type: ignore[arg-type]
    return make_checkpoint(header, asm_votes[: committee.quorum] if keys is None else asm_votes)


def first_checkpoint(led: LedgerState) -> tuple[Checkpoint, list[AccountSummary]]:
    header, accounts = led.checkpoint_draft(CUT, NET)
    return sign(header), accounts


def test_adopting_keeps_balances_and_seqs_and_drops_covered_facts() -> None:
    facts = history()
    led = ledger_with(facts)
    balances, seqs = led.balances(), {pid(p): led.next_seq(pid(p)) for p in PAYERS}
    cp, _accounts = first_checkpoint(led)
    assert cp.header.covered_count == 2 * len(PAYERS)
    led.ingest_checkpoint(cp)
    adoption = led.adopt_checkpoint(cp)
    assert led.checkpoint == cp
    # 2 covered certificates and their 2 receipts per payer are gone; the checkpoint stays.
    assert len(adoption.pruned) == 4 * len(PAYERS)
    assert len(led) == 2 * len(facts) - len(adoption.pruned) + 1
    assert led.balances() == balances
    assert sum(led.balances().values()) == 0
    assert {pid(p): led.next_seq(pid(p)) for p in PAYERS} == seqs
    # A covered certificate or a receipt it paid comes back (stale peer): known, not held.
    r0, c0 = facts[0]
    assert led.ingest_certificate(c0) is False
    assert led.ingest_receipt(r0) is False
    assert not led.has(c0.digest) and not led.has(r0.receipt_id)
    assert led.is_paid(r0)


def test_fresh_peer_from_checkpoint_reaches_the_old_peers_state_hash() -> None:
    facts = history()
    old = ledger_with(facts)
    cp, accounts = first_checkpoint(old)
    old.ingest_checkpoint(cp)
    old.adopt_checkpoint(cp)
    # A new peer: the checkpoint, its account rows, then only the facts after it.
    fresh = LedgerState(RULE, POL)
    fresh.ingest_checkpoint(cp)
    with pytest.raises(NeedAccounts):
        fresh.adopt_checkpoint(cp)  # it cannot compute the summary without the facts
    fresh.adopt_checkpoint(cp, accounts)
    for fid in old.fact_ids():
        item = old.item(fid)
        assert item is not None
        fresh.ingest_bytes(*item)
    assert fresh.state_hash() == old.state_hash()
    assert fresh.balances() == old.balances()
    # Payments go on after the checkpoint on both.
    r = receipt(PAYERS[0], PAYEES[0], 7, 999)
    c = cert_for(r, PAYERS[0], old.next_seq(pid(PAYERS[0])), CUT + 100_000)
    for led in (old, fresh):
        assert led.ingest_certificate(c) and led.ingest_receipt(r)
    assert fresh.state_hash() == old.state_hash()


def test_a_second_checkpoint_builds_on_the_first_and_the_chain_verifies() -> None:
    led = ledger_with(history())
    cp1, _ = first_checkpoint(led)
    led.ingest_checkpoint(cp1)
    led.adopt_checkpoint(cp1)
    h2, acc2 = led.checkpoint_draft(CUT + 100_000, NET)
    assert h2.epoch == 2 and h2.prev == cp1.digest
    cp2 = sign(h2)
    led.ingest_checkpoint(cp2)
    led.adopt_checkpoint(cp2)
    assert led.checkpoint == cp2
    verify_chain([cp1, cp2], RULE)
    with pytest.raises(ValidationError, match="predecessor"):
        verify_chain([cp1, sign(dataclasses.replace(h2, prev=bytes(range(32))))], RULE)
    # A fresh peer needs the whole chain before the latest one.
    fresh = LedgerState(RULE, POL)
    fresh.ingest_checkpoint(cp2)
    with pytest.raises(ValidationError, match="needs checkpoint 1"):
        fresh.adopt_checkpoint(cp2, acc2)
    fresh.ingest_checkpoint(cp1)
    fresh.adopt_checkpoint(cp2, acc2)
    assert fresh.balances() == led.balances()


# --- forged checkpoints --------------------------------------------------------------------


def test_too_few_votes_are_refused() -> None:
    led = ledger_with(history())
    header, _ = led.checkpoint_draft(CUT, NET)
    committee = checkpoint_committee(RULE, 1)
    members = [k for k in WITNESS_KEYS if pid(k) in committee]
    short = sign(header, members[: committee.quorum - 1])
    with pytest.raises(ValidationError, match="quorum"):
        led.ingest_checkpoint(short)
    with pytest.raises(ValidationError, match="quorum"):
        led.adopt_checkpoint(short)
    sign(header, members[: committee.quorum]).verify(RULE)  # enough is enough


def test_votes_from_outside_the_committee_are_refused() -> None:
    led = ledger_with(history())
    header, _ = led.checkpoint_draft(CUT, NET)
    outsiders = [key(200 + i) for i in range(4)]
    with pytest.raises(ValidationError, match="not in the committee"):
        sign(header, outsiders).verify(RULE)
    # A committee of another network (another rule) cannot sign for this one.
    other = rule(fallback=frozenset(pid(k) for k in outsiders))
    other_header = dataclasses.replace(header, network=rule_id(other))
    cp = make_checkpoint(other_header, [sign_checkpoint(k, other_header) for k in outsiders])
    cp.verify(other)
    with pytest.raises(ValidationError, match="another network"):
        cp.verify(RULE)


def test_a_vote_for_another_header_does_not_count() -> None:
    led = ledger_with(history())
    header, _ = led.checkpoint_draft(CUT, NET)
    other = dataclasses.replace(header, cut_ms=header.cut_ms + 1)
    votes = [sign_checkpoint(k, other) for k in WITNESS_KEYS]
    with pytest.raises(ValidationError, match="another checkpoint"):
        make_checkpoint(header, votes).verify(RULE)
    asm = CheckpointAssembler(RULE, header)
    with pytest.raises(ValidationError, match="another checkpoint"):
        asm.add_vote(votes[0])


def test_a_quorum_signed_wrong_digest_is_refused_by_a_ledger_holding_the_facts() -> None:
    led = ledger_with(history())
    header, accounts = led.checkpoint_draft(CUT, NET)
    total, _count = header.covered
    lie = dataclasses.replace(
        header, covered_sum=((total + 1) % (1 << 2048)).to_bytes(256, "little")
    )
    cp = sign(lie)
    cp.verify(RULE)  # the signatures are fine: more than f members lied
    with pytest.raises(NeedAccounts):
        led.adopt_checkpoint(cp)
    with pytest.raises(ValidationError, match="covered digest"):
        led.adopt_checkpoint(cp, accounts)
    assert led.checkpoint is None


def test_account_rows_must_match_the_header_and_sum_to_zero() -> None:
    led = ledger_with(history())
    cp, accounts = first_checkpoint(led)
    fresh = LedgerState(RULE, POL)
    richer = [dataclasses.replace(accounts[0], balance=accounts[0].balance + 5), *accounts[1:]]
    with pytest.raises(ValidationError, match="sum to"):
        fresh.adopt_checkpoint(cp, richer)
    # Balanced but not what the committee signed.
    moved = [
        dataclasses.replace(accounts[0], balance=accounts[0].balance + 5),
        dataclasses.replace(accounts[1], balance=accounts[1].balance - 5),
        *accounts[2:],
    ]
    with pytest.raises(ValidationError, match="do not match"):
        fresh.adopt_checkpoint(cp, moved)
    # A header whose rows sum to non-zero, even signed by a quorum, is refused.
    header = dataclasses.replace(cp.header, accounts=accounts_hash(richer))
    with pytest.raises(ValidationError, match="sum to"):
        fresh.adopt_checkpoint(sign(header), richer)
    fresh.adopt_checkpoint(cp, accounts)
    assert fresh.balances() == {a.account: a.balance for a in accounts if a.balance}


def test_a_checkpoint_that_does_not_follow_the_adopted_one_is_refused() -> None:
    led = ledger_with(history())
    cp1, _ = first_checkpoint(led)
    led.ingest_checkpoint(cp1)
    led.adopt_checkpoint(cp1)
    h2, acc2 = led.checkpoint_draft(CUT + 100_000, NET)
    stray = sign(dataclasses.replace(h2, prev=bytes(range(32))))
    with pytest.raises(ValidationError, match="does not follow"):
        led.adopt_checkpoint(stray, acc2)
    skip = sign(dataclasses.replace(h2, epoch=3))
    with pytest.raises(ValidationError, match="needs checkpoint 2"):
        led.adopt_checkpoint(skip, acc2)
    with pytest.raises(ValidationError, match="does not follow"):
        led.adopt_checkpoint(cp1)  # not again, nor anything older


def test_checkpoint_round_trips_and_travels_as_a_fact() -> None:
    led = ledger_with(history())
    cp, _ = first_checkpoint(led)
    assert Checkpoint.from_bytes(cp.to_bytes()) == cp
    fresh = LedgerState(RULE, POL)
    assert fresh.ingest_bytes(FactKind.CHECKPOINT, cp.to_bytes())
    assert fresh.latest_checkpoint_epoch() == 1
    with pytest.raises(ValidationError):
        AccountSummary.from_wire(["x", 1, 1, 0, 0])


@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), max_size=30))
def test_a_vote_lock_signs_at_most_one_header_per_epoch(asks: list[tuple[int, int]]) -> None:
    """Whatever headers are asked, in any order, at most one per epoch passes the lock,
    and once it passed, exactly that one passes again (also from a reloaded lock)."""
    lock = CheckpointVoteLock()
    passed: dict[int, bytes] = {}
    for epoch, variant in asks:
        h = _header_for_lock(epoch, 1000 * variant)
        try:
            lock.lock(h)
        except ValidationError:
            assert passed[epoch] != h.digest
            continue
        assert passed.setdefault(epoch, h.digest) == h.digest
    reloaded = CheckpointVoteLock(lock.locked)
    assert {e: h.digest for e, h in reloaded.locked.items() if h is not None} == passed


def test_an_unreadable_vote_lock_refuses_its_epoch_and_unlock_drops_only_its_own() -> None:
    h = _header_for_lock(1, 5)
    with pytest.raises(ValidationError, match="already voted"):
        CheckpointVoteLock({1: None}).check(h)
    lock = CheckpointVoteLock()
    assert lock.lock(h) is True and lock.lock(h) is False
    lock.unlock(dataclasses.replace(h, cut_ms=6))  # not the held one: kept
    assert lock.locked == {1: h}
    lock.unlock(h)
    assert lock.locked == {}


def _header_for_lock(epoch: int, cut_ms: int) -> CheckpointHeader:
    return CheckpointHeader(
        network=bytes(32),
        epoch=epoch,
        prev=bytes(32) if epoch == 1 else bytes([epoch]) * 32,
        cut_ms=cut_ms,
        covered_sum=bytes(256),
        covered_count=0,
        accounts=bytes(32),
        n_accounts=0,
    )
