"""Receipts: built by executor + requester, verifiable offline, never forgeable by a bit flip."""

from __future__ import annotations

import hashlib

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codec import decode, encode
from protocols.errors import (
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
    SignatureError,
    ValidationError,
)
from protocols.identity import peer_id_from_public_key
from protocols.receipt import (
    MAX_RECEIPT_BYTES,
    Acceptance,
    Receipt,
    ResultCommitment,
    accept,
    batch_digest,
    commit,
    content_digest,
    open_commitment,
)
from protocols.signed import Signed, sign_message
from protocols.signing import seal


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


EXEC, REQ, OTHER = key(1), key(2), key(3)
CID = hashlib.sha256(b"model").hexdigest()


def commitment(**over: object) -> ResultCommitment:
    fields: dict[str, object] = {
        "job_id": b"j" * 16,
        "requester": pid(REQ),
        "executor": pid(EXEC),
        "model_cid": CID,
        "input_digest": content_digest({"x": b"in"}),
        "output_digest": content_digest({"y": b"out"}),
        "price": 1_500,
        "compute_ms": 12,
    }
    fields.update(over)
    return ResultCommitment(**fields)  # type: ignore[arg-type]


def receipt(**over: object) -> Receipt:
    return Receipt.create(REQ, commit(EXEC, commitment(**over)))


# --- happy path -------------------------------------------------------------


def test_receipt_round_trips_and_verifies() -> None:
    r = receipt()
    r.verify()
    data = r.to_bytes()
    assert len(data) < MAX_RECEIPT_BYTES
    back = Receipt.from_bytes(data)
    assert back == r
    assert back.to_bytes() == data
    assert back.receipt_id == hashlib.sha256(data).digest() == r.receipt_id
    assert (back.requester, back.executor, back.price, back.job_id) == (
        pid(REQ),
        pid(EXEC),
        1_500,
        b"j" * 16,
    )
    assert back.count == 1 and back.model_cid == CID


def test_signing_is_deterministic() -> None:
    assert receipt().to_bytes() == receipt().to_bytes()
    assert receipt().receipt_id != receipt(price=1_501).receipt_id


def test_commitment_wire_round_trip() -> None:
    signed = commit(EXEC, commitment())
    back = open_commitment(signed.to_bytes())
    assert back.message == signed.message
    assert back.digest == signed.digest == signed.message.digest


def test_acceptance_names_commitment_digest() -> None:
    signed = commit(EXEC, commitment())
    a = accept(REQ, signed)
    assert a.message.commitment == signed.digest
    assert a.signer_id == pid(REQ)


def test_batch_receipt() -> None:
    ins = [content_digest(i) for i in range(5)]
    outs = [content_digest(-i) for i in range(5)]
    r = receipt(
        count=5, price=5 * 300, input_digest=batch_digest(ins), output_digest=batch_digest(outs)
    )
    assert Receipt.from_bytes(r.to_bytes()).count == 5


def test_batch_digest_is_order_and_length_sensitive() -> None:
    ds = [content_digest(i) for i in range(3)]
    assert batch_digest(ds) != batch_digest(list(reversed(ds)))
    assert batch_digest(ds) != batch_digest(ds[:2])
    assert batch_digest(ds[:1]) != ds[0]
    with pytest.raises(LocalProtocolError):
        batch_digest([])
    with pytest.raises(LocalProtocolError):
        batch_digest([b"short"])


# --- signer and linkage checks -------------------------------------------------


def test_wrong_key_cannot_sign() -> None:
    with pytest.raises(LocalProtocolError, match="must be signed by"):
        commit(OTHER, commitment())
    with pytest.raises(LocalProtocolError, match="must be signed by"):
        accept(OTHER, commit(EXEC, commitment()))


def test_commitment_signed_by_someone_else_is_rejected() -> None:
    # OTHER signs a body that names EXEC as executor: the signature is valid, the signer is not.
    env = seal(OTHER, ResultCommitment.DOMAIN, commitment().to_body())
    with pytest.raises(SignatureError, match="signed by"):
        open_commitment(env.to_bytes())


