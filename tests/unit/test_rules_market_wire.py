"""Golden vectors of the job market's wire (protocols/market.py): fixed messages -> fixed bytes.

Every peer runs the same code, so a changed domain tag, version, field name or frame tag
never fails a test between two peers of one release, yet it splits the network from the
previous release (a bid signed under another domain no longer verifies). These vectors
make such a change a decision: a deliberate one updates them, an accidental one fails here
(issue 17: a mutated domain tag or field name survived every other test).
"""

from __future__ import annotations

import hashlib

import pytest

from protocols.market import (
    Award,
    BatchClose,
    Bid,
    JobError,
    JobErrorCode,
    JobInput,
    JobRequest,
    JobResult,
    LeaseTerms,
    TensorMeta,
    decode_frame,
    encode_frame,
)
from protocols.signed import sign_message
from tests.unit.test_market_messages import CID, EXEC, JOB, NOW, REQ, pid

LEASE = LeaseTerms(max_jobs=4, until=NOW + 5.0, window=2)


def messages() -> dict[str, bytes]:
    req = JobRequest(
        job_id=JOB,
        requester=pid(REQ),
        model_cid=CID,
        inputs=(TensorMeta("x", "float32", (1, 3)), TensorMeta("m", "bool", ())),
        input_bytes=13,
        max_price=10_000,
        deadline=NOW + 10.0,
        bid_window=0.2,
        spot_check=0.1,
        nonce=b"n" * 16,
        round=2,
        lease=LEASE,
    )
    bid = Bid(job_id=JOB, executor=pid(EXEC), price=2_000, eta_ms=40, expires_at=NOW + 5.0)
    award = Award(
        job_id=JOB,
        requester=pid(REQ),
        executor=pid(EXEC),
        model_cid=CID,
        price=2_000,
        deadline=NOW + 10.0,
        lease=LEASE,
    )
    error = JobError(
        job_id=JOB, executor=pid(EXEC), code=JobErrorCode.BUSY.value, message="full", seq=3
    )
    return {
        "request": sign_message(REQ, req).to_bytes(),
        "bid": sign_message(EXEC, bid).to_bytes(),
        "award": encode_frame(sign_message(REQ, award)),
        "error": encode_frame(sign_message(EXEC, error)),
        "input": encode_frame(JobInput(job_id=JOB, seq=1, inputs={"x": b"1"})),
        "result": encode_frame(JobResult(job_id=JOB, seq=1, outputs={"y": b"2"}, compute_ms=7)),
        "close": encode_frame(BatchClose(job_id=JOB, count=3)),
    }


GOLDEN = {
    "award": "e41f7e52e77a4af9d6202f78f602fcdd7c1c6205159632a29211c59062fb1b70",
    "bid": "176ec46d51165c6e2e39a8bf32bcbdc7c4fe75172a1f40b7788f4375817bc6be",
    "close": "e95ee9edc73b82738dd964e9c84a495dbd47897d6b1ca44494b226bf7f9e60aa",
    "error": "81e2731db888f700cec3250d20be4ed27cbee0017f5543de36f1e8c880e4b94f",
    "input": "b71f1d267fabf75aa58a1e483f38168ab9230f77a51548ce7dfc9a44c6c25407",
    "request": "53c07ba54c9d01eed715e1756e629b165068cd8543035209761b62b0c726843d",
    "result": "6a71aa67d9958d544415f19af7949dc8c32ed73cdb6d1ff1b0c353f1d60defee",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_market_messages_have_fixed_bytes(name: str) -> None:
    assert hashlib.sha256(messages()[name]).hexdigest() == GOLDEN[name]


def test_every_golden_frame_reads_back() -> None:
    m = messages()
    assert JobRequest.from_bytes(m["request"]).message.lease == LEASE
    assert Bid.from_bytes(m["bid"]).message.eta_ms == 40
    for name in ("award", "error", "input", "result", "close"):
        assert encode_frame(decode_frame(m[name])) == m[name]
