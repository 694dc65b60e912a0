"""Who witnesses an account's transfers, and who referees a job.

An account's committee is the ``3f+1`` members of a pool whose key
(sha256 of the peer id) is closest, by XOR, to
``sha256(domain || account || beacon)``. The beacon is a public value fixed
before the account could influence it (the network's genesis beacon, or an
older agreed state hash), so a payer cannot grind keys until its own Sybils
become its witnesses: a fresh key changes only ``account``, and the pool only
admits accounts that are aged and have earned (``EligibilityPolicy``).

Small swarms: when fewer than ``3f+1`` pool members are eligible, the
committee is drawn from ``pool | fallback`` (the network's bootstrap/genesis
witnesses), and if that is still short it is simply smaller. A committee of
``n`` members tolerates ``f = (n-1)//3`` byzantine witnesses (0 for n < 4)
and needs ``quorum = (n+f)//2 + 1`` votes, which keeps any two quorums
overlapping in an honest member; ``Committee.degraded`` says the target size
was not met. Referee panels use the same draw with another domain tag, seeded
by the executor's signed commitment (``select_panel``) in place of the account,
and only among the pool members that serve the claim's model (``serving``, from
the epoch checkpoint that every ledger holds); the fallback tops a panel up only
when fewer than its size serve the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from protocols.codec import encode
from protocols.errors import LocalProtocolError, ValidationError
from protocols.signing import signing_bytes

COMMITTEE_DOMAIN = "edgeswarm/committee/v1"
REFEREE_DOMAIN = "edgeswarm/referees/v1"
REFEREE_PANEL_DOMAIN = "edgeswarm/referees/v2"
MAX_COMMITTEE = 64


class UnknownCheckpoint(ValidationError):
    """A fact names an epoch checkpoint this peer does not hold (yet): sync, then retry."""


def fault_tolerance(n: int) -> int:
    """Byzantine members a committee of ``n`` tolerates: ``(n-1)//3``."""
    return max(0, (n - 1) // 3)


def quorum_size(n: int) -> int:
    """Votes needed: ``(n+f)//2 + 1`` (= 2f+1 when n = 3f+1); two quorums share an honest member."""
    if n < 1:
        raise LocalProtocolError("a committee needs at least one member")
    return (n + fault_tolerance(n)) // 2 + 1


@dataclass(frozen=True)
class Committee:
    """The witnesses of one account (members sorted by closeness, nearest first)."""

    account: str
    members: tuple[str, ...]
    target_size: int
    _set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.members) <= MAX_COMMITTEE:
            raise LocalProtocolError(
                f"a committee has 1..{MAX_COMMITTEE} members, got {len(self.members)}"
            )
        if len(set(self.members)) != len(self.members):
            raise LocalProtocolError("committee members must be distinct")
        if self.account in self.members:
            raise LocalProtocolError("an account cannot witness its own transfers")
        object.__setattr__(self, "_set", frozenset(self.members))

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._set

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def f(self) -> int:
        return fault_tolerance(self.size)

    @property
    def quorum(self) -> int:
        return quorum_size(self.size)

    @property
    def degraded(self) -> bool:
        """True when fewer members than ``3f+1`` for the configured f could be found."""
        return self.size < self.target_size


def require_quorum(
    what: str,
    committee: Committee,
    signers: Sequence[str],
    *,
    outsider: Callable[[str], str],
) -> None:
    """Raise ``ValidationError`` unless ``signers`` (one per vote) are distinct members of
    ``committee`` and at least ``committee.quorum`` of them: the one quorum check behind
    certificates, ledger checkpoints and pool checkpoints. ``outsider(peer)`` words the
    error for a signer outside the committee; the caller checks each vote's content and
    signature."""
    if len(set(signers)) != len(signers):
        raise ValidationError(f"{what} has two votes from one witness")
    for signer in signers:
        if signer not in committee:
            raise ValidationError(outsider(signer))
    if len(signers) < committee.quorum:
        raise ValidationError(
            f"{what} has {len(signers)} votes, a quorum of {committee.size} witnesses is "
            f"{committee.quorum}"
        )


@dataclass(frozen=True)
class RefereePanel:
    """The referees of one job; ``threshold`` matching verdicts decide it (a majority).

    ``cp`` is the epoch checkpoint whose pool and beacon drew it (0: the genesis rule);
    every verdict counted for the panel must name the same ``cp``."""

    job_id: bytes
    members: tuple[str, ...]
    cp: int = 0

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.members

    @property
    def threshold(self) -> int:
        return len(self.members) // 2 + 1


