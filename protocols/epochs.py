"""Epochs: committees drawn from the network's eligible pool, rotated by a lagged beacon.

Time is cut into epochs of ``epoch_ms`` (``epoch_of(t) = t // epoch_ms``). At each
epoch ``k`` the *checkpoint committee* of the newest checkpoint (the genesis
witnesses at first) certifies a ``PoolCheckpoint``: ``{network, epoch k, prev
(epoch and digest), members: (peer id, since epoch)}``. A checkpoint names the
eligible pool every peer will draw committees from, so peers agree on
committees without agreeing on the order facts reached them:

* ``pool(age)``: the members with ``since <= epoch - age`` (aged identities);
* its digest is the **beacon** of the committees drawn from it;
* ``models``: which model cids each member serves (what it said when asked to
  ``stand``); referee panels for a claim on a model are drawn only from the pool
  members that serve it (``serving``), so every ledger draws the same panel;
* it is used **lagged**: a transfer made in epoch ``e`` is witnessed by the
  committee drawn under the newest checkpoint with epoch ``<= e - lag``, so the
  checkpoint (and its beacon) is known to every peer for a whole epoch before
  anyone pays under it, and a certificate names that checkpoint (``cp``) so it
  verifies offline, whatever newer checkpoints exist.

Who is a member (``CheckpointRules``): a proposer lists the candidates that are
live (they answered it, ``stand``) and eligible in its ledger (a proven identity,
not banned, ``earned >= eligible_earned`` from other identities); members of the
previous checkpoint keep their ``since``. A voter co-signs a proposal only if it
extends its newest checkpoint, every newcomer is eligible in *its* ledger (with
``since`` = the proposal's epoch), every kept member keeps its ``since``, and no
member is banned; it signs at most one checkpoint per epoch (durably, like a
witness lock), so with at most f byzantine members one epoch never gets two
certified checkpoints. A proposer may leave members out (dead peers leave the
pool this way); that discretion is the limit noted in docs/settlement.md.

Nothing here does I/O; ``EpochRules`` is a ``CommitteeRule`` whose committees
follow the checkpoints it was given (``add``) and the clock it was told
(``tick``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import nacl.signing

from protocols.codec import decode, encode
from protocols.committee import (
    MAX_COMMITTEE,
    Committee,
    CommitteeRule,
    UnknownCheckpoint,
    require_quorum,
)
from protocols.errors import LocalProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.market_fields import (
    FlatBody,
    check_body,
    want_bytes,
    want_cid,
    want_digest,
    want_int,
    want_peer_id,
)
from protocols.signed import Signed, open_message, sign_message
from protocols.signing import signing_bytes

CHECKPOINT_DOMAIN = "edgeswarm/pool-checkpoint/v1"
CHECKPOINT_VOTE_DOMAIN = "edgeswarm/pool-checkpoint-vote/v1"
CERTIFIED_CHECKPOINT_DOMAIN = "edgeswarm/certified-checkpoint/v1"
# The "account" whose committee certifies checkpoints (never a peer id, so never excluded).
CHECKPOINT_SUBJECT = "edgeswarm:checkpoint"
CHECKPOINT_VERSION = 1
MAX_MEMBERS = 512
MAX_EPOCH = 2**40
MAX_MODELS = 64  # distinct model cids one checkpoint records
MAX_MEMBER_MODELS = 8  # model cids recorded per member (and in one stand reply)

# model cid -> sorted indexes into ``members`` of the members that serve it
ModelTable = tuple[tuple[str, tuple[int, ...]], ...]


def epoch_of(time_ms: int, epoch_ms: int) -> int:
    """The epoch a time (ms since the Unix epoch) falls in."""
    if epoch_ms <= 0:
        raise LocalProtocolError(f"epoch_ms must be positive, got {epoch_ms}")
    return max(0, time_ms) // epoch_ms


@dataclass(frozen=True)
class PoolCheckpoint:
    """One epoch's pool: members (sorted by peer id), the epoch each joined and the
    models each serves (``models``: cid -> member indexes, sorted by cid)."""

    MAX_BYTES: ClassVar[int] = (
        512 + MAX_MEMBERS * 72 + MAX_MODELS * 80 + MAX_MEMBERS * MAX_MEMBER_MODELS * 3
    )
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"network", "epoch", "prev_epoch", "prev", "members"}
    )

    network: bytes  # the genesis digest
    epoch: int
    prev_epoch: int  # 0: the genesis
    prev: bytes  # digest of the previous checkpoint, or the genesis digest
    members: tuple[tuple[str, int], ...]
    models: ModelTable = ()

    def __post_init__(self) -> None:
        k = "PoolCheckpoint"
        want_digest(k, "network", self.network)
        want_int(k, "epoch", self.epoch, lo=1, hi=MAX_EPOCH)
        want_int(k, "prev_epoch", self.prev_epoch, hi=self.epoch - 1)
        want_digest(k, "prev", self.prev)
        if type(self.members) is not tuple or len(self.members) > MAX_MEMBERS:
            raise ValidationError(f"{k}.members must hold at most {MAX_MEMBERS} entries")
        for m in self.members:
            if type(m) is not tuple or len(m) != 2:
                raise ValidationError(f"{k}.members[] must be (peer id, since)")
            want_peer_id(k, "members[].peer", m[0])
            want_int(k, "members[].since", m[1], lo=1, hi=self.epoch)
        ids = [m[0] for m in self.members]
        if ids != sorted(set(ids)):
            raise ValidationError(f"{k}.members must be sorted by peer id and distinct")
        _check_models(self.models, len(self.members))

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "v": CHECKPOINT_VERSION,
            "network": self.network,
            "epoch": self.epoch,
            "prev_epoch": self.prev_epoch,
            "prev": self.prev,
            "members": [list(m) for m in self.members],
        }
        if self.models:  # left out when empty: such checkpoints keep their digest
            body["models"] = [[cid, list(ix)] for cid, ix in self.models]
        return encode(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> PoolCheckpoint:
        raw = decode(data, max_size=cls.MAX_BYTES)
        fields = cls._FIELDS | {"models"} if isinstance(raw, dict) and "models" in raw else None
        b = check_body(
            raw, kind="PoolCheckpoint", version=CHECKPOINT_VERSION, fields=fields or cls._FIELDS
        )
        if type(b["members"]) is not list:
            raise ValidationError("PoolCheckpoint.members must be a list")
        members = []
        for m in b["members"]:
            if type(m) is not list or len(m) != 2:
                raise ValidationError("PoolCheckpoint.members[] must be [peer id, since]")
            members.append((m[0], m[1]))
        models: list[tuple[str, tuple[int, ...]]] = []
        if fields is not None:
            if type(b["models"]) is not list or not 1 <= len(b["models"]) <= MAX_MODELS:
                raise ValidationError(
                    f"PoolCheckpoint.models must list 1..{MAX_MODELS} models (or be left out)"
                )
            for m in b["models"]:
                if type(m) is not list or len(m) != 2 or type(m[1]) is not list:
                    raise ValidationError("PoolCheckpoint.models[] must be [cid, [member index]]")
                models.append((m[0], tuple(m[1])))
        return cls(
            b["network"], b["epoch"], b["prev_epoch"], b["prev"], tuple(members), tuple(models)
        )

    @property
    def digest(self) -> bytes:
        """sha256 of the tagged bytes: the checkpoint's name and its committees' beacon."""
        return hashlib.sha256(signing_bytes(CHECKPOINT_DOMAIN, self.to_bytes())).digest()

    @property
    def since(self) -> dict[str, int]:
        return dict(self.members)

    def pool(self, age: int) -> frozenset[str]:
        """Members that joined at least ``age`` epochs before this checkpoint."""
        return frozenset(p for p, since in self.members if since <= self.epoch - age)

    def serving(self) -> dict[str, frozenset[str]]:
        """model cid -> the members recorded as serving it (a member not listed for a
        model does not serve it; ``CommitteeRule.servers`` intersects with the pool)."""
        return {cid: frozenset(self.members[i][0] for i in ix) for cid, ix in self.models}


def _check_models(models: ModelTable, n_members: int) -> None:
    """Shape of ``PoolCheckpoint.models``: at most ``MAX_MODELS`` distinct cids sorted,
    each with a non-empty sorted list of distinct member indexes, and no member recorded
    for more than ``MAX_MEMBER_MODELS`` models."""
    k = "PoolCheckpoint.models"
    if type(models) is not tuple or len(models) > MAX_MODELS:
        raise ValidationError(f"{k} must hold at most {MAX_MODELS} models")
    per_member = [0] * n_members
    cids = []
    for entry in models:
        if type(entry) is not tuple or len(entry) != 2 or type(entry[1]) is not tuple:
            raise ValidationError(f"{k}[] must be (cid, member indexes)")
        cids.append(want_cid(k, "cid", entry[0]))
        ix = entry[1]
        if not ix or list(ix) != sorted(set(ix)):
            raise ValidationError(f"{k}[] member indexes must be non-empty, sorted, distinct")
        for i in ix:
            want_int(k, "index", i, lo=0, hi=n_members - 1)
            per_member[i] += 1
            if per_member[i] > MAX_MEMBER_MODELS:
                raise ValidationError(f"{k}: a member is recorded for over {MAX_MEMBER_MODELS}")
    if cids != sorted(set(cids)):
        raise ValidationError(f"{k} must be sorted by cid, each once")


def propose_models(
    members: tuple[tuple[str, int], ...], reported: Mapping[str, Iterable[str]]
) -> ModelTable:
    """The proposer's ``models`` table: what each member said it serves when asked to
    stand (its first ``MAX_MEMBER_MODELS`` valid cids, sorted); past ``MAX_MODELS``
    cids, those served by the most members are kept (ties: by cid)."""
    index = {peer: i for i, (peer, _) in enumerate(members)}
    served: dict[str, list[int]] = {}
    for peer, cids in reported.items():
        i = index.get(peer)
        if i is None:
            continue
        valid = sorted({c for c in cids if _is_cid(c)})[:MAX_MEMBER_MODELS]
        for cid in valid:
            served.setdefault(cid, []).append(i)
    kept = sorted(served, key=lambda c: (-len(served[c]), c))[:MAX_MODELS]
    return tuple((cid, tuple(sorted(served[cid]))) for cid in sorted(kept))


def _is_cid(value: object) -> bool:
    try:
        want_cid("stand", "models[]", value)
    except ValidationError:
        return False
    return True


@dataclass(frozen=True)
class PoolVote(FlatBody):
    """Member-signed: "for epoch ``epoch`` I vouch only for checkpoint ``checkpoint``"."""

    DOMAIN: ClassVar[str] = CHECKPOINT_VOTE_DOMAIN
    MAX_BYTES: ClassVar[int] = 384
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset({"epoch", "checkpoint", "witness"})

    epoch: int
    checkpoint: bytes
    witness: str

    def __post_init__(self) -> None:
        want_int("PoolVote", "epoch", self.epoch, lo=1, hi=MAX_EPOCH)
        want_digest("PoolVote", "checkpoint", self.checkpoint)
        want_peer_id("PoolVote", "witness", self.witness)

    @property
    def signer(self) -> str:
        return self.witness

    def check_time(self, now: float) -> None:
        """Votes do not expire."""


def sign_pool_vote(key: nacl.signing.SigningKey, checkpoint: PoolCheckpoint) -> Signed[PoolVote]:
    vote = PoolVote(
        epoch=checkpoint.epoch,
        checkpoint=checkpoint.digest,
        witness=peer_id_from_public_key(bytes(key.verify_key)),
    )
    return sign_message(key, vote)


def open_pool_vote(data: bytes) -> Signed[PoolVote]:
    return open_message(PoolVote, data)


@dataclass(frozen=True)
class CertifiedCheckpoint:
    """A checkpoint and a quorum of its checkpoint committee's votes (sorted by witness)."""

    MAX_BYTES: ClassVar[int] = PoolCheckpoint.MAX_BYTES + MAX_COMMITTEE * 400 + 64

    checkpoint: PoolCheckpoint
    votes: tuple[Signed[PoolVote], ...]

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch

    @property
    def digest(self) -> bytes:
        return self.checkpoint.digest

    def verify(self, committee: Committee) -> None:
        """Raise unless at least ``committee.quorum`` distinct members signed this checkpoint."""
        digest = self.checkpoint.digest
        require_quorum(
            f"checkpoint {self.checkpoint.epoch}",
            committee,
            [v.message.witness for v in self.votes],
            outsider=lambda w: f"{w} is not in the checkpoint committee",
        )
        for vote in self.votes:
            v = vote.message
            if (v.epoch, v.checkpoint) != (self.checkpoint.epoch, digest):
                raise ValidationError(f"vote by {v.witness} is for another checkpoint")
            vote.verify()

    def to_bytes(self) -> bytes:
        return encode(
            {
                "v": CHECKPOINT_VERSION,
                "c": self.checkpoint.to_bytes(),
                "w": [v.to_bytes() for v in self.votes],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CertifiedCheckpoint:
        """Parse shape and fields; votes are checked by ``verify`` (``EpochRules.add``)."""
        raw = decode(data, max_size=cls.MAX_BYTES)
        b = check_body(
            raw, kind="CertifiedCheckpoint", version=CHECKPOINT_VERSION, fields=frozenset("cw")
        )
        c = PoolCheckpoint.from_bytes(
            want_bytes("CertifiedCheckpoint", "c", b["c"], lo=1, hi=PoolCheckpoint.MAX_BYTES)
        )
        if type(b["w"]) is not list or not 1 <= len(b["w"]) <= MAX_COMMITTEE:
            raise ValidationError(f"CertifiedCheckpoint.w must list 1..{MAX_COMMITTEE} votes")
        votes = tuple(
            open_message(
                PoolVote,
                want_bytes("CertifiedCheckpoint", "w[]", w, lo=1, hi=PoolVote.MAX_BYTES),
                verify=False,
            )
            for w in b["w"]
        )
        if list(votes) != sorted(votes, key=lambda v: v.message.witness):
            raise ValidationError("CertifiedCheckpoint votes must be sorted by witness")
        return cls(c, votes)


def certify_checkpoint(
    checkpoint: PoolCheckpoint, votes: Iterable[Signed[PoolVote]]
) -> CertifiedCheckpoint:
    return CertifiedCheckpoint(checkpoint, tuple(sorted(votes, key=lambda v: v.message.witness)))


# --- who may be a member -------------------------------------------------------------------


@dataclass(frozen=True)
class Eligibility:
    """One peer's view of who may enter the pool (from its ledger; see ``ledger_eligibility``)."""

    identities: Callable[[str], bool]  # holds a valid identity proof (or is a genesis witness)
    banned: Callable[[str], bool]
    earned: Callable[[str], int]  # earned from other identities, out of escrow
    min_earned: int

    def eligible(self, peer_id: str) -> bool:
        return (
            self.identities(peer_id)
            and not self.banned(peer_id)
            and self.earned(peer_id) >= self.min_earned
        )


def propose_members(
    prev: PoolCheckpoint | None,
    epoch: int,
    candidates: Iterable[str],
    view: Eligibility,
) -> tuple[tuple[str, int], ...]:
    """The proposer's members for ``epoch``: live candidates; kept members keep their
    ``since``, eligible newcomers join with ``since = epoch``; banned ones leave."""
    old = prev.since if prev is not None else {}
    out: dict[str, int] = {}
    for c in sorted(set(candidates)):
        if view.banned(c):
            continue
        if c in old:
            out[c] = old[c]
        elif view.eligible(c):
            out[c] = epoch
        if len(out) >= MAX_MEMBERS:
            break
    return tuple(sorted(out.items()))


def check_proposal(
    proposal: PoolCheckpoint,
    prev: PoolCheckpoint | None,
    network: bytes,
    now_epoch: int,
    view: Eligibility,
) -> str | None:
    """Why a voter must not sign ``proposal`` (None: it may). ``prev`` is the voter's
    newest checkpoint (None: only the genesis)."""
    if proposal.network != network:
        return "checkpoint of another network"
    if proposal.epoch > now_epoch:
        return f"checkpoint for epoch {proposal.epoch}, ours is {now_epoch}"
    prev_epoch, prev_digest = (0, network) if prev is None else (prev.epoch, prev.digest)
    if (proposal.prev_epoch, proposal.prev) != (prev_epoch, prev_digest):
        return f"does not extend our newest checkpoint (epoch {prev_epoch})"
    if proposal.epoch <= prev_epoch:
        return f"epoch {proposal.epoch} is not after {prev_epoch}"
    old = prev.since if prev is not None else {}
    for peer_id, since in proposal.members:
        if view.banned(peer_id):
            return f"{peer_id} is banned"
        if peer_id in old:
            if since != old[peer_id]:
                return f"{peer_id} joined at epoch {old[peer_id]}, not {since}"
        elif since != proposal.epoch:
            return f"newcomer {peer_id} must join at epoch {proposal.epoch}, not {since}"
        elif not view.eligible(peer_id):
            return f"{peer_id} is not eligible here (identity, earnings)"
    return None


class CheckpointVoter:
    """A member's one-vote-per-epoch lock, sans-IO (the I/O layer persists before replying).

    ``decide`` returns the vote to persist and send, or a refusal reason; a second,
    different checkpoint for an epoch already voted is always refused."""

    def __init__(
        self, key: nacl.signing.SigningKey, voted: Mapping[int, bytes] | None = None
    ) -> None:
        self._key = key
        self.peer_id = peer_id_from_public_key(bytes(key.verify_key))
        self.voted: dict[int, bytes] = dict(voted or {})

    def decide(
        self, proposal: PoolCheckpoint, rules: EpochRules, now_epoch: int, view: Eligibility
    ) -> Signed[PoolVote] | str:
        held = self.voted.get(proposal.epoch)
        if held is not None:
            if held == proposal.digest:
                return sign_pool_vote(self._key, proposal)
            return f"already voted for another checkpoint of epoch {proposal.epoch}"
        latest = rules.latest
        prev = latest.checkpoint if latest is not None else None
        if self.peer_id not in rules.checkpoint_committee(prev.epoch if prev else 0):
            return "not in the checkpoint committee"
        why = check_proposal(proposal, prev, rules.network, now_epoch, view)
        if why is not None:
            return why
        self.voted[proposal.epoch] = proposal.digest
        return sign_pool_vote(self._key, proposal)


# --- the rules, as they follow the checkpoints ----------------------------------------------


@dataclass(frozen=True, eq=False)
class EpochRules(CommitteeRule):
    """A ``CommitteeRule`` (its own fields are the genesis rule's) that draws committees
    from the newest checkpoint at least ``lag`` epochs old.

    ``add(certified)`` takes a checkpoint that extends a held one and carries a quorum
    of that one's checkpoint committee; ``tick(now_ms)`` moves "now"."""

    network: bytes = b"\0" * 32
    epoch_ms: int = 600_000
    lag: int = 2
    age: int = 6
    _book: dict[int, CertifiedCheckpoint] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _rules: dict[int, CommitteeRule] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _now: list[int] = field(default_factory=lambda: [0], init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        want_digest("EpochRules", "network", self.network)
        if self.epoch_ms <= 0 or self.lag < 1 or self.age < 0:
            raise LocalProtocolError("epoch_ms > 0, lag >= 1 and age >= 0 are needed")

    # --- the book of checkpoints ----------------------------------------------------------

    @property
    def latest(self) -> CertifiedCheckpoint | None:
        return self._book[max(self._book)] if self._book else None

    def get(self, epoch: int) -> CertifiedCheckpoint | None:
        return self._book.get(epoch)

    def epochs(self) -> list[int]:
        return sorted(self._book)

    def after(self, epoch: int, limit: int) -> list[CertifiedCheckpoint]:
        return [self._book[e] for e in sorted(self._book) if e > epoch][:limit]

    def rule_at(self, cp: int) -> CommitteeRule:
        """The committee rule under checkpoint ``cp`` (0: the genesis rule)."""
        rule = self._rules.get(cp)
        if rule is not None:
            return rule
        if cp == 0:
            rule = CommitteeRule(
                beacon=self.beacon,
                pool=self.pool,
                fallback=self.fallback,
                f=self.f,
                referee_panel_size=self.referee_panel_size,
                serving=self.serving,
            )
        else:
            held = self._book.get(cp)
            if held is None:
                raise UnknownCheckpoint(f"checkpoint of epoch {cp} is not held here")
            rule = CommitteeRule(
                beacon=held.digest,
                pool=held.checkpoint.pool(self.age),
                fallback=self.fallback,
                f=self.f,
                referee_panel_size=self.referee_panel_size,
                serving=held.checkpoint.serving(),
            )
        self._rules[cp] = rule
        return rule

    def checkpoint_committee(self, prev_epoch: int) -> Committee:
        """Who certifies the checkpoint that follows checkpoint ``prev_epoch``."""
        return self.rule_at(prev_epoch).committee_for(CHECKPOINT_SUBJECT)

    def add(self, certified: CertifiedCheckpoint) -> bool:
        """Verify and keep a certified checkpoint (True if new). Its predecessor must be
        held: sync checkpoints in epoch order."""
        c = certified.checkpoint
        if c.network != self.network:
            raise ValidationError("checkpoint of another network")
        held = self._book.get(c.epoch)
        if held is not None:
            if held.digest == c.digest:
                return False
            raise ValidationError(
                f"a second checkpoint for epoch {c.epoch}: more than f members broke the rules"
            )
        if c.prev_epoch == 0:
            if c.prev != self.network:
                raise ValidationError("the first checkpoint must name the genesis")
        else:
            prev = self._book.get(c.prev_epoch)
            if prev is None:
                raise UnknownCheckpoint(f"checkpoint {c.epoch} extends unknown {c.prev_epoch}")
            if prev.digest != c.prev:
                raise ValidationError(f"checkpoint {c.epoch} extends another {c.prev_epoch}")
        certified.verify(self.checkpoint_committee(c.prev_epoch))
        self._book[c.epoch] = certified
        return True

    # --- time -----------------------------------------------------------------------------

    def epoch_of(self, time_ms: int) -> int:
        return epoch_of(time_ms, self.epoch_ms)

    def cp_for(self, time_ms: int) -> int:
        """The checkpoint a transfer made at ``time_ms`` is witnessed under: the newest held
        one at least ``lag`` epochs older (0: the genesis)."""
        limit = self.epoch_of(time_ms) - self.lag
        best = 0
        for e in self._book:
            if best < e <= limit:
                best = e
        return best

    def tick(self, now_ms: int) -> None:
        self._now[0] = now_ms

    @property
    def current(self) -> int:
        """The checkpoint committees are drawn under now (see ``tick``)."""
        return self.cp_for(self._now[0])

    @property
    def current_rule(self) -> CommitteeRule:
        return self.rule_at(self.current)

    @property
    def panel_cp(self) -> int:
        """Referee panels are drawn under the current checkpoint, like committees."""
        return self.current

    def panel_cps(self) -> frozenset[int]:
        """The current checkpoint and the one current an epoch ago: a request made just
        before a checkpoint took over still finds its referees willing."""
        now = self._now[0]
        return frozenset({self.cp_for(now), self.cp_for(now - self.epoch_ms)})

    # --- CommitteeRule --------------------------------------------------------------------

    def committee_for(self, account: str) -> Committee:
        return self.rule_at(self.current).committee_for(account)

    def committee_at(self, account: str, cp: int, time_ms: int) -> Committee:
        if cp > self.epoch_of(time_ms) - self.lag and cp != 0:
            raise ValidationError(
                f"checkpoint {cp} is less than {self.lag} epochs older than the transfer"
            )
        return self.rule_at(cp).committee_for(account)

    def describe(self) -> dict[str, Any]:
        latest = self.latest
        rule = self.current_rule
        return {
            "epoch_ms": self.epoch_ms,
            "lag": self.lag,
            "age": self.age,
            "now_epoch": self.epoch_of(self._now[0]),
            "current_checkpoint": self.current,
            "latest_checkpoint": latest.epoch if latest is not None else 0,
            "checkpoints": len(self._book),
            "pool": sorted(self.current_rule.pool),
            # model cid -> how many pool members serve it (its referee panels come from them)
            "serving": {cid: len(rule.servers(cid)) for cid in sorted(rule.serving or {})},
        }


def rules_from(
    base: CommitteeRule, *, network: bytes, epoch_ms: int, lag: int, age: int
) -> EpochRules:
    """An ``EpochRules`` over the genesis rule ``base``."""
    return EpochRules(
        beacon=base.beacon,
        pool=base.pool,
        fallback=base.fallback,
        f=base.f,
        referee_panel_size=base.referee_panel_size,
        network=network,
        epoch_ms=epoch_ms,
        lag=lag,
        age=age,
    )


def ledger_eligibility(ledger: Any, now_ms: int, min_earned: int) -> Eligibility:
    """A peer's view of eligibility from its ``LedgerState``: a proven identity, not banned,
    and at least ``min_earned`` received out of escrow from *other* proven identities."""

    def earned(account: str) -> int:
        return sum(
            amount
            for payer, amount in ledger.earned_from(account, now_ms).items()
            if payer != account and ledger.has_identity(payer)
        )

    return Eligibility(ledger.has_identity, ledger.is_banned, earned, min_earned)


# --- wire: /edgeswarm/epochs/1 (one request, one reply per stream) ----------------------------

WIRE_VERSION = 1
MAX_GET = 16
MAX_REQUEST = PoolCheckpoint.MAX_BYTES + CertifiedCheckpoint.MAX_BYTES + 256
MAX_REPLY = MAX_GET * CertifiedCheckpoint.MAX_BYTES + 256


@dataclass(frozen=True)
class GetCheckpoints:
    """Ask for up to ``MAX_GET`` certified checkpoints after epoch ``after``, oldest first."""

    after: int


@dataclass(frozen=True)
class Stand:
    """Ask whether the peer stands for the pool (is live and wants to witness)."""


@dataclass(frozen=True)
class Propose:
    """Ask a checkpoint committee member to vote for ``checkpoint``; ``prev`` is the
    certified checkpoint it extends (None: the genesis), for a voter that lacks it."""

    checkpoint: PoolCheckpoint
    prev: CertifiedCheckpoint | None = None


@dataclass(frozen=True)
class Offer:
    """Hand a peer a newly certified checkpoint (it verifies it before keeping it)."""

    certified: CertifiedCheckpoint


EpochRequest = GetCheckpoints | Stand | Propose | Offer


def encode_request(req: EpochRequest) -> bytes:
    if isinstance(req, GetCheckpoints):
        return encode({"v": WIRE_VERSION, "op": "get", "after": req.after})
    if isinstance(req, Stand):
        return encode({"v": WIRE_VERSION, "op": "stand"})
    if isinstance(req, Offer):
        return encode({"v": WIRE_VERSION, "op": "offer", "c": req.certified.to_bytes()})
    prev = req.prev.to_bytes() if req.prev is not None else b""
    return encode({"v": WIRE_VERSION, "op": "propose", "c": req.checkpoint.to_bytes(), "p": prev})


def decode_request(data: bytes) -> EpochRequest:
    raw = decode(data, max_size=MAX_REQUEST)
    op = raw.get("op") if isinstance(raw, dict) else None
    if op == "get":
        b = check_body(
            raw, kind="Epochs.get", version=WIRE_VERSION, fields=frozenset({"op", "after"})
        )
        return GetCheckpoints(want_int("Epochs.get", "after", b["after"], hi=MAX_EPOCH))
    if op == "stand":
        check_body(raw, kind="Epochs.stand", version=WIRE_VERSION, fields=frozenset({"op"}))
        return Stand()
    if op == "propose":
        b = check_body(
            raw, kind="Epochs.propose", version=WIRE_VERSION, fields=frozenset({"op", "c", "p"})
        )
        blob = want_bytes("Epochs.propose", "c", b["c"], lo=1, hi=PoolCheckpoint.MAX_BYTES)
        prev = want_bytes("Epochs.propose", "p", b["p"], lo=0, hi=CertifiedCheckpoint.MAX_BYTES)
        return Propose(
            PoolCheckpoint.from_bytes(blob),
            CertifiedCheckpoint.from_bytes(prev) if prev else None,
        )
    if op == "offer":
        b = check_body(
            raw, kind="Epochs.offer", version=WIRE_VERSION, fields=frozenset({"op", "c"})
        )
        blob = want_bytes("Epochs.offer", "c", b["c"], lo=1, hi=CertifiedCheckpoint.MAX_BYTES)
        return Offer(CertifiedCheckpoint.from_bytes(blob))
    raise ValidationError(f"unknown epochs request {op!r}")


def encode_checkpoints(items: Iterable[CertifiedCheckpoint]) -> bytes:
    return encode({"v": WIRE_VERSION, "cps": [c.to_bytes() for c in items][:MAX_GET]})


def decode_checkpoints(data: bytes) -> list[CertifiedCheckpoint]:
    raw = decode(data, max_size=MAX_REPLY)
    b = check_body(raw, kind="Epochs.cps", version=WIRE_VERSION, fields=frozenset({"cps"}))
    if type(b["cps"]) is not list or len(b["cps"]) > MAX_GET:
        raise ValidationError(f"Epochs.cps must list at most {MAX_GET} checkpoints")
    return [
        CertifiedCheckpoint.from_bytes(
            want_bytes("Epochs.cps", "cps[]", c, lo=1, hi=CertifiedCheckpoint.MAX_BYTES)
        )
        for c in b["cps"]
    ]


MAX_STAND_REPLY = 64 + MAX_MEMBER_MODELS * 70


def encode_stand(stand: bool, models: Iterable[str] = ()) -> bytes:
    """Whether this peer stands for the pool and, if it does, the model cids it serves
    (at most ``MAX_MEMBER_MODELS``; left out when none)."""
    body: dict[str, Any] = {"v": WIRE_VERSION, "stand": stand}
    cids = sorted(set(models))[:MAX_MEMBER_MODELS] if stand else []
    if cids:
        body["models"] = cids
    return encode(body)


def decode_stand_reply(data: bytes) -> tuple[bool, tuple[str, ...]]:
    """(stands, the model cids it says it serves)."""
    raw = decode(data, max_size=MAX_STAND_REPLY)
    names = {"stand", "models"} if isinstance(raw, dict) and "models" in raw else {"stand"}
    b = check_body(raw, kind="Epochs.stand", version=WIRE_VERSION, fields=frozenset(names))
    if type(b["stand"]) is not bool:
        raise ValidationError("Epochs.stand must be a boolean")
    models: tuple[str, ...] = ()
    if "models" in b:
        if type(b["models"]) is not list or not 1 <= len(b["models"]) <= MAX_MEMBER_MODELS:
            raise ValidationError(f"Epochs.stand.models must list 1..{MAX_MEMBER_MODELS} cids")
        models = tuple(want_cid("Epochs.stand", "models[]", c) for c in b["models"])
    return bool(b["stand"]), models


def decode_stand(data: bytes) -> bool:
    return decode_stand_reply(data)[0]


def encode_vote_reply(answer: Signed[PoolVote] | str) -> bytes:
    if isinstance(answer, str):
        return encode({"v": WIRE_VERSION, "no": answer[:300]})
    return encode({"v": WIRE_VERSION, "vote": answer.to_bytes()})


def decode_vote_reply(data: bytes) -> Signed[PoolVote] | str:
    raw = decode(data, max_size=1024)
    if isinstance(raw, dict) and "vote" in raw:
        b = check_body(raw, kind="Epochs.vote", version=WIRE_VERSION, fields=frozenset({"vote"}))
        blob = want_bytes("Epochs.vote", "vote", b["vote"], lo=1, hi=PoolVote.MAX_BYTES)
        return open_pool_vote(blob)
    b = check_body(raw, kind="Epochs.no", version=WIRE_VERSION, fields=frozenset({"no"}))
    if type(b["no"]) is not str or len(b["no"]) > 300:
        raise ValidationError("Epochs.no must be a short text")
    return str(b["no"])


__all__ = [
    "CHECKPOINT_SUBJECT",
    "CertifiedCheckpoint",
    "CheckpointVoter",
    "Eligibility",
    "EpochRules",
    "GetCheckpoints",
    "Offer",
    "PoolCheckpoint",
    "PoolVote",
    "Propose",
    "Stand",
    "certify_checkpoint",
    "check_proposal",
    "decode_checkpoints",
    "decode_request",
    "decode_stand",
    "decode_stand_reply",
    "decode_vote_reply",
    "encode_checkpoints",
    "encode_request",
    "encode_stand",
    "encode_vote_reply",
    "epoch_of",
    "ledger_eligibility",
    "open_pool_vote",
    "propose_members",
    "propose_models",
    "rules_from",
    "sign_pool_vote",
]
