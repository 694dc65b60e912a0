"""Ledger checkpoints: a committee-signed summary of the ledger up to a cut, sans-IO.

A checkpoint lets peers drop old facts (bounded ledger size) and lets a new peer
start from a summary instead of from genesis. It has three parts:

* ``CheckpointHeader``: network, ``epoch`` (checkpoint number: 1, 2, 3, ... each
  one's ``prev`` is the digest of the one before, the first's is 32 zero bytes),
  ``cut_ms`` (every payment it covers has a transfer time before it), the
  *covered digest* (the set digest, sum and count, of every certificate covered
  since genesis) and the hash of its account summaries;
* ``AccountSummary`` rows (sorted by account): per account its balance,
  ``next_seq`` (seqs below it are covered), what it received and what of that it
  earned from other proven identities; ``accounts_hash`` binds them to the header;
* ``WitnessVote``-style ``CheckpointVote`` signatures over the header's digest by
  a quorum of ``checkpoint_committee(rule, epoch)``, checked with the same rules
  as a payment certificate (members only, distinct, ``Committee.quorum`` of them).

``Checkpoint`` (header + votes) is a network-wide ledger fact; the account rows
travel beside it (``encode_accounts``) and are checked against the header hash.
What a ledger does with one (which facts it drops, how it folds the summary) is
``LedgerState.adopt_checkpoint``; docs/settlement.md has the reasoning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import nacl.signing

from protocols.codec import decode, encode
from protocols.committee import MAX_COMMITTEE, Committee, CommitteeRule, require_quorum
from protocols.errors import ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import MAX_AMOUNT, MAX_SEQ
from protocols.market_fields import (
    FlatBody,
    check_body,
    want_bytes,
    want_digest,
    want_int,
    want_peer_id,
)
from protocols.signed import Signed, open_message, sign_message
from protocols.signing import signing_bytes

HEADER_DOMAIN = "edgeswarm/checkpoint/v1"
VOTE_DOMAIN = "edgeswarm/checkpoint-vote/v1"
ACCOUNTS_DOMAIN = "edgeswarm/checkpoint-accounts/v1"
RULE_DOMAIN = "edgeswarm/checkpoint-network/v1"
CHECKPOINT_VERSION = 1
GENESIS_PREV = bytes(32)
SUM_BYTES = 256  # the 2048-bit set digest (protocols.ledger_state.DIGEST_BITS)
MAX_EPOCH = (1 << 53) - 1
MAX_TIME_MS = (1 << 53) - 1
MAX_ACCOUNTS = 1 << 24
# Rows of one accounts page on the wire (~70 bytes each): well under a 1 MiB frame.
ACCOUNTS_PAGE = 4096
_MAX_BALANCE = MAX_AMOUNT * MAX_SEQ


def rule_id(rule: CommitteeRule) -> bytes:
    """The network a checkpoint belongs to: a digest of the rule's fixed inputs (beacon,
    fallback witnesses, f, panel size; not the pool, which may change per epoch)."""
    body = encode([rule.beacon, sorted(rule.fallback), rule.f, rule.referee_panel_size])
    return hashlib.sha256(signing_bytes(RULE_DOMAIN, body)).digest()


def checkpoint_subject(epoch: int) -> str:
    """The name a checkpoint committee is drawn for (never a peer id)."""
    return f"checkpoint/{epoch}"


def checkpoint_committee(rule: CommitteeRule, epoch: int, pool: int = 0) -> Committee:
    """Who signs checkpoint ``epoch`` cast under epoch checkpoint ``pool`` (0: the genesis):
    the rule of that epoch checkpoint (``rule.rule_at``: its pool and beacon, from the
    epoch-checkpoint chain) applied to the checkpoint's subject, so it is drawn like a
    payment committee and the same forever, whenever it is verified. Raises
    ``UnknownCheckpoint`` while that epoch checkpoint is not held."""
    return rule.rule_at(pool).committee_for(checkpoint_subject(epoch))


# --- account summaries ---------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class AccountSummary:
    """One account as of a checkpoint (covered payments only)."""

    account: str
    balance: int
    next_seq: int  # the account's seqs below this are covered (1: none)
    received: int  # covered, unreversed payments to it
    earned: int  # of which from other proven, unbanned identities

    def __post_init__(self) -> None:
        k = "AccountSummary"
        want_peer_id(k, "account", self.account)
        if type(self.balance) is not int or not -_MAX_BALANCE <= self.balance <= _MAX_BALANCE:
            raise ValidationError(f"{k}.balance out of range: {self.balance!r}")
        want_int(k, "next_seq", self.next_seq, lo=1, hi=MAX_SEQ + 1)
        want_int(k, "received", self.received, lo=0, hi=_MAX_BALANCE)
        want_int(k, "earned", self.earned, lo=0, hi=self.received)

    def to_wire(self) -> list[Any]:
        return [self.account, self.balance, self.next_seq, self.received, self.earned]

    @classmethod
    def from_wire(cls, raw: object) -> AccountSummary:
        if type(raw) is not list or len(raw) != 5:
            raise ValidationError(
                "an account summary is [account, balance, next, received, earned]"
            )
        return cls(*raw)


def accounts_hash(accounts: Sequence[AccountSummary]) -> bytes:
    """sha256 over the canonical CBOR of the sorted rows (what the header names)."""
    h = hashlib.sha256(signing_bytes(ACCOUNTS_DOMAIN, len(accounts).to_bytes(8, "big")))
    for a in accounts:
        h.update(encode(a.to_wire()))
    return h.digest()


def check_accounts(accounts: Sequence[AccountSummary]) -> None:
    """Sorted by account, no account twice, balances sum to zero."""
    names = [a.account for a in accounts]
    if names != sorted(set(names)):
        raise ValidationError("checkpoint accounts must be sorted by account, each once")
    total = sum(a.balance for a in accounts)
    if total != 0:
        raise ValidationError(f"checkpoint balances sum to {total}, not 0")


def encode_accounts(accounts: Sequence[AccountSummary]) -> list[list[Any]]:
    return [a.to_wire() for a in accounts]


def decode_accounts(raw: object, *, limit: int = ACCOUNTS_PAGE) -> list[AccountSummary]:
    if type(raw) is not list or len(raw) > limit:
        raise ValidationError(f"checkpoint accounts must be a list of at most {limit} rows")
    return [AccountSummary.from_wire(r) for r in raw]


# --- the header, its votes, the certified checkpoint ---------------------------------------


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint committee signs (its digest)."""

    MAX_BYTES: ClassVar[int] = 1024

    network: bytes
    epoch: int
    prev: bytes
    cut_ms: int
    covered_sum: bytes  # 256 bytes little-endian: sum of covered certificates' elements
    covered_count: int
    accounts: bytes  # accounts_hash of the rows
    n_accounts: int
    # The epoch checkpoint (protocols.epochs) whose committee signs this one; 0: the
    # genesis rule (then the field is left out of the body: such headers keep their digest).
    pool: int = 0

    def __post_init__(self) -> None:
        k = "CheckpointHeader"
        want_digest(k, "network", self.network)
        want_int(k, "epoch", self.epoch, lo=1, hi=MAX_EPOCH)
        want_digest(k, "prev", self.prev)
        want_int(k, "cut_ms", self.cut_ms, lo=0, hi=MAX_TIME_MS)
        want_bytes(k, "covered_sum", self.covered_sum, lo=SUM_BYTES, hi=SUM_BYTES)
        want_int(k, "covered_count", self.covered_count, lo=0, hi=MAX_EPOCH)
        want_digest(k, "accounts", self.accounts)
        want_int(k, "n_accounts", self.n_accounts, lo=0, hi=MAX_ACCOUNTS)
        want_int(k, "pool", self.pool, lo=0, hi=MAX_EPOCH)
        if (self.epoch == 1) != (self.prev == GENESIS_PREV):
            raise ValidationError(f"{k}: only the first checkpoint has no predecessor")

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "network",
        "epoch",
        "prev",
        "cut_ms",
        "covered_sum",
        "covered_count",
        "accounts",
        "n_accounts",
    )

    def to_body(self) -> dict[str, Any]:
        body = {"v": CHECKPOINT_VERSION, **{n: getattr(self, n) for n in self._FIELDS}}
        if self.pool:
            body["pool"] = self.pool
        return body

    def to_bytes(self) -> bytes:
        return encode(self.to_body())

    @classmethod
    def from_body(cls, raw: object) -> CheckpointHeader:
        names = (*cls._FIELDS, "pool") if isinstance(raw, dict) and "pool" in raw else cls._FIELDS
        b = check_body(
            raw, kind="CheckpointHeader", version=CHECKPOINT_VERSION, fields=frozenset(names)
        )
        if b.get("pool", 1) == 0:
            raise ValidationError("CheckpointHeader.pool 0 is written by leaving it out")
        return cls(**{n: b[n] for n in names})

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(signing_bytes(HEADER_DOMAIN, self.to_bytes())).digest()

    @property
    def covered(self) -> tuple[int, int]:
        """(sum, count) of the covered certificates' set digest."""
        return int.from_bytes(self.covered_sum, "little"), self.covered_count