def _target(domain: str, subject: bytes, beacon: bytes) -> int:
    return int.from_bytes(
        hashlib.sha256(signing_bytes(domain, encode([subject, beacon]))).digest(), "big"
    )


def _key(peer_id: str) -> int:
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest(), "big")


def closest(domain: str, subject: bytes, beacon: bytes, pool: Iterable[str], k: int) -> list[str]:
    """The ``k`` pool members closest (XOR) to the target; ties by peer id. Deterministic."""
    target = _target(domain, subject, beacon)
    return sorted(set(pool), key=lambda p: (_key(p) ^ target, p))[:k]


def select_committee(
    account: str,
    beacon: bytes,
    pool: Iterable[str],
    *,
    f: int = 1,
    fallback: Iterable[str] = (),
) -> Committee:
    """``3f+1`` witnesses for ``account`` from ``pool`` (topped up from ``fallback`` if short)."""
    if f < 0 or 3 * f + 1 > MAX_COMMITTEE:
        raise LocalProtocolError(f"f must be 0..{(MAX_COMMITTEE - 1) // 3}, got {f}")
    size = 3 * f + 1
    candidates = set(pool) - {account}
    if len(candidates) < size:
        candidates |= set(fallback) - {account}
    if not candidates:
        raise LocalProtocolError(f"no witness candidates for {account}: pool and fallback empty")
    members = closest(COMMITTEE_DOMAIN, account.encode(), beacon, candidates, size)
    return Committee(account=account, members=tuple(members), target_size=size)


def _draw_referees(
    domain: str,
    subject: bytes,
    parties: Iterable[str],
    beacon: bytes,
    pool: Iterable[str],
    size: int,
    fallback: Iterable[str],
) -> tuple[str, ...]:
    if not 1 <= size <= MAX_COMMITTEE:
        raise LocalProtocolError(f"referee panel size must be 1..{MAX_COMMITTEE}, got {size}")
    excluded = set(parties)
    candidates = set(pool) - excluded
    if len(candidates) < size:
        candidates |= set(fallback) - excluded
    if not candidates:
        raise LocalProtocolError("no referee candidates: pool and fallback empty")
    return tuple(closest(domain, subject, beacon, candidates, size))


def select_referees(
    job_id: bytes,
    parties: Iterable[str],
    beacon: bytes,
    pool: Iterable[str],
    *,
    size: int = 3,
    fallback: Iterable[str] = (),
) -> RefereePanel:
    """``size`` referees for a job id, never one of its ``parties`` (requester, executors).

    Seeded by the job id alone, which the requester chooses: a requester can grind job
    ids until the panel suits it. Verification uses ``select_panel`` (below) instead."""
    members = _draw_referees(REFEREE_DOMAIN, job_id, parties, beacon, pool, size, fallback)
    return RefereePanel(job_id=job_id, members=members)


def select_panel(
    seed: bytes,
    job_id: bytes,
    parties: Iterable[str],
    beacon: bytes,
    pool: Iterable[str],
    *,
    cp: int = 0,
    size: int = 3,
    fallback: Iterable[str] = (),
) -> RefereePanel:
    """The referee panel of one executor's signed claim, drawn under checkpoint ``cp``:
    the ``size`` members of ``pool`` (the checkpoint's peers that serve the claim's
    model, ``CommitteeRule.servers``; ``fallback`` if short) closest to
    ``sha256(tag || [seed, beacon])``, never one of the ``parties``.

    ``seed`` is ``protocols.proofs.panel_seed(commitment)``: a digest of the executor's
    *signed* commitment, signature included. The requester fixes the job id before that
    signature exists and cannot compute it (it needs the executor's key), so choosing job
    ids does not choose the panel; what is left to the party that builds the proof is the
    choice of ``cp`` (see docs/settlement.md)."""
    members = _draw_referees(REFEREE_PANEL_DOMAIN, seed, parties, beacon, pool, size, fallback)
    return RefereePanel(job_id=job_id, members=members, cp=cp)


@dataclass(frozen=True)
class EligibilityPolicy:
    """Who may join the witness/referee pool: proven identity and matured earnings."""

    min_earned: int = 10_000_000  # 10 credits, earned and out of escrow

    def eligible(
        self, matured_earned: Mapping[str, int], identities: Iterable[str], banned: Iterable[str]
    ) -> frozenset[str]:
        ids, bad = set(identities), set(banned)
        return frozenset(
            a
            for a, e in matured_earned.items()
            if e >= self.min_earned and a in ids and a not in bad
        )


