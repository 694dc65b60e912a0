"""Rules of ledger checkpoints (protocols/checkpoint.py) that no other test held.

A checkpoint replaces a ledger's history with balances signed by a quorum, so its
bounds, its chain order and its vote counting guard money. Found by mutation testing
(issue 17, docs/testing.md): each test fails when its rule is removed.
"""

from __future__ import annotations

import dataclasses

import pytest
from settlement_fixtures import WITNESS_KEYS, key, pid, rule

from protocols.checkpoint import (
    AccountSummary,
    Checkpoint,
    CheckpointAssembler,
    CheckpointHeader,
    CheckpointVote,
    accounts_hash,
    checkpoint_committee,
    follows,
    make_checkpoint,
    open_checkpoint_vote,
    rule_id,
    sign_checkpoint,
    verify_chain,
)
from protocols.codec import decode, encode
from protocols.committee import MAX_COMMITTEE
from protocols.errors import ProtocolError, ValidationError
from protocols.ledger import MAX_AMOUNT, MAX_SEQ

RULE = rule()
NET = rule_id(RULE)
MAX_EPOCH = (1 << 53) - 1
MAX_TIME_MS = (1 << 53) - 1
MAX_ACCOUNTS = 1 << 24
MAX_BALANCE = MAX_AMOUNT * MAX_SEQ
ACCOUNT = pid(key(1))
EMPTY_ACCOUNTS_HASH = "c9c465e040bc2c6593341a1eebffca009204543491fad078b3913aa13e94338a"
TWO_ACCOUNTS_HASH = "7026eaae6af560d384424554f0f06db4e1f268c5fcd437eb5e84bb9d21ea4c32"


def header(epoch: int = 1, **over: object) -> CheckpointHeader:
    fields: dict[str, object] = {
        "network": NET,
        "epoch": epoch,
        "prev": bytes(32) if epoch == 1 else bytes([7]) * 32,
        "cut_ms": 1000,
        "covered_sum": bytes(256),
        "covered_count": 5,
        "accounts": bytes(32),
        "n_accounts": 0,
    }
    fields.update(over)
    return CheckpointHeader(**fields)  # type: ignore[arg-type]


def members(h: CheckpointHeader) -> list[object]:
    committee = checkpoint_committee(RULE, h.epoch, h.pool)
    return [k for k in WITNESS_KEYS if pid(k) in committee]


def certified(h: CheckpointHeader) -> Checkpoint:
    committee = checkpoint_committee(RULE, h.epoch, h.pool)
    votes = [sign_checkpoint(k, h) for k in members(h)]  # type: ignore[arg-type]
    return make_checkpoint(h, votes[: committee.quorum])


@pytest.mark.parametrize(
    ("field", "top"),
    [
        ("epoch", MAX_EPOCH),
        ("cut_ms", MAX_TIME_MS),
        ("covered_count", MAX_EPOCH),
        ("n_accounts", MAX_ACCOUNTS),
        ("pool", MAX_EPOCH),
    ],
)
def test_header_numbers_are_bounded_inclusively(field: str, top: int) -> None:
    assert getattr(header(**{"epoch": 2, field: top}), field) == top  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        header(**{"epoch": 2, field: top + 1})  # type: ignore[arg-type]


def test_a_header_epoch_starts_at_1() -> None:
    with pytest.raises(ValidationError):
        header(0)  # a predecessor named, so only the epoch bound refuses it


def test_a_vote_epoch_is_1_to_max_epoch() -> None:
    base = {"network": NET, "header": bytes(32), "witness": ACCOUNT}
    assert CheckpointVote(epoch=MAX_EPOCH, **base).epoch == MAX_EPOCH  # type: ignore[arg-type]
    for bad in (0, MAX_EPOCH + 1):
        with pytest.raises(ValidationError):
            CheckpointVote(epoch=bad, **base)  # type: ignore[arg-type]


def summary(**over: object) -> AccountSummary:
    fields: dict[str, object] = {
        "account": ACCOUNT,
        "balance": 0,
        "next_seq": 1,
        "received": 10,
        "earned": 10,
    }
    fields.update(over)
    return AccountSummary(**fields)  # type: ignore[arg-type]


