"""Witness votes and transfer certificates.

A ``WitnessVote`` is a witness's signature over ``(account, seq, transfer
digest)`` (domain ``edgeswarm/witness-vote/v1``). A ``Certificate`` is the
payer-signed transfer plus votes from a quorum of distinct members of the
payer's committee; ``Certificate.verify(committee)`` checks all of it offline.
The ``CertificateAssembler`` is the payer's sans-IO helper: feed it the votes
that come back, it says when a certificate is complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import nacl.signing

from protocols.codec import decode, encode
from protocols.committee import MAX_COMMITTEE, Committee, require_quorum
from protocols.errors import LocalProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import MAX_SEQ, Transfer
from protocols.market_fields import (
    FlatBody,
    check_body,
    want_bytes,
    want_digest,
    want_int,
    want_peer_id,
)
from protocols.signed import Signed, open_message, sign_message

VOTE_DOMAIN = "edgeswarm/witness-vote/v1"
CERTIFICATE_VERSION = 1


@dataclass(frozen=True)
class WitnessVote(FlatBody):
    """Witness-signed: "for ``account``'s ``seq`` I vouch only for ``transfer``"."""

    DOMAIN: ClassVar[str] = VOTE_DOMAIN
    MAX_BYTES: ClassVar[int] = 384
    VERSION: ClassVar[int] = 2
    _FIELDS: ClassVar[frozenset[str]] = frozenset({"account", "seq", "transfer", "witness", "cp"})

    account: str
    seq: int
    transfer: bytes  # the transfer's digest
    witness: str
    cp: int = 0  # the epoch checkpoint whose committee this witness sits on (0: genesis)

    def __post_init__(self) -> None:
        want_peer_id("WitnessVote", "account", self.account)
        want_int("WitnessVote", "seq", self.seq, lo=1, hi=MAX_SEQ)
        want_digest("WitnessVote", "transfer", self.transfer)
        want_peer_id("WitnessVote", "witness", self.witness)
        want_int("WitnessVote", "cp", self.cp, hi=2**40)

    @property
    def signer(self) -> str:
        return self.witness

    def check_time(self, now: float) -> None:
        """Votes do not expire."""


def sign_vote(
    key: nacl.signing.SigningKey, transfer: Signed[Transfer], cp: int = 0
) -> Signed[WitnessVote]:
    """Witness side: sign a vote for ``transfer`` under checkpoint ``cp`` (callers go
    through ``Witness``)."""
    t = transfer.message
    vote = WitnessVote(
        account=t.payer,
        seq=t.seq,
        transfer=transfer.digest,
        witness=peer_id_from_public_key(bytes(key.verify_key)),
        cp=cp,
    )
    return sign_message(key, vote)


def open_vote(data: bytes) -> Signed[WitnessVote]:
    return open_message(WitnessVote, data)


def _check_vote(
    vote: Signed[WitnessVote], transfer: Signed[Transfer], committee: Committee, cp: int
) -> None:
    v, t = vote.message, transfer.message
    if v.cp != cp:
        raise ValidationError(f"vote by {v.witness} is cast under checkpoint {v.cp}, not {cp}")
    if (v.account, v.seq, v.transfer) != (t.payer, t.seq, transfer.digest):
        raise ValidationError(
            f"vote by {v.witness} is for ({v.account}, seq {v.seq}, {v.transfer.hex()[:16]}), "
            f"not ({t.payer}, seq {t.seq}, {transfer.digest.hex()[:16]})"
        )
    if v.witness not in committee:
        raise ValidationError(f"{v.witness} is not a witness of {t.payer}")
    vote.verify()


@dataclass(frozen=True)
class Certificate:
    """A payer-signed transfer and a quorum of its committee's votes (sorted by witness)."""

    MAX_BYTES: ClassVar[int] = 512 + MAX_COMMITTEE * (WitnessVote.MAX_BYTES + 8) + 64

    transfer: Signed[Transfer]
    votes: tuple[Signed[WitnessVote], ...]

    @property
    def digest(self) -> bytes:
        """The certified transfer's digest: the certificate's identity as a ledger fact.

        Two certificates for one transfer with different vote subsets are the
        same fact, so peers that hold either agree on the state hash.
        """
        return self.transfer.digest

    @property
    def account(self) -> str:
        return self.transfer.message.payer

    @property
    def seq(self) -> int:
        return self.transfer.message.seq

    @property
    def cp(self) -> int:
        """The epoch checkpoint whose committee voted (``verify`` checks all votes agree)."""
        return self.votes[0].message.cp

    @property
    def time_ms(self) -> int:
        return self.transfer.message.time_ms

    def verify(self, committee: Committee) -> None:
        """Raise unless the transfer and at least ``committee.quorum`` distinct votes are valid.
        ``committee`` must be the payer's committee under checkpoint ``self.cp``
        (``CommitteeRule.committee_at(account, cp, time_ms)``)."""
        t = self.transfer.message
        if committee.account != t.payer:
            raise ValidationError(f"certificate is for {t.payer}, expected {committee.account}")
        self.transfer.verify()
        require_quorum(
            "certificate",
            committee,
            [v.message.witness for v in self.votes],
            outsider=lambda w: f"{w} is not a witness of {t.payer}",
        )
        for vote in self.votes:
            _check_vote(vote, self.transfer, committee, self.cp)

    def to_bytes(self) -> bytes:
        return encode(
            {
                "v": CERTIFICATE_VERSION,
                "t": self.transfer.to_bytes(),
                "w": [v.to_bytes() for v in self.votes],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse shape and fields; signatures and quorum are checked by ``verify(committee)``."""
        raw = decode(data, max_size=cls.MAX_BYTES)
        b = check_body(raw, kind="Certificate", version=CERTIFICATE_VERSION, fields=frozenset("tw"))
        t_bytes = want_bytes("Certificate", "t", b["t"], lo=1, hi=Transfer.MAX_BYTES)
        if type(b["w"]) is not list or not 1 <= len(b["w"]) <= MAX_COMMITTEE:
            raise ValidationError(f"Certificate.w must be a list of 1..{MAX_COMMITTEE} votes")
        votes = tuple(
            open_message(
                WitnessVote,
                want_bytes("Certificate", "w[]", w, lo=1, hi=WitnessVote.MAX_BYTES),
                verify=False,
            )
            for w in b["w"]
        )
        cert = cls(transfer=open_message(Transfer, t_bytes, verify=False), votes=votes)
        if list(votes) != sorted(votes, key=lambda v: v.message.witness):
            raise ValidationError("Certificate votes must be sorted by witness")
        return cert


def make_certificate(
    transfer: Signed[Transfer], votes: Iterable[Signed[WitnessVote]]
) -> Certificate:
    """Build a certificate with votes in canonical (witness) order."""
    return Certificate(
        transfer=transfer, votes=tuple(sorted(votes, key=lambda v: v.message.witness))
    )


class CertificateAssembler:
    """Payer side, sans-IO: collect votes for one transfer until a quorum is reached.

    ``add_vote`` checks each vote (right transfer, committee member,
    signature); a bad vote raises ``RemoteProtocolError`` and is not kept.
    Exactly ``quorum`` votes (the first valid ones) go into the certificate.
    """

    def __init__(self, transfer: Signed[Transfer], committee: Committee, cp: int = 0) -> None:
        if committee.account != transfer.message.payer:
            raise LocalProtocolError("committee does not belong to the transfer's payer")
        self.transfer = transfer
        self.committee = committee
        self.cp = cp
        self._votes: dict[str, Signed[WitnessVote]] = {}

    def add_vote(self, vote: Signed[WitnessVote]) -> Certificate | None:
        if vote.message.witness not in self._votes:
            _check_vote(vote, self.transfer, self.committee, self.cp)
            self._votes[vote.message.witness] = vote
        return self.certificate

    @property
    def certificate(self) -> Certificate | None:
        if len(self._votes) < self.committee.quorum:
            return None
        chosen = sorted(self._votes)[: self.committee.quorum]
        return make_certificate(self.transfer, (self._votes[w] for w in chosen))

    @property
    def missing(self) -> tuple[str, ...]:
        """Committee members whose vote has not arrived (whom to ask / retry)."""
        return tuple(m for m in self.committee.members if m not in self._votes)


def open_certificate(data: bytes, committee: Committee) -> Certificate:
    cert = Certificate.from_bytes(data)
    cert.verify(committee)
    return cert


__all__ = [
    "VOTE_DOMAIN",
    "Certificate",
    "CertificateAssembler",
    "WitnessVote",
    "make_certificate",
    "open_certificate",
    "open_vote",
    "sign_vote",
]
