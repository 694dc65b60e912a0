"""Result commitments, acceptances and receipts: the proof that a job was done and taken.

The executor signs a ``ResultCommitment`` (what ran, on what, what came out,
for how much); the requester, after checking the outputs, signs an
``Acceptance`` naming that commitment's digest. The pair is a ``Receipt``,
which anyone can check offline with ``receipt.verify()``: both signatures,
signers equal to the executor/requester the commitment names, and the
acceptance naming exactly this commitment. Nothing is paid without one.

A lease batch is one commitment with ``count > 1``: ``price`` is the total,
``input_digest``/``output_digest`` are ``batch_digest`` over the per-job
input/output digests in job order, and ``job_id`` is the lease's job id.

Money is integer micro-credits (``price``), never floats.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import nacl.signing

from protocols.codec import decode, encode
from protocols.errors import LocalProtocolError, SignatureError, ValidationError
from protocols.market_fields import (
    DIGEST_SIZE,
    FlatBody,
    check_body,
    want_bytes,
    want_cid,
    want_digest,
    want_int,
    want_job_id,
    want_peer_id,
)
from protocols.signed import Signed, message_digest, open_message, sign_message
from protocols.signing import signing_bytes

COMMITMENT_DOMAIN = "edgeswarm/commitment/v1"
ACCEPTANCE_DOMAIN = "edgeswarm/acceptance/v1"
BATCH_DOMAIN = "edgeswarm/batch/v1"
RECEIPT_VERSION = 1
# One lease batch covers at most this many jobs.
MAX_BATCH = 1_000_000
# A day of compute in ms is far beyond any edge job; the cap just bounds garbage.
MAX_COMPUTE_MS = 86_400_000 * 30
MAX_RECEIPT_BYTES = 2048


def content_digest(value: Any) -> bytes:
    """sha256 of the canonical CBOR of ``value`` (how input and output digests are made)."""
    return hashlib.sha256(encode(value)).digest()


def batch_digest(job_digests: Sequence[bytes]) -> bytes:
    """One digest over a lease batch's per-job digests, in job order.

    Domain-separated and length-committing (CBOR array), so a batch digest can
    never equal a single job's digest or another batch's.
    """
    if not job_digests:
        raise LocalProtocolError("a batch needs at least one job digest")
    if len(job_digests) > MAX_BATCH:
        raise LocalProtocolError(f"a batch holds at most {MAX_BATCH} jobs, got {len(job_digests)}")
    for d in job_digests:
        if type(d) is not bytes or len(d) != DIGEST_SIZE:
            raise LocalProtocolError(f"job digests must be {DIGEST_SIZE} bytes")
    return hashlib.sha256(signing_bytes(BATCH_DOMAIN, encode(list(job_digests)))).digest()


@dataclass(frozen=True)
class ResultCommitment(FlatBody):
    """Executor-signed: "I ran ``model_cid`` on ``input_digest`` and got ``output_digest``."""

    DOMAIN: ClassVar[str] = COMMITMENT_DOMAIN
    MAX_BYTES: ClassVar[int] = 1024
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "job_id",
            "requester",
            "executor",
            "model_cid",
            "input_digest",
            "output_digest",
            "price",
            "compute_ms",
            "count",
        }
    )

    job_id: bytes
    requester: str
    executor: str
    model_cid: str
    input_digest: bytes
    output_digest: bytes
    price: int
    compute_ms: int
    count: int = 1

    def __post_init__(self) -> None:
        k = "ResultCommitment"
        want_job_id(k, self.job_id)
        want_peer_id(k, "requester", self.requester)
        want_peer_id(k, "executor", self.executor)
        if self.requester == self.executor:
            # Self-dealing receipts would mint "earned" credit out of nothing.
            raise ValidationError(f"{k}: requester and executor are the same peer")
        want_cid(k, "model_cid", self.model_cid)
        want_digest(k, "input_digest", self.input_digest)
        want_digest(k, "output_digest", self.output_digest)
        want_int(k, "price", self.price)
        want_int(k, "compute_ms", self.compute_ms, hi=MAX_COMPUTE_MS)
        want_int(k, "count", self.count, lo=1, hi=MAX_BATCH)

    @property
    def signer(self) -> str:
        return self.executor

    @property
    def digest(self) -> bytes:
        """What an ``Acceptance`` names: sha256 of the commitment's signed bytes."""
        return message_digest(self)

    def check_time(self, now: float) -> None:
        """Commitments do not expire."""


