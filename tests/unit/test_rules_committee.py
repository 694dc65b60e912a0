"""Rules of committee and referee selection (protocols/committee.py) that no other test held.

Who witnesses an account's transfers and who referees a disputed job decides who can
certify payments: every peer must pick the same members. Found by mutation testing
(issue 17, docs/testing.md): each test fails when its rule is removed.
"""

from __future__ import annotations

import pytest

from protocols.committee import (
    MAX_COMMITTEE,
    Committee,
    CommitteeRule,
    describe_committee,
    select_committee,
    select_referees,
)
from protocols.errors import LocalProtocolError

PEERS = [f"peer-{i:03d}" for i in range(80)]
ACCOUNT = "account"
BEACON = b"beacon"
JOB = b"\x07" * 16


def test_f_may_be_0_to_21_and_a_committee_holds_3f_plus_1() -> None:
    assert select_committee(ACCOUNT, BEACON, PEERS, f=0).size == 1
    top = select_committee(ACCOUNT, BEACON, PEERS, f=(MAX_COMMITTEE - 1) // 3)
    assert top.size == top.target_size == MAX_COMMITTEE
    for bad in (-1, (MAX_COMMITTEE - 1) // 3 + 1):
        with pytest.raises(LocalProtocolError):
            select_committee(ACCOUNT, BEACON, PEERS[:10], f=bad)


def test_a_committee_of_max_committee_members_is_allowed_and_one_more_is_not() -> None:
    assert Committee(ACCOUNT, tuple(PEERS[:MAX_COMMITTEE]), MAX_COMMITTEE).size == MAX_COMMITTEE
    with pytest.raises(LocalProtocolError):
        Committee(ACCOUNT, tuple(PEERS[: MAX_COMMITTEE + 1]), MAX_COMMITTEE)


def test_the_rule_selects_committees_with_its_own_f() -> None:
    rule = CommitteeRule(beacon=BEACON, fallback=frozenset(PEERS[:20]), f=2)
    assert rule.committee_for(ACCOUNT).size == 7
    assert rule.committee_for(ACCOUNT).target_size == 7


def test_a_referee_panel_has_3_members_by_default_and_up_to_max_committee() -> None:
    assert len(select_referees(JOB, [], BEACON, PEERS).members) == 3
    panel = select_referees(JOB, [], BEACON, PEERS, size=MAX_COMMITTEE)
    assert len(panel.members) == MAX_COMMITTEE
    with pytest.raises(LocalProtocolError):
        select_referees(JOB, [], BEACON, PEERS, size=MAX_COMMITTEE + 1)


def test_referees_come_from_the_pool_alone_when_it_holds_enough() -> None:
    pool, fallback = PEERS[:3], PEERS[3:40]
    panel = select_referees(JOB, [], BEACON, pool, size=3, fallback=fallback)
    assert set(panel.members) == set(pool)


def test_a_short_pool_is_topped_up_from_the_fallback_not_replaced_by_it() -> None:
    pool, fallback = PEERS[:2], PEERS[2:4]
    panel = select_referees(JOB, [], BEACON, pool, size=3, fallback=fallback)
    assert len(panel.members) == 3
    assert set(panel.members) <= set(pool) | set(fallback)


def test_describe_committee_says_where_the_members_came_from() -> None:
    """The keys are those of ``edgeswarm ledger status --json``: a contract."""
    rule = CommitteeRule(beacon=BEACON, pool=frozenset(PEERS[:6]), fallback=frozenset(PEERS[6:9]))
    committee = rule.committee_for(ACCOUNT)
    assert set(committee.members) <= set(PEERS[:6])  # the pool holds enough
    assert describe_committee(committee, rule) == {
        "members": list(committee.members),
        "size": 4,
        "target_size": 4,
        "f": 1,
        "quorum": 3,
        "degraded": False,
        "from_pool": 4,
        "from_fallback": 0,
    }
