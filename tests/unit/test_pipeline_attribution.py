"""Referees attribute a bad intermediate to its producer (``protocols.pipeline``): the
next stage's executor keeps the producer's signed ``StageOutput``; with the producer's
signed commitment for the same job it pins the intermediate on the producer
(``check_stage_dispute``), and a panel majority of "mismatch" verdicts on that commitment
(the referees re-ran the stage on the committed input) is a ``FraudProof`` against it
(``stage_fraud``). Every check has a case that fails when it is removed."""

from __future__ import annotations

import dataclasses

import nacl.signing
import pytest

from protocols.committee import RefereePanel
from protocols.identity import peer_id_from_public_key
from protocols.pipeline import (
    AttributionError,
    StageDispute,
    StageOutput,
    check_stage_dispute,
    stage_fraud,
)
from protocols.proofs import RefereeResult, Verdict, sign_referee_result
from protocols.receipt import ResultCommitment, batch_digest, content_digest
from protocols.signed import Signed, sign_message


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(n: int) -> str:
    return peer_id_from_public_key(bytes(key(n).verify_key))


REQ, PRODUCER, NEXT = pid(1), pid(2), pid(3)
J1, J2 = b"\x01" * 16, b"\x02" * 16
MODEL = "ab" * 32
WIRE = {"h": {"dtype": "float32", "shape": [1], "data": b"\1\0\0\0"}}
D = content_digest(WIRE)
INS = [content_digest({"in": n}) for n in range(3)]
OUTS = [content_digest({"out": n}) for n in range(3)]
OUTS[1] = D  # job 1 of the batch gave the disputed intermediate
REFEREES = (pid(10), pid(11), pid(12))
PANEL = RefereePanel(job_id=J1, members=REFEREES)


def output(signer: int = 2, **kw: object) -> Signed[StageOutput]:
    base: dict[str, object] = {
        "job_id": J1,
        "seq": 1,
        "requester": REQ,
        "executor": pid(signer),
        "output_digest": D,
        "to_job": J2,
        "to_seq": 1,
    }
    base.update(kw)
    return sign_message(key(signer), StageOutput(**base))  # type: ignore[arg-type]


def commitment(signer: int = 2, **kw: object) -> Signed[ResultCommitment]:
    base: dict[str, object] = {
        "job_id": J1,
        "requester": REQ,
        "executor": pid(signer),
        "model_cid": MODEL,
        "input_digest": batch_digest(INS),
        "output_digest": batch_digest(OUTS),
        "price": 30,
        "compute_ms": 3,
        "count": 3,
    }
    base.update(kw)
    return sign_message(key(signer), ResultCommitment(**base))  # type: ignore[arg-type]


def dispute(**kw: object) -> StageDispute:
    base: dict[str, object] = {
        "output": output(),
        "commitment": commitment(),
        "ins": tuple(INS),
        "outs": tuple(OUTS),
    }
    base.update(kw)
    return StageDispute(**base)  # type: ignore[arg-type]


def single() -> StageDispute:
    c = commitment(input_digest=INS[0], output_digest=D, count=1)
    return StageDispute(output(seq=0, to_seq=0), c)


def test_a_dispute_pins_the_intermediate_on_its_producer() -> None:
    d = dispute()
    check_stage_dispute(d, D)
    assert (d.offender, d.seq, d.input_digest, d.output_digest) == (PRODUCER, 1, INS[1], D)
    s = single()
    check_stage_dispute(s, D)
    assert (s.seq, s.input_digest) == (None, INS[0])


def forged(signed: Signed[StageOutput] | Signed[ResultCommitment]) -> object:
    """Another message in the genuine envelope: its signature does not cover it."""
    msg = signed.message
    if isinstance(msg, StageOutput):
        other: object = dataclasses.replace(msg, to_seq=2)
    else:
        other = dataclasses.replace(msg, price=1)
    return Signed(message=other, envelope=signed.envelope)  # type: ignore[arg-type]


