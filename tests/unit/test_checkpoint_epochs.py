"""Ledger checkpoints signed by the committee of an epoch checkpoint (issues 10 and 11).

A ledger checkpoint names the epoch checkpoint (``CheckpointHeader.pool``) whose
committee signs it, so checkpoints go on once the genesis witnesses are gone, and a
verifier that holds the epoch-checkpoint chain checks each one against the committee of
its own epoch checkpoint, offline, forever. Each rule has a test that fails without it.
"""

from __future__ import annotations

import dataclasses

import pytest
from settlement_fixtures import policy

from protocols.checkpoint import (
    Checkpoint,
    CheckpointHeader,
    checkpoint_committee,
    follows,
    make_checkpoint,
    rule_id,
    sign_checkpoint,
    verify_chain,
)
from protocols.committee import CommitteeRule, UnknownCheckpoint
from protocols.epochs import EpochRules
from protocols.errors import ValidationError
from protocols.ledger_state import LedgerState
from tests.unit.test_epochs import GENESIS, KEYS, MEMBERS, grow, new_rules

POOL = {m: 1 for m in MEMBERS[:5]}


def epoch_rules(upto: int = 3) -> EpochRules:
    rules = new_rules()
    grow(rules, upto, POOL)
    return rules


def header(
    rules: CommitteeRule, pool: int, epoch: int = 1, prev: bytes = bytes(32)
) -> CheckpointHeader:
    h, _ = LedgerState(rules, policy()).checkpoint_draft(1_000, rule_id(rules))
    return dataclasses.replace(h, pool=pool, epoch=epoch, prev=prev)


def signed_by(h: CheckpointHeader, signers: list[str]) -> Checkpoint:
    return make_checkpoint(h, [sign_checkpoint(KEYS[m], h) for m in signers])


def quorum_of(rules: CommitteeRule, h: CheckpointHeader) -> list[str]:
    committee = checkpoint_committee(rules, h.epoch, h.pool)
    return list(committee.members[: committee.quorum])


def test_a_checkpoint_signed_by_a_later_epochs_committee_is_adopted_and_verifies() -> None:
    rules = epoch_rules()
    h = header(rules, pool=3)
    committee = checkpoint_committee(rules, 1, 3)
    assert GENESIS not in committee and committee.size == 4  # drawn from the pool alone
    cp = signed_by(h, quorum_of(rules, h))
    cp = Checkpoint.from_bytes(cp.to_bytes())
    assert cp.header.pool == 3
    cp.verify(rules)
    verify_chain([cp], rules)
    ledger = LedgerState(rules, policy())
    ledger.adopt_checkpoint(cp)
    assert ledger.checkpoint == cp
    # Offline: a verifier that loads the epoch chain (and nothing else) checks it too.
    verify_chain([cp], epoch_rules())
    # One that lacks the epoch checkpoint it names cannot, and says why.
    with pytest.raises(UnknownCheckpoint):
        cp.verify(epoch_rules(upto=2))


def test_a_checkpoint_signed_by_another_committee_is_refused() -> None:
    rules = epoch_rules()
    h = header(rules, pool=3)
    # The genesis witness alone (the pre-epoch rule) cannot sign one cast under epoch 3.
    with pytest.raises(ValidationError, match="not in the committee"):
        signed_by(h, [GENESIS]).verify(rules)
    # Nor can epoch 2's committee, where it differs from epoch 3's.
    three = checkpoint_committee(rules, 1, 3)
    other = [m for m in quorum_of(rules, header(rules, pool=2)) if m not in three]
    assert other
    with pytest.raises(ValidationError, match="not in the committee"):
        signed_by(h, [*quorum_of(rules, h)[:-1], other[0]]).verify(rules)
    # Claiming the genesis rule (pool 0) does not let the pool committee sign it.
    genesis_h = header(rules, pool=0)
    with pytest.raises(ValidationError, match="not in the committee"):
        signed_by(genesis_h, quorum_of(rules, h)).verify(rules)
    signed_by(genesis_h, [GENESIS]).verify(rules)  # (the genesis witness does)


def test_old_genesis_checkpoints_keep_their_bytes_and_verify() -> None:
    rules = epoch_rules()
    h = header(rules, pool=0)
    assert "pool" not in h.to_body()  # a header from before this field has the same digest
    assert CheckpointHeader.from_body(h.to_body()) == h
    body = h.to_body() | {"pool": 0}
    with pytest.raises(ValidationError, match="pool 0"):
        CheckpointHeader.from_body(body)
    plain = CommitteeRule(beacon=b"seed", fallback=frozenset({GENESIS}), f=1)
    verify_chain([signed_by(h, [GENESIS])], plain)  # a plain rule verifies it as before
    with pytest.raises(UnknownCheckpoint):
        checkpoint_committee(plain, 1, 3)


def test_a_chain_never_goes_back_to_an_older_epochs_committee() -> None:
    rules = epoch_rules()
    first = signed_by(header(rules, pool=3), quorum_of(rules, header(rules, pool=3)))
    h2 = header(rules, pool=2, epoch=2, prev=first.digest)
    second = signed_by(h2, quorum_of(rules, h2))
    second.verify(rules)  # its own signatures are fine
    with pytest.raises(ValidationError, match="back in time"):
        verify_chain([first, second], rules)
    with pytest.raises(ValidationError, match="back in time"):
        follows(second, first)
    h3 = header(rules, pool=3, epoch=2, prev=first.digest)
    verify_chain([first, signed_by(h3, quorum_of(rules, h3))], rules)
