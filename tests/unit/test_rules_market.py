"""Rules of the market's messages (protocols/market.py) that no other test held.

Every message here is parsed from untrusted bytes and several carry money (prices and
their 64-bit totals). Found by mutation testing (issue 17, docs/testing.md): each test
fails when its rule is removed. Boundaries are tested both ways: the bound is taken,
one past it is refused.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from protocols.codec import encode
from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.market import (
    MAX_BID_VALIDITY_S,
    MAX_DIM,
    MAX_ETA_MS,
    MAX_HORIZON_S,
    MAX_INPUTS,
    MAX_PAYLOAD_FRAME,
    BatchClose,
    JobError,
    JobInput,
    JobRequest,
    JobResult,
    LeaseTerms,
    TensorMeta,
    decode_frame,
    encode_frame,
)
from protocols.market_fields import MAX_INT
from protocols.receipt import MAX_BATCH
from protocols.signed import sign_message
from tests.unit.test_market_messages import EXEC, JOB, NOW, REQ, award, bid, error, request


def refused(build: Any, *args: Any, **kw: Any) -> None:
    with pytest.raises(ValidationError):
        build(*args, **kw)


# --- time ------------------------------------------------------------------------------


def test_a_request_or_award_is_valid_up_to_and_including_its_deadline() -> None:
    request().check_time(NOW + 10.0)
    award().check_time(NOW + 10.0)
    refused(request().check_time, NOW + 10.001)
    refused(award().check_time, NOW + 10.001)


def test_a_deadline_may_be_exactly_the_horizon_ahead_and_no_further() -> None:
    far = request(deadline=NOW + MAX_HORIZON_S)
    far.check_time(NOW)
    refused(far.check_time, NOW - 0.5)


def test_a_bid_may_be_valid_for_exactly_the_max_validity() -> None:
    bid(expires_at=NOW + MAX_BID_VALIDITY_S).check_time(NOW)
    refused(bid(expires_at=NOW + MAX_BID_VALIDITY_S).check_time, NOW - 0.5)


def test_every_time_field_is_a_float_even_when_given_an_int() -> None:
    """One value, one encoding: 10 and 10.0 are different CBOR, so different signed bytes."""
    t = int(NOW) + 5
    assert type(bid(expires_at=t).expires_at) is float
    assert type(award(deadline=t + 5).deadline) is float
    assert type(request(bid_window=1).bid_window) is float
    assert type(request(spot_check=1).spot_check) is float
    assert type(LeaseTerms(max_jobs=1, until=t).until) is float


def test_job_errors_never_expire() -> None:
    old = sign_message(EXEC, error()).to_bytes()
    assert JobError.from_bytes(old, now=NOW + 10 * MAX_HORIZON_S).message == error()


# --- money -----------------------------------------------------------------------------


def test_a_price_times_jobs_of_exactly_max_int_is_allowed() -> None:
    assert award(price=MAX_INT).price == MAX_INT
    one = LeaseTerms(max_jobs=1, until=NOW + 5)
    assert request(max_price=MAX_INT, lease=one).max_price == MAX_INT
    half = MAX_INT // 2 + 1  # x 2 jobs is one past MAX_INT
    two = LeaseTerms(max_jobs=2, until=NOW + 5)
    refused(award, price=half, lease=two)
    refused(request, max_price=half, lease=two)


# --- bounds, both ways -----------------------------------------------------------------


def test_lease_terms_hold_1_to_max_batch_jobs_and_a_window_up_to_max_batch() -> None:
    for n in (1, MAX_BATCH):
        assert LeaseTerms(max_jobs=n, until=NOW).max_jobs == n
    for n in (0, MAX_BATCH + 1):
        refused(LeaseTerms, max_jobs=n, until=NOW)
    assert LeaseTerms(max_jobs=1, until=NOW, window=MAX_BATCH).window == MAX_BATCH
    refused(LeaseTerms, max_jobs=1, until=NOW, window=MAX_BATCH + 1)


def test_a_lease_may_end_exactly_at_the_deadline() -> None:
    lease = LeaseTerms(max_jobs=2, until=NOW + 10.0)
    assert request(deadline=NOW + 10.0, lease=lease).lease == lease
    assert award(deadline=NOW + 10.0, lease=lease).lease == lease
    refused(request, deadline=NOW + 9.999, lease=lease)


def test_a_window_of_0_on_the_wire_is_refused() -> None:
    """0 is encoded by leaving the window out: one value, one encoding."""
    assert LeaseTerms.from_body({"max_jobs": 2, "until": NOW}) == LeaseTerms(2, NOW)
    assert LeaseTerms.from_body({"max_jobs": 2, "until": NOW, "window": 1}) == LeaseTerms(2, NOW, 1)
    with pytest.raises(DecodeError):
        LeaseTerms.from_body({"max_jobs": 2, "until": NOW, "window": 0})


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("nonce", b"n" * 32, b"n" * 33),
        ("round", 1000, 1001),
        ("input_bytes", MAX_PAYLOAD_FRAME, MAX_PAYLOAD_FRAME + 1),
    ],
)
def test_request_field_bounds(field: str, ok: object, bad: object) -> None:
    assert getattr(request(**{field: ok}), field) == ok
    refused(request, **{field: bad})


def test_a_bids_eta_is_at_most_max_eta_ms() -> None:
    assert bid(eta_ms=MAX_ETA_MS).eta_ms == MAX_ETA_MS
    refused(bid, eta_ms=MAX_ETA_MS + 1)


def test_a_job_errors_message_is_at_most_1024_characters_and_seq_at_most_max_batch() -> None:
    assert error(message="m" * 1024, seq=MAX_BATCH).seq == MAX_BATCH
    refused(error, message="m" * 1025)
    refused(error, seq=MAX_BATCH + 1)


def test_input_and_result_seqs_are_below_max_batch() -> None:
    last = MAX_BATCH - 1
    assert JobInput(job_id=JOB, seq=last, inputs={}).seq == last
    assert JobResult(job_id=JOB, seq=last, outputs={}, compute_ms=0).seq == last
    refused(JobInput, job_id=JOB, seq=MAX_BATCH, inputs={})
    refused(JobResult, job_id=JOB, seq=MAX_BATCH, outputs={}, compute_ms=0)


def test_a_batch_close_counts_1_to_max_batch_jobs() -> None:
    for n in (1, MAX_BATCH):
        assert BatchClose(job_id=JOB, count=n).count == n
    for n in (0, MAX_BATCH + 1):
        refused(BatchClose, job_id=JOB, count=n)


def test_tensor_meta_bounds() -> None:
    assert TensorMeta("n" * 256, "float32", (MAX_DIM,)).shape == (MAX_DIM,)
    refused(TensorMeta, "n" * 257, "float32", (1,))
    refused(TensorMeta, "x", "float32", (MAX_DIM + 1,))


# --- shapes of untrusted bodies and frames ---------------------------------------------


@pytest.mark.parametrize(
    "body", [5, "abc", {"a": 1}, ["x", "float32"], ["x", "float32", [1], "extra"], ["x", "f", 1]]
)
def test_an_input_spec_that_is_not_name_dtype_dims_is_a_decode_error(body: object) -> None:
    with pytest.raises(DecodeError):
        TensorMeta.from_body(body)


def test_a_request_body_with_more_than_max_inputs_is_a_decode_error() -> None:
    body = request().to_body()
    body["inputs"] = [[f"x{i}", "float32", [1]] for i in range(MAX_INPUTS + 1)]
    with pytest.raises(DecodeError):
        JobRequest.from_body(body)
    body["inputs"] = {"x": ["x", "float32", [1]]}
    with pytest.raises(DecodeError):
        JobRequest.from_body(body)


def test_a_signed_frame_holds_exactly_a_tag_and_message_bytes() -> None:
    m = sign_message(REQ, award()).to_bytes()
    assert decode_frame(encode({"t": "award", "m": m})).message == award()
    for bad in ({"t": "award", "m": m, "x": 1}, {"t": "award", "m": m.hex()}, {"t": "award"}):
        with pytest.raises(DecodeError):
            decode_frame(encode(bad))


@pytest.mark.parametrize(
    "bad",
    [
        {"t": "input", "job_id": JOB, "seq": 0},
        {"t": "input", "job_id": JOB, "seq": 0, "y": {}, "ms": 1},
        {"t": "result", "job_id": JOB, "seq": 0, "y": {}},
        {"t": "result", "job_id": JOB, "seq": 0, "x": {}},
        {"t": "close", "job_id": JOB},
    ],
)
def test_an_unsigned_frame_with_other_fields_is_a_decode_error(bad: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode_frame(encode(bad))


def test_a_job_frame_need_not_be_canonical_cbor() -> None:
    """The outer frame is neither signed nor hashed as bytes (inputs and outputs are bound
    by content_digest of the decoded value): its canonical form is not required."""
    frame = JobResult(job_id=JOB, seq=0, outputs={"y": {}}, compute_ms=3)
    loose = cbor2.dumps({"y": {"y": {}}, "t": "result", "seq": 0, "ms": 3, "job_id": JOB})
    assert loose != encode_frame(frame)
    assert decode_frame(loose) == frame


def test_frames_are_protocol_errors_never_crashes() -> None:
    for bad in ({"t": "input", "seq": 0, "x": {}, "job_id": JOB, "pad": 0}, [1], {"t": 1}):
        with pytest.raises(ProtocolError):
            decode_frame(encode(bad))
