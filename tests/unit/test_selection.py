"""Bid selection is deterministic: filters, score, tie-break, independent of arrival order."""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError
from protocols.identity import peer_id_from_public_key
from protocols.market import Bid, JobRequest, TensorMeta
from protocols.selection import Weights, bid_fits, rank_bids, score, tie_break

PEERS = [
    peer_id_from_public_key(bytes(nacl.signing.SigningKey(bytes([i]) * 32).verify_key))
    for i in range(1, 9)
]
REQUESTER = PEERS[0]
EXECS = PEERS[1:]
CID = hashlib.sha256(b"m").hexdigest()
JOB = b"J" * 16
NOW = 1000.0


def request(**over: Any) -> JobRequest:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "requester": REQUESTER,
        "model_cid": CID,
        "inputs": (TensorMeta("x", "float32", (1, 4)),),
        "input_bytes": 16,
        "max_price": 1_000,
        "deadline": NOW + 2.0,
        "bid_window": 0.1,
    }
    fields.update(over)
    return JobRequest(**fields)


def bid(
    executor: str, price: int = 100, eta_ms: int = 50, expires_at: float = NOW + 1, **over: Any
) -> Bid:
    return Bid(
        job_id=over.get("job_id", JOB),
        executor=executor,
        price=price,
        eta_ms=eta_ms,
        expires_at=expires_at,
    )


def test_cheapest_fitting_bid_wins() -> None:
    bids = [bid(EXECS[0], 300), bid(EXECS[1], 100), bid(EXECS[2], 200)]
    ranked = rank_bids(request(), bids, now=NOW)
    assert [b.price for b in ranked] == [100, 200, 300]


def test_filters() -> None:
    r = request()
    good = bid(EXECS[0])
    assert bid_fits(r, good, now=NOW)
    assert not bid_fits(r, bid(EXECS[0], job_id=b"K" * 16), now=NOW)  # other job
    assert not bid_fits(r, bid(EXECS[0], expires_at=NOW - 0.001), now=NOW)  # expired
    assert not bid_fits(r, bid(EXECS[0], price=1_001), now=NOW)  # over max price
    assert not bid_fits(r, bid(EXECS[0], eta_ms=2_001), now=NOW)  # misses deadline
    assert bid_fits(r, bid(EXECS[0], eta_ms=2_000), now=NOW)  # exactly on time
    assert not bid_fits(r, bid(REQUESTER), now=NOW)  # self-dealing
    assert not bid_fits(r, good, now=NOW, banned={EXECS[0]})
    assert rank_bids(r, [bid(EXECS[0], price=5_000)], now=NOW) == []


def test_eta_and_reputation_matter() -> None:
    r = request()
    fast, slow = bid(EXECS[0], 100, eta_ms=10), bid(EXECS[1], 100, eta_ms=1_500)
    assert rank_bids(r, [slow, fast], now=NOW)[0] == fast
    a, b = bid(EXECS[0], 100), bid(EXECS[1], 100)
    assert rank_bids(r, [a, b], now=NOW, reputation={EXECS[1]: 1.0, EXECS[0]: 0.0})[0] == b
    assert rank_bids(r, [a, b], now=NOW, reputation={EXECS[0]: 1.0, EXECS[1]: 0.0})[0] == a
    # Price-only weights ignore eta entirely.
    w = Weights(price=1.0, eta=0.0, reputation=0.0)
    pricier_fast = bid(EXECS[0], 101, eta_ms=1)
    cheap_slow = bid(EXECS[1], 100, eta_ms=1_900)
    assert rank_bids(r, [pricier_fast, cheap_slow], now=NOW, weights=w)[0] == cheap_slow


def test_ties_broken_by_hash() -> None:
    r = request()
    bids = [bid(e) for e in EXECS]
    ranked = rank_bids(r, bids, now=NOW)
    assert [b.executor for b in ranked] == sorted(EXECS, key=lambda e: tie_break(JOB, e))
    # Another job id gives another order (per-job fairness), with overwhelming probability.
    other = request(job_id=b"Z" * 16)
    other_ranked = rank_bids(other, [bid(e, job_id=b"Z" * 16) for e in EXECS], now=NOW)
    assert [b.executor for b in other_ranked] != [b.executor for b in ranked]


def test_one_entry_per_executor_its_best_bid() -> None:
    r = request()
    ranked = rank_bids(r, [bid(EXECS[0], 300), bid(EXECS[0], 200), bid(EXECS[1], 250)], now=NOW)
    assert [(b.executor, b.price) for b in ranked] == [(EXECS[0], 200), (EXECS[1], 250)]


def test_score_terms_are_bounded() -> None:
    r = request()
    s = score(r, bid(EXECS[0], 1_000, eta_ms=2_000), now=NOW, reputation={EXECS[0]: -5.0})
    assert s == pytest.approx(1.0 + 0.25 + 0.25)
    assert score(request(max_price=0), bid(EXECS[0], 0), now=NOW, reputation={}) >= 0


def test_bad_weights() -> None:
    with pytest.raises(LocalProtocolError):
        Weights(price=-1.0)


_BIDS = st.lists(
    st.builds(
        bid,
        st.sampled_from(EXECS),
        price=st.integers(0, 1_200),
        eta_ms=st.integers(0, 2_500),
        expires_at=st.floats(NOW - 1, NOW + 2),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(bids=_BIDS, data=st.data(), rep=st.dictionaries(st.sampled_from(EXECS), st.floats(0, 1)))
def test_arrival_order_never_changes_the_result(
    bids: list[Bid], data: st.DataObject, rep: dict[str, float]
) -> None:
    shuffled = data.draw(st.permutations(bids))
    r = request()
    first = rank_bids(r, bids, now=NOW, reputation=rep)
    assert rank_bids(r, shuffled, now=NOW, reputation=rep) == first
    # Every ranked bid fits, each executor appears once, and nothing fitting is dropped.
    assert all(bid_fits(r, b, now=NOW) for b in first)
    assert len({b.executor for b in first}) == len(first)
    assert {b.executor for b in first} == {b.executor for b in bids if bid_fits(r, b, now=NOW)}
