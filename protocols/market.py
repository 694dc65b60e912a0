"""Job market messages: what travels on gossip and on ``/edgeswarm/job/1``.

Signed (each with its own domain tag, so no signature is valid as another kind):

- ``JobRequest`` (requester, gossip on the model's topic): what to run, the
  input shapes (never the payload), max price, deadline, bid window.
- ``Bid`` (executor, gossip): price and eta for one job, valid until ``expires_at``.
- ``Award`` (requester, first frame on the job stream): names the winner and
  the agreed price; with ``lease`` terms it covers many jobs.
- ``JobError`` (executor, job stream): a refusal or failure with a code.
- ``ResultCommitment`` / ``Acceptance`` live in ``protocols.receipt``.

Unsigned frames on the job stream (their integrity comes from the signed
award/commitment around them): ``JobInput`` (one job's inputs), ``JobResult``
(one job's outputs), ``JobForwarded`` (a pipeline stage's outputs went to the next
stage's executor: only their digest), ``BatchClose`` (requester ends a lease batch).
``encode_frame``/``decode_frame`` tag every job-stream frame so the I/O layer
can read them in any order and hand them to the state machines.

Money is integer micro-credits; times are absolute POSIX seconds (floats)
passed in by the caller, never read here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from protocols.codec import decode, encode
from protocols.errors import DecodeError, ValidationError
from protocols.market_fields import (
    MAX_INT,
    FlatBody,
    check_body,
    want_bytes,
    want_cid,
    want_float,
    want_int,
    want_job_id,
    want_peer_id,
    want_str,
)
from protocols.receipt import MAX_BATCH, Acceptance, ResultCommitment
from protocols.signed import Signed, open_message
from protocols.tensor import WIRE_DTYPE_NAMES

JOB_REQUEST_DOMAIN = "edgeswarm/job-request/v1"
BID_DOMAIN = "edgeswarm/bid/v1"
AWARD_DOMAIN = "edgeswarm/award/v1"
JOB_ERROR_DOMAIN = "edgeswarm/job-error/v1"
JOB_PROTOCOL_ID = "/edgeswarm/job/1"
# Requester -> known server: signed JobRequests straight to the servers an auction
# expects (no gossip mesh hop); the server's signed Bid comes back on the same stream.
AUCTION_PROTOCOL_ID = "/edgeswarm/auction/1"

# A job or lease may not reach further ahead than this (bounds garbage deadlines).
MAX_HORIZON_S = 24 * 3600.0
MAX_BID_WINDOW_S = 60.0
MAX_ROUND = 1000  # auctions for one job_id (a cold mesh re-auctions until the deadline)
# A bid may be valid for at most this long after now.
MAX_BID_VALIDITY_S = 3600.0
# How far apart two peers' wall clocks may be (edge boxes without NTP) for jobs to still
# run: the I/O layer judges times written by another peer with this allowance
# (``ExecutorConfig.clock_skew_s``, the gossip guard).
CLOCK_SKEW_S = 10.0
MAX_ETA_MS = 3_600_000
MAX_INPUTS = 32
MAX_RANK = 8
MAX_DIM = 2**31 - 1
# Payload frames (inputs/outputs) are capped by the I/O layer's tensor limits;
# this is the hard ceiling any frame decoder must enforce.
MAX_PAYLOAD_FRAME = 64 * 1024 * 1024 + 64 * 1024
# The element types a tensor may have on the wire (protocols.tensor decodes them).
DTYPES = WIRE_DTYPE_NAMES


def _check_expires(kind: str, what: str, at: float, now: float) -> None:
    if now > at:
        raise ValidationError(f"{kind} expired: its {what} {at:.3f} is {now - at:.3f} s ago")
    if at > now + MAX_HORIZON_S:
        raise ValidationError(
            f"{kind} {what} {at:.3f} is more than {MAX_HORIZON_S:.0f} s ahead of now {now:.3f}"
        )


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of one input (the payload itself never goes on gossip)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        want_str("TensorMeta", "name", self.name, hi=256)
        if self.dtype not in DTYPES:
            raise ValidationError(
                f"TensorMeta.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        if type(self.shape) is not tuple or len(self.shape) > MAX_RANK:
            raise ValidationError(f"TensorMeta.shape must be a tuple of at most {MAX_RANK} dims")
        for dim in self.shape:
            want_int("TensorMeta", "shape", dim, hi=MAX_DIM)

    def to_body(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape)]

    @classmethod
    def from_body(cls, body: Any) -> TensorMeta:
        if type(body) is not list or len(body) != 3 or type(body[2]) is not list:
            raise DecodeError("an input spec must be [name, dtype, [dims...]]")
        return cls(name=body[0], dtype=body[1], shape=tuple(body[2]))


@dataclass(frozen=True)
class LeaseTerms:
    """Up to ``max_jobs`` jobs, each at the award's per-job price, sent before ``until``.

    ``window`` (fair exchange): the most results the executor delivers (and jobs it
    starts) beyond the last cumulative Acceptance the requester signed; at half of it
    the executor sends a cumulative commitment to accept. 0: the executor's own bound
    (``ExecutorConfig.max_unaccepted``), which also caps any larger window. In credits
    the bound is ``window x price``.
    """

    max_jobs: int
    until: float
    window: int = 0

    def __post_init__(self) -> None:
        want_int("LeaseTerms", "max_jobs", self.max_jobs, lo=1, hi=MAX_BATCH)
        want_int("LeaseTerms", "window", self.window, lo=0, hi=MAX_BATCH)
        object.__setattr__(self, "until", want_float("LeaseTerms", "until", self.until))

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"max_jobs": self.max_jobs, "until": self.until}
        if self.window:  # absent when 0, so terms without a window keep their encoding
            body["window"] = self.window
        return body

    @classmethod
    def from_body(cls, body: Any) -> LeaseTerms | None:
        if body is None:
            return None
        if not isinstance(body, dict) or set(body) not in (
            {"max_jobs", "until"},
            {"max_jobs", "until", "window"},
        ):
            raise DecodeError("lease terms must be a map {max_jobs, until[, window]} or null")
        if body.get("window", 1) == 0:
            raise DecodeError("lease terms encode a window of 0 by leaving it out")
        return cls(max_jobs=body["max_jobs"], until=body["until"], window=body.get("window", 0))


def _lease_body(lease: LeaseTerms | None) -> dict[str, Any] | None:
    return None if lease is None else lease.to_body()


@dataclass(frozen=True)
class JobRequest:
    """Requester-signed call for bids, published on the model cid's gossip topic.

    ``round`` counts auctions for the same ``job_id`` (0, then 1 after a
    re-auction ...); gossip dedupes on ``(job_id, round)``. ``spot_check`` is
    the probability that the job is also run elsewhere to check the result.
    """

    DOMAIN: ClassVar[str] = JOB_REQUEST_DOMAIN
    # Fits the largest valid request (32 inputs, 256-char names, rank 8, 2**31 dims).
    MAX_BYTES: ClassVar[int] = 16384
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "job_id",
            "requester",
            "model_cid",
            "inputs",
            "input_bytes",
            "max_price",
            "deadline",
            "bid_window",
            "spot_check",
            "nonce",
            "round",
            "lease",
        }
    )

    job_id: bytes
    requester: str
    model_cid: str
    inputs: tuple[TensorMeta, ...]
    input_bytes: int
    max_price: int
    deadline: float
    bid_window: float
    spot_check: float = 0.0
    nonce: bytes = b"\0" * 8
    round: int = 0
    lease: LeaseTerms | None = None

    def __post_init__(self) -> None:
        k = "JobRequest"
        want_job_id(k, self.job_id)
        want_peer_id(k, "requester", self.requester)
        want_cid(k, "model_cid", self.model_cid)
        if type(self.inputs) is not tuple or not 1 <= len(self.inputs) <= MAX_INPUTS:
            raise ValidationError(f"{k}.inputs must be a tuple of 1..{MAX_INPUTS} TensorMeta")
        if not all(isinstance(t, TensorMeta) for t in self.inputs):
            raise ValidationError(f"{k}.inputs must hold TensorMeta values")
        if len({t.name for t in self.inputs}) != len(self.inputs):
            raise ValidationError(f"{k}.inputs has duplicate names")
        want_int(k, "input_bytes", self.input_bytes, hi=MAX_PAYLOAD_FRAME)
        want_int(k, "max_price", self.max_price)
        object.__setattr__(self, "deadline", want_float(k, "deadline", self.deadline))
        object.__setattr__(
            self, "bid_window", want_float(k, "bid_window", self.bid_window, hi=MAX_BID_WINDOW_S)
        )
        object.__setattr__(self, "spot_check", want_float(k, "spot_check", self.spot_check, hi=1.0))
        want_bytes(k, "nonce", self.nonce, lo=8, hi=32)
        want_int(k, "round", self.round, hi=MAX_ROUND)
        if self.lease is not None and not isinstance(self.lease, LeaseTerms):
            raise ValidationError(f"{k}.lease must be LeaseTerms or None")
        if self.lease is not None and self.lease.until > self.deadline:
            raise ValidationError(f"{k}.lease.until is after the deadline")
        if self.lease is not None and self.max_price * self.lease.max_jobs > MAX_INT:
            raise ValidationError(f"{k}: max_price x lease.max_jobs overflows a 64-bit total")

    @property
    def signer(self) -> str:
        return self.requester

    def to_body(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "job_id": self.job_id,
            "requester": self.requester,
            "model_cid": self.model_cid,
            "inputs": [t.to_body() for t in self.inputs],
            "input_bytes": self.input_bytes,
            "max_price": self.max_price,
            "deadline": self.deadline,
            "bid_window": self.bid_window,
            "spot_check": self.spot_check,
            "nonce": self.nonce,
            "round": self.round,
            "lease": _lease_body(self.lease),
        }

    @classmethod
    def from_body(cls, body: Any) -> Self:
        b = check_body(body, kind="JobRequest", version=cls.VERSION, fields=cls._FIELDS)
        if type(b["inputs"]) is not list or len(b["inputs"]) > MAX_INPUTS:
            raise DecodeError(f"JobRequest.inputs must be a list of at most {MAX_INPUTS}")
        return cls(
            job_id=b["job_id"],
            requester=b["requester"],
            model_cid=b["model_cid"],
            inputs=tuple(TensorMeta.from_body(t) for t in b["inputs"]),
            input_bytes=b["input_bytes"],
            max_price=b["max_price"],
            deadline=b["deadline"],
            bid_window=b["bid_window"],
            spot_check=b["spot_check"],
            nonce=b["nonce"],
            round=b["round"],
            lease=LeaseTerms.from_body(b["lease"]),
        )

    def check_time(self, now: float) -> None:
        _check_expires("JobRequest", "deadline", self.deadline, now)

    @classmethod
    def from_bytes(cls, data: bytes, now: float | None = None) -> Signed[JobRequest]:
        return open_message(JobRequest, data, now=now)


@dataclass(frozen=True)
class Bid(FlatBody):
    """Executor-signed: run ``job_id`` for ``price`` in ``eta_ms``; valid to ``expires_at``."""

    DOMAIN: ClassVar[str] = BID_DOMAIN
    MAX_BYTES: ClassVar[int] = 1024
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"job_id", "executor", "price", "eta_ms", "expires_at"}
    )

    job_id: bytes
    executor: str
    price: int
    eta_ms: int
    expires_at: float

    def __post_init__(self) -> None:
        want_job_id("Bid", self.job_id)
        want_peer_id("Bid", "executor", self.executor)
        want_int("Bid", "price", self.price)
        want_int("Bid", "eta_ms", self.eta_ms, hi=MAX_ETA_MS)
        object.__setattr__(self, "expires_at", want_float("Bid", "expires_at", self.expires_at))

    @property
    def signer(self) -> str:
        return self.executor

    def check_time(self, now: float) -> None:
        if now > self.expires_at:
            raise ValidationError(f"Bid expired {now - self.expires_at:.3f} s ago")
        if self.expires_at > now + MAX_BID_VALIDITY_S:
            raise ValidationError(
                f"Bid is valid for {self.expires_at - now:.0f} s, at most "
                f"{MAX_BID_VALIDITY_S:.0f} s is allowed"
            )

    @classmethod
    def from_bytes(cls, data: bytes, now: float | None = None) -> Signed[Bid]:
        return open_message(Bid, data, now=now)


@dataclass(frozen=True)
class Award:
    """Requester-signed: ``executor`` runs ``job_id`` at ``price`` (per job) before ``deadline``.

    With ``lease`` it covers up to ``lease.max_jobs`` jobs sent before
    ``lease.until``, committed together as one batch receipt.
    """

    DOMAIN: ClassVar[str] = AWARD_DOMAIN
    MAX_BYTES: ClassVar[int] = 1024
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"job_id", "requester", "executor", "model_cid", "price", "deadline", "lease"}
    )

    job_id: bytes
    requester: str
    executor: str
    model_cid: str
    price: int
    deadline: float
    lease: LeaseTerms | None = None

    def __post_init__(self) -> None:
        want_job_id("Award", self.job_id)
        want_peer_id("Award", "requester", self.requester)
        want_peer_id("Award", "executor", self.executor)
        if self.requester == self.executor:
            raise ValidationError("Award: requester and executor are the same peer")
        want_cid("Award", "model_cid", self.model_cid)
        want_int("Award", "price", self.price)
        object.__setattr__(self, "deadline", want_float("Award", "deadline", self.deadline))
        if self.lease is not None and not isinstance(self.lease, LeaseTerms):
            raise ValidationError("Award.lease must be LeaseTerms or None")
        if self.lease is not None and self.lease.until > self.deadline:
            raise ValidationError("Award.lease.until is after the award deadline")
        # A batch commitment's total (price x count) must fit a 64-bit int.
        if self.price * self.max_jobs > MAX_INT:
            raise ValidationError("Award: price x lease.max_jobs overflows a 64-bit total")

    @property
    def signer(self) -> str:
        return self.requester

    @property
    def max_jobs(self) -> int:
        return 1 if self.lease is None else self.lease.max_jobs

    def to_body(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "job_id": self.job_id,
            "requester": self.requester,
            "executor": self.executor,
            "model_cid": self.model_cid,
            "price": self.price,
            "deadline": self.deadline,
            "lease": _lease_body(self.lease),
        }

    @classmethod
    def from_body(cls, body: Any) -> Self:
        b = check_body(body, kind="Award", version=cls.VERSION, fields=cls._FIELDS)
        return cls(
            job_id=b["job_id"],
            requester=b["requester"],
            executor=b["executor"],
            model_cid=b["model_cid"],
            price=b["price"],
            deadline=b["deadline"],
            lease=LeaseTerms.from_body(b["lease"]),
        )

    def check_time(self, now: float) -> None:
        _check_expires("Award", "deadline", self.deadline, now)

    @classmethod
    def from_bytes(cls, data: bytes, now: float | None = None) -> Signed[Award]:
        return open_message(Award, data, now=now)


class JobErrorCode(enum.StrEnum):
    """Why an executor refused or failed a job (``JobError.code`` on the wire)."""

    BUSY = "busy"  # no capacity now; try another executor
    UNKNOWN_MODEL = "unknown-model"  # model not served here
    BAD_AWARD = "bad-award"  # award does not match this executor's bid, or is expired
    BAD_INPUT = "bad-input"  # inputs malformed, oversize, or not what the model declares
    DEADLINE = "deadline"  # cannot finish before the deadline
    DUPLICATE = "duplicate"  # this job (or lease seq) was already run
    INTERNAL = "internal"  # the model failed to run


ERROR_CODES = frozenset(c.value for c in JobErrorCode)


@dataclass(frozen=True)
class JobError(FlatBody):
    """Executor-signed refusal or failure. ``seq`` is the lease job it is about (0 otherwise)."""

    DOMAIN: ClassVar[str] = JOB_ERROR_DOMAIN
    MAX_BYTES: ClassVar[int] = 2048
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset({"job_id", "executor", "seq", "code", "message"})

    job_id: bytes
    executor: str
    code: str
    message: str
    seq: int = 0

    def __post_init__(self) -> None:
        want_job_id("JobError", self.job_id)
        want_peer_id("JobError", "executor", self.executor)
        if self.code not in ERROR_CODES:
            raise ValidationError(f"JobError.code must be one of {sorted(ERROR_CODES)}")
        want_str("JobError", "message", self.message, lo=0, hi=1024)
        want_int("JobError", "seq", self.seq, hi=MAX_BATCH)

    @property
    def signer(self) -> str:
        return self.executor

    def check_time(self, now: float) -> None:
        """Errors do not expire."""

    @classmethod
    def from_bytes(cls, data: bytes, now: float | None = None) -> Signed[JobError]:
        return open_message(JobError, data, now=now)


# --- unsigned job-stream frames ------------------------------------------------


@dataclass(frozen=True)
class JobInput:
    """One job's inputs (tensor wire map, see ``protocols.tensor``); ``seq`` numbers lease jobs."""

    job_id: bytes
    seq: int
    inputs: Any

    def __post_init__(self) -> None:
        want_job_id("JobInput", self.job_id)
        want_int("JobInput", "seq", self.seq, hi=MAX_BATCH - 1)
        if not isinstance(self.inputs, dict):
            raise ValidationError("JobInput.inputs must be a map of tensors")


