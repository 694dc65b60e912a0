"""Range-based set reconciliation: exact differences in a bounded number of rounds."""

from __future__ import annotations

import contextlib
import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codec import encode
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.reconcile import (
    FINGERPRINT_SIZE,
    Reconciler,
    decode_message,
    fingerprint_of,
)


def ids(tag: str, n: int) -> list[bytes]:
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(n)]


def run(
    a_ids: list[bytes], b_ids: list[bytes], *, max_rounds: int = 100, **kw: int
) -> tuple[Reconciler, int, int]:
    """Drive a session to the end; returns the initiator, round trips and largest message."""
    a, b = Reconciler(a_ids, **kw), Reconciler(b_ids, **kw)
    msg: bytes | None = a.initiate()
    trips, largest = 0, len(msg)
    while msg is not None:
        trips += 1
        assert trips <= max_rounds, "reconciliation did not finish"
        msg = b.receive(msg).reply
        if msg is None:
            break
        largest = max(largest, len(msg))
        msg = a.receive(msg).reply
        largest = max(largest, len(msg or b""))
    return a, trips, largest


def _bound(n: int, threshold: int = 16, branching: int = 16) -> int:
    return 3 + max(0, math.ceil(math.log(max(n, 1) / threshold, branching)))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 400),
    st.sets(st.integers(0, 999), max_size=60),
    st.sets(st.integers(0, 999), max_size=60),
)
def test_random_sets_learn_exact_differences(
    common: int, only_a: set[int], only_b: set[int]
) -> None:
    shared = ids("c", common)
    a_only = [hashlib.sha256(b"a%d" % i).digest() for i in only_a]
    b_only = [hashlib.sha256(b"b%d" % i).digest() for i in only_b]
    a, trips, largest = run(shared + a_only, shared + b_only)
    assert a.done
    assert a.have == sorted(a_only)
    assert a.need == sorted(b_only)
    assert trips <= _bound(common + max(len(only_a), len(only_b)))
    assert largest <= a.max_message_bytes


def test_equal_sets_finish_in_one_round_trip() -> None:
    same = ids("x", 5000)
    a, trips, largest = run(same, list(reversed(same)))
    assert (a.have, a.need, trips) == ([], [], 1)
    assert largest < 1000  # 16 fingerprints out, one SKIP back


def test_empty_against_large_respects_the_message_cap() -> None:
    big = ids("y", 6_000)
    a, _, largest = run([], big, max_message_bytes=8192, max_rounds=400)
    assert a.need == sorted(big) and a.have == []
    assert largest <= 8192
    b, _, _ = run(big, [], max_message_bytes=8192, max_rounds=400)
    assert b.have == sorted(big)


def test_few_differences_in_a_large_set_take_few_rounds() -> None:
    shared = ids("z", 50_000)
    a, trips, largest = run(shared + ids("a", 3), shared + ids("b", 2))
    assert a.have == sorted(ids("a", 3)) and a.need == sorted(ids("b", 2))
    assert trips <= _bound(50_000)
    assert largest <= 64 * 1024


def test_fingerprint_is_order_free() -> None:
    x = ids("f", 50)
    assert fingerprint_of(x) == fingerprint_of(reversed(x))
    assert len(fingerprint_of(x)) == FINGERPRINT_SIZE
    assert fingerprint_of(x) != fingerprint_of(x[1:])


GARBAGE = [
    b"",
    b"\xff",
    encode([2, [[None, 0, None]]]),
    encode([1, []]),
    encode([1, [[b"\x01", 0, None]]]),  # does not end at infinity
    encode([1, [[None, 3, None]]]),  # unknown mode
    encode([1, [[None, 1, b"short"]]]),  # bad fingerprint
    encode([1, [[None, 2, [b"x" * 31]]]]),  # bad id
    encode([1, [[None, 2, [b"b" * 32, b"a" * 32]]]]),  # unsorted ids
    encode([1, [[b"\x05", 0, None], [b"\x05", 0, None], [None, 0, None]]]),  # not increasing
    encode([1, [[b"\x05", 2, [b"\x06" * 32]], [None, 0, None]]]),  # id outside range
    encode([1, [[None, 0, None], [None, 0, None]]]),  # range after infinity
    encode([1, [[b"x" * 33, 0, None], [None, 0, None]]]),  # bound too long
    encode({"v": 1}),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(data)
    with pytest.raises(RemoteProtocolError):
        Reconciler(ids("g", 10)).receive(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    r = Reconciler(ids("g", 40))
    with contextlib.suppress(RemoteProtocolError):
        r.receive(data)


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Reconciler([b"short"])
    with pytest.raises(LocalProtocolError):
        Reconciler([], max_message_bytes=100)
    a = Reconciler([])
    a.initiate()
    with pytest.raises(LocalProtocolError):
        a.initiate()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 1500),
    st.sets(st.integers(0, 5000), max_size=700),
    st.sets(st.integers(0, 5000), max_size=700),
    st.sampled_from([2, 4, 16]),
    st.sampled_from([1, 4, 16]),
)
def test_small_message_caps_still_give_exact_differences(
    common: int, only_a: set[int], only_b: set[int], branching: int, threshold: int
) -> None:
    """The tightest cap forces the carry-over paths; the answer must stay exact."""
    shared = ids("s", common)
    a_only = [hashlib.sha256(b"A%d" % i).digest() for i in only_a]
    b_only = [hashlib.sha256(b"B%d" % i).digest() for i in only_b]
    a, _, largest = run(
        shared + a_only,
        shared + b_only,
        max_rounds=2000,
        max_message_bytes=4096,
        branching=branching,
        id_list_threshold=threshold,
    )
    assert a.have == sorted(a_only) and a.need == sorted(b_only)
    assert largest <= 4096


def test_step_reports_each_difference_once() -> None:
    shared = ids("d", 3000)
    a, b = (
        Reconciler(shared + ids("a", 300), max_message_bytes=4096),
        Reconciler(shared + ids("b", 300), max_message_bytes=4096),
    )
    msg: bytes | None = a.initiate()
    seen_have: list[bytes] = []
    seen_need: list[bytes] = []
    for _ in range(500):
        assert msg is not None
        msg = b.receive(msg).reply
        if msg is None:
            break
        step = a.receive(msg)
        seen_have += step.have
        seen_need += step.need
        msg = step.reply
        if msg is None:
            break
    assert a.done
    assert sorted(seen_have) == a.have == sorted(ids("a", 300))
    assert sorted(seen_need) == a.need == sorted(ids("b", 300))
