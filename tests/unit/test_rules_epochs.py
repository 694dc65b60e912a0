"""Rules of epoch checkpoints (protocols/epochs.py) that no other test held.

Epoch checkpoints decide who sits on the committees that sign payments, so their
bounds, their voters' checks and the eligibility of newcomers guard money and
signatures. Found by mutation testing (issue 17, docs/testing.md): each test fails
when its rule is removed.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_epochs import (
    GENESIS,
    KEYS,
    MEMBER_KEYS,
    MEMBERS,
    NETWORK,
    certify,
    checkpoint,
    everyone,
    grow,
    new_rules,
)

from protocols.codec import decode, encode
from protocols.committee import MAX_COMMITTEE, CommitteeRule
from protocols.epochs import (
    MAX_EPOCH,
    MAX_GET,
    MAX_MEMBERS,
    CertifiedCheckpoint,
    CheckpointVoter,
    EpochRules,
    GetCheckpoints,
    PoolCheckpoint,
    PoolVote,
    certify_checkpoint,
    decode_checkpoints,
    decode_request,
    decode_stand,
    decode_vote_reply,
    encode_request,
    encode_stand,
    encode_vote_reply,
    epoch_of,
    ledger_eligibility,
    propose_members,
    rules_from,
    sign_pool_vote,
)
from protocols.errors import LocalProtocolError, ProtocolError, ValidationError
from tests.unit.settlement_fixtures import key, pid

MANY = sorted(pid(key(2000 + n)) for n in range(MAX_MEMBERS + 1))


class FakeLedger:
    """The three questions ledger_eligibility asks a LedgerState."""

    def __init__(self, earned: dict[str, dict[str, int]], proven: set[str], banned: set[str]):
        self.earned, self.proven, self.banned = earned, proven, banned
        self.asked: list[tuple[str, int]] = []

    def earned_from(self, account: str, now_ms: int) -> dict[str, int]:
        self.asked.append((account, now_ms))
        return self.earned.get(account, {})

    def has_identity(self, peer: str) -> bool:
        return peer in self.proven

    def is_banned(self, peer: str) -> bool:
        return peer in self.banned


def test_eligibility_counts_earnings_from_other_proven_identities_only() -> None:
    a, b, c, d = MEMBERS[:4]
    ledger = FakeLedger(
        {a: {a: 500, b: 60, c: 900}, d: {b: 100}},  # a paid itself; c has no identity
        proven={a, b, d},
        banned={d},
    )
    view = ledger_eligibility(ledger, 1234, 60)
    assert view.earned(a) == 60
    assert ledger.asked == [(a, 1234)]
    assert view.eligible(a)
    assert not ledger_eligibility(ledger, 1234, 61).eligible(a)
    assert not view.eligible(c)  # no identity
    assert not view.eligible(d)  # banned, though it earned enough
    assert view.banned(d) and not view.banned(a)


def test_a_newly_drawn_member_votes_for_the_next_checkpoint() -> None:
    """The voter's committee is the one of its newest checkpoint, not the genesis."""
    rules = new_rules()
    grow(rules, 2, {m: 1 for m in MEMBERS[:5]})
    committee = rules.checkpoint_committee(2)
    member = next(k for k in MEMBER_KEYS if pid(k) in committee)
    proposal = checkpoint(rules, 3, {m: 1 for m in MEMBERS[:5]})
    vote = CheckpointVoter(member).decide(proposal, rules, 3, everyone())
    assert not isinstance(vote, str)
    assert vote.message.checkpoint == proposal.digest
    genesis = CheckpointVoter(KEYS[GENESIS]).decide(proposal, rules, 3, everyone())
    assert genesis == "not in the checkpoint committee"


def test_a_voter_refuses_a_proposal_its_checks_refuse() -> None:
    rules = new_rules()
    other = PoolCheckpoint(bytes(32), 1, 0, bytes(32), ())
    voter = CheckpointVoter(KEYS[GENESIS])
    assert isinstance(voter.decide(other, rules, 1, everyone()), str)
    assert voter.voted == {}


def test_epoch_rules_need_positive_epochs_a_lag_of_1_and_a_non_negative_age() -> None:
    base = CommitteeRule(beacon=b"seed", fallback=frozenset({GENESIS}), f=1)
    ok = {"network": NETWORK, "epoch_ms": 1, "lag": 1, "age": 0}
    rules_from(base, **ok)
    for bad in ({"epoch_ms": 0}, {"lag": 0}, {"age": -1}):
        with pytest.raises(LocalProtocolError):
            rules_from(base, **(ok | bad))


