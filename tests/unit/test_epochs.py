"""Epoch checkpoints and the committees drawn from them (protocols/epochs.py).

Each rule that guards signatures or money has a test here that fails without it:
the checkpoint quorum, the chain, one vote per epoch, newcomers' eligibility, kept
``since``, the age filter, the beacon lag, and votes cast under one checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.certificate import CertificateAssembler, make_certificate, sign_vote
from protocols.committee import CommitteeRule, UnknownCheckpoint
from protocols.epochs import (
    CHECKPOINT_SUBJECT,
    CertifiedCheckpoint,
    CheckpointVoter,
    Eligibility,
    EpochRules,
    GetCheckpoints,
    Offer,
    PoolCheckpoint,
    Propose,
    Stand,
    certify_checkpoint,
    check_proposal,
    decode_checkpoints,
    decode_request,
    decode_vote_reply,
    encode_checkpoints,
    encode_request,
    encode_vote_reply,
    propose_members,
    propose_models,
    rules_from,
    sign_pool_vote,
)
from protocols.errors import ProtocolError, ValidationError
from protocols.ledger_state import LedgerState
from protocols.payment import Certified, PaymentSession
from protocols.witness import PersistLock, Refuse, Witness, encode_reply
from tests.unit.settlement_fixtures import key, pid, policy, receipt, transfer

EPOCH_MS = 1_000
NETWORK = hashlib.sha256(b"genesis").digest()
GENESIS_KEY = key(900)
GENESIS = pid(GENESIS_KEY)
MEMBER_KEYS = [key(910 + i) for i in range(8)]
MEMBERS = [pid(k) for k in MEMBER_KEYS]
KEYS = {pid(k): k for k in [GENESIS_KEY, *MEMBER_KEYS]}


def new_rules(*, lag: int = 2, age: int = 1) -> EpochRules:
    return rules_from(
        CommitteeRule(beacon=b"seed", fallback=frozenset({GENESIS}), f=1),
        network=NETWORK,
        epoch_ms=EPOCH_MS,
        lag=lag,
        age=age,
    )


def everyone(min_earned: int = 0, banned: frozenset[str] = frozenset()) -> Eligibility:
    return Eligibility(lambda p: True, lambda p: p in banned, lambda p: 0, min_earned)


def checkpoint(
    rules: EpochRules,
    epoch: int,
    members: dict[str, int] | None = None,
    serves: Mapping[str, Iterable[str]] | None = None,
) -> PoolCheckpoint:
    latest = rules.latest
    listed = tuple(sorted((members or {}).items()))
    return PoolCheckpoint(
        network=NETWORK,
        epoch=epoch,
        prev_epoch=latest.epoch if latest else 0,
        prev=latest.digest if latest else NETWORK,
        members=listed,
        models=propose_models(listed, serves or {}),
    )


def certify(rules: EpochRules, c: PoolCheckpoint) -> CertifiedCheckpoint:
    committee = rules.checkpoint_committee(c.prev_epoch)
    votes = [sign_pool_vote(KEYS[m], c) for m in committee.members[: committee.quorum]]
    return certify_checkpoint(c, votes)


def grow(
    rules: EpochRules,
    upto: int,
    members: dict[str, int],
    serves: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """Checkpoints 1..upto, each listing ``members`` (since as given) and the models each
    serves (``serves``: member -> cids)."""
    for e in range(1, upto + 1):
        listed = {m: s for m, s in members.items() if s <= e}
        rules.add(certify(rules, checkpoint(rules, e, listed, serves)))


# --- the checkpoint chain -------------------------------------------------------------------


def test_checkpoint_round_trips_and_names_itself() -> None:
    c = PoolCheckpoint(NETWORK, 3, 1, b"\1" * 32, ((MEMBERS[0], 2), (MEMBERS[1], 3)))
    assert PoolCheckpoint.from_bytes(c.to_bytes()) == c
    assert PoolCheckpoint.from_bytes(c.to_bytes()).digest == c.digest
    assert c.pool(age=1) == {MEMBERS[0]}
    assert c.pool(age=0) == {MEMBERS[0], MEMBERS[1]}
    with pytest.raises(ValidationError):  # members unsorted
        PoolCheckpoint(NETWORK, 3, 1, b"\1" * 32, ((MEMBERS[1], 2), (MEMBERS[0], 3)))
    with pytest.raises(ValidationError):  # joined after the checkpoint
        PoolCheckpoint(NETWORK, 3, 1, b"\1" * 32, ((MEMBERS[0], 4),))
    with pytest.raises(ValidationError):  # prev not before
        PoolCheckpoint(NETWORK, 3, 3, b"\1" * 32, ())


def test_first_checkpoint_is_certified_by_the_genesis_witness_alone() -> None:
    rules = new_rules()
    c = checkpoint(rules, 1, {MEMBERS[0]: 1})
    assert rules.checkpoint_committee(0).members == (GENESIS,)
    certified = certify(rules, c)
    assert rules.add(CertifiedCheckpoint.from_bytes(certified.to_bytes()))
    assert not rules.add(certified)  # once
    assert rules.latest == certified


def test_a_checkpoint_needs_a_quorum_of_the_previous_checkpoints_committee() -> None:
    rules = new_rules()
    grow(rules, 2, {m: 1 for m in MEMBERS[:5]})
    c = checkpoint(rules, 3, {m: 1 for m in MEMBERS[:5]})
    committee = rules.checkpoint_committee(2)
    assert GENESIS not in committee  # the pool (5 aged members) replaced the fallback
    short = certify_checkpoint(
        c, [sign_pool_vote(KEYS[m], c) for m in committee.members[: committee.quorum - 1]]
    )
    with pytest.raises(ValidationError, match="quorum"):
        rules.add(short)
    outsider = next(m for m in MEMBERS if m not in committee)
    stuffed = certify_checkpoint(
        c,
        [
            *(sign_pool_vote(KEYS[m], c) for m in committee.members[: committee.quorum - 1]),
            sign_pool_vote(KEYS[outsider], c),
        ],
    )
    with pytest.raises(ValidationError, match="not in the checkpoint committee"):
        rules.add(stuffed)
    with pytest.raises(ValidationError):  # the genesis witness alone no longer suffices
        rules.add(certify_checkpoint(c, [sign_pool_vote(GENESIS_KEY, c)]))
    assert rules.add(certify(rules, c))


def test_a_checkpoint_must_extend_a_held_one() -> None:
    rules = new_rules()
    grow(rules, 2, {MEMBERS[0]: 1})
    orphan = PoolCheckpoint(NETWORK, 5, 4, b"\2" * 32, ())
    with pytest.raises(UnknownCheckpoint):
        rules.add(certify_checkpoint(orphan, [sign_pool_vote(GENESIS_KEY, orphan)]))
    forged_prev = PoolCheckpoint(NETWORK, 3, 2, b"\2" * 32, ())
    with pytest.raises(ValidationError, match="extends another"):
        rules.add(certify_checkpoint(forged_prev, [sign_pool_vote(GENESIS_KEY, forged_prev)]))
    other = new_rules()
    foreign = PoolCheckpoint(b"\3" * 32, 1, 0, b"\3" * 32, ())
    with pytest.raises(ValidationError, match="another network"):
        other.add(certify_checkpoint(foreign, [sign_pool_vote(GENESIS_KEY, foreign)]))


def test_a_second_checkpoint_for_an_epoch_is_refused() -> None:
    rules = new_rules()
    grow(rules, 1, {MEMBERS[0]: 1})
    twin = PoolCheckpoint(NETWORK, 1, 0, NETWORK, ((MEMBERS[1], 1),))
    with pytest.raises(ValidationError, match="second checkpoint"):
        rules.add(certify_checkpoint(twin, [sign_pool_vote(GENESIS_KEY, twin)]))


# --- committees under the checkpoints --------------------------------------------------------


def test_committees_move_to_the_aged_pool_after_the_lag() -> None:
    rules = new_rules(lag=2, age=1)
    grow(rules, 3, {m: 1 for m in MEMBERS[:4]})
    payer = pid(key(1))
    # Checkpoint 1 has no aged member (since 1 > 1 - 1): its committees are the fallback.
    assert rules.rule_at(1).pool == frozenset()
    assert rules.rule_at(2).pool == frozenset(MEMBERS[:4])
    assert rules.cp_for(3 * EPOCH_MS) == 1  # epoch 3 - lag 2
    assert rules.cp_for(4 * EPOCH_MS) == 2
    rules.tick(3 * EPOCH_MS)
    assert rules.committee_for(payer).members == (GENESIS,)
    rules.tick(4 * EPOCH_MS + 500)
    assert set(rules.committee_for(payer).members) == set(MEMBERS[:4])
    assert not rules.committee_for(payer).degraded


def test_a_certificate_may_not_use_a_checkpoint_younger_than_the_lag() -> None:
    rules = new_rules(lag=2, age=0)
    grow(rules, 4, {m: 1 for m in MEMBERS[:4]})
    payer = pid(key(1))
    rules.committee_at(payer, 2, 4 * EPOCH_MS)  # 2 <= 4 - 2
    with pytest.raises(ValidationError, match="epochs older"):
        rules.committee_at(payer, 3, 4 * EPOCH_MS)
    with pytest.raises(UnknownCheckpoint):
        rules.committee_at(payer, 7, 10 * EPOCH_MS)


def test_committees_rotate_with_the_beacon() -> None:
    rules = new_rules(lag=1, age=0)
    grow(rules, 6, {m: 1 for m in MEMBERS})
    accounts = [pid(key(2000 + i)) for i in range(40)]
    seats = [
        {a: rules.rule_at(cp).committee_for(a).members for a in accounts} for cp in range(2, 7)
    ]
    # Same pool, new beacon each epoch: most accounts get a different committee.
    changed = sum(1 for a in accounts if len({s[a] for s in seats}) > 1)
    assert changed >= 30, changed
    # A peer holding the same checkpoints draws the same committees.
    again = new_rules(lag=1, age=0)
    for e in rules.epochs():
        held = rules.get(e)
        assert held is not None
        again.add(CertifiedCheckpoint.from_bytes(held.to_bytes()))
    assert all(
        again.rule_at(cp).committee_for(a) == rules.rule_at(cp).committee_for(a)
        for cp in range(2, 7)
        for a in accounts
    )


@settings(max_examples=40, deadline=None)
@given(
    since=st.lists(st.integers(1, 6), min_size=8, max_size=8),
    age=st.integers(0, 4),
    cp=st.integers(1, 6),
)
def test_pools_hold_only_members_aged_enough(since: list[int], age: int, cp: int) -> None:
    rules = new_rules(lag=1, age=age)
    grow(rules, 6, dict(zip(MEMBERS, since, strict=True)))
    pool = rules.rule_at(cp).pool
    assert pool == {m for m, s in zip(MEMBERS, since, strict=True) if s <= cp - age}
    committee = rules.rule_at(cp).committee_for(pid(key(1)))
    if len(pool) >= 4:
        assert set(committee.members) <= pool  # the fallback is not used
    else:
        assert set(committee.members) <= pool | {GENESIS}


# --- proposals and votes ---------------------------------------------------------------------


def test_proposer_keeps_since_adds_eligible_newcomers_and_drops_banned() -> None:
    prev = PoolCheckpoint(NETWORK, 2, 0, NETWORK, ((MEMBERS[0], 1), (MEMBERS[1], 2)))
    view = Eligibility(
        identities=lambda p: p != MEMBERS[3],
        banned=lambda p: p == MEMBERS[1],
        earned=lambda p: 10 if p != MEMBERS[4] else 0,
        min_earned=5,
    )
    members = propose_members(prev, 3, MEMBERS[:5], view)
    assert dict(members) == {MEMBERS[0]: 1, MEMBERS[2]: 3}


def test_voter_checks_every_member_against_its_own_ledger() -> None:
    prev = PoolCheckpoint(NETWORK, 2, 0, NETWORK, ((MEMBERS[0], 1),))
    ok = PoolCheckpoint(NETWORK, 3, 2, prev.digest, ((MEMBERS[0], 1), (MEMBERS[1], 3)))
    view = Eligibility(lambda p: True, lambda p: False, lambda p: 10, 5)
    assert check_proposal(ok, prev, NETWORK, 3, view) is None
    poor = Eligibility(lambda p: True, lambda p: False, lambda p: 0 if p == MEMBERS[1] else 10, 5)
    assert "not eligible" in str(check_proposal(ok, prev, NETWORK, 3, poor))
    no_id = Eligibility(lambda p: p != MEMBERS[1], lambda p: False, lambda p: 10, 5)
    assert "not eligible" in str(check_proposal(ok, prev, NETWORK, 3, no_id))
    banned = Eligibility(lambda p: True, lambda p: p == MEMBERS[0], lambda p: 10, 5)
    assert "banned" in str(check_proposal(ok, prev, NETWORK, 3, banned))
    aged = PoolCheckpoint(NETWORK, 3, 2, prev.digest, ((MEMBERS[0], 1), (MEMBERS[1], 1)))
    assert "must join at epoch 3" in str(check_proposal(aged, prev, NETWORK, 3, view))
    rejuvenated = PoolCheckpoint(NETWORK, 3, 2, prev.digest, ((MEMBERS[0], 2),))
    assert "joined at epoch 1" in str(check_proposal(rejuvenated, prev, NETWORK, 3, view))
    assert "extend" in str(check_proposal(ok, None, NETWORK, 3, view))
    assert "epoch 3, ours is 2" in str(check_proposal(ok, prev, NETWORK, 2, view))
    assert "another network" in str(check_proposal(ok, prev, b"\5" * 32, 3, view))


def test_voter_signs_one_checkpoint_per_epoch() -> None:
    rules = new_rules()
    voter = CheckpointVoter(GENESIS_KEY)
    a = checkpoint(rules, 1, {MEMBERS[0]: 1})
    b = checkpoint(rules, 1, {MEMBERS[1]: 1})
    vote = voter.decide(a, rules, 1, everyone())
    assert not isinstance(vote, str) and vote.message.checkpoint == a.digest
    assert voter.decide(b, rules, 1, everyone()) == (
        "already voted for another checkpoint of epoch 1"
    )
    again = voter.decide(a, rules, 1, everyone())
    assert not isinstance(again, str)  # the same one may be asked again
    restarted = CheckpointVoter(GENESIS_KEY, voter.voted)  # the durable votes, reloaded
    assert isinstance(restarted.decide(b, rules, 1, everyone()), str)
    outsider = CheckpointVoter(MEMBER_KEYS[0])
    assert outsider.decide(a, rules, 1, everyone()) == "not in the checkpoint committee"


def test_wire_round_trips_and_refuses_garbage() -> None:
    rules = new_rules()
    grow(rules, 2, {MEMBERS[0]: 1})
    c = checkpoint(rules, 3, {MEMBERS[0]: 1})
    prev = rules.latest
    assert prev is not None
    for req in (GetCheckpoints(2), Stand(), Propose(c), Propose(c, prev), Offer(prev)):
        assert decode_request(encode_request(req)) == req
    assert [x.digest for x in decode_checkpoints(encode_checkpoints(rules.after(0, 16)))] == [
        x.digest for x in rules.after(0, 16)
    ]
    vote = sign_pool_vote(GENESIS_KEY, c)
    got = decode_vote_reply(encode_vote_reply(vote))
    assert not isinstance(got, str) and got.message == vote.message
    assert decode_vote_reply(encode_vote_reply("no")) == "no"
    for junk in (b"", b"\xa0", b"\xff" * 10, encode_request(Stand())[:-1]):
        with pytest.raises(ProtocolError):
            decode_request(junk)


# --- payments under a checkpoint --------------------------------------------------------------


def test_payment_is_certified_by_the_pool_committee_and_verifies_everywhere() -> None:
    rules = new_rules(lag=2, age=1)
    grow(rules, 3, {m: 1 for m in MEMBERS[:5]})
    now = 4 * EPOCH_MS + 100
    rules.tick(now)
    payer, payee = key(1), key(2)
    r = receipt(payer, payee, 100, 1)
    pol = policy(genesis=frozenset({pid(payer)}))  # the payer may owe (no PoW needed here)
    ledgers = {m: LedgerState(rules, pol) for m in [*MEMBERS[:5], GENESIS, pid(payer)]}
    session, persist = PaymentSession.start(payer, r, ledgers[pid(payer)], now)
    assert session.cp == 2 and GENESIS not in session.committee
    cert = None
    for send in session.persisted():
        led = ledgers[send.witness]
        led.ingest_payable(r)
        w = Witness(KEYS[send.witness])
        action = w.handle_transfer(persist.transfer, r, led, now)
        assert isinstance(action, PersistLock)
        reply = w.lock_persisted(action.record)
        for out in session.on_reply(send.witness, encode_reply(reply)):
            if isinstance(out, Certified):
                cert = out.certificate
    assert cert is not None and cert.cp == 2
    for led in ledgers.values():
        assert led.ingest_certificate(cert)
    # The genesis witness is no longer this payer's witness.
    refused = Witness(GENESIS_KEY).handle_transfer(
        persist.transfer, r, LedgerState(rules, pol), now
    )
    assert isinstance(refused, Refuse) and refused.reason.value == "not-in-committee"


def test_votes_under_another_checkpoint_do_not_make_a_certificate() -> None:
    rules = new_rules(lag=1, age=0)
    grow(rules, 3, {m: 1 for m in MEMBERS[:5]})
    now = 4 * EPOCH_MS
    payer = key(1)
    r = receipt(payer, key(2), 100, 1)
    t = transfer(payer, r, 1, time_ms=now)
    cp = rules.cp_for(now)
    committee = rules.committee_at(pid(payer), cp, now)
    asm = CertificateAssembler(t, committee, cp)
    stale = sign_vote(KEYS[committee.members[0]], t, cp - 1)
    with pytest.raises(ValidationError, match="checkpoint"):
        asm.add_vote(stale)
    # Votes of the right members but cast under an older checkpoint: refused by the ledger.
    votes = [sign_vote(KEYS[m], t, cp - 1) for m in committee.members[: committee.quorum]]
    mixed = make_certificate(t, [*votes[:-1], sign_vote(KEYS[committee.members[-1]], t, cp)])
    with pytest.raises(ProtocolError):
        LedgerState(rules, policy()).ingest_certificate(mixed)
    # A certificate claiming a checkpoint the verifier does not hold is not accepted yet.
    ahead = make_certificate(t, [sign_vote(KEYS[m], t, 9) for m in committee.members[:3]])
    with pytest.raises(ProtocolError):
        LedgerState(rules, policy()).ingest_certificate(ahead)
    # A plain (genesis-only) rule knows no checkpoint.
    with pytest.raises(UnknownCheckpoint):
        CommitteeRule(beacon=b"x", fallback=frozenset({GENESIS})).committee_at(pid(payer), 1, now)
    assert CHECKPOINT_SUBJECT not in committee