@dataclass(frozen=True)
class CheckpointVote(FlatBody):
    """Committee member-signed: "checkpoint ``epoch`` of ``network`` is ``header``"."""

    DOMAIN: ClassVar[str] = VOTE_DOMAIN
    MAX_BYTES: ClassVar[int] = 384
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset({"network", "epoch", "header", "witness"})

    network: bytes
    epoch: int
    header: bytes  # the header's digest
    witness: str

    def __post_init__(self) -> None:
        want_digest("CheckpointVote", "network", self.network)
        want_int("CheckpointVote", "epoch", self.epoch, lo=1, hi=MAX_EPOCH)
        want_digest("CheckpointVote", "header", self.header)
        want_peer_id("CheckpointVote", "witness", self.witness)

    @property
    def signer(self) -> str:
        return self.witness

    def check_time(self, now: float) -> None:
        """Votes do not expire."""


def sign_checkpoint(
    key: nacl.signing.SigningKey, header: CheckpointHeader
) -> Signed[CheckpointVote]:
    """A committee member's vote for ``header`` (sign only a header you computed yourself)."""
    vote = CheckpointVote(
        network=header.network,
        epoch=header.epoch,
        header=header.digest,
        witness=peer_id_from_public_key(bytes(key.verify_key)),
    )
    return sign_message(key, vote)


