"""The referee wire messages (peer/market/referee.py): headers, claims, replies, batch claims."""

from __future__ import annotations

import hashlib

import nacl.signing
import numpy as np
import pytest

from peer.market.referee import (
    Claim,
    RefereeError,
    decode_header,
    decode_payload,
    decode_reply,
    encode_error,
    encode_header,
    encode_payload,
    encode_reply,
)
from protocols.codec import encode
from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.proofs import sign_referee_result
from protocols.receipt import ResultCommitment, batch_digest, commit, content_digest
from protocols.tensor import encode_tensors
from protocols.verification import judge, outputs_digest

CID = hashlib.sha256(b"model").hexdigest()


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"referee-key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


REQ, EX, EX2, REF = key(1), key(2), key(3), key(4)
X = {"x": np.arange(4, dtype=np.float32)}
GOOD = {"z": np.arange(4, dtype=np.float32) * 2}
BAD = {"z": np.arange(4, dtype=np.float32) * 2 + 1}


def single(executor: nacl.signing.SigningKey, outputs: dict[str, np.ndarray], job: int) -> Claim:
    c = ResultCommitment(
        job_id=hashlib.sha256(b"job%d" % job).digest()[:16],
        requester=pid(REQ),
        executor=pid(executor),
        model_cid=CID,
        input_digest=content_digest(encode_tensors(X)),
        output_digest=outputs_digest(outputs),
        price=1,
        compute_ms=1,
    )
    return Claim(commit(executor, c), encode_tensors(outputs))


def batch(seq: int, outputs: dict[str, np.ndarray], n: int = 3) -> Claim:
    others = [{"z": np.full(4, i, dtype=np.float32)} for i in range(n)]
    ins = [
        content_digest(encode_tensors({"x": np.full(4, 9 + i, dtype=np.float32)})) for i in range(n)
    ]
    outs = [outputs_digest(o) for o in others]
    ins[seq] = content_digest(encode_tensors(X))
    outs[seq] = outputs_digest(outputs)
    c = ResultCommitment(
        job_id=b"lease-job-000001",
        requester=pid(REQ),
        executor=pid(EX),
        model_cid=CID,
        input_digest=batch_digest(ins),
        output_digest=batch_digest(outs),
        price=n,
        compute_ms=1,
        count=n,
    )
    return Claim(commit(EX, c), encode_tensors(outputs), seq=seq, ins=tuple(ins), outs=tuple(outs))


def test_header_round_trip_single_and_batch() -> None:
    claims = [batch(1, BAD), single(EX2, GOOD, 2)]
    back, cp = decode_header(encode_header(claims, 7))
    assert cp == 7
    assert [c.commitment.digest for c in back] == [c.commitment.digest for c in claims]
    assert back[0].seq == 1 and back[0].ins == claims[0].ins and back[1].seq is None
    assert back[0].job_input_digest == back[1].job_input_digest


def test_batch_claim_judged_against_its_batch_digest() -> None:
    cheat, honest = batch(2, BAD), batch(2, GOOD)
    assert judge(cheat.commitment.message, BAD, GOOD, digest=cheat.output_digest_of) == "mismatch"
    assert judge(honest.commitment.message, GOOD, GOOD, digest=honest.output_digest_of) == "match"
    # A requester cannot frame the executor with outputs it never committed to.
    with pytest.raises(ValidationError, match="do not hash"):
        judge(honest.commitment.message, BAD, GOOD, digest=honest.output_digest_of)


def _raw_header(*claims: object, v: int = 2, cp: object = 0) -> bytes:
    return encode({"v": v, "c": list(claims), "cp": cp})


def test_bad_headers_are_refused() -> None:
    a, b = single(EX, BAD, 1), single(EX2, GOOD, 2)
    cases: list[tuple[bytes, str]] = [
        (_raw_header(a.header(), v=1), "must be"),
        (encode({"v": 2, "c": [a.header()]}), "must be"),
        (_raw_header(a.header(), cp=-1), "cp must be"),
        (_raw_header(a.header(), cp=2**41), "cp must be"),
        (_raw_header(a.header(), cp="1"), "cp must be"),
        (_raw_header(), "1..2 claims"),
        (_raw_header(a.header(), b.header(), a.header()), "1..2 claims"),
        (_raw_header(a.header(), a.header()), "sent twice"),
        (_raw_header({"c": a.commitment.to_bytes(), "x": 1}), "a claim must be"),
        (_raw_header({"c": b"\x00" * 2000}), "size cap"),
    ]
    # Claims about different inputs.
    other = single(EX2, GOOD, 3)
    moved = ResultCommitment(
        **{**other.commitment.message.__dict__, "input_digest": b"\x01" * 32}  # type: ignore[arg-type]
    )
    cases.append((encode_header([a, Claim(commit(EX2, moved))]), "same model and input"))
    # A batch claim without seq, with digests that do not hash to it, or seq out of range.
    bc = batch(0, BAD)
    cases.append((_raw_header({"c": bc.commitment.to_bytes()}), "needs seq"))
    forged = {**bc.header(), "outs": [b"\x02" * 32] * 3}
    cases.append((_raw_header(forged), "do not hash"))
    cases.append((_raw_header({**bc.header(), "seq": 3}), "seq must be"))
    # A tampered signature.
    raw = bytearray(a.commitment.to_bytes())
    raw[-1] ^= 1
    cases.append((_raw_header({"c": bytes(raw)}), ""))
    for data, why in cases:
        with pytest.raises(ProtocolError, match=why or None):
            decode_header(data)


def test_payload_and_reply() -> None:
    a, b = single(EX, BAD, 1), single(EX2, GOOD, 2)
    wire = encode_tensors(X)
    data = encode_payload(wire, [a.outputs, b.outputs])
    assert decode_payload(data, 2, 1 << 20) == (wire, [a.outputs, b.outputs])
    with pytest.raises(DecodeError, match="2 outputs"):
        decode_payload(encode_payload(wire, [a.outputs]), 2, 1 << 20)
    r = sign_referee_result(
        REF, a.commitment, output_digest=outputs_digest(GOOD), verdict="mismatch", time_ms=1
    )
    back = decode_reply(encode_reply([r, None]), 2)
    assert back[0] is not None and back[0].message == r.message and back[1] is None
    with pytest.raises(RefereeError, match="busy"):
        decode_reply(encode_error("busy: 4 referee runs in progress"), 2)
    with pytest.raises(DecodeError):
        decode_reply(encode_reply([r]), 2)