@dataclass(frozen=True)
class JobResult:
    """One job's outputs (tensor wire map) and how long it ran. Bound later by the commitment."""

    job_id: bytes
    seq: int
    outputs: Any
    compute_ms: int

    def __post_init__(self) -> None:
        want_job_id("JobResult", self.job_id)
        want_int("JobResult", "seq", self.seq, hi=MAX_BATCH - 1)
        want_int("JobResult", "compute_ms", self.compute_ms, hi=MAX_INT)
        if not isinstance(self.outputs, dict):
            raise ValidationError("JobResult.outputs must be a map of tensors")


@dataclass(frozen=True)
class JobForwarded:
    """Job ``seq``'s outputs went straight to the next pipeline stage's executor ``to``
    (``protocols.pipeline``): the requester gets only their ``content_digest``, bound later
    by the commitment like a ``JobResult``'s outputs."""

    job_id: bytes
    seq: int
    output_digest: bytes
    to: str
    compute_ms: int

    def __post_init__(self) -> None:
        want_job_id("JobForwarded", self.job_id)
        want_int("JobForwarded", "seq", self.seq, hi=MAX_BATCH - 1)
        want_bytes("JobForwarded", "output_digest", self.output_digest, lo=32, hi=32)
        want_peer_id("JobForwarded", "to", self.to)
        want_int("JobForwarded", "compute_ms", self.compute_ms, hi=MAX_INT)


