"""Shared builders for the settlement tests: keys, receipts, transfers, a 4-witness world."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import nacl.signing

from protocols.certificate import Certificate, CertificateAssembler
from protocols.committee import CommitteeRule
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, Transfer, sign_transfer
from protocols.ledger_state import LedgerState
from protocols.proofs import PayableReceipt
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest
from protocols.signed import Signed
from protocols.witness import PersistLock, ReplyVote, Witness

CID = hashlib.sha256(b"model").hexdigest()
NOW_MS = 1_800_000_000_000
BEACON = b"genesis-beacon"


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


WITNESS_KEYS = [key(100 + i) for i in range(4)]
WITNESSES = frozenset(pid(k) for k in WITNESS_KEYS)


def signed_commitment(
    requester: nacl.signing.SigningKey,
    executor: nacl.signing.SigningKey,
    price: int,
    job: int,
    *,
    output: bytes = b"out",
) -> Signed[ResultCommitment]:
    return commit(
        executor,
        ResultCommitment(
            job_id=hashlib.sha256(b"job%d" % job).digest()[:16],
            requester=pid(requester),
            executor=pid(executor),
            model_cid=CID,
            input_digest=content_digest({"x": b"in%d" % job}),
            output_digest=content_digest({"y": output}),
            price=price,
            compute_ms=5,
        ),
    )


def receipt(
    requester: nacl.signing.SigningKey, executor: nacl.signing.SigningKey, price: int, job: int
) -> Receipt:
    return Receipt.create(requester, signed_commitment(requester, executor, price, job))


def transfer(
    payer: nacl.signing.SigningKey, r: PayableReceipt, seq: int, *, time_ms: int = NOW_MS
) -> Signed[Transfer]:
    return sign_transfer(
        payer,
        Transfer(
            payer=pid(payer),
            payee=r.executor,
            amount=r.price,
            seq=seq,
            receipt_id=r.receipt_id,
            time_ms=time_ms,
        ),
    )


def policy(**over: object) -> CreditPolicy:
    fields: dict[str, object] = {
        "base_limit": 1_000,
        "pow_bits": 4,
        "fraud_window_ms": 60_000,
        "genesis": frozenset(),
    }
    fields.update(over)
    return CreditPolicy(**fields)  # type: ignore[arg-type]


def rule(**over: object) -> CommitteeRule:
    fields: dict[str, object] = {"beacon": BEACON, "fallback": WITNESSES, "referee_panel_size": 3}
    fields.update(over)
    return CommitteeRule(**fields)  # type: ignore[arg-type]


@dataclass
class World:
    """Four honest witnesses with their own ledgers; everything persisted at once."""

    pol: CreditPolicy
    rul: CommitteeRule = field(default_factory=rule)
    witnesses: list[Witness] = field(default_factory=list)
    ledgers: list[LedgerState] = field(default_factory=list)
    view: LedgerState | None = None

    def __post_init__(self) -> None:
        self.witnesses = [Witness(k) for k in WITNESS_KEYS]
        self.ledgers = [LedgerState(self.rul, self.pol) for _ in WITNESS_KEYS]
        self.view = LedgerState(self.rul, self.pol)

    def certify(
        self, t: Signed[Transfer], r: PayableReceipt, now_ms: int = NOW_MS
    ) -> Certificate | None:
        """Ask every witness; persist locks at once; return the certificate if a quorum signed."""
        asm = CertificateAssembler(t, self.rul.committee_for(t.message.payer))
        cert = None
        for w, led in zip(self.witnesses, self.ledgers, strict=True):
            led.ingest_payable(r)
            action = w.handle_transfer(t, r, led, now_ms)
            if isinstance(action, PersistLock):
                action = w.lock_persisted(action.record)
            if isinstance(action, ReplyVote):
                cert = asm.add_vote(action.vote) or cert
        if cert is not None:
            for led in [*self.ledgers, self.view]:
                assert led is not None
                led.ingest_certificate(cert)
        return cert
