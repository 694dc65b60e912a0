"""Committee and referee selection: deterministic, unbiasable by the payer, quorums intersect."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from settlement_fixtures import key, pid

from protocols.committee import (
    CommitteeRule,
    EligibilityPolicy,
    fault_tolerance,
    quorum_size,
    select_committee,
    select_referees,
)
from protocols.errors import LocalProtocolError

POOL = [pid(key(200 + i)) for i in range(30)]
BOOT = [pid(key(300 + i)) for i in range(4)]
ACCOUNT = pid(key(1))


def test_selection_is_deterministic_and_order_free() -> None:
    c1 = select_committee(ACCOUNT, b"beacon", POOL)
    c2 = select_committee(ACCOUNT, b"beacon", list(reversed(POOL)))
    assert c1 == c2 and c1.size == 4 and c1.quorum == 3 and c1.f == 1 and not c1.degraded
    assert set(c1.members) <= set(POOL)


def test_beacon_and_account_change_the_committee() -> None:
    c1 = select_committee(ACCOUNT, b"beacon", POOL)
    assert select_committee(ACCOUNT, b"other beacon", POOL).members != c1.members
    assert select_committee(pid(key(2)), b"beacon", POOL).members != c1.members


def test_account_never_witnesses_itself() -> None:
    c = select_committee(POOL[0], b"b", POOL[:5])
    assert POOL[0] not in c.members and c.size == 4


def test_small_swarm_falls_back_to_bootstrap_witnesses() -> None:
    c = select_committee(ACCOUNT, b"b", POOL[:2], fallback=BOOT)
    assert c.size == 4 and set(c.members) <= set(POOL[:2]) | set(BOOT)
    tiny = select_committee(ACCOUNT, b"b", POOL[:2])
    assert tiny.size == 2 and tiny.degraded and tiny.f == 0 and tiny.quorum == 2
    with pytest.raises(LocalProtocolError):
        select_committee(ACCOUNT, b"b", [ACCOUNT])


def test_larger_f() -> None:
    c = select_committee(ACCOUNT, b"b", POOL, f=2)
    assert c.size == 7 and c.quorum == 5 and c.f == 2


@given(st.integers(1, 64))
def test_any_two_quorums_share_an_honest_member(n: int) -> None:
    q, f = quorum_size(n), fault_tolerance(n)
    assert q <= n - f  # the honest members alone can form a quorum (liveness)
    assert 2 * q - n >= f + 1  # two quorums overlap in more than f members (safety)


@settings(max_examples=30)
@given(st.integers(0, 10_000))
def test_grinding_keys_gives_a_payer_no_control(seed: int) -> None:
    """A fresh key is just a new target; membership is spread over the whole pool."""
    account = pid(key(10_000 + seed))
    c = select_committee(account, b"beacon", POOL)
    assert len(set(c.members)) == 4


def test_committee_seats_are_spread_evenly() -> None:
    counts = dict.fromkeys(POOL, 0)
    for i in range(300):
        for m in select_committee(pid(key(5000 + i)), b"beacon", POOL).members:
            counts[m] += 1
    # 1200 seats over 30 members: 40 expected each; nobody is starved or dominant.
    assert min(counts.values()) >= 15 and max(counts.values()) <= 75


def test_referees_exclude_the_parties() -> None:
    job = b"j" * 16
    panel = select_referees(job, (POOL[0], POOL[1]), b"b", POOL[:5])
    assert len(panel.members) == 3 and panel.threshold == 2
    assert POOL[0] not in panel and POOL[1] not in panel
    assert panel == select_referees(job, (POOL[1], POOL[0]), b"b", list(reversed(POOL[:5])))


def test_rule_caches_and_eligibility() -> None:
    rule = CommitteeRule(beacon=b"b", pool=frozenset(POOL), fallback=frozenset(BOOT))
    assert rule.committee_for(ACCOUNT) is rule.committee_for(ACCOUNT)
    elig = EligibilityPolicy(min_earned=100).eligible(
        {POOL[0]: 100, POOL[1]: 99, POOL[2]: 500, POOL[3]: 1000},
        identities={POOL[0], POOL[1], POOL[2]},
        banned={POOL[2]},
    )
    assert elig == {POOL[0]}