@dataclass(frozen=True)
class BatchClose:
    """Requester ends a lease: commit the ``count`` jobs sent so far."""

    job_id: bytes
    count: int

    def __post_init__(self) -> None:
        want_job_id("BatchClose", self.job_id)
        want_int("BatchClose", "count", self.count, lo=1, hi=MAX_BATCH)


JobFrame = (
    Signed[Award]
    | Signed[JobError]
    | Signed[ResultCommitment]
    | Signed[Acceptance]
    | JobInput
    | JobResult
    | JobForwarded
    | BatchClose
)

_SIGNED_TAGS: dict[
    str, type[Award] | type[JobError] | type[ResultCommitment] | type[Acceptance]
] = {
    "award": Award,
    "error": JobError,
    "commit": ResultCommitment,
    "accept": Acceptance,
}


def encode_frame(frame: JobFrame) -> bytes:
    """Canonical bytes of one job-stream frame (the caller adds the length prefix)."""
    if isinstance(frame, Signed):
        tag = {v.DOMAIN: k for k, v in _SIGNED_TAGS.items()}[frame.envelope.domain]
        return encode({"t": tag, "m": frame.to_bytes()})
    if isinstance(frame, JobInput):
        return encode({"t": "input", "job_id": frame.job_id, "seq": frame.seq, "x": frame.inputs})
    if isinstance(frame, JobResult):
        return encode(
            {
                "t": "result",
                "job_id": frame.job_id,
                "seq": frame.seq,
                "y": frame.outputs,
                "ms": frame.compute_ms,
            }
        )
    if isinstance(frame, JobForwarded):
        return encode(
            {
                "t": "fwd",
                "job_id": frame.job_id,
                "seq": frame.seq,
                "d": frame.output_digest,
                "to": frame.to,
                "ms": frame.compute_ms,
            }
        )
    return encode({"t": "close", "job_id": frame.job_id, "count": frame.count})


