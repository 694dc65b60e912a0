"""How many rounds and bytes a reconciliation session takes (protocols/reconcile.py).

Found by mutation testing (issue 17, docs/testing.md): the message-size accounting in
``Reconciler.receive`` and ``_Out`` (the reserve kept for later ranges, ``max_ids``, the
cost of the closing range, merged SKIPs) could be broken without any test failing,
because messages still fit under the cap and sessions still converge. What breaks is
how full each message is, and so how many round trips a sync takes: these tests pin
the rounds and bytes of fixed sessions (every peer runs this code, so a change here is
a change of the wire's behaviour and should update the figures on purpose).
"""

from __future__ import annotations

import hashlib
import itertools

import pytest

from protocols.reconcile import (
    ID_SIZE,
    MIN_MESSAGE,
    Mode,
    Range,
    Reconciler,
    decode_message,
    encode_message,
)

MAX_ROUND_TRIPS = 200


def _ids(numbers: range) -> list[bytes]:
    return [hashlib.sha256(b"%d" % i).digest() for i in numbers]


def _session(a: list[bytes], b: list[bytes], **kw: int) -> tuple[int, list[bytes]]:
    """Run a whole session (a initiates); returns the initiator's rounds and every message."""
    kw.setdefault("max_message_bytes", MIN_MESSAGE)
    init, resp = Reconciler(a, **kw), Reconciler(b, **kw)
    msg: bytes | None = init.initiate()
    sent: list[bytes] = []
    for _ in range(MAX_ROUND_TRIPS):
        assert msg is not None
        sent.append(msg)
        msg = resp.receive(msg).reply
        if msg is None:
            break
        sent.append(msg)
        msg = init.receive(msg).reply
        if msg is None:
            break
    else:
        pytest.fail("the session did not end")
    assert init.done
    assert set(init.have) == set(a) - set(b)
    assert set(init.need) == set(b) - set(a)
    assert all(len(m) <= kw["max_message_bytes"] for m in sent)
    return init.rounds, sent


SCATTERED = [x for k, x in enumerate(_ids(range(3300))) if k % 7]


def _thinned(n: int, every: int, offset: int) -> list[bytes]:
    """Ids offset..offset+n, every ``every``-th one left out."""
    return [x for k, x in enumerate(_ids(range(offset, n + offset))) if k % every]


# Caps a few bytes off the minimum put a range's cost exactly at the room left (found
# by a search over sessions: each one fails when a ``<=`` of the accounting becomes ``<``
# or a merged SKIP is costed as a new entry).

# name: initiator's ids, responder's ids, options,
#       (initiator rounds, messages, total bytes, largest message)
SESSIONS = {
    "few against 118": (_ids(range(10)), _ids(range(5, 123)), {}, (1, 2, 4367, 4020)),
    "few against 119": (_ids(range(10)), _ids(range(5, 124)), {}, (3, 6, 5324, 3877)),
    "few against 300": (_ids(range(10)), _ids(range(300)), {}, (4, 8, 13578, 4068)),
    "scattered": (_ids(range(3000)), SCATTERED, {}, (46, 92, 354779, 4091)),
    "one missing": (_ids(range(3000)), _ids(range(1, 3000)), {}, (2, 4, 1604, 461)),
    "halves": (_ids(range(0, 4000, 2)), _ids(range(0, 4000, 3)), {}, (29, 58, 225153, 4087)),
    "default cap": (
        _ids(range(20000)),
        [x for k, x in enumerate(_ids(range(21000))) if k % 11],
        {"max_message_bytes": 65536},
        (7, 14, 652817, 65533),
    ),
    "wide": (
        _ids(range(2000)),
        _ids(range(1000, 2600)),
        {"branching": 64, "id_list_threshold": 64},
        (18, 36, 127783, 4072),
    ),
    "echo fills the room": (
        _thinned(2211, 16, 224),
        _ids(range(2211)),
        {"max_message_bytes": 4222, "branching": 4},
        (33, 66, 260539, 4218),
    ),
    "parts fill the room": (
        _ids(range(1677)),
        _thinned(1677, 11, 18),
        {"max_message_bytes": 4280, "branching": 4},
        (12, 24, 89212, 4272),
    ),
    "a skip fills the room": (
        _thinned(2231, 17, 33),
        _ids(range(2231)),
        {"max_message_bytes": 4281, "branching": 2, "id_list_threshold": 1},
        (13, 26, 59091, 4272),
    ),
    "a merged skip fills the room": (
        _thinned(2386, 26, 104),
        _ids(range(2386)),
        {"max_message_bytes": 4168, "branching": 2, "id_list_threshold": 1},
        (19, 38, 89617, 4164),
    ),
}


@pytest.mark.parametrize("name", SESSIONS)
def test_a_session_takes_a_fixed_number_of_rounds_and_bytes(name: str) -> None:
    a, b, kw, want = SESSIONS[name]
    rounds, sent = _session(a, b, **kw)
    assert (rounds, len(sent), sum(map(len, sent)), max(map(len, sent))) == want


def test_a_short_id_list_is_answered_with_every_id_that_fits_in_one_message() -> None:
    """The peer sent its few ids: up to (room // (id + 2 header bytes)) - 1 come back listed.

    At the 4096-byte minimum that is 118 ids (one round trip); 119 are split into
    fingerprints instead.
    """
    cap = (MIN_MESSAGE - 8 - 20) // (ID_SIZE + 2) - 1
    assert cap == 118
    for theirs, listed in ((cap, True), (cap + 1, False)):
        init = Reconciler(_ids(range(10)), max_message_bytes=MIN_MESSAGE)
        resp = Reconciler(_ids(range(5, 5 + theirs)), max_message_bytes=MIN_MESSAGE)
        reply = resp.receive(init.initiate()).reply
        assert reply is not None
        modes = [r.mode for r in decode_message(reply)]
        assert (modes == [Mode.IDLIST]) is listed


def test_a_session_that_differs_in_one_id_settles_the_rest_with_merged_skips() -> None:
    """Neighbouring SKIPs merge into one: an answer about one range stays small."""
    init = Reconciler(_ids(range(3000)), max_message_bytes=MIN_MESSAGE)
    resp = Reconciler(_ids(range(1, 3000)), max_message_bytes=MIN_MESSAGE)
    reply = resp.receive(init.initiate()).reply
    assert reply is not None
    ranges = decode_message(reply)
    skips = [r for r in ranges if r.mode is Mode.SKIP]
    # The 15 matching ranges of the first message become two SKIPs (before and after
    # the one that differs, which is split into 16 fingerprints).
    assert (len(skips), len(ranges)) == (2, 2 + 16)
    assert all(
        not (x.mode is Mode.SKIP and y.mode is Mode.SKIP) for x, y in itertools.pairwise(ranges)
    )


def test_an_id_list_equal_to_mine_past_the_first_range_is_answered_with_a_skip() -> None:
    """Equal lists are settled wherever the range starts (not only at the minimum)."""
    x, y = sorted(_ids(range(2)))
    resp = Reconciler([x, y])
    msg = encode_message([Range(y, Mode.SKIP), Range(None, Mode.IDLIST, ids=(y,))])
    reply = resp.receive(msg).reply
    assert reply is not None
    assert [r.mode for r in decode_message(reply)] == [Mode.SKIP]