def test_rules_from_keeps_the_genesis_rules_fields() -> None:
    base = CommitteeRule(
        beacon=b"seed",
        pool=frozenset(MEMBERS[:3]),
        fallback=frozenset({GENESIS}),
        f=2,
        referee_panel_size=5,
    )
    rules = rules_from(base, network=NETWORK, epoch_ms=10, lag=3, age=1)
    assert (rules.pool, rules.f, rules.referee_panel_size, rules.lag) == (base.pool, 2, 5, 3)
    assert isinstance(rules, EpochRules)


def test_epoch_of_counts_from_time_zero() -> None:
    assert epoch_of(0, 1) == 0
    assert epoch_of(7, 1) == 7
    assert epoch_of(-5, 1000) == 0
    with pytest.raises(LocalProtocolError):
        epoch_of(5, 0)


def test_pool_checkpoint_bounds() -> None:
    PoolCheckpoint(NETWORK, MAX_EPOCH, 0, NETWORK, ())
    full = tuple((m, 1) for m in MANY[:MAX_MEMBERS])
    assert len(PoolCheckpoint(NETWORK, 1, 0, NETWORK, full).members) == MAX_MEMBERS
    for bad in (
        (NETWORK, MAX_EPOCH + 1, 0, NETWORK, ()),
        (NETWORK, 1, 0, NETWORK, tuple((m, 1) for m in MANY)),  # one too many
        (NETWORK, 1, 0, NETWORK, [(MEMBERS[0], 1)]),  # not a tuple
        (NETWORK, 1, 0, NETWORK, ([MEMBERS[0], 1],)),  # a member not a pair
        (NETWORK, 1, 0, NETWORK, ((MEMBERS[0], 0),)),  # joined at epoch 0
    ):
        with pytest.raises(ValidationError):
            PoolCheckpoint(*bad)  # type: ignore[arg-type]


def test_pool_checkpoint_members_on_the_wire_are_pairs_in_lists() -> None:
    c = PoolCheckpoint(NETWORK, 1, 0, NETWORK, ((MEMBERS[0], 1),))
    wire = decode(c.to_bytes(), max_size=PoolCheckpoint.MAX_BYTES)
    wire["members"] = [{0: MEMBERS[0], 1: 1}]
    with pytest.raises(ValidationError):
        PoolCheckpoint.from_bytes(encode(wire))


def test_a_pool_vote_epoch_is_1_to_max_epoch() -> None:
    PoolVote(epoch=MAX_EPOCH, checkpoint=NETWORK, witness=GENESIS)
    for bad in (0, MAX_EPOCH + 1):
        with pytest.raises(ValidationError):
            PoolVote(epoch=bad, checkpoint=NETWORK, witness=GENESIS)


def test_a_proposal_skips_banned_candidates_and_holds_at_most_max_members() -> None:
    banned = MANY[0]
    view = everyone(banned=frozenset({banned}))
    out = propose_members(None, 1, [*MANY, pid(key(5000))], view)
    assert len(out) == MAX_MEMBERS
    assert banned not in dict(out)
    assert [m for m, _ in out] == sorted([*MANY[1:], pid(key(5000))])[:MAX_MEMBERS]


def _certified_wire(votes: list[Any]) -> bytes:
    c = PoolCheckpoint(NETWORK, 1, 0, NETWORK, ())
    return encode({"v": 1, "c": c.to_bytes(), "w": votes})


def test_a_certified_checkpoint_carries_1_to_max_committee_votes_in_a_list() -> None:
    c = PoolCheckpoint(NETWORK, 1, 0, NETWORK, ())
    votes = sorted(
        (sign_pool_vote(key(3000 + n), c) for n in range(MAX_COMMITTEE)),
        key=lambda v: v.message.witness,
    )
    full = CertifiedCheckpoint.from_bytes(_certified_wire([v.to_bytes() for v in votes]))
    assert len(full.votes) == MAX_COMMITTEE
    for bad in ([], {votes[0].to_bytes(): 0}):
        with pytest.raises(ValidationError):
            CertifiedCheckpoint.from_bytes(_certified_wire(bad))  # type: ignore[arg-type]


def test_parsing_a_certified_checkpoint_leaves_the_signatures_to_verify() -> None:
    rules = new_rules()
    good = certify(rules, checkpoint(rules, 1, {MEMBERS[0]: 1}))
    wire = decode(good.to_bytes(), max_size=CertifiedCheckpoint.MAX_BYTES)
    envelope = decode(wire["w"][0], max_size=PoolVote.MAX_BYTES)
    envelope["s"] = bytes([envelope["s"][0] ^ 1]) + envelope["s"][1:]
    wire["w"][0] = encode(envelope)
    parsed = CertifiedCheckpoint.from_bytes(encode(wire))
    with pytest.raises(ProtocolError):
        rules.add(parsed)
    assert certify_checkpoint(parsed.checkpoint, good.votes).digest == good.digest