def decode_frame(data: bytes, *, max_size: int = MAX_PAYLOAD_FRAME) -> JobFrame:
    """Parse one job-stream frame from untrusted bytes (signatures of signed frames checked).

    The outer frame map is not signed or hashed as bytes, so its canonical form
    is not checked (that re-encode dominated large tensor frames): signed frames
    carry their envelope as bytes in ``m``, decoded strictly by ``open_message``;
    inputs and outputs are bound by ``content_digest`` (canonical re-encoding of
    the decoded value), so a non-canonical encoding changes no digest.
    """
    raw = decode(data, max_size=max_size, canonical=False)
    if not isinstance(raw, dict) or type(raw.get("t")) is not str:
        raise DecodeError("a job frame must be a CBOR map with a text tag 't'")
    tag = raw["t"]
    if tag in _SIGNED_TAGS:
        if set(raw) != {"t", "m"} or type(raw["m"]) is not bytes:
            raise DecodeError(f"a {tag} frame must be {{t, m: bytes}}")
        cls = _SIGNED_TAGS[tag]
        if cls is Award:
            return open_message(Award, raw["m"])
        if cls is JobError:
            return open_message(JobError, raw["m"])
        if cls is ResultCommitment:
            return open_message(ResultCommitment, raw["m"])
        return open_message(Acceptance, raw["m"])
    fields = set(raw)
    if tag == "input" and fields == {"t", "job_id", "seq", "x"}:
        return JobInput(job_id=raw["job_id"], seq=raw["seq"], inputs=raw["x"])
    if tag == "result" and fields == {"t", "job_id", "seq", "y", "ms"}:
        return JobResult(
            job_id=raw["job_id"], seq=raw["seq"], outputs=raw["y"], compute_ms=raw["ms"]
        )
    if tag == "fwd" and fields == {"t", "job_id", "seq", "d", "to", "ms"}:
        return JobForwarded(
            job_id=raw["job_id"],
            seq=raw["seq"],
            output_digest=raw["d"],
            to=raw["to"],
            compute_ms=raw["ms"],
        )
    if tag == "close" and fields == {"t", "job_id", "count"}:
        return BatchClose(job_id=raw["job_id"], count=raw["count"])
    raise DecodeError(f"unknown job frame {str(tag)[:40]!r} with fields {sorted(map(str, raw))}")
