"""The one quorum check (``protocols.committee.require_quorum``) behind certificates, ledger
checkpoints and pool checkpoints: distinct signers, committee members only, at least
``Committee.quorum`` of them. Each test fails when its part of the rule is removed; the
verifiers' own tests (test_witness, test_checkpoint, test_epochs) check each one calls it.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.committee import MAX_COMMITTEE, Committee, fault_tolerance, require_quorum
from protocols.errors import ValidationError

PEERS = [f"peer-{i:03d}" for i in range(MAX_COMMITTEE + 8)]


def committee(n: int) -> Committee:
    return Committee("account", tuple(PEERS[:n]), n)


def check(c: Committee, signers: list[str]) -> None:
    require_quorum("test", c, signers, outsider=lambda w: f"{w} is an outsider")


@given(n=st.integers(1, MAX_COMMITTEE), data=st.data())
def test_passes_exactly_for_a_quorum_of_distinct_members(n: int, data: st.DataObject) -> None:
    c = committee(n)
    signers = data.draw(st.lists(st.sampled_from(PEERS[: n + 4]), max_size=n + 4))
    ok = (
        len(set(signers)) == len(signers)
        and all(s in c for s in signers)
        and len(signers) >= c.quorum
    )
    if ok:
        check(c, signers)
    else:
        with pytest.raises(ValidationError):
            check(c, signers)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, MAX_COMMITTEE])
def test_one_vote_short_of_the_quorum_is_refused(n: int) -> None:
    c = committee(n)
    check(c, list(c.members[: c.quorum]))
    with pytest.raises(ValidationError, match=f"a quorum of {n} witnesses is {c.quorum}"):
        check(c, list(c.members[: c.quorum - 1]))


def test_a_repeated_signer_is_refused_even_when_the_count_is_met() -> None:
    c = committee(4)
    with pytest.raises(ValidationError, match="two votes from one witness"):
        check(c, [c.members[0], c.members[1], c.members[1]])


def test_an_outsider_is_refused_in_the_callers_words() -> None:
    c = committee(4)
    with pytest.raises(ValidationError, match=f"{PEERS[10]} is an outsider"):
        check(c, [*c.members[:3], PEERS[10]])


@pytest.mark.parametrize("n", range(1, MAX_COMMITTEE + 1))
def test_two_quorums_share_more_than_f_members(n: int) -> None:
    """Why the count is what it is: any two quorums overlap in at least f+1 members, so an
    honest member is in both (what keeps one seq from two certificates)."""
    c = committee(n)
    assert 2 * c.quorum - n >= fault_tolerance(n) + 1
    assert c.quorum <= n
