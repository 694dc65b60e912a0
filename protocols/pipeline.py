"""Pipelines: one model cut into stage models that run one after another.

Pure rules, no I/O:

- ``PipelineManifest``: the stages (each an ordinary model, by cid) in order,
  the tensors that cross each cut (name, dtype, shape) and the full model's
  cid. Its canonical JSON bytes (sorted keys, no spaces, ASCII) hash to the
  pipeline's cid (sha256 hex), so a manifest names exactly one computation.
  Stage i's outputs are exactly the tensors of cut i, which are exactly stage
  i+1's inputs: what one stage sends is what the next one takes, byte for byte.
- ``check_chain``: the stages' result commitments prove the whole
  computation only if they chain: stage 1 committed to the requester's input
  digest, every later stage to the previous stage's output digest, each names
  its stage's model, and the last output digest is that of the outputs
  returned. A broken link means some stage ran on other inputs than the
  previous stage produced.
- Streaming (``/edgeswarm/stage/1``): the intermediate tensor goes from stage
  i's executor straight to stage i+1's. The requester still awards and pays
  every stage, and tells each stage executor its neighbours in a signed
  ``StageRoute``: who may forward it inputs (the executor the requester
  awarded the previous stage) and where its outputs go. ``check_route`` is
  what an executor checks before taking a route, ``check_forward`` before it
  reads a forwarded payload: the sender (the transport-authenticated remote
  peer) must be the upstream executor the route names, for the job it names.
  The chain proof is unchanged: each stage commits to the digest of the
  inputs it received, which ``check_chain`` requires to be the previous
  stage's output digest.
- Attribution: every forward carries the sender's signed ``StageOutput`` (job,
  seq, output digest, where it goes). ``check_forward`` requires it to name
  exactly the forward it rides on, ``check_payload`` that the payload read
  has that digest; the receiver keeps it, so a bad intermediate is provably
  its signer's (the next stage and a referee can hold it against the signer),
  not the receiver's or a relay's.
- Referees: ``StageDispute`` holds a forwarded intermediate against its producer (its
  signed ``StageOutput`` and its signed commitment for the same job);
  ``check_stage_dispute`` says whether the evidence holds together (so that a re-run of
  that stage on the committed input judges the signed output), ``stage_fraud`` turns a
  panel majority of "mismatch" verdicts on that commitment into a ``FraudProof`` against
  the producer, never against the stage that ran on it.
- Failover mid-lease: a route's ``seq_shift`` maps the sender's job seqs onto
  its downstream's (``forward_seq``): when one stage's executor dies and the
  next bidder takes over from job n, its seq 0 is job n, so its upstream
  forwards its seq s as s - n and nothing below n (those jobs the dead one
  answered); a later route with the new shift re-forwards what it holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from protocols.codec import decode, encode
from protocols.committee import RefereePanel
from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.market_fields import (
    FlatBody,
    want_bytes,
    want_digest,
    want_float,
    want_int,
    want_job_id,
    want_peer_id,
    want_str,
)
from protocols.proofs import FraudProof, RefereeResult
from protocols.receipt import MAX_BATCH, ResultCommitment, batch_digest
from protocols.signed import Signed, open_message
from protocols.tensor import DTYPES as TENSOR_DTYPES

FORMAT = "edgeswarm-pipeline/1"
MAX_STAGES = 16
MAX_TENSORS = 1024  # per cut, and per model signature
MAX_NAME_CHARS = 256
MAX_RANK = 16
MAX_DIM = 2**40
MAX_MANIFEST_BYTES = 1024 * 1024
DTYPES = frozenset(TENSOR_DTYPES)  # what protocols.tensor carries on the wire
_CID_RE = re.compile(r"[0-9a-f]{64}")

Dim = int | str | None


class ChainError(ValidationError):
    """Stage commitments that do not chain into one computation."""


def _fail(msg: str) -> ValidationError:
    return ValidationError(f"pipeline manifest: {msg}")


def _cid(value: Any, what: str) -> str:
    if type(value) is not str or not _CID_RE.fullmatch(value):
        raise _fail(f"{what} must be a sha256 cid (64 lowercase hex digits), got {value!r:.80}")
    return value


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise _fail(f"{what} must be a tensor name of 1..{MAX_NAME_CHARS} characters")
    return value


def _names(value: Any, what: str) -> tuple[str, ...]:
    if type(value) not in (list, tuple) or not 1 <= len(value) <= MAX_TENSORS:
        raise _fail(f"{what} must be a list of 1..{MAX_TENSORS} tensor names")
    names = tuple(_name(v, what) for v in value)
    if len(set(names)) != len(names):
        raise _fail(f"{what} names a tensor twice")
    return names


@dataclass(frozen=True)
class CrossingTensor:
    """A tensor that crosses a cut (or a model input/output): name, dtype, shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def __post_init__(self) -> None:
        _name(self.name, "tensor name")
        if self.dtype not in DTYPES:
            raise _fail(f"tensor {self.name!r:.80} has unsupported dtype {self.dtype!r:.40}")
        if self.shape is not None:
            if type(self.shape) is not tuple or len(self.shape) > MAX_RANK:
                raise _fail(f"tensor {self.name!r:.80} shape must have rank <= {MAX_RANK}")
            for d in self.shape:
                ok = (
                    d is None
                    or (type(d) is int and 0 <= d <= MAX_DIM)
                    or (type(d) is str and 1 <= len(d) <= 64)
                )
                if not ok:
                    raise _fail(f"tensor {self.name!r:.80} has a bad dim {d!r:.40}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    @classmethod
    def from_dict(cls, d: Any) -> CrossingTensor:
        if type(d) is not dict or set(d) != {"name", "dtype", "shape"}:
            raise _fail("a tensor must be {name, dtype, shape}")
        shape = d["shape"]
        if shape is not None and type(shape) is not list:
            raise _fail("a tensor shape must be a list or null")
        return cls(name=d["name"], dtype=d["dtype"], shape=None if shape is None else tuple(shape))


def _tensors(value: Any, what: str) -> tuple[CrossingTensor, ...]:
    if type(value) is not list or not 1 <= len(value) <= MAX_TENSORS:
        raise _fail(f"{what} must be a list of 1..{MAX_TENSORS} tensors")
    out = tuple(CrossingTensor.from_dict(v) for v in value)
    if len({t.name for t in out}) != len(out):
        raise _fail(f"{what} names a tensor twice")
    return out


@dataclass(frozen=True)
class Stage:
    cid: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        _cid(self.cid, "stage cid")
        _names(self.inputs, "stage inputs")
        _names(self.outputs, "stage outputs")

    def to_dict(self) -> dict[str, Any]:
        return {"cid": self.cid, "inputs": list(self.inputs), "outputs": list(self.outputs)}

    @classmethod
    def from_dict(cls, d: Any) -> Stage:
        if type(d) is not dict or set(d) != {"cid", "inputs", "outputs"}:
            raise _fail("a stage must be {cid, inputs, outputs}")
        return cls(
            cid=d["cid"],
            inputs=_names(d["inputs"], "stage inputs"),
            outputs=_names(d["outputs"], "stage outputs"),
        )


@dataclass(frozen=True)
class Cut:
    """The tensors crossing one cut, and their bytes per job (free dims as the splitter counts)."""

    tensors: tuple[CrossingTensor, ...]
    bytes: int

    def __post_init__(self) -> None:
        if type(self.bytes) is not int or not 0 <= self.bytes <= 2**62:
            raise _fail(f"cut bytes must be a non-negative integer, got {self.bytes!r:.40}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": [t.to_dict() for t in self.tensors], "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: Any) -> Cut:
        if type(d) is not dict or set(d) != {"tensors", "bytes"}:
            raise _fail("a cut must be {tensors, bytes}")
        return cls(tensors=_tensors(d["tensors"], "cut tensors"), bytes=d["bytes"])


@dataclass(frozen=True)
class PipelineManifest:
    model: str
    inputs: tuple[CrossingTensor, ...]
    outputs: tuple[CrossingTensor, ...]
    stages: tuple[Stage, ...]
    cuts: tuple[Cut, ...]

    def __post_init__(self) -> None:
        _cid(self.model, "model")
        if not 2 <= len(self.stages) <= MAX_STAGES:
            raise _fail(f"a pipeline has 2..{MAX_STAGES} stages, got {len(self.stages)}")
        if len(self.cuts) != len(self.stages) - 1:
            raise _fail(f"{len(self.stages)} stages need {len(self.stages) - 1} cuts")
        if not self.inputs or not self.outputs:
            raise _fail("the model's inputs and outputs must be listed")
        # Each boundary is one exact set of names: what a stage emits, the next one takes.
        boundaries = [tuple(t.name for t in self.inputs), *(c.names for c in self.cuts)]
        boundaries.append(tuple(t.name for t in self.outputs))
        for i, stage in enumerate(self.stages):
            if set(stage.inputs) != set(boundaries[i]):
                raise _fail(
                    f"stage {i + 1} takes {sorted(stage.inputs)}, "
                    f"but {'the model gets' if i == 0 else f'cut {i} carries'} "
                    f"{sorted(boundaries[i])}"
                )
            if set(stage.outputs) != set(boundaries[i + 1]):
                last = i == len(self.stages) - 1
                raise _fail(
                    f"stage {i + 1} gives {sorted(stage.outputs)}, "
                    f"but {'the model gives' if last else f'cut {i + 1} carries'} "
                    f"{sorted(boundaries[i + 1])}"
                )

    @property
    def crossing_bytes(self) -> list[int]:
        return [c.bytes for c in self.cuts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "stages": [s.to_dict() for s in self.stages],
            "cuts": [c.to_dict() for c in self.cuts],
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII. Its sha256 is the cid."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()

    @property
    def cid(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_dict(cls, d: Any) -> PipelineManifest:
        keys = {"format", "model", "inputs", "outputs", "stages", "cuts"}
        if type(d) is not dict:
            raise _fail("must be a JSON object")
        if d.get("format") != FORMAT:
            raise _fail(f"format must be {FORMAT!r}, got {d.get('format')!r:.40}")
        if set(d) != keys:
            raise _fail(f"expected exactly the fields {sorted(keys)}")
        stages, cuts = d["stages"], d["cuts"]
        if type(stages) is not list or type(cuts) is not list or len(stages) > MAX_STAGES:
            raise _fail(f"stages and cuts must be lists (at most {MAX_STAGES} stages)")
        return cls(
            model=d["model"],
            inputs=_tensors(d["inputs"], "inputs"),
            outputs=_tensors(d["outputs"], "outputs"),
            stages=tuple(Stage.from_dict(s) for s in stages),
            cuts=tuple(Cut.from_dict(c) for c in cuts),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PipelineManifest:
        """Parse JSON (any formatting); the cid is that of the canonical form."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise DecodeError(f"pipeline manifest is {len(data)} bytes, over {MAX_MANIFEST_BYTES}")
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"pipeline manifest is not JSON: {exc}") from None
        return cls.from_dict(value)


@dataclass(frozen=True)
class LocalRun:
    """A stage the requester ran on its own executor (self-award): no commitment exists,
    and the requester trusts its own run; the chain continues from its output digest."""

    output_digest: bytes


def check_chain(
    manifest: PipelineManifest,
    input_digest: bytes,
    commitments: Sequence[ResultCommitment | LocalRun],
    output_digest: bytes | None = None,
    *,
    jobs: int = 1,
) -> None:
    """Raise ``ChainError`` unless the stage commitments prove one run of the pipeline.

    ``input_digest``: the digest of the inputs the requester gave stage 1;
    ``output_digest``: of the outputs the last stage returned (None: not checked).
    ``jobs``: how many jobs each commitment covers (a lease over the pipeline: every stage
    ran the same ``jobs`` micro-batches, in the same order, so its batch input digest is
    the previous stage's batch output digest; ``input_digest`` is then the batch digest).
    """
    if len(commitments) != len(manifest.stages):
        raise ChainError(
            f"{len(manifest.stages)} stages but {len(commitments)} commitments: the chain is "
            "incomplete"
        )
    want_in = input_digest
    requester = next((c.requester for c in commitments if isinstance(c, ResultCommitment)), "")
    for i, (stage, c) in enumerate(zip(manifest.stages, commitments, strict=True)):
        if isinstance(c, LocalRun):
            want_in = c.output_digest
            continue
        if c.model_cid != stage.cid:
            raise ChainError(f"stage {i + 1}'s commitment names another model ({c.model_cid[:12]})")
        if c.requester != requester:
            raise ChainError(f"stage {i + 1}'s commitment is for another requester")
        if c.count != jobs:
            raise ChainError(f"stage {i + 1}'s commitment covers {c.count} jobs, not {jobs}")
        if c.input_digest != want_in:
            source = "the requester's inputs" if i == 0 else f"stage {i}'s outputs"
            raise ChainError(f"stage {i + 1} committed to other inputs than {source}")
        want_in = c.output_digest
    if output_digest is not None and want_in != output_digest:
        raise ChainError("the last stage committed to other outputs than those returned")


@dataclass(frozen=True)
class Segment:
    """The jobs of a pipeline lease one executor ran at one stage, under one commitment:
    jobs ``first`` .. ``first + commitment.count - 1`` of the lease. A stage whose executor
    died mid-lease has a segment per executor that was paid (the dead one's last accepted
    interim commitment, if any; its replacement's final one)."""

    first: int
    commitment: ResultCommitment

    def __post_init__(self) -> None:
        if type(self.first) is not int or not 0 <= self.first < MAX_BATCH:
            raise ValidationError(f"a segment's first job must be in [0, {MAX_BATCH})")

    @property
    def end(self) -> int:
        return self.first + self.commitment.count


def check_lease_chain(
    manifest: PipelineManifest,
    cut_digests: Sequence[Sequence[bytes]],
    segments: Sequence[Sequence[Segment]],
) -> None:
    """Raise ``ChainError`` unless the stage commitments of a pipeline lease whose stages may
    have failed over mid-lease prove its jobs, and no job is paid twice at any stage.

    ``cut_digests[0]``: per job, the digest of the inputs given to stage 1;
    ``cut_digests[i]``: per job, of stage i's outputs (what stage i+1 took); the last: of the
    outputs returned. ``segments[i]``: stage i+1's segments. Each commitment names its
    stage's model and the lease's requester; a stage's segments never overlap (a job is
    paid once per stage) and the last one ends at the last job (the executor holding the
    stage at the end answered every job after its takeover); each commitment's input digest
    is the batch digest of the cut before it over its jobs, its output digest that of the
    cut after it. Jobs in no segment were answered by an executor that died unpaid.
    """
    n_stages = len(manifest.stages)
    if len(cut_digests) != n_stages + 1 or len(segments) != n_stages:
        raise ChainError(f"{n_stages} stages need {n_stages + 1} cuts and {n_stages} segment lists")
    jobs = len(cut_digests[0])
    if jobs == 0 or any(len(c) != jobs for c in cut_digests):
        raise ChainError("every cut needs one digest per job of the lease")
    requester = next((seg.commitment.requester for segs in segments for seg in segs), "")
    for i, (stage, segs) in enumerate(zip(manifest.stages, segments, strict=True)):
        if not segs:
            raise ChainError(f"stage {i + 1} has no commitment")
        end = 0
        for seg in sorted(segs, key=lambda g: g.first):
            c = seg.commitment
            if c.model_cid != stage.cid:
                raise ChainError(f"stage {i + 1}'s commitment names another model")
            if c.requester != requester:
                raise ChainError(f"stage {i + 1}'s commitment is for another requester")
            if seg.first < end:
                raise ChainError(f"stage {i + 1}: job {seg.first} is paid twice")
            if seg.end > jobs:
                raise ChainError(f"stage {i + 1}'s commitment covers jobs past the lease's {jobs}")
            if c.input_digest != batch_digest(cut_digests[i][seg.first : seg.end]):
                source = "the requester's inputs" if i == 0 else f"stage {i}'s outputs"
                raise ChainError(
                    f"stage {i + 1} committed to other inputs than {source} "
                    f"(jobs {seg.first}..{seg.end - 1})"
                )
            if c.output_digest != batch_digest(cut_digests[i + 1][seg.first : seg.end]):
                raise ChainError(
                    f"stage {i + 1} committed to other outputs than it gave "
                    f"(jobs {seg.first}..{seg.end - 1})"
                )
            end = seg.end
        if end != jobs:
            raise ChainError(f"stage {i + 1}'s last commitment ends at job {end}, not {jobs}")


@dataclass(frozen=True)
class Placement:
    """Whether to run a pipeline split, and why (estimates in ms per job)."""

    split: bool
    why: str
    split_ms: float | None = None
    unsplit_ms: float | None = None


def choose_placement(
    full_p50_ms: float | None,
    stage_p50_ms: Sequence[float | None],
    crossing_bytes: Sequence[int],
    *,
    bytes_per_ms: float,
    hop_ms: float,
    late: Sequence[int] = (),
) -> Placement:
    """Run split only where it beats the best single node that holds the whole model.

    ``full_p50_ms``: the best p50 among peers serving the whole model (None: nobody does);
    ``stage_p50_ms``: the best p50 per stage (None: nobody serves that stage);
    ``crossing_bytes``: per cut; ``bytes_per_ms``: link speed; ``hop_ms``: what each job
    through the market costs beyond compute (auction, award, round trip). The split costs
    one hop per stage plus the bytes of every cut; the whole model one hop.
    ``late``: what the lookups did not answer in time (0: the whole model, i: stage i);
    their p50 is unknown, which is not the same as nobody serving them, and the reason
    says which it was.
    """
    if bytes_per_ms <= 0 or hop_ms < 0:
        raise ValidationError("placement needs bytes_per_ms > 0 and hop_ms >= 0")
    late_stages = sorted(i for i in set(late) if 1 <= i <= len(stage_p50_ms))
    missing = [i + 1 for i, p in enumerate(stage_p50_ms) if p is None and i + 1 not in late_stages]
    whole_late = 0 in late
    unsplit = None if full_p50_ms is None else full_p50_ms + hop_ms
    if missing or late_stages:
        why = "; ".join(
            [f"no peer serves stage(s) {missing}"] * bool(missing)
            + [f"no answer in time about stage(s) {late_stages}"] * bool(late_stages)
        )
        if unsplit is not None:
            return Placement(False, f"whole model: {why}", None, unsplit)
        if whole_late:
            return Placement(True, f"no answer in time about the whole model; {why}", None, None)
        return Placement(True, "nobody serves the whole model", None, None)
    split = sum(p for p in stage_p50_ms if p is not None) + hop_ms * len(stage_p50_ms)
    split += sum(crossing_bytes) / bytes_per_ms
    if unsplit is None:
        if whole_late:
            return Placement(True, "no answer in time about the whole model", split, None)
        return Placement(True, "no single peer serves the whole model", split, None)
    if split < unsplit:
        return Placement(True, f"split {split:.1f} ms < whole {unsplit:.1f} ms", split, unsplit)
    return Placement(False, f"whole {unsplit:.1f} ms <= split {split:.1f} ms", split, unsplit)


# --- streaming: stage executor to stage executor ---------------------------------------

STAGE_PROTOCOL_ID = "/edgeswarm/stage/1"
STAGE_ROUTE_DOMAIN = "edgeswarm/stage-route/v1"
STAGE_OUTPUT_DOMAIN = "edgeswarm/stage-output/v1"
STAGE_CONTROL_MAX = 4096  # every stage-stream frame but a forwarded payload


class ForwardRefused(ValidationError):
    """A route or forwarded input a stage executor must not take."""


@dataclass(frozen=True)
class StageRoute(FlatBody):
    """Requester-signed: the executor ``executor`` of stage job ``job_id`` takes its inputs
    from ``upstream`` (the executor awarded job ``upstream_job``) and sends its outputs to
    ``downstream`` (awarded ``downstream_job``). "" and b"": that side is the requester
    (stage 1 gets its inputs, the last stage gives its outputs, on the job stream).
    Valid until ``expires``. A later route for the same job replaces an earlier one (the
    requester re-routes around an executor that died). ``seq_shift`` (0 unless a stage
    failed over mid-lease): this executor's job seq s is the downstream's seq
    s - seq_shift, and seqs below seq_shift are not forwarded (``forward_seq``)."""

    DOMAIN: ClassVar[str] = STAGE_ROUTE_DOMAIN
    MAX_BYTES: ClassVar[int] = 1024
    VERSION: ClassVar[int] = 2
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "job_id",
            "requester",
            "executor",
            "upstream",
            "upstream_job",
            "downstream",
            "downstream_job",
            "expires",
            "seq_shift",
        }
    )

    job_id: bytes
    requester: str
    executor: str
    upstream: str
    upstream_job: bytes
    downstream: str
    downstream_job: bytes
    expires: float
    seq_shift: int = 0

    def __post_init__(self) -> None:
        want_job_id("StageRoute", self.job_id)
        want_int("StageRoute", "seq_shift", self.seq_shift, lo=1 - MAX_BATCH, hi=MAX_BATCH - 1)
        if self.seq_shift and not self.downstream:
            raise ValidationError("StageRoute: a seq_shift without a downstream")
        want_peer_id("StageRoute", "requester", self.requester)
        want_peer_id("StageRoute", "executor", self.executor)
        object.__setattr__(self, "expires", want_float("StageRoute", "expires", self.expires))
        for side in ("upstream", "downstream"):
            peer, job = getattr(self, side), getattr(self, f"{side}_job")
            if peer == "":
                want_bytes("StageRoute", f"{side}_job", job, lo=0, hi=0)
                continue
            want_peer_id("StageRoute", side, peer)
            want_job_id("StageRoute", job)
            if peer == self.executor or job == self.job_id:
                raise ValidationError(f"StageRoute: the {side} stage is this stage")
        if not self.upstream and not self.downstream:
            raise ValidationError("StageRoute: a route names an upstream or a downstream stage")

    @property
    def signer(self) -> str:
        return self.requester

    def check_time(self, now: float) -> None:
        if now > self.expires:
            raise ValidationError(f"StageRoute expired {now - self.expires:.3f} s ago")

    @classmethod
    def from_bytes(cls, data: bytes, now: float | None = None) -> Signed[StageRoute]:
        return open_message(StageRoute, data, now=now)


def forward_seq(route: StageRoute, seq: int) -> int | None:
    """The downstream's seq for this executor's job ``seq`` under ``route``, or None: the
    route has no downstream, or the downstream took over after that job (its seq would be
    negative: a job the executor it replaced answered already)."""
    if not route.downstream:
        return None
    to_seq = seq - route.seq_shift
    return to_seq if 0 <= to_seq < MAX_BATCH else None


@dataclass(frozen=True)
class StageOutput(FlatBody):
    """Executor-signed, one per forwarded payload: job ``seq`` of stage job ``job_id``, run
    by ``executor`` for ``requester``, gave outputs of digest ``output_digest``, sent on as
    job ``to_seq`` of ``to_job``. The receiver keeps it: whoever holds a bad intermediate
    can show who produced it (the signer cannot deny it, the receiver cannot forge it)."""

    DOMAIN: ClassVar[str] = STAGE_OUTPUT_DOMAIN
    MAX_BYTES: ClassVar[int] = 1024
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"job_id", "seq", "requester", "executor", "output_digest", "to_job", "to_seq"}
    )

    job_id: bytes
    seq: int
    requester: str
    executor: str
    output_digest: bytes
    to_job: bytes
    to_seq: int

    def __post_init__(self) -> None:
        want_job_id("StageOutput", self.job_id)
        want_job_id("StageOutput", self.to_job)
        want_int("StageOutput", "seq", self.seq, hi=MAX_BATCH - 1)
        want_int("StageOutput", "to_seq", self.to_seq, hi=MAX_BATCH - 1)
        want_peer_id("StageOutput", "requester", self.requester)
        want_peer_id("StageOutput", "executor", self.executor)
        want_digest("StageOutput", "output_digest", self.output_digest)
        if self.job_id == self.to_job:
            raise ValidationError("StageOutput: a stage forwards to another stage's job")

    @property
    def signer(self) -> str:
        return self.executor

    def check_time(self, now: float) -> None:
        """No expiry: it is evidence, held as long as the job's receipts."""

    @classmethod
    def from_bytes(cls, data: bytes) -> Signed[StageOutput]:
        return open_message(StageOutput, data)


@dataclass(frozen=True)
class StageForward:
    """Header of one forwarded payload: the sender's signed ``output`` (its job and seq, the
    payload's digest) for job ``seq`` of ``to_job``; ``size`` bytes of payload frame follow
    (checked before read)."""

    to_job: bytes
    from_job: bytes
    seq: int
    size: int
    output: Signed[StageOutput]

    def __post_init__(self) -> None:
        want_job_id("StageForward", self.to_job)
        want_job_id("StageForward", self.from_job)
        want_int("StageForward", "seq", self.seq, hi=MAX_BATCH - 1)
        want_int("StageForward", "size", self.size, lo=1)
        if not isinstance(self.output, Signed) or not isinstance(self.output.message, StageOutput):
            raise ValidationError("StageForward.output must be a signed StageOutput")


@dataclass(frozen=True)
class StagePayload:
    """The tensors (wire map) a ``StageForward`` announced."""

    tensors: Any

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, dict):
            raise ValidationError("StagePayload.tensors must be a map of tensors")


@dataclass(frozen=True)
class StageFetch:
    """The requester asks a stage executor for the outputs of its job ``seq`` of stage job
    ``job_id`` that it forwarded on and still holds (a spot check needs the tensors): the
    answer is a ``StagePayload`` (checked against the digest the requester recorded) or a
    ``StageReply`` saying why not. Only the job's requester may ask."""

    job_id: bytes
    seq: int

    def __post_init__(self) -> None:
        want_job_id("StageFetch", self.job_id)
        want_int("StageFetch", "seq", self.seq, hi=MAX_BATCH - 1)


MAX_TAKEN = 64  # signed outputs a route's answer reports (a lease's window is at most 64)
STAGE_REPLY_MAX = STAGE_CONTROL_MAX + MAX_TAKEN * (StageOutput.MAX_BYTES + 256)


@dataclass(frozen=True)
class StageReply:
    """The answer to a route or a forward: taken, or why not. A route's answer also gives
    ``taken``: the signed outputs of the latest forwards (at most ``MAX_TAKEN``) this
    executor took for the route's job, from any upstream, before it took the route. From
    then on it takes forwards only from the route's upstream, so a requester re-routing
    around a dead upstream learns exactly which of its jobs that one delivered
    (``answered_downstream``)."""

    ok: bool
    why: str = ""
    taken: tuple[Signed[StageOutput], ...] = ()

    def __post_init__(self) -> None:
        if type(self.ok) is not bool:
            raise ValidationError("StageReply.ok must be a bool")
        if self.why:
            want_str("StageReply", "why", self.why, hi=512)
        if type(self.taken) is not tuple or len(self.taken) > MAX_TAKEN:
            raise ValidationError(f"StageReply.taken must be a tuple of at most {MAX_TAKEN}")
        for out in self.taken:
            if not isinstance(out, Signed) or not isinstance(out.message, StageOutput):
                raise ValidationError("StageReply.taken holds signed StageOutputs")


StageFrame = Signed[StageRoute] | StageForward | StagePayload | StageReply | StageFetch


def encode_stage_frame(item: StageFrame) -> bytes:
    """Canonical bytes of one stage-stream frame (the caller adds the length prefix)."""
    if isinstance(item, Signed):
        return encode({"t": "route", "m": item.to_bytes()})
    if isinstance(item, StageForward):
        return encode(
            {
                "t": "fwd",
                "to": item.to_job,
                "from": item.from_job,
                "seq": item.seq,
                "n": item.size,
                "o": item.output.to_bytes(),
            }
        )
    if isinstance(item, StagePayload):
        return encode({"t": "x", "x": item.tensors})
    if isinstance(item, StageFetch):
        return encode({"t": "get", "j": item.job_id, "s": item.seq})
    if item.taken:
        taken = [o.to_bytes() for o in item.taken]
        return encode({"t": "reply", "ok": item.ok, "why": item.why, "k": taken})
    return encode({"t": "reply", "ok": item.ok, "why": item.why})


def decode_stage_frame(data: bytes, *, max_size: int) -> StageFrame:
    """Parse one stage-stream frame from untrusted bytes (a route's signature is checked)."""
    raw = decode(data, max_size=max_size, canonical=False)
    if not isinstance(raw, dict) or type(raw.get("t")) is not str:
        raise DecodeError("a stage frame must be a CBOR map with a text tag 't'")
    tag, fields = raw["t"], set(raw)
    if tag == "route" and fields == {"t", "m"} and type(raw["m"]) is bytes:
        return open_message(StageRoute, raw["m"])
    if tag == "fwd" and fields == {"t", "to", "from", "seq", "n", "o"} and type(raw["o"]) is bytes:
        return StageForward(
            to_job=raw["to"],
            from_job=raw["from"],
            seq=raw["seq"],
            size=raw["n"],
            output=open_message(StageOutput, raw["o"]),
        )
    if tag == "get" and fields == {"t", "j", "s"}:
        return StageFetch(job_id=raw["j"], seq=raw["s"])
    if tag == "x" and fields == {"t", "x"}:
        return StagePayload(raw["x"])
    if tag == "reply" and fields == {"t", "ok", "why"}:
        return StageReply(ok=raw["ok"], why=raw["why"])
    if tag == "reply" and fields == {"t", "ok", "why", "k"} and type(raw["k"]) is list:
        if len(raw["k"]) > MAX_TAKEN or not all(type(o) is bytes for o in raw["k"]):
            raise DecodeError(f"a reply reports at most {MAX_TAKEN} signed outputs")
        taken = tuple(open_message(StageOutput, o) for o in raw["k"])
        return StageReply(ok=raw["ok"], why=raw["why"], taken=taken)
    raise DecodeError(f"unknown stage frame {str(tag)[:40]!r} with fields {sorted(map(str, raw))}")


def check_route(
    route: StageRoute, *, sender: str, award_requester: str, award_executor: str
) -> None:
    """An executor takes a route for one of its awards only from the requester that awarded
    it (``sender``: the stream's authenticated remote peer), naming this executor."""
    if sender != route.requester or route.requester != award_requester:
        raise ForwardRefused(
            f"a route for job {route.job_id.hex()[:12]} from {sender}, "
            f"not from its requester {award_requester}"
        )
    if route.executor != award_executor:
        raise ForwardRefused("the route names another executor than the award")


def check_forward(route: StageRoute | None, *, sender: str, header: StageForward) -> None:
    """A stage executor reads forwarded inputs only from the executor the requester named
    for the previous stage (``sender``: the stream's authenticated remote peer), for the
    previous stage's job; never for a stage that takes its inputs from the requester."""
    if route is None or route.job_id != header.to_job:
        raise ForwardRefused(f"no route for job {header.to_job.hex()[:12]}")
    if not route.upstream:
        raise ForwardRefused("this stage takes its inputs from the requester")
    if sender != route.upstream:
        raise ForwardRefused(
            f"inputs forwarded by {sender}, but the requester named {route.upstream} "
            "as the previous stage's executor"
        )
    if header.from_job != route.upstream_job:
        raise ForwardRefused("inputs forwarded from another job than the previous stage's")
    out = header.output.message
    try:
        header.output.verify()
    except ProtocolError as exc:
        raise ForwardRefused(f"the forward's signed output does not verify: {exc}") from None
    # The signed output must be the sender's own (verified: its signer is its executor),
    # about exactly this forward: else it would blame nobody, or someone else.
    if out.executor != sender:
        raise ForwardRefused("the forward's signed output is not its sender's")
    if out.requester != route.requester:
        raise ForwardRefused("the forward's signed output is for another requester")
    if (out.job_id, out.to_job, out.to_seq) != (header.from_job, header.to_job, header.seq):
        raise ForwardRefused("the forward's signed output names another job or seq")


def check_payload(header: StageForward, payload_digest: bytes) -> None:
    """The payload read after ``header`` must be the one its sender signed for."""
    if payload_digest != header.output.message.output_digest:
        raise ForwardRefused("the forwarded payload is not the one its sender signed for")


def answered_downstream(
    taken: Sequence[Signed[StageOutput]],
    *,
    requester: str,
    executor: str,
    job_id: bytes,
    to_job: bytes,
    first: int,
    end: int,
    base: int,
    to_base: int,
) -> list[tuple[int, Signed[StageOutput]]]:
    """The lease jobs ``first``, ``first + 1``, ... (before ``end``) that the dead ``executor``
    of stage job ``job_id`` forwarded to the next stage (job ``to_job``) although its
    answer to the requester was lost: the take-over must start after them, else the next
    stage would get them twice. ``taken``: the next stage executor's report (its route's
    answer); ``base``/``to_base``: the lease job that seq 0 of ``job_id``/``to_job`` is.

    Only signed outputs the dead executor signed itself, for this requester, about its job
    n's seq and the next stage's seq of job n count, and only in an unbroken run from
    ``first``: the next stage executor cannot make a job look answered that was not, and a
    job the dead one delivered is its own (unpaid past its last accepted commitment).
    """
    by_seq: dict[int, Signed[StageOutput]] = {}
    for signed in taken:
        out = signed.message
        try:
            signed.verify()
        except ProtocolError:
            continue
        if out.executor != executor or out.requester != requester:
            continue
        if out.job_id != job_id or out.to_job != to_job:
            continue
        if out.seq + base != out.to_seq + to_base:  # not the same lease job on both sides
            continue
        by_seq.setdefault(out.seq + base, signed)
    answered: list[tuple[int, Signed[StageOutput]]] = []
    n = first
    while n < end and n in by_seq:
        answered.append((n, by_seq[n]))
        n += 1
    return answered


# --- referees: a bad intermediate is its producer's --------------------------------------


class AttributionError(ValidationError):
    """Evidence about a forwarded intermediate that does not hold together."""


@dataclass(frozen=True)
class StageDispute:
    """A forwarded intermediate held against the stage executor that produced it: its
    signed ``output`` (what it sent on, kept by the next stage's executor) and its signed
    ``commitment`` for the same job (what it was paid for: its input and output digests).
    For a lease batch, ``ins``/``outs`` are the per-job digests the commitment's batch
    digests cover (the output's ``seq`` indexes them); for a single job both are empty.
    A re-run of the stage model on the job's committed input (``input_digest``) judges
    the signed output (``output_digest``)."""

    output: Signed[StageOutput]
    commitment: Signed[ResultCommitment]
    ins: tuple[bytes, ...] = ()
    outs: tuple[bytes, ...] = ()

    @property
    def offender(self) -> str:
        return self.output.message.executor

    @property
    def seq(self) -> int | None:
        """The disputed job's index in the commitment's batch (None: a single job)."""
        return self.output.message.seq if self.ins else None

    @property
    def model_cid(self) -> str:
        return self.commitment.message.model_cid

    @property
    def input_digest(self) -> bytes:
        seq = self.seq
        return self.commitment.message.input_digest if seq is None else self.ins[seq]

    @property
    def output_digest(self) -> bytes:
        return self.output.message.output_digest


def check_stage_dispute(dispute: StageDispute, payload_digest: bytes) -> None:
    """Raise ``AttributionError`` unless ``dispute`` pins the intermediate of digest
    ``payload_digest`` on one stage executor: both its signed output and its commitment
    verify and are its own, for the same job and requester; the intermediate is the one it
    signed for; and its commitment covers that very output for the job's seq (so the
    input a re-run takes is the one it committed to for the job that gave it)."""
    out, c = dispute.output.message, dispute.commitment.message
    for signed in (dispute.output, dispute.commitment):
        try:
            signed.verify()
        except ProtocolError as exc:
            raise AttributionError(f"a stage dispute's signature does not verify: {exc}") from None
    if out.executor != c.executor:
        raise AttributionError("the signed output and the commitment are not one executor's")
    if (out.job_id, out.requester) != (c.job_id, c.requester):
        raise AttributionError("the signed output is about another job than the commitment")
    if payload_digest != out.output_digest:
        raise AttributionError("the intermediate held is not the one its producer signed for")
    if not dispute.ins and not dispute.outs:
        if c.count != 1 or out.seq != 0:
            raise AttributionError("a batch commitment needs the per-job digests it covers")
        if c.output_digest != out.output_digest:
            raise AttributionError("the commitment names another output than the one sent on")
        return
    if not len(dispute.ins) == len(dispute.outs) == c.count:
        raise AttributionError(f"the commitment covers {c.count} jobs: one digest per job")
    if batch_digest(dispute.ins) != c.input_digest:
        raise AttributionError("the per-job input digests are not the commitment's")
    if batch_digest(dispute.outs) != c.output_digest:
        raise AttributionError("the per-job output digests are not the commitment's")
    if out.seq >= c.count:
        raise AttributionError(f"job {out.seq} is past the commitment's {c.count} jobs")
    if dispute.outs[out.seq] != out.output_digest:
        raise AttributionError("the commitment names another output than the one sent on")


def stage_fraud(
    dispute: StageDispute,
    payload_digest: bytes,
    results: Sequence[Signed[RefereeResult]],
    panel: RefereePanel,
) -> FraudProof | None:
    """The referees' verdicts on the producer's commitment (each re-ran its stage on the
    committed input and compared with the signed intermediate): a ``FraudProof`` against
    the producer once a panel majority says "mismatch"; None otherwise (no majority, or a
    majority "match": the intermediate was right). Verdicts about another commitment,
    input or model, off the panel, or that do not verify are not counted."""
    check_stage_dispute(dispute, payload_digest)
    c = dispute.commitment
    counted: dict[str, Signed[RefereeResult]] = {}
    for signed in results:
        r = signed.message
        if r.verdict != "mismatch" or r.referee not in panel or r.cp != panel.cp:
            continue
        if (r.commitment, r.job_id, r.model_cid, r.input_digest) != (
            c.digest,
            c.message.job_id,
            c.message.model_cid,
            c.message.input_digest,
        ):
            continue
        if r.referee in (c.message.requester, c.message.executor):
            continue
        try:
            signed.verify()
        except ProtocolError:
            continue
        counted[r.referee] = signed
    if len(counted) < panel.threshold:
        return None
    chosen = tuple(counted[k] for k in sorted(counted)[: panel.threshold])
    proof = FraudProof.of(c, chosen)
    proof.verify(panel)
    if proof.offender != dispute.offender:  # never: the dispute checked one executor signed both
        raise AttributionError("the proof would blame another executor than the producer")
    return proof