def test_acceptance_of_other_commitment_fails_verify() -> None:
    c1 = commit(EXEC, commitment())
    c2 = commit(EXEC, commitment(price=9))
    r = Receipt(commitment=c1, acceptance=accept(REQ, c2))
    with pytest.raises(SignatureError, match="different commitment"):
        r.verify()
    with pytest.raises(SignatureError):
        Receipt.from_bytes(r.to_bytes())
    # Parsing without verification still yields an object that fails verify.
    with pytest.raises(SignatureError):
        Receipt.from_bytes(r.to_bytes(), verify=False).verify()


def test_acceptance_by_third_party_fails_verify() -> None:
    c = commit(EXEC, commitment())
    third = sign_message(
        OTHER, Acceptance(job_id=b"j" * 16, requester=pid(OTHER), commitment=c.digest)
    )
    with pytest.raises(SignatureError, match="requester"):
        Receipt(commitment=c, acceptance=third).verify()


def test_envelope_swapped_message_fails_verify() -> None:
    good = commit(EXEC, commitment())
    lying = Signed(message=commitment(price=1), envelope=good.envelope)
    with pytest.raises(ValidationError, match="does not match"):
        lying.verify()


def test_cross_domain_replay_rejected() -> None:
    a = accept(REQ, commit(EXEC, commitment()))
    with pytest.raises(SignatureError, match="expected a edgeswarm/commitment/v1"):
        open_commitment(a.to_bytes())


# --- field validation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"job_id": b"short"}, "job_id"),
        ({"job_id": b"x" * 33}, "job_id"),
        ({"requester": "nope"}, "requester"),
        ({"executor": pid(REQ)}, "same peer"),
        ({"model_cid": "AB" * 32}, "model_cid"),
        ({"model_cid": "ab"}, "model_cid"),
        ({"input_digest": b"x" * 31}, "input_digest"),
        ({"price": -1}, "price"),
        ({"price": 1.5}, "price"),
        ({"price": True}, "price"),
        ({"price": 2**63}, "price"),
        ({"compute_ms": -1}, "compute_ms"),
        ({"count": 0}, "count"),
    ],
)
def test_commitment_fields_validated(over: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        commitment(**over)


def test_unknown_version_and_fields_rejected() -> None:
    body = commitment().to_body()
    with pytest.raises(DecodeError, match="version"):
        ResultCommitment.from_body({**body, "v": 2})
    with pytest.raises(DecodeError, match="unknown fields"):
        ResultCommitment.from_body({**body, "tip": 5})
    del body["price"]
    with pytest.raises(DecodeError, match="missing"):
        ResultCommitment.from_body(body)
    data = decode(receipt().to_bytes(), max_size=4096)
    with pytest.raises(DecodeError, match="version"):
        Receipt.from_bytes(encode({**data, "v": 2}))
    with pytest.raises(DecodeError, match="unknown"):
        Receipt.from_bytes(encode({**data, "x": 1}))


def test_oversize_rejected_before_decoding() -> None:
    with pytest.raises(DecodeError, match="limit"):
        Receipt.from_bytes(b"\x00" * (MAX_RECEIPT_BYTES + 1))
    with pytest.raises(DecodeError, match="cap"):
        open_commitment(b"\x00" * 5000)


# --- properties ---------------------------------------------------------------

_REFERENCE = receipt().to_bytes()


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=len(_REFERENCE) * 8 - 1))
def test_any_bit_flip_is_caught(bit: int) -> None:
    data = bytearray(_REFERENCE)
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RemoteProtocolError):
        Receipt.from_bytes(bytes(data))
    # The unverified parse either fails or yields a receipt that fails verify.
    try:
        parsed = Receipt.from_bytes(bytes(data), verify=False)
    except RemoteProtocolError:
        return
    with pytest.raises(RemoteProtocolError):
        parsed.verify()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_garbage_gives_typed_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Receipt.from_bytes(data)


@settings(max_examples=50, deadline=None)
@given(
    price=st.integers(min_value=0, max_value=2**63 - 1),
    compute_ms=st.integers(min_value=0, max_value=10**9),
    count=st.integers(min_value=1, max_value=1_000_000),
    job_id=st.binary(min_size=16, max_size=32),
)
def test_round_trip_any_values(price: int, compute_ms: int, count: int, job_id: bytes) -> None:
    r = receipt(price=price, compute_ms=compute_ms, count=count, job_id=job_id)
    back = Receipt.from_bytes(r.to_bytes())
    assert back == r and back.price == price and back.job_id == job_id