CASES: dict[str, tuple[dict[str, object], bytes, str]] = {
    "output signature": ({"output": forged(output())}, D, "does not verify"),
    "commitment signature": ({"commitment": forged(commitment())}, D, "does not verify"),
    # The next stage's executor's own output/commitment: it cannot blame the producer.
    "one executor": ({"commitment": commitment(signer=3)}, D, "not one executor's"),
    "same job": ({"output": output(job_id=J2, to_job=J1)}, D, "another job"),
    "same requester": ({"output": output(requester=NEXT)}, D, "another job"),
    "payload": ({}, OUTS[0], "not the one its producer signed"),
    "digest per job": ({"ins": tuple(INS[:2]), "outs": tuple(OUTS[:2])}, D, "3 jobs"),
    "ins": ({"ins": tuple(reversed(INS))}, D, "input digests"),
    "outs": ({"outs": (OUTS[1], OUTS[0], OUTS[2])}, D, "output digests"),
    "seq": ({"output": output(seq=2, to_seq=2)}, D, "another output"),
    "past": ({"output": output(seq=3, to_seq=3)}, D, "past the commitment's 3 jobs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_evidence_that_does_not_hold_together_blames_nobody(case: str) -> None:
    edit, payload, match = CASES[case]
    with pytest.raises(AttributionError, match=match):
        check_stage_dispute(dispute(**edit), payload)


def test_a_single_jobs_commitment_must_name_the_output_sent_on() -> None:
    s = single()
    with pytest.raises(AttributionError, match="another output"):
        check_stage_dispute(dataclasses.replace(s, commitment=commitment(count=1)), D)
    with pytest.raises(AttributionError, match="per-job digests"):
        check_stage_dispute(dataclasses.replace(s, commitment=commitment()), D)
    with pytest.raises(AttributionError, match="per-job digests"):
        check_stage_dispute(dataclasses.replace(s, output=output()), D)


def verdict(
    referee: int, c: Signed[ResultCommitment], v: Verdict = "mismatch", **kw: object
) -> Signed[RefereeResult]:
    signed = sign_referee_result(key(referee), c, output_digest=OUTS[2], verdict=v, time_ms=5)
    if not kw:
        return signed
    return sign_message(key(referee), dataclasses.replace(signed.message, **kw))  # type: ignore[arg-type]


def test_a_panel_majority_of_mismatches_is_a_fraud_proof_against_the_producer() -> None:
    d = dispute()
    c = d.commitment
    proof = stage_fraud(d, D, [verdict(10, c), verdict(12, c)], PANEL)
    assert proof is not None and proof.offender == PRODUCER
    proof.verify(PANEL)
    assert stage_fraud(d, D, [verdict(10, c)], PANEL) is None  # no majority yet
    assert stage_fraud(d, D, [verdict(10, c, "match"), verdict(11, c, "match")], PANEL) is None
    with pytest.raises(AttributionError):  # evidence that does not hold: nobody is blamed
        stage_fraud(d, OUTS[0], [verdict(10, c), verdict(12, c)], PANEL)


@pytest.mark.parametrize(
    "edit", ["off panel", "party", "cp", "commitment", "input", "model", "sig"]
)
def test_verdicts_that_are_not_about_this_commitment_are_not_counted(edit: str) -> None:
    d = dispute()
    c = d.commitment
    good = verdict(10, c)
    other = commitment(price=31)  # another commitment of the producer's
    bad: Signed[RefereeResult]
    if edit == "off panel":
        bad = verdict(13, c)
    elif edit == "party":
        panel = RefereePanel(job_id=J1, members=(*REFEREES[:2], PRODUCER))
        bad = verdict(2, c)
        assert stage_fraud(d, D, [good, bad], panel) is None
        return
    elif edit == "cp":
        bad = verdict(11, c, cp=1)
    elif edit == "commitment":
        bad = verdict(11, other)
    elif edit == "input":
        bad = verdict(11, c, input_digest=INS[0])
    elif edit == "model":
        bad = verdict(11, c, model_cid="cd" * 32)
    else:
        real = verdict(11, c)
        bad = Signed(message=real.message, envelope=verdict(12, c).envelope)
    assert stage_fraud(d, D, [good, bad], PANEL) is None
    assert stage_fraud(d, D, [good, bad, verdict(12, c)], PANEL) is not None