def open_checkpoint_vote(data: bytes) -> Signed[CheckpointVote]:
    return open_message(CheckpointVote, data)


@dataclass(frozen=True)
class Checkpoint:
    """A header and a quorum of its epoch committee's votes (sorted by witness)."""

    MAX_BYTES: ClassVar[int] = CheckpointHeader.MAX_BYTES + MAX_COMMITTEE * (
        CheckpointVote.MAX_BYTES + 8
    )

    header: CheckpointHeader
    votes: tuple[Signed[CheckpointVote], ...]

    @property
    def digest(self) -> bytes:
        """The header's digest: the checkpoint's identity (whatever quorum signed it)."""
        return self.header.digest

    @property
    def epoch(self) -> int:
        return self.header.epoch

    @property
    def fact_id(self) -> bytes:
        return self.digest

    def verify(self, rule: CommitteeRule) -> None:
        """Raise unless a quorum of distinct members of the epoch's committee signed this
        header for this network (signatures checked last: they cost the most)."""
        h = self.header
        if h.network != rule_id(rule):
            raise ValidationError("checkpoint is for another network")
        committee = checkpoint_committee(rule, h.epoch, h.pool)
        digest = h.digest
        for vote in self.votes:
            v = vote.message
            if (v.network, v.epoch, v.header) != (h.network, h.epoch, digest):
                raise ValidationError(f"vote by {v.witness} is for another checkpoint")
        require_quorum(
            "checkpoint",
            committee,
            [v.message.witness for v in self.votes],
            outsider=lambda w: f"{w} is not in the committee of checkpoint {h.epoch}",
        )
        for vote in self.votes:
            vote.verify()

    def to_bytes(self) -> bytes:
        return encode(
            {
                "v": CHECKPOINT_VERSION,
                "h": self.header.to_body(),
                "w": [v.to_bytes() for v in self.votes],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Parse shape and fields; ``verify(rule)`` checks the votes."""
        raw = decode(data, max_size=cls.MAX_BYTES)
        b = check_body(raw, kind="Checkpoint", version=CHECKPOINT_VERSION, fields=frozenset("hw"))
        header = CheckpointHeader.from_body(b["h"])
        if type(b["w"]) is not list or not 1 <= len(b["w"]) <= MAX_COMMITTEE:
            raise ValidationError(f"Checkpoint.w must be a list of 1..{MAX_COMMITTEE} votes")
        votes = tuple(
            open_message(
                CheckpointVote,
                want_bytes("Checkpoint", "w[]", w, lo=1, hi=CheckpointVote.MAX_BYTES),
                verify=False,
            )
            for w in b["w"]
        )
        if [v.message.witness for v in votes] != sorted(v.message.witness for v in votes):
            raise ValidationError("Checkpoint votes must be sorted by witness")
        return cls(header=header, votes=votes)


def make_checkpoint(
    header: CheckpointHeader, votes: Iterable[Signed[CheckpointVote]]
) -> Checkpoint:
    return Checkpoint(header, tuple(sorted(votes, key=lambda v: v.message.witness)))


class CheckpointAssembler:
    """Proposer side, sans-IO: collect votes for one header until a quorum is reached."""

    def __init__(self, rule: CommitteeRule, header: CheckpointHeader) -> None:
        self.header = header
        self.committee = checkpoint_committee(rule, header.epoch, header.pool)
        self._votes: dict[str, Signed[CheckpointVote]] = {}

    def add_vote(self, vote: Signed[CheckpointVote]) -> Checkpoint | None:
        v = vote.message
        if (v.network, v.epoch, v.header) != (
            self.header.network,
            self.header.epoch,
            self.header.digest,
        ):
            raise ValidationError(f"vote by {v.witness} is for another checkpoint")
        if v.witness not in self.committee:
            raise ValidationError(f"{v.witness} is not in this checkpoint's committee")
        vote.verify()
        self._votes.setdefault(v.witness, vote)
        if len(self._votes) < self.committee.quorum:
            return None
        chosen = sorted(self._votes)[: self.committee.quorum]
        return make_checkpoint(self.header, (self._votes[w] for w in chosen))


class CheckpointVoteLock:
    """A member's one-vote-per-checkpoint lock, sans-IO: once it voted for a header of
    checkpoint ``epoch`` it signs no other header for that epoch, ever.

    Two quorums of one committee share an honest member, so with at most f byzantine
    members one epoch never gets two certified checkpoints (the fork of two proposers
    with different cuts). ``lock`` returns True for a new lock: the I/O layer persists
    the header (``locked`` reloads it after a restart) before the vote leaves the machine,
    and calls ``unlock`` if that fails. ``None`` for an epoch: a lock whose header could
    not be read back, which refuses every header of that epoch."""

    def __init__(self, locked: Mapping[int, CheckpointHeader | None] | None = None) -> None:
        self.locked: dict[int, CheckpointHeader | None] = dict(locked or {})

    def check(self, header: CheckpointHeader) -> None:
        """Raise unless this member may vote for ``header``."""
        if header.epoch not in self.locked:
            return
        held = self.locked[header.epoch]
        if held is None or held.digest != header.digest:
            raise ValidationError(f"already voted for another checkpoint {header.epoch}")

    def lock(self, header: CheckpointHeader) -> bool:
        """Take the lock for ``header`` (``check`` first); True if it is new."""
        self.check(header)
        if header.epoch in self.locked:
            return False
        self.locked[header.epoch] = header
        return True

    def unlock(self, header: CheckpointHeader) -> None:
        """Drop a new lock whose persist failed (no vote left the machine)."""
        held = self.locked.get(header.epoch)
        if held is not None and held.digest == header.digest:
            del self.locked[header.epoch]


def verify_chain(chain: Sequence[Checkpoint], rule: CommitteeRule) -> None:
    """Check a chain of checkpoints from the first: epochs 1, 2, ..., each ``prev`` the
    digest of the one before, each signed by a quorum of its own epoch's committee (under
    the epoch checkpoint it names: ``rule`` must hold the epoch-checkpoint chain), cuts,
    covered counts and epoch checkpoints never going back."""
    prev: Checkpoint | None = None
    for cp in chain:
        h = cp.header
        want = 1 if prev is None else prev.epoch + 1
        if h.epoch != want:
            raise ValidationError(f"checkpoint chain: expected epoch {want}, got {h.epoch}")
        expected_prev = GENESIS_PREV if prev is None else prev.digest
        if h.prev != expected_prev:
            raise ValidationError(f"checkpoint {h.epoch} does not name its predecessor")
        if prev is not None and (
            h.cut_ms < prev.header.cut_ms
            or h.covered_count < prev.header.covered_count
            or h.pool < prev.header.pool
        ):
            raise ValidationError(f"checkpoint {h.epoch} goes back in time")
        cp.verify(rule)
        prev = cp


def follows(cp: Checkpoint, prev: Checkpoint | None) -> None:
    """Raise unless ``cp`` is the checkpoint right after ``prev`` (None: the first)."""
    if prev is None:
        if cp.epoch != 1:
            raise ValidationError(
                f"checkpoint {cp.epoch} needs its predecessors (this ledger holds none)"
            )
        return
    if cp.epoch != prev.epoch + 1 or cp.header.prev != prev.digest:
        raise ValidationError(
            f"checkpoint {cp.epoch} does not follow checkpoint {prev.epoch} held here"
        )
    h, p = cp.header, prev.header
    if h.cut_ms < p.cut_ms or h.covered_count < p.covered_count or h.pool < p.pool:
        raise ValidationError(f"checkpoint {cp.epoch} goes back in time")


__all__ = [
    "ACCOUNTS_PAGE",
    "GENESIS_PREV",
    "AccountSummary",
    "Checkpoint",
    "CheckpointAssembler",
    "CheckpointHeader",
    "CheckpointVote",
    "CheckpointVoteLock",
    "accounts_hash",
    "check_accounts",
    "checkpoint_committee",
    "checkpoint_subject",
    "decode_accounts",
    "encode_accounts",
    "follows",
    "make_checkpoint",
    "open_checkpoint_vote",
    "rule_id",
    "sign_checkpoint",
    "verify_chain",
]
