"""Market messages: signed, domain-separated, size-capped, strict on versions, fields and time."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

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
from protocols.market import (
    Award,
    BatchClose,
    Bid,
    JobError,
    JobInput,
    JobRequest,
    JobResult,
    LeaseTerms,
    TensorMeta,
    decode_frame,
    encode_frame,
)
from protocols.receipt import Acceptance, ResultCommitment, accept, commit, content_digest
from protocols.signed import Signed, open_message, sign_message
from protocols.signing import seal


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


REQ, EXEC, OTHER = key(1), key(2), key(3)
CID = hashlib.sha256(b"tiny model").hexdigest()
JOB = bytes(range(16))
NOW = 1_700_000_000.0


def request(**over: Any) -> JobRequest:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "requester": pid(REQ),
        "model_cid": CID,
        "inputs": (TensorMeta("x", "float32", (1, 3, 224, 224)),),
        "input_bytes": 4 * 3 * 224 * 224,
        "max_price": 10_000,
        "deadline": NOW + 10.0,
        "bid_window": 0.2,
        "spot_check": 0.1,
        "nonce": b"n" * 16,
    }
    fields.update(over)
    return JobRequest(**fields)


def bid(**over: Any) -> Bid:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "executor": pid(EXEC),
        "price": 2_000,
        "eta_ms": 40,
        "expires_at": NOW + 5.0,
    }
    fields.update(over)
    return Bid(**fields)


def award(**over: Any) -> Award:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "requester": pid(REQ),
        "executor": pid(EXEC),
        "model_cid": CID,
        "price": 2_000,
        "deadline": NOW + 10.0,
    }
    fields.update(over)
    return Award(**fields)


def error(**over: Any) -> JobError:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "executor": pid(EXEC),
        "code": "bad-input",
        "message": "x: expected float32, got int64",
    }
    fields.update(over)
    return JobError(**fields)


# --- round trips ----------------------------------------------------------------


def test_request_round_trip() -> None:
    lease = LeaseTerms(max_jobs=100, until=NOW + 5)
    for r in (request(), request(lease=lease, round=2)):
        s = sign_message(REQ, r)
        back = JobRequest.from_bytes(s.to_bytes(), now=NOW)
        assert back.message == r
        assert back.signer_id == pid(REQ)
        assert back.digest == s.digest


def test_bid_award_error_round_trip() -> None:
    sb = sign_message(EXEC, bid())
    assert Bid.from_bytes(sb.to_bytes(), now=NOW).message == bid()
    la = award(lease=LeaseTerms(max_jobs=10, until=NOW + 9))
    for a in (award(), la):
        assert Award.from_bytes(sign_message(REQ, a).to_bytes(), now=NOW).message == a
    assert la.max_jobs == 10 and award().max_jobs == 1
    assert JobError.from_bytes(sign_message(EXEC, error()).to_bytes()).message == error()


def test_ints_are_normalised_to_float_times() -> None:
    r = request(deadline=1_700_000_010)
    assert isinstance(r.deadline, float)
    assert JobRequest.from_body(decode(encode(r.to_body()), max_size=9000)) == r


def test_sizes_are_small() -> None:
    assert len(sign_message(REQ, request()).to_bytes()) < 600
    assert len(sign_message(EXEC, bid()).to_bytes()) < 300
    assert len(sign_message(REQ, award()).to_bytes()) < 400


# --- who signs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer", "msg"),
    [(EXEC, request()), (REQ, bid()), (EXEC, award()), (REQ, error())],
)
def test_only_the_named_peer_can_sign(signer: nacl.signing.SigningKey, msg: Any) -> None:
    with pytest.raises(LocalProtocolError, match="must be signed by"):
        sign_message(signer, msg)


def test_forged_signer_rejected() -> None:
    # OTHER signs a bid that claims to come from EXEC.
    env = seal(OTHER, Bid.DOMAIN, bid().to_body())
    with pytest.raises(SignatureError, match="signed by"):
        Bid.from_bytes(env.to_bytes())


def test_domains_are_separate() -> None:
    b = sign_message(EXEC, bid()).to_bytes()
    with pytest.raises(SignatureError, match="expected a edgeswarm/award/v1"):
        Award.from_bytes(b)
    # Same body signed under another domain tag does not verify as a bid.
    env = seal(EXEC, "edgeswarm/job-error/v1", bid().to_body())
    raw = decode(env.to_bytes(), max_size=4096)
    raw["d"] = Bid.DOMAIN
    with pytest.raises(SignatureError):
        Bid.from_bytes(encode(raw))


def test_domain_tags() -> None:
    assert JobRequest.DOMAIN == "edgeswarm/job-request/v1"
    assert Bid.DOMAIN == "edgeswarm/bid/v1"
    assert Award.DOMAIN == "edgeswarm/award/v1"
    assert JobError.DOMAIN == "edgeswarm/job-error/v1"


# --- time -------------------------------------------------------------------------


def test_expiry_checked_with_now() -> None:
    sb = sign_message(EXEC, bid()).to_bytes()
    Bid.from_bytes(sb, now=NOW + 5.0)
    with pytest.raises(ValidationError, match="expired"):
        Bid.from_bytes(sb, now=NOW + 5.001)
    with pytest.raises(ValidationError, match="valid for"):
        Bid.from_bytes(sign_message(EXEC, bid(expires_at=NOW + 7200)).to_bytes(), now=NOW)
    sr = sign_message(REQ, request()).to_bytes()
    with pytest.raises(ValidationError, match="expired"):
        JobRequest.from_bytes(sr, now=NOW + 11)
    with pytest.raises(ValidationError, match="ahead"):
        JobRequest.from_bytes(sr, now=NOW - 100_000)
    sa = sign_message(REQ, award()).to_bytes()
    with pytest.raises(ValidationError, match="expired"):
        Award.from_bytes(sa, now=NOW + 10.5)
    # Without now, no time check (e.g. replaying stored messages for audit).
    Award.from_bytes(sa)


# --- strict parsing -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [JobRequest, Bid, Award, JobError])
def test_unknown_version_and_fields(cls: Any) -> None:
    body = {
        JobRequest: request,
        Bid: bid,
        Award: award,
        JobError: error,
    }[cls]().to_body()
    with pytest.raises(DecodeError, match="version"):
        cls.from_body({**body, "v": 2})
    with pytest.raises(DecodeError, match="unknown fields"):
        cls.from_body({**body, "extra": 1})
    with pytest.raises(DecodeError, match="missing"):
        cls.from_body({k: v for k, v in body.items() if k != "job_id"})
    with pytest.raises(DecodeError, match="map"):
        cls.from_body([1, 2])


def test_unknown_version_in_signed_bytes() -> None:
    body = {**bid().to_body(), "v": 9}
    env = seal(EXEC, Bid.DOMAIN, body)
    with pytest.raises(DecodeError, match="unsupported Bid version 9, expected 1"):
        Bid.from_bytes(env.to_bytes())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: request(max_price=-1), "max_price"),
        (lambda: request(max_price=1.5), "max_price"),
        (lambda: request(deadline=float("nan")), "deadline"),
        (lambda: request(deadline=float("inf")), "deadline"),
        (lambda: request(bid_window=61), "bid_window"),
        (lambda: request(spot_check=1.5), "spot_check"),
        (lambda: request(nonce=b"1"), "nonce"),
        (lambda: request(inputs=()), "inputs"),
        (lambda: request(inputs=(TensorMeta("a", "float32", ()),) * 2), "duplicate"),
        (lambda: request(lease=LeaseTerms(5, NOW + 20)), "lease"),
        (lambda: TensorMeta("x", "complex64", (1,)), "dtype"),
        (lambda: TensorMeta("x", "float32", (-1,)), "shape"),
        (lambda: TensorMeta("x", "float32", (1,) * 9), "shape"),
        (lambda: TensorMeta("", "float32", (1,)), "name"),
        (lambda: bid(eta_ms=-5), "eta_ms"),
        (lambda: bid(price=True), "price"),
        (lambda: bid(executor="Qm" + "x" * 44), "executor"),
        (lambda: award(executor=pid(REQ)), "same peer"),
        (lambda: award(lease=LeaseTerms(0, NOW)), "max_jobs"),
        (lambda: error(code="oops"), "code"),
        (lambda: award(price=2**62, lease=LeaseTerms(4, NOW)), "overflows"),
        (lambda: request(max_price=2**62, lease=LeaseTerms(4, NOW)), "overflows"),
    ],
)
def test_bad_fields_rejected(make: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        make()


def test_oversize_rejected_before_decoding() -> None:
    with pytest.raises(DecodeError, match="cap"):
        Bid.from_bytes(b"\xa0" * (Bid.MAX_BYTES + 1))
    with pytest.raises(DecodeError, match="cap"):
        JobRequest.from_bytes(b"\xa0" * (JobRequest.MAX_BYTES + 1))


def test_largest_valid_request_fits_its_cap() -> None:
    dims = (2**31 - 1,) * 8
    big = request(
        inputs=tuple(TensorMeta(f"{i:03d}" + "n" * 253, "float16", dims) for i in range(32)),
        lease=LeaseTerms(max_jobs=1_000_000, until=NOW + 9.123456789),
        nonce=b"\xff" * 32,
        max_price=(2**63 - 1) // 1_000_000,
    )
    data = sign_message(REQ, big).to_bytes()
    assert len(data) <= JobRequest.MAX_BYTES
    assert JobRequest.from_bytes(data).message == big


# --- job-stream frames --------------------------------------------------------------


def test_frames_round_trip() -> None:
    c = commit(
        EXEC,
        ResultCommitment(
            job_id=JOB,
            requester=pid(REQ),
            executor=pid(EXEC),
            model_cid=CID,
            input_digest=content_digest(1),
            output_digest=content_digest(2),
            price=2_000,
            compute_ms=3,
        ),
    )
    frames: list[Any] = [
        sign_message(REQ, award()),
        sign_message(EXEC, error()),
        c,
        accept(REQ, c),
        JobInput(job_id=JOB, seq=0, inputs={"x": {"dtype": "uint8", "shape": [1], "data": b"\1"}}),
        JobResult(
            job_id=JOB,
            seq=3,
            outputs={"y": {"dtype": "uint8", "shape": [], "data": b"\2"}},
            compute_ms=7,
        ),
        BatchClose(job_id=JOB, count=4),
    ]
    for f in frames:
        back = decode_frame(encode_frame(f))
        assert back == f
        if isinstance(f, Signed):
            assert isinstance(back, Signed) and back.envelope == f.envelope


def test_frame_garbage_rejected() -> None:
    with pytest.raises(DecodeError, match="unknown job frame"):
        decode_frame(encode({"t": "nope"}))
    with pytest.raises(DecodeError, match="unknown job frame"):
        decode_frame(encode({"t": "close", "job_id": JOB, "count": 1, "x": 0}))
    with pytest.raises(DecodeError):
        decode_frame(encode({"t": "award", "m": "text"}))
    with pytest.raises(DecodeError, match="limit"):
        decode_frame(b"\0" * 100, max_size=10)


# --- properties --------------------------------------------------------------------

_SIGNED: list[tuple[type[Any], bytes]] = [
    (JobRequest, sign_message(REQ, request()).to_bytes()),
    (Bid, sign_message(EXEC, bid()).to_bytes()),
    (Award, sign_message(REQ, award(lease=LeaseTerms(3, NOW + 1))).to_bytes()),
    (JobError, sign_message(EXEC, error()).to_bytes()),
    (
        Acceptance,
        accept(
            REQ,
            commit(
                EXEC,
                ResultCommitment(
                    JOB, pid(REQ), pid(EXEC), CID, content_digest(1), content_digest(2), 1, 1
                ),
            ),
        ).to_bytes(),
    ),
]


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(_SIGNED) - 1), data=st.data())
def test_any_bit_flip_is_rejected(which: int, data: st.DataObject) -> None:
    cls, raw = _SIGNED[which]
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RemoteProtocolError):
        open_message(cls, bytes(flipped))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_gives_typed_errors(data: bytes) -> None:
    for cls in (JobRequest, Bid, Award, JobError):
        with pytest.raises(RemoteProtocolError):
            open_message(cls, data)
    with pytest.raises(RemoteProtocolError):
        decode_frame(data)


@settings(max_examples=100, deadline=None)
@given(
    price=st.integers(0, 2**63 - 1),
    eta=st.integers(0, 3_600_000),
    expires=st.floats(0, 1e10, allow_nan=False),
)
def test_bid_round_trips_any_values(price: int, eta: int, expires: float) -> None:
    b = bid(price=price, eta_ms=eta, expires_at=expires)
    assert Bid.from_bytes(sign_message(EXEC, b).to_bytes()).message == b


def test_replace_revalidates() -> None:
    with pytest.raises(ValidationError):
        replace(bid(), price=-1)
