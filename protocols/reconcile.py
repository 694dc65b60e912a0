"""Range-based set reconciliation (Negentropy style), sans-IO.

Two peers each hold a set of 32-byte ids (ledger fact ids). The id space is
cut into ranges; for each range a side sends either a fingerprint of its ids
there, or the ids themselves when there are few. A range whose fingerprints
match is done (``SKIP``); a mismatched one is split into ``branching``
sub-ranges of about equal count and the exchange recurses. Each round trip
goes one level down, so a few round trips settle millions of ids while only
ranges that differ cost bandwidth.

Message (canonical CBOR): ``[1, [[upper, mode, payload], ...]]``. Ranges are
contiguous: the first starts at the empty bound (the minimum), each ends at
its ``upper`` (exclusive; a byte string of 0..32 bytes, compared
lexicographically) and the last ends at ``null`` (+infinity). ``mode`` 0 =
SKIP (payload null), 1 = FINGERPRINT (16 bytes), 2 = IDLIST (list of sorted
ids inside the range). Messages stay under ``max_message_bytes``: when the
budget runs out, the rest of the space is sent as one fingerprint and the
peer picks it up in the next round.

Usage::

    a, b = Reconciler(ids_a), Reconciler(ids_b)
    msg = a.initiate()
    while msg is not None:
        msg = b.receive(msg).reply      # responder
        if msg is None: break
        msg = a.receive(msg).reply      # initiator: None when done
    a.have, a.need   # ids only a has (push them) / ids only b has (fetch them)

The initiator learns both differences exactly; the responder only answers.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from protocols.codec import decode, encode
from protocols.errors import DecodeError, LocalProtocolError, ValidationError

VERSION = 1
ID_SIZE = 32
FINGERPRINT_SIZE = 16
DEFAULT_MAX_MESSAGE = 64 * 1024
MIN_MESSAGE = 4096
_MOD = 1 << 256
# Bytes of a message besides its entries: [1, [...]] with a list header of up to 5 bytes.
_MESSAGE_OVERHEAD = 8
# Worst-case bytes of one FINGERPRINT entry ending at infinity (the closing "rest" range).
_REST_COST = 1 + 1 + 1 + 1 + FINGERPRINT_SIZE
# Bytes besides its ids that an id list needs to go out alone: message overhead 8, a SKIP
# before it 37, its own header and 32-byte bound 39, the closing fingerprint 20 (104).
_LIST_SLACK = 128


class Mode(IntEnum):
    SKIP = 0
    FINGERPRINT = 1
    IDLIST = 2


Bound = bytes | None  # None = +infinity


@dataclass(frozen=True)
class Range:
    upper: Bound
    mode: Mode
    fingerprint: bytes = b""
    ids: tuple[bytes, ...] = ()

    def encoded(self) -> list[Any]:
        payload: Any = None
        if self.mode is Mode.FINGERPRINT:
            payload = self.fingerprint
        elif self.mode is Mode.IDLIST:
            payload = list(self.ids)
        return [self.upper, int(self.mode), payload]

    def cost(self) -> int:
        """Exact bytes this entry adds to an encoded message."""
        return len(encode(self.encoded()))


@dataclass(frozen=True)
class Step:
    """What one ``receive`` produced: the reply to send (None: nothing more to say)."""

    reply: bytes | None
    have: tuple[bytes, ...] = ()  # newly found: ids I have and the peer lacks
    need: tuple[bytes, ...] = ()  # newly found: ids the peer has and I lack


def fingerprint_of(ids: Iterable[bytes]) -> bytes:
    """Order-free fingerprint: sha256(sum of ids mod 2^256 || count), first 16 bytes."""
    total, count = 0, 0
    for i in ids:
        total = (total + int.from_bytes(i, "little")) % _MOD
        count += 1
    return _fp(total, count)


def _fp(total: int, count: int) -> bytes:
    return hashlib.sha256(total.to_bytes(32, "little") + count.to_bytes(8, "little")).digest()[
        :FINGERPRINT_SIZE
    ]


def _separator(prev: bytes, nxt: bytes) -> bytes:
    """Shortest prefix of ``nxt`` that is greater than ``prev`` (a compact range bound)."""
    n = 0
    while n < len(nxt) and n < len(prev) and prev[n] == nxt[n]:
        n += 1
    return nxt[: n + 1]


def _before(a: Bound, b: Bound) -> bool:
    """Strict order of bounds with None as +infinity."""
    if a is None:
        return False
    return b is None or a < b


def decode_message(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE) -> list[Range]:
    """Parse and validate a reconciliation message (typed errors on any garbage)."""
    raw = decode(data, max_size=max_size)
    if not (isinstance(raw, list) and len(raw) == 2):
        raise DecodeError("reconcile message must be [version, ranges]")
    if type(raw[0]) is not int or raw[0] != VERSION:
        raise DecodeError(f"unsupported reconcile version {raw[0]!r}, expected {VERSION}")
    if type(raw[1]) is not list or not raw[1]:
        raise DecodeError("reconcile message needs a non-empty list of ranges")
    ranges: list[Range] = []
    lower: bytes = b""
    for entry in raw[1]:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise DecodeError("each range must be [upper, mode, payload]")
        upper, mode, payload = entry
        if upper is not None and not (type(upper) is bytes and len(upper) <= ID_SIZE):
            raise ValidationError(f"range bound must be null or 0..{ID_SIZE} bytes")
        if ranges and ranges[-1].upper is None:
            raise ValidationError("a range follows the one that ends at infinity")
        if not _before(lower, upper):
            raise ValidationError("range bounds must strictly increase")
        if type(mode) is not int or mode not in (0, 1, 2):
            raise ValidationError(f"range mode must be 0, 1 or 2, got {mode!r}")
        m = Mode(mode)
        if m is Mode.SKIP:
            if payload is not None:
                raise ValidationError("a SKIP range has no payload")
            ranges.append(Range(upper, m))
        elif m is Mode.FINGERPRINT:
            if type(payload) is not bytes or len(payload) != FINGERPRINT_SIZE:
                raise ValidationError(f"fingerprint must be {FINGERPRINT_SIZE} bytes")
            ranges.append(Range(upper, m, fingerprint=payload))
        else:
            if type(payload) is not list:
                raise ValidationError("an IDLIST payload must be a list of ids")
            prev: bytes | None = None
            for i in payload:
                if type(i) is not bytes or len(i) != ID_SIZE:
                    raise ValidationError(f"ids must be {ID_SIZE}-byte strings")
                if i < lower or (upper is not None and i >= upper):
                    raise ValidationError("an id lies outside its range")
                if prev is not None and i <= prev:
                    raise ValidationError("ids in a range must be sorted and distinct")
                prev = i
            ranges.append(Range(upper, m, ids=tuple(payload)))
        lower = upper if upper is not None else lower
    if ranges[-1].upper is not None:
        raise ValidationError("the last range must end at infinity (null)")
    return ranges


def encode_message(ranges: list[Range]) -> bytes:
    return encode([VERSION, [r.encoded() for r in ranges]])


@dataclass
class _Out:
    budget: int
    ranges: list[Range] = field(default_factory=list)
    used: int = _MESSAGE_OVERHEAD

    def _merges(self, r: Range) -> bool:
        return r.mode is Mode.SKIP and bool(self.ranges) and self.ranges[-1].mode is Mode.SKIP

    def delta(self, r: Range) -> int:
        """Bytes that adding ``r`` would add (a merged SKIP only changes the bound)."""
        return r.cost() - (self.ranges[-1].cost() if self._merges(r) else 0)

    def add(self, r: Range) -> None:
        # Merge neighbouring SKIPs: they say the same thing.
        if self._merges(r):
            self.used -= self.ranges[-1].cost()
            self.ranges[-1] = r
        else:
            self.ranges.append(r)
        self.used += r.cost()

    def room(self) -> int:
        """Bytes still free, keeping space for a closing "rest" fingerprint."""
        return self.budget - self.used - _REST_COST


class Reconciler:
    """One side of one reconciliation session over a fixed, sorted set of ids."""

    def __init__(
        self,
        ids: Iterable[bytes],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        id_list_threshold: int = 16,
        branching: int = 16,
    ) -> None:
        if max_message_bytes < MIN_MESSAGE:
            raise LocalProtocolError(f"max_message_bytes must be >= {MIN_MESSAGE}")
        if not 2 <= branching <= 64 or not 1 <= id_list_threshold <= 1024:
            raise LocalProtocolError("branching must be 2..64 and id_list_threshold 1..1024")
        if id_list_threshold * (ID_SIZE + 2) + _LIST_SLACK > max_message_bytes:
            # Else initiate() (and every reply) could build an id list over the cap.
            raise LocalProtocolError("id_list_threshold ids must fit in max_message_bytes")
        self._ids = sorted(set(ids))
        if any(type(i) is not bytes or len(i) != ID_SIZE for i in self._ids):
            raise LocalProtocolError(f"ids must be {ID_SIZE} bytes")
        self.max_message_bytes = max_message_bytes
        self.threshold = id_list_threshold
        self.branching = branching
        # Prefix sums make every range fingerprint O(1) after an O(n) build.
        self._prefix = [0]
        for i in self._ids:
            self._prefix.append((self._prefix[-1] + int.from_bytes(i, "little")) % _MOD)
        self.initiator = False
        self.done = False
        self.rounds = 0
        self._have: set[bytes] = set()
        self._need: set[bytes] = set()

    @property
    def have(self) -> list[bytes]:
        """Ids I hold that the peer lacks (initiator only, complete once ``done``)."""
        return sorted(self._have)

    @property
    def need(self) -> list[bytes]:
        """Ids the peer holds that I lack (initiator only, complete once ``done``)."""
        return sorted(self._need)

    def _fingerprint(self, lo: int, hi: int) -> bytes:
        return _fp((self._prefix[hi] - self._prefix[lo]) % _MOD, hi - lo)

    def _index(self, bound: Bound) -> int:
        return len(self._ids) if bound is None else bisect_left(self._ids, bound)

    def _describe(self, lo: int, hi: int, upper: Bound, max_ids: int = 0) -> list[Range]:
        """My view of ids[lo:hi] (ending at ``upper``): an id list, or split fingerprints.

        ``max_ids`` lets a long id list through when the peer already showed it has
        few ids there (it sent its list): one message then settles the range.
        """
        count = hi - lo
        if count <= max(self.threshold, max_ids):
            return [Range(upper, Mode.IDLIST, ids=tuple(self._ids[lo:hi]))]
        parts = min(self.branching, count)
        out = []
        for k in range(parts):
            a = lo + count * k // parts
            b = lo + count * (k + 1) // parts
            bound = upper if k == parts - 1 else _separator(self._ids[b - 1], self._ids[b])
            out.append(Range(bound, Mode.FINGERPRINT, fingerprint=self._fingerprint(a, b)))
        return out

    def initiate(self) -> bytes:
        """Start a session as the initiator; returns the first message."""
        if self.rounds or self.initiator:
            raise LocalProtocolError("initiate() may be called once, before any receive()")
        self.initiator = True
        return encode_message(self._describe(0, len(self._ids), None))

    def receive(self, data: bytes) -> Step:
        """Process the peer's message; returns the reply and any differences found."""
        if self.done:
            raise LocalProtocolError("this reconciliation session is finished")
        ranges = decode_message(data, max_size=self.max_message_bytes)
        self.rounds += 1
        out = _Out(self.max_message_bytes)
        have: list[bytes] = []
        need: list[bytes] = []
        # Pass 1: settle what is cheap (SKIPs, the initiator's id-list diffs) and list
        # the ranges that need my description, with the cost of a plain fingerprint each.
        plan: list[tuple[Range, int, int, Range | None]] = []
        lo = 0
        for r in ranges:
            hi = self._index(r.upper)
            done: Range | None = Range(r.upper, Mode.SKIP)
            if r.mode is Mode.FINGERPRINT and r.fingerprint != self._fingerprint(lo, hi):
                done = None
            elif r.mode is Mode.IDLIST and (
                hi - lo != len(r.ids) or tuple(self._ids[lo:hi]) != r.ids
            ):
                mine = self._ids[lo:hi]
                if self.initiator:
                    theirs, mine_set = set(r.ids), set(mine)
                    have.extend(i for i in mine if i not in theirs and i not in self._have)
                    need.extend(i for i in r.ids if i not in mine_set and i not in self._need)
                else:
                    done = None
            plan.append((r, lo, hi, done))
            lo = hi
        echo_cost = [
            0 if done is not None else Range(r.upper, Mode.FINGERPRINT, b"\0" * 16).cost()
            for r, _, _, done in plan
        ]
        reserve = sum(echo_cost)
        # Pass 2: describe mismatched ranges while the budget allows, keeping room to at
        # least echo a fingerprint for each later one (so no refinement is thrown away);
        # if even that runs out, one fingerprint covers the rest.
        described_any = False
        for n, (r, lo, hi, done) in enumerate(plan):
            reserve -= echo_cost[n]
            if done is not None and out.delta(done) <= out.room():
                out.add(done)
                continue
            if done is not None:
                out.add(
                    Range(None, Mode.FINGERPRINT, fingerprint=self._fingerprint(lo, len(self._ids)))
                )
                break
            max_ids = 0
            if r.mode is Mode.IDLIST:
                max_ids = (out.room() - reserve) // (ID_SIZE + 2) - 1
            parts = self._describe(lo, hi, r.upper, max_ids)
            cost = sum(p.cost() for p in parts)
            if (not described_any or cost + reserve <= out.room()) and cost <= out.room():
                for p in parts:
                    out.add(p)
                described_any = True
                continue
            echo = Range(r.upper, Mode.FINGERPRINT, fingerprint=self._fingerprint(lo, hi))
            if echo.cost() <= out.room():
                out.add(echo)
                continue
            rest = self._fingerprint(lo, len(self._ids))
            out.add(Range(None, Mode.FINGERPRINT, fingerprint=rest))
            break
        self._have.update(have)
        self._need.update(need)
        if all(r.mode is Mode.SKIP for r in out.ranges):
            if self.initiator:
                self.done = True
                return Step(None, tuple(have), tuple(need))
            # The responder confirms agreement once, then has nothing more to say.
            if all(r.mode is Mode.SKIP for r in ranges):
                return Step(None)
        return Step(encode_message(out.ranges), tuple(have), tuple(need))


__all__ = [
    "FINGERPRINT_SIZE",
    "ID_SIZE",
    "Mode",
    "Range",
    "Reconciler",
    "Step",
    "decode_message",
    "encode_message",
    "fingerprint_of",
]