@dataclass(frozen=True)
class Acceptance(FlatBody):
    """Requester-signed: "I accept the commitment with this digest" (and so owe its price)."""

    DOMAIN: ClassVar[str] = ACCEPTANCE_DOMAIN
    MAX_BYTES: ClassVar[int] = 512
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset({"job_id", "requester", "commitment"})

    job_id: bytes
    requester: str
    commitment: bytes

    def __post_init__(self) -> None:
        want_job_id("Acceptance", self.job_id)
        want_peer_id("Acceptance", "requester", self.requester)
        want_digest("Acceptance", "commitment", self.commitment)

    @property
    def signer(self) -> str:
        return self.requester

    def check_time(self, now: float) -> None:
        """Acceptances do not expire."""


def commit(key: nacl.signing.SigningKey, commitment: ResultCommitment) -> Signed[ResultCommitment]:
    """Executor side: sign a commitment (``key`` must be the commitment's executor)."""
    return sign_message(key, commitment)


def accept(
    key: nacl.signing.SigningKey, commitment: Signed[ResultCommitment]
) -> Signed[Acceptance]:
    """Requester side: sign an acceptance of ``commitment`` (checked first)."""
    commitment.verify()
    c = commitment.message
    return sign_message(
        key, Acceptance(job_id=c.job_id, requester=c.requester, commitment=commitment.digest)
    )


def open_commitment(data: bytes) -> Signed[ResultCommitment]:
    """Parse and verify an executor's signed commitment from untrusted bytes."""
    return open_message(ResultCommitment, data)


@dataclass(frozen=True)
class Receipt:
    """A signed commitment plus the requester's signed acceptance of it."""

    commitment: Signed[ResultCommitment]
    acceptance: Signed[Acceptance]

    @classmethod
    def create(
        cls, requester_key: nacl.signing.SigningKey, commitment: Signed[ResultCommitment]
    ) -> Receipt:
        """Requester side: accept ``commitment`` and return the finished receipt."""
        return cls(commitment=commitment, acceptance=accept(requester_key, commitment))

    def verify(self) -> None:
        """Raise a ``RemoteProtocolError`` unless this receipt is fully valid."""
        self.commitment.verify()
        self.acceptance.verify()
        c, a = self.commitment.message, self.acceptance.message
        if a.commitment != self.commitment.digest:
            raise SignatureError("the acceptance names a different commitment")
        if a.job_id != c.job_id:
            raise ValidationError(
                f"acceptance is for job {a.job_id.hex()}, commitment for {c.job_id.hex()}"
            )
        if a.requester != c.requester:
            raise SignatureError(
                f"acceptance signed by {a.requester}, but the commitment's requester is "
                f"{c.requester}"
            )

    def to_bytes(self) -> bytes:
        return self._wire

    @functools.cached_property
    def _wire(self) -> bytes:
        """Encoded once per object (frozen: its bytes cannot change); a receipt is stored,
        hashed and sent several times on its way."""
        return encode(
            {"v": RECEIPT_VERSION, "c": self.commitment.to_bytes(), "a": self.acceptance.to_bytes()}
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, verify: bool = True) -> Receipt:
        """Parse a receipt; with ``verify`` (the default) also run ``verify()``.

        ``verify=False`` is for bytes this peer already checked and stored.
        """
        raw = decode(data, max_size=MAX_RECEIPT_BYTES)
        body = check_body(raw, kind="Receipt", version=RECEIPT_VERSION, fields=frozenset("ca"))
        c_bytes = want_bytes("Receipt", "c", body["c"], lo=1, hi=ResultCommitment.MAX_BYTES)
        a_bytes = want_bytes("Receipt", "a", body["a"], lo=1, hi=Acceptance.MAX_BYTES)
        receipt = cls(
            commitment=open_message(ResultCommitment, c_bytes, verify=False),
            acceptance=open_message(Acceptance, a_bytes, verify=False),
        )
        if verify:
            receipt.verify()
        return receipt

    @functools.cached_property
    def receipt_id(self) -> bytes:
        """sha256 of the receipt's canonical bytes: its key in ledgers and sync (computed
        once per object: a witness and a ledger ask for it several times per payment)."""
        return hashlib.sha256(self.to_bytes()).digest()

    @property
    def job_id(self) -> bytes:
        return self.commitment.message.job_id

    @property
    def requester(self) -> str:
        return self.commitment.message.requester

    @property
    def executor(self) -> str:
        return self.commitment.message.executor

    @property
    def price(self) -> int:
        return self.commitment.message.price

    @property
    def count(self) -> int:
        return self.commitment.message.count

    @property
    def model_cid(self) -> str:
        return self.commitment.message.model_cid


__all__ = [
    "ACCEPTANCE_DOMAIN",
    "COMMITMENT_DOMAIN",
    "MAX_RECEIPT_BYTES",
    "Acceptance",
    "Receipt",
    "ResultCommitment",
    "accept",
    "batch_digest",
    "commit",
    "content_digest",
    "open_commitment",
]