@dataclass(frozen=True)
class CommitteeRule:
    """The agreed inputs of selection for one epoch: beacon, pool, fallback, f, panel size.

    Every peer must use the same rule to agree on certificates; in this build
    the I/O layer pins it from network config (fallback = bootstrap
    witnesses) and may pin a pool computed by ``EligibilityPolicy`` from an
    agreed checkpoint. Committees are cached per account.
    """

    beacon: bytes
    pool: frozenset[str] = frozenset()
    fallback: frozenset[str] = frozenset()
    f: int = 1
    referee_panel_size: int = 3
    # model cid -> the pool members that serve it (from an epoch checkpoint); None: no
    # such record (a configured or genesis pool), every pool member counts as serving.
    serving: Mapping[str, frozenset[str]] | None = field(default=None, compare=False)
    _cache: dict[str, Committee] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def committee_for(self, account: str) -> Committee:
        c = self._cache.get(account)
        if c is None:
            c = select_committee(account, self.beacon, self.pool, f=self.f, fallback=self.fallback)
            if len(self._cache) < 100_000:
                self._cache[account] = c
        return c

    def cp_for(self, time_ms: int) -> int:
        """The checkpoint a transfer made at ``time_ms`` is witnessed under (0: genesis)."""
        return 0

    def rule_at(self, cp: int) -> CommitteeRule:
        """The rule under checkpoint ``cp``: a plain rule has only the genesis (``cp == 0``);
        ``protocols.epochs.EpochRules`` follows the network's checkpoints."""
        if cp != 0:
            raise UnknownCheckpoint(f"checkpoint {cp}: this rule has only the genesis")
        return self

    def committee_at(self, account: str, cp: int, time_ms: int) -> Committee:
        """The committee a certificate cast under checkpoint ``cp`` must carry a quorum of.
        A plain rule has only the genesis (``cp == 0``); ``protocols.epochs.EpochRules``
        follows the network's checkpoints."""
        if cp != 0:
            raise UnknownCheckpoint(f"checkpoint {cp}: this rule has only the genesis")
        return self.committee_for(account)

    @property
    def panel_cp(self) -> int:
        """The checkpoint referee panels are drawn under now (a plain rule: the genesis)."""
        return 0

    def panel_cps(self) -> frozenset[int]:
        """The checkpoints an honest referee signs verdicts under now: the current one and
        the one that was current an epoch ago (a plain rule: the genesis only)."""
        return frozenset({0})

    def servers(self, model_cid: str) -> frozenset[str]:
        """The pool members a claim on ``model_cid`` may be refereed by: those that serve
        it (every pool member when the rule has no ``serving`` record)."""
        if self.serving is None:
            return self.pool
        return self.pool & self.serving.get(model_cid, frozenset())

    def panel_at(
        self, cp: int, seed: bytes, job_id: bytes, parties: Iterable[str], *, model_cid: str
    ) -> RefereePanel:
        """The referee panel of a claim on ``model_cid`` (``seed``:
        ``protocols.proofs.panel_seed``) under checkpoint ``cp``: that checkpoint's beacon
        and its pool members that serve the model, the fallback only if too few do
        (``UnknownCheckpoint`` if the checkpoint is not held)."""
        rule = self.rule_at(cp)
        return select_panel(
            seed,
            job_id,
            parties,
            rule.beacon,
            rule.servers(model_cid),
            cp=cp,
            size=rule.referee_panel_size,
            fallback=rule.fallback,
        )


def describe_committee(committee: Committee, rule: CommitteeRule) -> dict[str, object]:
    """A plain view of one account's committee (``edgeswarm ledger status --json``)."""
    from_pool = [m for m in committee.members if m in rule.pool]
    return {
        "members": list(committee.members),
        "size": committee.size,
        "target_size": committee.target_size,
        "f": committee.f,
        "quorum": committee.quorum,
        "degraded": committee.degraded,
        "from_pool": len(from_pool),
        "from_fallback": committee.size - len(from_pool),
    }


__all__ = [
    "Committee",
    "CommitteeRule",
    "EligibilityPolicy",
    "RefereePanel",
    "UnknownCheckpoint",
    "closest",
    "describe_committee",
    "fault_tolerance",
    "quorum_size",
    "require_quorum",
    "select_committee",
    "select_panel",
    "select_referees",
]