def test_rules_under_the_genesis_and_under_a_checkpoint_keep_f_and_panel_size() -> None:
    base = CommitteeRule(
        beacon=b"seed",
        pool=frozenset(MEMBERS[:3]),
        fallback=frozenset({GENESIS}),
        f=0,
        referee_panel_size=5,
    )
    rules = rules_from(base, network=NETWORK, epoch_ms=1000, lag=2, age=0)
    genesis = rules.rule_at(0)
    assert (genesis.pool, genesis.f, genesis.referee_panel_size) == (base.pool, 0, 5)
    c = PoolCheckpoint(NETWORK, 1, 0, NETWORK, ((MEMBERS[4], 1),))
    committee = rules.checkpoint_committee(0)
    votes = [sign_pool_vote(KEYS[m], c) for m in committee.members[: committee.quorum]]
    assert rules.add(certify_checkpoint(c, votes))
    under = rules.rule_at(1)
    assert (under.pool, under.f, under.referee_panel_size) == (frozenset({MEMBERS[4]}), 0, 5)


def test_checkpoints_after_an_epoch_and_the_lag_of_a_transfers_checkpoint() -> None:
    rules = new_rules(lag=2)  # epochs of 1000 ms
    assert rules.cp_for(10**9) == 0  # nothing held: the genesis
    grow(rules, 2, {MEMBERS[0]: 1})
    assert [c.epoch for c in rules.after(1, 16)] == [2]
    assert [c.epoch for c in rules.after(0, 1)] == [1]
    assert rules.cp_for(3000) == 1 and rules.cp_for(2999) == 0
    rules.committee_at(MEMBERS[0], 1, 3000)
    rules.committee_at(MEMBERS[0], 0, 0)
    with pytest.raises(ValidationError):
        rules.committee_at(MEMBERS[0], 1, 2999)  # checkpoint 1 is not 2 epochs old yet


def test_describe_names_the_epoch_state() -> None:
    """``edgeswarm ledger status --json`` shows these keys."""
    rules = new_rules(lag=2, age=1)
    assert rules.describe()["latest_checkpoint"] == 0
    grow(rules, 2, {MEMBERS[0]: 1, MEMBERS[1]: 2})
    rules.tick(3500)
    assert rules.describe() == {
        "epoch_ms": 1000,
        "lag": 2,
        "age": 1,
        "now_epoch": 3,
        "current_checkpoint": 1,
        "latest_checkpoint": 2,
        "checkpoints": 2,
        "pool": sorted(rules.rule_at(1).pool),
        "serving": {},
    }


def test_a_stand_reply_is_a_boolean() -> None:
    assert decode_stand(encode_stand(True)) is True
    assert decode_stand(encode_stand(False)) is False
    assert encode_stand(True) == encode({"v": 1, "stand": True})
    for bad in ({"v": 1, "stand": 1}, {"v": 2, "stand": True}, {"v": 1, "stand": True, "x": 0}):
        with pytest.raises(ProtocolError):
            decode_stand(encode(bad))


def test_a_refusal_is_text_of_at_most_300_characters() -> None:
    assert decode_vote_reply(encode_vote_reply("x" * 400)) == "x" * 300
    assert decode_vote_reply(encode({"v": 1, "no": "y" * 300})) == "y" * 300
    for bad in ({"v": 1, "no": "y" * 301}, {"v": 1, "no": 5}):
        with pytest.raises(ValidationError):
            decode_vote_reply(encode(bad))


def test_a_checkpoints_reply_lists_at_most_max_get() -> None:
    rules = new_rules()
    one = certify(rules, checkpoint(rules, 1, {MEMBERS[0]: 1})).to_bytes()
    assert len(decode_checkpoints(encode({"v": 1, "cps": [one] * MAX_GET}))) == MAX_GET
    for bad in ([one] * (MAX_GET + 1), {one: 0}):
        with pytest.raises(ValidationError):
            decode_checkpoints(encode({"v": 1, "cps": bad}))


def test_an_epochs_request_is_a_map_and_asks_after_at_most_max_epoch() -> None:
    assert decode_request(encode_request(GetCheckpoints(MAX_EPOCH))) == GetCheckpoints(MAX_EPOCH)
    for bad in (encode([1, "get"]), encode({"v": 1, "op": "get", "after": MAX_EPOCH + 1})):
        with pytest.raises(ProtocolError):
            decode_request(bad)
