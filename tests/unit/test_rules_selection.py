"""Rules of bid selection (protocols/selection.py) that no other test held.

Found by mutation testing (issue 17, docs/testing.md): each test fails when its rule is
removed. Selection decides who is paid and how much, so its boundaries are money rules.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError
from protocols.selection import Weights, bid_fits, rank_bids, score
from tests.unit.test_selection import EXECS, NOW, bid, request

ONLY_PRICE = Weights(price=1.0, eta=0.0, reputation=0.0)
ONLY_ETA = Weights(price=0.0, eta=1.0, reputation=0.0)
ONLY_REP = Weights(price=0.0, eta=0.0, reputation=1.0)


def test_a_bid_of_exactly_the_max_price_fits_and_one_more_does_not() -> None:
    req = request(max_price=1_000)
    assert bid_fits(req, bid(EXECS[0], price=1_000), now=NOW)
    assert not bid_fits(req, bid(EXECS[0], price=1_001), now=NOW)


def test_a_bid_fits_up_to_and_including_its_expiry() -> None:
    b = bid(EXECS[0], expires_at=NOW + 1)
    assert bid_fits(request(), b, now=NOW + 1)
    assert not bid_fits(request(), b, now=NOW + 1.001)


def test_of_one_executors_equal_rebids_the_longer_lived_one_is_kept() -> None:
    short, long = bid(EXECS[0], expires_at=NOW + 1), bid(EXECS[0], expires_at=NOW + 1.5)
    for order in ([short, long], [long, short]):
        assert rank_bids(request(), order, now=NOW) == [long]


@given(st.integers(0, 1_000))
def test_the_price_term_is_the_price_over_the_max_price(price: int) -> None:
    req, b = request(max_price=1_000), bid(EXECS[0], price=price)
    got = score(req, b, now=NOW, reputation={}, weights=ONLY_PRICE)
    assert got == pytest.approx(price / 1_000)


def test_with_a_max_price_of_0_the_price_term_is_0() -> None:
    got = score(
        request(max_price=0), bid(EXECS[0], price=0), now=NOW, reputation={}, weights=ONLY_PRICE
    )
    assert got == 0.0


@pytest.mark.parametrize("left_s", [0.25, 0.5, 2.0])
def test_the_eta_term_is_the_eta_over_the_time_left(left_s: float) -> None:
    req = request(deadline=NOW + left_s)
    got = score(req, bid(EXECS[0], eta_ms=200), now=NOW, reputation={}, weights=ONLY_ETA)
    assert got == pytest.approx(0.2 / left_s)


def test_the_eta_term_is_at_most_1() -> None:
    req = request(deadline=NOW + 2.0)
    got = score(req, bid(EXECS[0], eta_ms=10_000), now=NOW, reputation={}, weights=ONLY_ETA)
    assert got == 1.0


@pytest.mark.parametrize(("rep", "term"), [(5.0, 0.0), (1.0, 0.0), (0.25, 0.75), (-3.0, 1.0)])
def test_reputation_is_clamped_to_0_1(rep: float, term: float) -> None:
    got = score(request(), bid(EXECS[0]), now=NOW, reputation={EXECS[0]: rep}, weights=ONLY_REP)
    assert got == pytest.approx(term)


def test_a_weight_is_a_number_from_0_to_a_million() -> None:
    assert Weights(price=1e6).price == 1e6
    assert Weights(eta=0).eta == 0
    for bad in (1e6 + 0.5, -0.001):
        with pytest.raises(LocalProtocolError):
            Weights(reputation=bad)
