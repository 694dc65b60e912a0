"""Rules of ledger set reconciliation (protocols/reconcile.py) that no other test held.

Messages come from untrusted peers, and two peers only agree when they compute the same
fingerprints. Found by mutation testing (issue 17, docs/testing.md): each test fails when
its rule is removed. (The message-size accounting: test_rules_reconcile_rounds.py.)
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.codec import encode
from protocols.errors import ProtocolError
from protocols.reconcile import (
    ID_SIZE,
    MIN_MESSAGE,
    Mode,
    Reconciler,
    _separator,
    decode_message,
    fingerprint_of,
)

IDS = [bytes([i]) * 32 for i in range(1, 6)]
# Ids that read differently little- and big-endian (IDS above do not).
SKEWED = [bytes(range(i, i + 32)) for i in range(1, 6)]


def test_fingerprints_are_fixed() -> None:
    """Every peer must compute the same fingerprint of the same ids (a golden vector)."""
    assert fingerprint_of([]).hex() == "2c34ce1df23b838c5abf2a7f6437cca3"
    assert fingerprint_of(IDS).hex() == "b10b87d7863c2b934161c7016e3041c5"
    assert fingerprint_of(reversed(IDS)) == fingerprint_of(IDS)
    assert fingerprint_of(SKEWED).hex() == "722855e62ab96d17c0fbe9c622fc5b25"


def test_a_bound_after_a_shared_prefix_is_one_byte_past_it() -> None:
    prev, nxt = b"\x00\x05" + bytes(30), b"\x00\x07" + bytes(30)
    assert _separator(prev, nxt) == b"\x00\x07"


@given(st.lists(st.binary(min_size=ID_SIZE, max_size=ID_SIZE), min_size=2, unique=True))
def test_a_range_bound_is_the_shortest_prefix_of_the_next_id_above_the_last(
    ids: list[bytes],
) -> None:
    prev, nxt = sorted(ids)[:2]
    sep = _separator(prev, nxt)
    assert prev < sep <= nxt and nxt.startswith(sep)
    assert not prev < sep[:-1]  # one byte shorter no longer separates them


def test_a_range_entry_must_be_a_list_of_three() -> None:
    for bad in ([None, 0], [None, 0, None, 0], (None, 0)):
        with pytest.raises(ProtocolError):
            decode_message(encode([1, [bad]]))


def test_a_bound_may_be_a_full_32_byte_id() -> None:
    msg = encode([1, [[b"\x05" * 32, 0, None], [None, 0, None]]])
    assert decode_message(msg)[0].upper == b"\x05" * 32
    with pytest.raises(ProtocolError):
        decode_message(encode([1, [[b"\x05" * 33, 0, None], [None, 0, None]]]))


def test_an_id_list_holds_ids_from_its_lower_bound_up_to_not_including_its_upper() -> None:
    low, high = b"\x02" * 32, b"\x04" * 32
    ok = encode([1, [[low, 0, None], [high, 2, [low, b"\x03" * 32]], [None, 0, None]]])
    assert decode_message(ok)[1].ids == (low, b"\x03" * 32)
    for ids in ([low, high], [low, low]):
        with pytest.raises(ProtocolError):
            decode_message(encode([1, [[low, 0, None], [high, 2, ids], [None, 0, None]]]))


def test_a_reconciler_reads_messages_only_up_to_its_own_size_cap() -> None:
    many = sorted(bytes([i, j]) + bytes(30) for i in range(1, 3) for j in range(80))
    big = encode([1, [[None, 2, many]]])
    assert len(big) > MIN_MESSAGE
    with pytest.raises(ProtocolError):
        Reconciler(IDS, max_message_bytes=MIN_MESSAGE).receive(big)


def test_an_initiator_lists_all_its_ids_when_they_are_few() -> None:
    msg = decode_message(Reconciler(IDS).initiate())
    assert [(r.upper, r.mode, r.ids) for r in msg] == [(None, Mode.IDLIST, tuple(IDS))]


def test_exactly_the_threshold_of_ids_is_still_sent_as_a_list() -> None:
    msg = decode_message(Reconciler(IDS, id_list_threshold=len(IDS)).initiate())
    assert [r.mode for r in msg] == [Mode.IDLIST]


def test_an_id_list_equal_to_mine_is_answered_with_a_skip_and_rounds_are_counted() -> None:
    a, b = Reconciler(IDS), Reconciler(IDS)
    step = b.receive(a.initiate())
    assert b.rounds == 1
    assert step.reply is not None
    assert [(r.upper, r.mode) for r in decode_message(step.reply)] == [(None, Mode.SKIP)]
    assert (step.have, step.need) == ((), ())
    end = a.receive(step.reply)
    assert a.rounds == 1 and end.reply is None
    assert (a.have, a.need) == ([], [])


def test_every_receive_counts_one_round() -> None:
    common = [bytes([i, j]) + bytes(30) for i in range(1, 4) for j in range(100)]
    only_a, only_b = [b"\xaa" * 32], [b"\xbb" * 32, b"\x00\x07" + bytes(30)]
    a, b = Reconciler(common + only_a), Reconciler(common + only_b)
    msg: bytes | None = a.initiate()
    calls = {"a": 0, "b": 0}
    for _ in range(20):
        assert msg is not None
        msg = b.receive(msg).reply
        calls["b"] += 1
        assert b.rounds == calls["b"]
        if msg is None:
            break
        msg = a.receive(msg).reply
        calls["a"] += 1
        assert a.rounds == calls["a"]
        if msg is None:
            break
    assert calls["a"] >= 2
    assert (a.have, a.need) == (only_a, sorted(only_b))


def test_an_id_list_threshold_that_cannot_fit_in_a_message_is_refused() -> None:
    """initiate() sends up to ``id_list_threshold`` ids in its first message; a threshold
    whose list cannot fit under ``max_message_bytes`` would make that message one the peer
    refuses (and, as a fingerprint, one neither side could ever answer with a list)."""
    fits = (MIN_MESSAGE - 128) // (ID_SIZE + 2)  # 116
    Reconciler([], max_message_bytes=MIN_MESSAGE, id_list_threshold=fits)
    with pytest.raises(ProtocolError):
        Reconciler([], max_message_bytes=MIN_MESSAGE, id_list_threshold=fits + 1)
    with pytest.raises(ProtocolError):
        Reconciler([], max_message_bytes=MIN_MESSAGE, id_list_threshold=1024)
    Reconciler([], id_list_threshold=1024)  # the default cap holds 1024 ids
    # The bound is exact: 117 ids need 117 * 34 + 128 = 4106 bytes.
    Reconciler([], max_message_bytes=4106, id_list_threshold=117)
    with pytest.raises(ProtocolError):
        Reconciler([], max_message_bytes=4105, id_list_threshold=117)


def test_the_first_message_fits_the_cap_at_the_largest_threshold_and_the_session_ends() -> None:
    fits = (MIN_MESSAGE - 128) // (ID_SIZE + 2)
    mine = [bytes([0xFF]) * 31 + bytes([i]) for i in range(fits)]
    theirs = mine[10:] + [bytes([0xFE]) * 31 + bytes([i]) for i in range(fits - 10)]
    kw = {"max_message_bytes": MIN_MESSAGE, "id_list_threshold": fits}
    a, b = Reconciler(mine, **kw), Reconciler(theirs, **kw)
    msg: bytes | None = a.initiate()
    assert msg is not None and len(msg) <= MIN_MESSAGE
    assert [r.mode for r in decode_message(msg)] == [Mode.IDLIST]
    for _ in range(20):
        assert msg is not None and len(msg) <= MIN_MESSAGE
        msg = b.receive(msg).reply
        if msg is None:
            break
        assert len(msg) <= MIN_MESSAGE
        msg = a.receive(msg).reply
        if msg is None:
            break
    assert a.done
    assert a.have == sorted(mine[:10]) and a.need == sorted(set(theirs) - set(mine))
