"""Offline-checkable evidence: equivocation, fraud and arbitrated receipts.

- ``EquivocationProof``: two payer-signed transfers for one (account, seq)
  with different digests. Anyone can check it; the payer is banned (credit
  limit 0) and its committee will never certify that seq twice.
- ``RefereeResult``: a referee's signed verdict on one executor commitment:
  "I ran the same model on the same input; the output that hashes to the
  commitment's output digest does / does not match mine within tolerance".
- ``FraudProof``: an executor's signed ``ResultCommitment`` plus a majority of
  the job's referee panel saying "mismatch". The cheater is banned and its
  payouts still in escrow are reversed (see ledger_state).
- ``ArbitratedReceipt``: the same commitment plus a majority saying "match":
  stands in for the requester's acceptance when the requester refuses to
  sign one. The requester then owes the price like for a ``Receipt``.

The referee panel is not chosen by the requester: ``referee_panel`` draws it from the
pool and beacon of an epoch checkpoint (named ``cp`` in every verdict), seeded by the
executor's signed commitment (``panel_seed``), which the requester cannot compute when
it picks the job id. See docs/settlement.md for what each party can still choose.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import nacl.signing

from protocols.codec import decode, encode
from protocols.committee import MAX_COMMITTEE, CommitteeRule, RefereePanel
from protocols.errors import ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import MAX_TIME_MS, Transfer
from protocols.market_fields import (
    FlatBody,
    check_body,
    want_bytes,
    want_cid,
    want_digest,
    want_int,
    want_job_id,
    want_peer_id,
    want_str,
)
from protocols.receipt import ResultCommitment
from protocols.signed import Signed, open_message, sign_message
from protocols.signing import signing_bytes

REFEREE_RESULT_DOMAIN = "edgeswarm/referee-result/v1"
EQUIVOCATION_DOMAIN = "edgeswarm/equivocation/v1"
FRAUD_DOMAIN = "edgeswarm/fraud/v1"
ARBITRATED_DOMAIN = "edgeswarm/arbitrated-receipt/v1"
PANEL_SEED_DOMAIN = "edgeswarm/referee-panel-seed/v1"
MAX_CP = 2**40  # an epoch number (protocols.epochs.MAX_EPOCH)
PROOF_VERSION = 1

Verdict = Literal["match", "mismatch"]
VERDICTS: frozenset[str] = frozenset({"match", "mismatch"})


class PayableReceipt(Protocol):
    """What a witness needs from a receipt: a ``Receipt`` or an ``ArbitratedReceipt``."""

    @property
    def commitment(self) -> Signed[ResultCommitment]: ...
    @property
    def receipt_id(self) -> bytes: ...
    @property
    def requester(self) -> str: ...
    @property
    def executor(self) -> str: ...
    @property
    def price(self) -> int: ...
    @property
    def job_id(self) -> bytes: ...


# --- equivocation --------------------------------------------------------------------------


@dataclass(frozen=True)
class EquivocationProof:
    """Two valid payer signatures on different transfers with the same (payer, seq)."""

    MAX_BYTES: ClassVar[int] = 2 * Transfer.MAX_BYTES + 64

    first: Signed[Transfer]
    second: Signed[Transfer]

    @classmethod
    def of(cls, a: Signed[Transfer], b: Signed[Transfer]) -> EquivocationProof:
        """Canonical order (by digest) so one pair gives one proof."""
        return cls(first=a, second=b) if a.digest < b.digest else cls(first=b, second=a)

    @property
    def offender(self) -> str:
        return self.first.message.payer

    @property
    def seq(self) -> int:
        return self.first.message.seq

    def verify(self) -> None:
        a, b = self.first.message, self.second.message
        if a.payer != b.payer or a.seq != b.seq:
            raise ValidationError(
                f"equivocation proof needs one (payer, seq); got ({a.payer}, {a.seq}) "
                f"and ({b.payer}, {b.seq})"
            )
        if self.first.digest >= self.second.digest:
            raise ValidationError(
                "equivocation proof transfers must differ and be sorted by digest"
            )
        self.first.verify()
        self.second.verify()

    @property
    def fact_id(self) -> bytes:
        """One equivocation fact per offender: any proof bans it the same way."""
        return hashlib.sha256(signing_bytes(EQUIVOCATION_DOMAIN, self.offender.encode())).digest()

    def to_bytes(self) -> bytes:
        return encode({"v": PROOF_VERSION, "a": self.first.to_bytes(), "b": self.second.to_bytes()})

    @classmethod
    def from_bytes(cls, data: bytes) -> EquivocationProof:
        """Parse and verify."""
        b = check_body(
            decode(data, max_size=cls.MAX_BYTES),
            kind="EquivocationProof",
            version=PROOF_VERSION,
            fields=frozenset("ab"),
        )
        proof = cls(
            first=open_message(
                Transfer, want_bytes("EquivocationProof", "a", b["a"], lo=1, hi=512), verify=False
            ),
            second=open_message(
                Transfer, want_bytes("EquivocationProof", "b", b["b"], lo=1, hi=512), verify=False
            ),
        )
        proof.verify()
        return proof


# --- referee results -----------------------------------------------------------------------


@dataclass(frozen=True)
class RefereeResult(FlatBody):
    """Referee-signed verdict on the commitment with digest ``commitment``."""

    DOMAIN: ClassVar[str] = REFEREE_RESULT_DOMAIN
    MAX_BYTES: ClassVar[int] = 640
    VERSION: ClassVar[int] = 2  # 2: names the checkpoint ``cp`` its panel was drawn under
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "cp",
            "job_id",
            "model_cid",
            "input_digest",
            "commitment",
            "output_digest",
            "verdict",
            "referee",
            "time_ms",
        }
    )

    job_id: bytes
    model_cid: str
    input_digest: bytes
    commitment: bytes  # digest of the judged ResultCommitment
    output_digest: bytes  # the referee's own output digest
    verdict: str
    referee: str
    time_ms: int
    cp: int = 0  # the epoch checkpoint whose pool drew the panel (0: the genesis rule)

    def __post_init__(self) -> None:
        k = "RefereeResult"
        want_job_id(k, self.job_id)
        want_cid(k, "model_cid", self.model_cid)
        want_digest(k, "input_digest", self.input_digest)
        want_digest(k, "commitment", self.commitment)
        want_digest(k, "output_digest", self.output_digest)
        want_str(k, "verdict", self.verdict, hi=16)
        if self.verdict not in VERDICTS:
            raise ValidationError(
                f"{k}.verdict must be 'match' or 'mismatch', got {self.verdict!r}"
            )
        want_peer_id(k, "referee", self.referee)
        want_int(k, "time_ms", self.time_ms, hi=MAX_TIME_MS)
        want_int(k, "cp", self.cp, hi=MAX_CP)

    @property
    def signer(self) -> str:
        return self.referee

    def check_time(self, now: float) -> None:
        """Verdicts do not expire."""


def sign_referee_result(
    key: nacl.signing.SigningKey,
    commitment: Signed[ResultCommitment],
    *,
    output_digest: bytes,
    verdict: Verdict,
    time_ms: int,
    cp: int = 0,
) -> Signed[RefereeResult]:
    """Referee side: sign a verdict on ``commitment`` as a member of its panel under
    checkpoint ``cp`` (see verification.judge for the verdict)."""
    c = commitment.message
    return sign_message(
        key,
        RefereeResult(
            job_id=c.job_id,
            model_cid=c.model_cid,
            input_digest=c.input_digest,
            commitment=commitment.digest,
            output_digest=output_digest,
            verdict=verdict,
            referee=peer_id_from_public_key(bytes(key.verify_key)),
            time_ms=time_ms,
            cp=cp,
        ),
    )


def open_referee_result(data: bytes) -> Signed[RefereeResult]:
    return open_message(RefereeResult, data)


def panel_seed(commitment: Signed[ResultCommitment]) -> bytes:
    """What a claim's referee panel is drawn from: sha256 over the executor's signed
    commitment, signature included. A requester fixes its job id before the executor
    signs and cannot make the executor's signature, so it cannot grind job ids into a
    panel of its choice (``protocols.committee.select_panel``)."""
    return hashlib.sha256(signing_bytes(PANEL_SEED_DOMAIN, commitment.to_bytes())).digest()


def referee_panel(
    rule: CommitteeRule, commitment: Signed[ResultCommitment], cp: int
) -> RefereePanel:
    """The referee panel of ``commitment`` under checkpoint ``cp`` of ``rule``: drawn from
    the checkpoint's pool members that serve the claim's model."""
    c = commitment.message
    return rule.panel_at(
        cp, panel_seed(commitment), c.job_id, (c.requester, c.executor), model_cid=c.model_cid
    )


def _check_panel_verdicts(
    kind: str,
    commitment: Signed[ResultCommitment],
    results: tuple[Signed[RefereeResult], ...],
    panel: RefereePanel,
    verdict: Verdict,
) -> None:
    commitment.verify()
    c = commitment.message
    if panel.job_id != c.job_id:
        raise ValidationError(f"{kind}: referee panel is for another job")
    referees = [r.message.referee for r in results]
    if len(set(referees)) != len(referees):
        raise ValidationError(f"{kind}: two verdicts from one referee")
    if referees != sorted(referees):
        raise ValidationError(f"{kind}: verdicts must be sorted by referee")
    for signed in results:
        r = signed.message
        if r.cp != panel.cp:
            raise ValidationError(
                f"{kind}: verdict of {r.referee} names checkpoint {r.cp}, the panel is "
                f"drawn under {panel.cp}"
            )
        if r.referee not in panel:
            raise ValidationError(f"{kind}: {r.referee} is not on the job's referee panel")
        if r.referee in (c.requester, c.executor):
            raise ValidationError(f"{kind}: a party to the job cannot referee it")
        if (r.job_id, r.model_cid, r.input_digest, r.commitment) != (
            c.job_id,
            c.model_cid,
            c.input_digest,
            commitment.digest,
        ):
            raise ValidationError(f"{kind}: verdict of {r.referee} is about another job or result")
        if r.verdict != verdict:
            raise ValidationError(
                f"{kind}: verdict of {r.referee} is {r.verdict!r}, not {verdict!r}"
            )
        signed.verify()
    if len(results) < panel.threshold:
        raise ValidationError(
            f"{kind}: {len(results)} verdicts, a majority of the {len(panel.members)}-referee "
            f"panel is {panel.threshold}"
        )


def _encode_with_results(
    commitment: Signed[ResultCommitment], results: tuple[Signed[RefereeResult], ...]
) -> bytes:
    return encode(
        {"v": PROOF_VERSION, "c": commitment.to_bytes(), "r": [r.to_bytes() for r in results]}
    )


def _decode_with_results(
    kind: str, data: bytes, max_size: int
) -> tuple[Signed[ResultCommitment], tuple[Signed[RefereeResult], ...]]:
    b = check_body(
        decode(data, max_size=max_size), kind=kind, version=PROOF_VERSION, fields=frozenset("cr")
    )
    c = open_message(
        ResultCommitment,
        want_bytes(kind, "c", b["c"], lo=1, hi=ResultCommitment.MAX_BYTES),
        verify=False,
    )
    if type(b["r"]) is not list or not 1 <= len(b["r"]) <= MAX_COMMITTEE:
        raise ValidationError(f"{kind}.r must be a list of 1..{MAX_COMMITTEE} referee results")
    results = tuple(
        open_message(
            RefereeResult,
            want_bytes(kind, "r[]", r, lo=1, hi=RefereeResult.MAX_BYTES),
            verify=False,
        )
        for r in b["r"]
    )
    return c, results


def _sorted_results(
    results: tuple[Signed[RefereeResult], ...],
) -> tuple[Signed[RefereeResult], ...]:
    return tuple(sorted(results, key=lambda r: r.message.referee))


class _PanelEvidence:
    """A commitment plus a panel majority's verdicts: what fraud proofs and arbitrated
    receipts share (``KIND`` names it in errors, ``VERDICT`` is the majority's verdict)."""

    KIND: ClassVar[str]
    VERDICT: ClassVar[Verdict]
    commitment: Signed[ResultCommitment]
    results: tuple[Signed[RefereeResult], ...]

    def verify(self, panel: RefereePanel) -> None:
        _check_panel_verdicts(self.KIND, self.commitment, self.results, panel, self.VERDICT)

    @property
    def cp(self) -> int:
        """The checkpoint its verdicts name (``verify`` checks they all name the panel's)."""
        return self.results[0].message.cp if self.results else 0

    def verify_under(self, rule: CommitteeRule) -> None:
        """``verify`` against the panel drawn under the checkpoint the verdicts name
        (``UnknownCheckpoint`` while this peer does not hold it)."""
        self.verify(referee_panel(rule, self.commitment, self.cp))


# --- fraud ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FraudProof(_PanelEvidence):
    """The cheater's own commitment plus a panel majority that found its output wrong."""

    MAX_BYTES: ClassVar[int] = 2048 + MAX_COMMITTEE * (RefereeResult.MAX_BYTES + 8)
    KIND: ClassVar[str] = "FraudProof"
    VERDICT: ClassVar[Verdict] = "mismatch"

    commitment: Signed[ResultCommitment]
    results: tuple[Signed[RefereeResult], ...]

    @classmethod
    def of(
        cls, commitment: Signed[ResultCommitment], results: tuple[Signed[RefereeResult], ...]
    ) -> FraudProof:
        return cls(commitment=commitment, results=_sorted_results(results))

    @property
    def offender(self) -> str:
        return self.commitment.message.executor

    @property
    def time_ms(self) -> int:
        """When fraud was established: the median verdict time (honest-majority bounded)."""
        times = sorted(r.message.time_ms for r in self.results)
        return times[(len(times) - 1) // 2]

    def to_bytes(self) -> bytes:
        return _encode_with_results(self.commitment, self.results)

    @property
    def fact_id(self) -> bytes:
        return hashlib.sha256(signing_bytes(FRAUD_DOMAIN, self.to_bytes())).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> FraudProof:
        """Parse the shape; signatures and panel are checked by ``verify(panel)``."""
        c, results = _decode_with_results("FraudProof", data, cls.MAX_BYTES)
        return cls(commitment=c, results=results)


# --- arbitrated receipts -------------------------------------------------------------------


@dataclass(frozen=True)
class ArbitratedReceipt(_PanelEvidence):
    """A commitment plus a panel majority that found its output right: acceptance by referees."""

    MAX_BYTES: ClassVar[int] = FraudProof.MAX_BYTES
    KIND: ClassVar[str] = "ArbitratedReceipt"
    VERDICT: ClassVar[Verdict] = "match"

    commitment: Signed[ResultCommitment]
    results: tuple[Signed[RefereeResult], ...]

    @classmethod
    def of(
        cls, commitment: Signed[ResultCommitment], results: tuple[Signed[RefereeResult], ...]
    ) -> ArbitratedReceipt:
        return cls(commitment=commitment, results=_sorted_results(results))

    def to_bytes(self) -> bytes:
        return _encode_with_results(self.commitment, self.results)

    @classmethod
    def from_bytes(cls, data: bytes) -> ArbitratedReceipt:
        """Parse the shape; signatures and panel are checked by ``verify(panel)``."""
        c, results = _decode_with_results("ArbitratedReceipt", data, cls.MAX_BYTES)
        return cls(commitment=c, results=results)

    @property
    def receipt_id(self) -> bytes:
        return hashlib.sha256(signing_bytes(ARBITRATED_DOMAIN, self.to_bytes())).digest()

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


__all__ = [
    "ARBITRATED_DOMAIN",
    "REFEREE_RESULT_DOMAIN",
    "ArbitratedReceipt",
    "EquivocationProof",
    "FraudProof",
    "PayableReceipt",
    "RefereeResult",
    "Verdict",
    "open_referee_result",
    "panel_seed",
    "referee_panel",
    "sign_referee_result",
]