def test_account_summary_bounds() -> None:
    for ok in (
        {"balance": MAX_BALANCE},
        {"balance": -MAX_BALANCE},
        {"next_seq": MAX_SEQ + 1},
        {"received": MAX_BALANCE, "earned": 0},
        {"earned": 10},
    ):
        summary(**ok)
    for bad in (
        {"balance": MAX_BALANCE + 1},
        {"balance": -MAX_BALANCE - 1},
        {"balance": 1.0},
        {"balance": True},
        {"next_seq": 0},
        {"next_seq": MAX_SEQ + 2},
        {"received": MAX_BALANCE + 1, "earned": 0},
        {"earned": 11},  # more earned than received
    ):
        with pytest.raises(ValidationError):
            summary(**bad)


def test_the_accounts_hash_is_fixed() -> None:
    """Every peer must name the same rows with the same digest (a golden vector)."""
    rows = [summary(balance=-5), summary(account=pid(key(2)), balance=5)]
    assert accounts_hash([]).hex() == EMPTY_ACCOUNTS_HASH
    assert accounts_hash(rows).hex() == TWO_ACCOUNTS_HASH


def test_a_checkpoint_may_keep_cut_and_count_but_neither_may_go_back() -> None:
    first = certified(header(1))
    same = certified(header(2, prev=first.digest))
    follows(same, first)
    verify_chain([first, same], RULE)
    for back in ({"cut_ms": 999, "covered_count": 6}, {"cut_ms": 1001, "covered_count": 4}):
        later = certified(header(2, prev=first.digest, **back))
        with pytest.raises(ValidationError):
            follows(later, first)
        with pytest.raises(ValidationError):
            verify_chain([first, later], RULE)


def test_the_assembler_refuses_outsiders_and_completes_at_exactly_a_quorum() -> None:
    h = header(1)
    committee = checkpoint_committee(RULE, 1)
    asm = CheckpointAssembler(RULE, h)
    with pytest.raises(ValidationError):
        asm.add_vote(sign_checkpoint(key(1), h))
    done = [asm.add_vote(sign_checkpoint(k, h)) for k in members(h)[: committee.quorum]]  # type: ignore[arg-type]
    assert done[:-1] == [None] * (committee.quorum - 1)
    assert done[-1] is not None
    assert len(done[-1].votes) == committee.quorum
    done[-1].verify(RULE)


def test_a_vote_travels_and_a_forged_one_is_refused() -> None:
    h = header(1)
    vote = sign_checkpoint(WITNESS_KEYS[0], h)
    assert open_checkpoint_vote(vote.to_bytes()).message == vote.message
    envelope = decode(vote.to_bytes(), max_size=CheckpointVote.MAX_BYTES)
    envelope["s"] = bytes([envelope["s"][0] ^ 1]) + envelope["s"][1:]
    with pytest.raises(ProtocolError):
        open_checkpoint_vote(encode(envelope))


def _with_votes(h: CheckpointHeader, w: object) -> bytes:
    return encode({"v": 1, "h": h.to_body(), "w": w})


def test_a_checkpoint_carries_1_to_max_committee_votes_in_a_list() -> None:
    h = header(1)
    votes = sorted(
        (sign_checkpoint(key(500 + n), h) for n in range(MAX_COMMITTEE)),
        key=lambda v: v.message.witness,
    )
    full = Checkpoint.from_bytes(_with_votes(h, [v.to_bytes() for v in votes]))
    assert len(full.votes) == MAX_COMMITTEE
    assert len(Checkpoint.from_bytes(_with_votes(h, [votes[0].to_bytes()])).votes) == 1
    for bad in ([], {votes[0].to_bytes(): 0}):
        with pytest.raises(ValidationError):
            Checkpoint.from_bytes(_with_votes(h, bad))


def test_parsing_a_checkpoint_leaves_the_signatures_to_verify() -> None:
    """from_bytes checks shape only (cheap, for any peer's bytes); verify checks votes."""
    cp = certified(header(1))
    wire = decode(cp.to_bytes(), max_size=Checkpoint.MAX_BYTES)
    envelope = decode(wire["w"][0], max_size=CheckpointVote.MAX_BYTES)
    envelope["s"] = bytes([envelope["s"][0] ^ 1]) + envelope["s"][1:]
    wire["w"][0] = encode(envelope)
    parsed = Checkpoint.from_bytes(encode(wire))
    with pytest.raises(ProtocolError):
        parsed.verify(RULE)
    assert dataclasses.replace(parsed, votes=cp.votes).digest == cp.digest
