"""Builders for the settlement I/O tests: keys, signed receipts, certificates (pure witnesses)."""

from __future__ import annotations

import hashlib
import time

import nacl.signing

from protocols.certificate import Certificate, CertificateAssembler
from protocols.committee import CommitteeRule
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, Transfer, sign_transfer
from protocols.ledger_state import LedgerState
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest
from protocols.signed import Signed
from protocols.witness import PersistLock, ReplyVote, Witness

CID = hashlib.sha256(b"model").hexdigest()
BEACON = b"test-beacon"


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"settle-key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


def now_ms() -> int:
    return int(time.time() * 1000)


def make_receipt(
    requester: nacl.signing.SigningKey,
    executor: nacl.signing.SigningKey,
    price: int,
    job: int,
    *,
    output: bytes = b"out",
) -> Receipt:
    c = commit(
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
    return Receipt.create(requester, c)


def make_transfer(
    payer: nacl.signing.SigningKey, r: Receipt, seq: int, *, time_ms: int | None = None
) -> Signed[Transfer]:
    return sign_transfer(
        payer,
        Transfer(
            payer=pid(payer),
            payee=r.executor,
            amount=r.price,
            seq=seq,
            receipt_id=r.receipt_id,
            time_ms=now_ms() if time_ms is None else time_ms,
        ),
    )


GENESIS = frozenset(peer_id_from_public_key(bytes(key(n).verify_key)) for n in range(1, 10))


def policy(**over: object) -> CreditPolicy:
    """Keys 1..9 are genesis accounts (credit without PoW); others need an identity proof."""
    fields: dict[str, object] = {
        "base_limit": 1_000_000,
        "pow_bits": 4,
        "fraud_window_ms": 60_000,
        "genesis": GENESIS,
    }
    fields.update(over)
    return CreditPolicy(**fields)  # type: ignore[arg-type]


def rule_for(witnesses: list[nacl.signing.SigningKey], f: int = 1) -> CommitteeRule:
    return CommitteeRule(beacon=BEACON, fallback=frozenset(pid(k) for k in witnesses), f=f)


def certify_offline(
    witness_keys: list[nacl.signing.SigningKey],
    rule: CommitteeRule,
    pol: CreditPolicy,
    t: Signed[Transfer],
    r: Receipt,
    history: list[Certificate] = (),  # type: ignore[assignment]
) -> Certificate:
    """A certificate made by pure, in-memory witnesses (no network, no store)."""
    asm = CertificateAssembler(t, rule.committee_for(t.message.payer))
    for k in witness_keys:
        led = LedgerState(rule, pol)
        for c in history:
            led.ingest_certificate(c)
        led.ingest_payable(r)
        w = Witness(k)
        action = w.handle_transfer(t, r, led, t.message.time_ms)
        if isinstance(action, PersistLock):
            action = w.lock_persisted(action.record)
        assert isinstance(action, ReplyVote), action
        cert = asm.add_vote(action.vote)
        if cert is not None:
            return cert
    raise AssertionError("no quorum")
