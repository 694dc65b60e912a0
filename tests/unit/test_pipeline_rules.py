"""Pipeline manifests (canonical, self-consistent), the chain rule over stage commitments,
placement, and the streaming rules: who may route a stage, who may forward it inputs, the
sender's signed output every forward carries, and the seq shift of a stage that failed over."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codec import encode
from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.market import JobForwarded, decode_frame, encode_frame
from protocols.pipeline import (
    ChainError,
    CrossingTensor,
    Cut,
    ForwardRefused,
    LocalRun,
    PipelineManifest,
    Segment,
    Stage,
    StageFetch,
    StageForward,
    StageOutput,
    StagePayload,
    StageReply,
    StageRoute,
    answered_downstream,
    check_chain,
    check_forward,
    check_lease_chain,
    check_payload,
    check_route,
    choose_placement,
    decode_stage_frame,
    encode_stage_frame,
    forward_seq,
)
from protocols.receipt import ResultCommitment, batch_digest, content_digest
from protocols.signed import Signed, sign_message


def cid(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def pid(n: int) -> str:
    return peer_id_from_public_key(bytes(nacl.signing.SigningKey(bytes([n]) * 32).verify_key))


def t(
    name: str, dtype: str = "float32", shape: tuple[int | str | None, ...] = ("b", 4)
) -> CrossingTensor:
    return CrossingTensor(name=name, dtype=dtype, shape=shape)


def manifest(n_stages: int = 3) -> PipelineManifest:
    # x -> stage1 -> {h1, mask} -> stage2 -> {h2, mask} -> stage3 -> y
    cuts = tuple(
        Cut(tensors=(t(f"h{i}"), t("mask", "int64")), bytes=100 * i) for i in range(1, n_stages)
    )
    bounds = [("x",), *(c.names for c in cuts), ("y",)]
    stages = tuple(
        Stage(cid=cid(f"s{i}"), inputs=bounds[i], outputs=bounds[i + 1]) for i in range(n_stages)
    )
    return PipelineManifest(
        model=cid("full"), inputs=(t("x"),), outputs=(t("y"),), stages=stages, cuts=cuts
    )


def test_round_trip_and_cid_is_sha256_of_canonical_bytes() -> None:
    m = manifest()
    data = m.to_bytes()
    assert m.cid == hashlib.sha256(data).hexdigest()
    assert PipelineManifest.from_bytes(data) == m
    assert m.crossing_bytes == [100, 200]
    # Canonical: sorted keys, no whitespace.
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()


@settings(max_examples=30, deadline=None)
@given(indent=st.one_of(st.none(), st.integers(0, 4)), reverse=st.booleans())
def test_cid_does_not_depend_on_formatting(indent: int | None, reverse: bool) -> None:
    m = manifest()
    d = m.to_dict()
    if reverse:
        d = dict(reversed(list(d.items())))
    text = json.dumps(d, indent=indent).encode()
    assert PipelineManifest.from_bytes(text).cid == m.cid


def test_any_change_changes_the_cid() -> None:
    m = manifest()
    other = dataclasses.replace(m, model=cid("other"))
    assert other.cid != m.cid


def test_stage_outputs_must_be_the_next_stage_inputs() -> None:
    m = manifest()
    bad = dataclasses.replace(m.stages[1], inputs=("h1",))  # forgets the mask stage 1 sends
    with pytest.raises(ValidationError, match="stage 2 takes"):
        dataclasses.replace(m, stages=(m.stages[0], bad, m.stages[2]))
    bad_last = dataclasses.replace(m.stages[2], outputs=("z",))
    with pytest.raises(ValidationError, match="the model gives"):
        dataclasses.replace(m, stages=(*m.stages[:2], bad_last))
    with pytest.raises(ValidationError, match="cuts"):
        dataclasses.replace(m, cuts=m.cuts[:1])
    with pytest.raises(ValidationError, match="stages"):
        manifest(1)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format="other/1"),
        lambda d: d.update(extra=1),
        lambda d: d.update(model="ABC"),
        lambda d: d["stages"][0].update(cid="0" * 63),
        lambda d: d["cuts"][0].update(bytes=-1),
        lambda d: d["cuts"][0]["tensors"][0].update(dtype="string"),
        lambda d: d["cuts"][0]["tensors"][0].update(shape=[-1]),
        lambda d: d["cuts"][0].update(tensors=[]),
        lambda d: d["stages"].append(d["stages"][0]),
        lambda d: d.update(stages="x"),
    ],
)
def test_malformed_manifests_are_refused(edit: object) -> None:
    d = manifest().to_dict()
    edit(d)  # type: ignore[operator]
    with pytest.raises(ValidationError):
        PipelineManifest.from_bytes(json.dumps(d).encode())


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_garbage_gives_a_typed_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        PipelineManifest.from_bytes(data)


@settings(max_examples=100, deadline=None)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_bit_flips_give_a_typed_error_or_another_cid(pos: int, bit: int) -> None:
    m = manifest()
    data = bytearray(m.to_bytes())
    data[pos % len(data)] ^= 1 << bit
    try:
        got = PipelineManifest.from_bytes(bytes(data))
    except ProtocolError:
        return
    assert got.cid != m.cid


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="over"):
        PipelineManifest.from_bytes(b" " * (1024 * 1024 + 1))


# --- the chain rule ---------------------------------------------------------------------


def chain(m: PipelineManifest, first_in: bytes) -> list[ResultCommitment]:
    out, digest = [], first_in
    for i, stage in enumerate(m.stages):
        nxt = content_digest({"stage": i, "out": True})
        out.append(
            ResultCommitment(
                job_id=bytes([i + 1]) * 16,
                requester=pid(1),
                executor=pid(10 + i),
                model_cid=stage.cid,
                input_digest=digest,
                output_digest=nxt,
                price=10,
                compute_ms=1,
            )
        )
        digest = nxt
    return out


def test_a_chained_run_passes() -> None:
    m = manifest()
    first = content_digest({"x": b"in"})
    cs = chain(m, first)
    check_chain(m, first, cs, cs[-1].output_digest)


def test_a_stage_that_ran_on_other_inputs_breaks_the_chain() -> None:
    m = manifest()
    first = content_digest({"x": b"in"})
    cs = chain(m, first)
    cs[1] = dataclasses.replace(cs[1], input_digest=content_digest({"forged": 1}))
    with pytest.raises(ChainError, match="stage 2 committed to other inputs than stage 1's"):
        check_chain(m, first, cs)


@pytest.mark.parametrize("where", ["first", "model", "requester", "count", "missing", "last"])
def test_every_link_is_checked(where: str) -> None:
    m = manifest()
    first = content_digest({"x": b"in"})
    cs = chain(m, first)
    out = cs[-1].output_digest
    if where == "first":
        first = content_digest({"x": b"other"})
    elif where == "model":
        cs[2] = dataclasses.replace(cs[2], model_cid=cid("elsewhere"))
    elif where == "requester":
        cs[1] = dataclasses.replace(cs[1], requester=pid(2))
    elif where == "count":
        cs[0] = dataclasses.replace(cs[0], count=2)
    elif where == "missing":
        cs = cs[:2]
    else:
        out = content_digest({"y": b"swapped"})
    with pytest.raises(ChainError):
        check_chain(m, first, cs, out)


def test_a_stage_the_requester_ran_itself_continues_the_chain_from_its_outputs() -> None:
    m = manifest()
    first = content_digest({"x": b"in"})
    cs = chain(m, first)
    links: list[ResultCommitment | LocalRun] = [cs[0], LocalRun(cs[1].output_digest), cs[2]]
    check_chain(m, first, links, cs[2].output_digest)
    links[1] = LocalRun(content_digest({"other": 1}))
    with pytest.raises(ChainError, match="stage 3 committed to other inputs"):
        check_chain(m, first, links)


# --- a pipeline lease whose stage failed over: segments --------------------------------

JOBS = 6


def cuts(m: PipelineManifest) -> list[list[bytes]]:
    """Per cut (inputs, each stage's outputs), per job, a digest."""
    n_cuts = len(m.stages) + 1
    return [[content_digest({"cut": i, "job": j}) for j in range(JOBS)] for i in range(n_cuts)]


def seg(m: PipelineManifest, ds: list[list[bytes]], i: int, first: int, end: int) -> Segment:
    """Stage i+1's commitment over jobs first..end-1, digests as the cuts say."""
    c = ResultCommitment(
        job_id=bytes([i + 1]) * 16,
        requester=pid(1),
        executor=pid(10 + i + first),
        model_cid=m.stages[i].cid,
        input_digest=batch_digest(ds[i][first:end]),
        output_digest=batch_digest(ds[i + 1][first:end]),
        price=10 * (end - first),
        compute_ms=1,
        count=end - first,
    )
    return Segment(first, c)


def failed_over(m: PipelineManifest, ds: list[list[bytes]]) -> list[list[Segment]]:
    """Stage 2's first executor was paid for jobs 0, 1 (an interim acceptance), answered
    job 2 unpaid, and died; its replacement ran jobs 3..5."""
    return [
        [seg(m, ds, 0, 0, JOBS)],
        [seg(m, ds, 1, 0, 2), seg(m, ds, 1, 3, JOBS)],
        [seg(m, ds, 2, 0, JOBS)],
    ]


def test_a_lease_whose_stage_failed_over_chains_segment_by_segment() -> None:
    m = manifest()
    ds = cuts(m)
    segs = failed_over(m, ds)
    check_lease_chain(m, ds, segs)
    check_lease_chain(m, ds, [segs[0], segs[1][::-1], segs[2]])  # in any order
    check_lease_chain(m, ds, [[seg(m, ds, i, 0, JOBS)] for i in range(3)])  # no failover


def test_no_job_is_paid_twice_at_a_stage() -> None:
    """The replacement's commitment may not cover a job the dead executor was paid for."""
    m = manifest()
    ds = cuts(m)
    segs = failed_over(m, ds)
    segs[1] = [seg(m, ds, 1, 0, 2), seg(m, ds, 1, 1, JOBS)]  # job 1 in both
    with pytest.raises(ChainError, match="job 1 is paid twice"):
        check_lease_chain(m, ds, segs)
    segs[1] = [seg(m, ds, 1, 1, JOBS), seg(m, ds, 1, 0, 2)]  # in any order
    with pytest.raises(ChainError, match="paid twice"):
        check_lease_chain(m, ds, segs)


@pytest.mark.parametrize(
    "where", ["inputs", "outputs", "model", "requester", "past", "short", "none", "cuts"]
)
def test_every_segment_link_is_checked(where: str) -> None:
    m = manifest()
    ds = cuts(m)
    segs = failed_over(m, ds)
    last = segs[1][1]
    if where == "inputs":  # the replacement ran on other inputs than stage 1 gave
        c = dataclasses.replace(last.commitment, input_digest=batch_digest(ds[0][3:]))
        segs[1][1] = Segment(3, c)
        match = "stage 2 committed to other inputs than stage 1's outputs"
    elif where == "outputs":  # it committed to other outputs than stage 3 took
        c = dataclasses.replace(last.commitment, output_digest=batch_digest(ds[1][3:]))
        segs[1][1] = Segment(3, c)
        match = "stage 2 committed to other outputs"
    elif where == "model":
        c = dataclasses.replace(last.commitment, model_cid=cid("elsewhere"))
        segs[1][1] = Segment(3, c)
        match = "another model"
    elif where == "requester":
        c = dataclasses.replace(segs[2][0].commitment, requester=pid(2))
        segs[2][0] = Segment(0, c)
        match = "another requester"
    elif where == "past":  # a commitment over more jobs than the lease ran
        segs[1][1] = Segment(4, last.commitment)
        match = "past the lease"
    elif where == "short":  # the stage's last executor did not answer the last jobs
        segs[1][1] = seg(m, ds, 1, 3, JOBS - 1)
        match = "ends at job 5, not 6"
    elif where == "none":
        segs[0] = []
        match = "stage 1 has no commitment"
    else:
        ds = ds[:-1]
        match = "cuts"
    with pytest.raises(ChainError, match=match):
        check_lease_chain(m, ds, segs)


# --- placement ---------------------------------------------------------------------------


def test_split_runs_only_where_it_beats_the_best_single_node() -> None:
    kw = {"bytes_per_ms": 100_000.0, "hop_ms": 10.0}
    # A single node at 50 ms beats two stages at 20 ms each plus two hops and 1 MB across.
    p = choose_placement(50.0, [20.0, 20.0], [1_000_000], **kw)
    assert not p.split and p.split_ms == 20 + 20 + 2 * 10 + 10 and p.unsplit_ms == 60
    # Stages at 10 ms each: 10 + 10 + 20 + 10 = 50 < 60.
    assert choose_placement(50.0, [10.0, 10.0], [1_000_000], **kw).split
    # Equal estimates: the whole model (never lose).
    assert not choose_placement(30.0, [10.0, 10.0], [0], **kw).split  # 40 vs 40
    # Nobody holds the whole model: split is the only way.
    assert choose_placement(None, [90.0, 90.0], [10**9], **kw).split
    # A stage nobody serves: the whole model where somebody serves it.
    assert not choose_placement(500.0, [1.0, None], [0], **kw).split
    assert choose_placement(None, [1.0, None], [0], **kw).split


@settings(max_examples=200, deadline=None)
@given(
    full=st.floats(0, 1e4),
    stages=st.lists(st.floats(0, 1e4), min_size=2, max_size=5),
    cross=st.integers(0, 10**9),
    hop=st.floats(0, 100),
)
def test_a_chosen_split_is_never_estimated_slower(
    full: float, stages: list[float], cross: int, hop: float
) -> None:
    p = choose_placement(full, stages, [cross], bytes_per_ms=1e5, hop_ms=hop)
    assert p.split_ms is not None and p.unsplit_ms is not None
    assert p.split == (p.split_ms < p.unsplit_ms)


def test_placement_tells_no_answer_in_time_from_nobody_serving() -> None:
    kw = {"bytes_per_ms": 100_000.0, "hop_ms": 10.0}
    # Stage lookups that did not answer in time, the whole model served: run it whole, and
    # say the lookups were late (not that nobody serves the stages).
    p = choose_placement(50.0, [None, None], [0], late=[1, 2], **kw)
    assert not p.split and p.why == "whole model: no answer in time about stage(s) [1, 2]"
    p = choose_placement(50.0, [1.0, None], [0], **kw)
    assert not p.split and p.why == "whole model: no peer serves stage(s) [2]"
    p = choose_placement(50.0, [None, None], [0], late=[2], **kw)
    assert p.why == "whole model: no peer serves stage(s) [1]; no answer in time about stage(s) [2]"
    # The whole model's lookup was late: split, saying so (not "nobody serves it").
    p = choose_placement(None, [1.0, 1.0], [0], late=[0], **kw)
    assert p.split and p.why == "no answer in time about the whole model"
    p = choose_placement(None, [1.0, 1.0], [0], **kw)
    assert p.split and p.why == "no single peer serves the whole model"
    p = choose_placement(None, [None, 1.0], [0], late=[0, 1], **kw)
    assert p.split and p.why.startswith("no answer in time about the whole model")


# --- streaming: routes and forwards -------------------------------------------------------


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


REQ, E1, E2, E3 = pid(1), pid(2), pid(3), pid(4)
J1, J2, J3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16


def route(**kw: object) -> StageRoute:
    base: dict[str, object] = {
        "job_id": J2,
        "requester": REQ,
        "executor": E2,
        "upstream": E1,
        "upstream_job": J1,
        "downstream": E3,
        "downstream_job": J3,
        "expires": 1000.0,
    }
    base.update(kw)
    return StageRoute(**base)  # type: ignore[arg-type]


def test_a_route_names_real_neighbours() -> None:
    route()
    route(downstream="", downstream_job=b"")  # the last stage
    route(upstream="", upstream_job=b"")  # the first stage
    with pytest.raises(ValidationError, match="names an upstream or a downstream"):
        route(upstream="", upstream_job=b"", downstream="", downstream_job=b"")
    with pytest.raises(ValidationError, match="the upstream stage is this stage"):
        route(upstream=E2)
    with pytest.raises(ValidationError, match="the downstream stage is this stage"):
        route(downstream_job=J2)
    with pytest.raises(ValidationError):
        route(upstream="", upstream_job=J1)  # a job without its executor
    with pytest.raises(ValidationError):
        route(upstream_job=b"short")


def test_a_route_is_taken_only_from_the_requester_that_awarded_the_job() -> None:
    r = route()
    check_route(r, sender=REQ, award_requester=REQ, award_executor=E2)
    with pytest.raises(ForwardRefused, match="not from its requester"):
        check_route(r, sender=E1, award_requester=REQ, award_executor=E2)
    with pytest.raises(ForwardRefused, match="not from its requester"):
        check_route(r, sender=REQ, award_requester=E3, award_executor=E2)
    with pytest.raises(ForwardRefused, match="another executor"):
        check_route(r, sender=REQ, award_requester=REQ, award_executor=E3)


WIRE = {"h": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}}


def output(signer: int = 2, **kw: object) -> Signed[StageOutput]:
    """E1's (key 2's) signed output of its job J1 seq 0, forwarded as J2 seq 0."""
    base: dict[str, object] = {
        "job_id": J1,
        "seq": 0,
        "requester": REQ,
        "executor": pid(signer),
        "output_digest": content_digest(WIRE),
        "to_job": J2,
        "to_seq": 0,
    }
    base.update(kw)
    return sign_message(key(signer), StageOutput(**base))  # type: ignore[arg-type]


def header(out: Signed[StageOutput] | None = None, **kw: object) -> StageForward:
    base: dict[str, object] = {"to_job": J2, "from_job": J1, "seq": 0, "size": 10}
    base.update(kw)
    return StageForward(output=out or output(), **base)  # type: ignore[arg-type]


def test_forwarded_inputs_are_taken_only_from_the_upstream_the_requester_named() -> None:
    r = route()
    hdr = header()
    check_forward(r, sender=E1, header=hdr)
    with pytest.raises(ForwardRefused, match="requester named"):
        check_forward(r, sender=E3, header=hdr)  # any other peer, even a real stage's
    with pytest.raises(ForwardRefused, match="requester named"):
        check_forward(r, sender=REQ, header=hdr)
    with pytest.raises(ForwardRefused, match="another job"):
        check_forward(r, sender=E1, header=dataclasses.replace(hdr, from_job=J3))
    with pytest.raises(ForwardRefused, match="no route"):
        check_forward(None, sender=E1, header=hdr)
    with pytest.raises(ForwardRefused, match="no route"):
        check_forward(r, sender=E1, header=dataclasses.replace(hdr, to_job=J3))
    first = route(upstream="", upstream_job=b"")
    with pytest.raises(ForwardRefused, match="from the requester"):
        check_forward(first, sender=E1, header=hdr)


def test_a_forward_carries_its_senders_signed_output_for_exactly_that_forward() -> None:
    """Without it the receiver of a bad intermediate could not show who produced it."""
    r = route()
    # Signed by another executor than the sender (the real E3 signs, E1 sends it on).
    with pytest.raises(ForwardRefused, match="not its sender's"):
        check_forward(r, sender=E1, header=header(output(signer=4)))
    # About another forward: another from-job, to-job or to-seq than the header's.
    for edit in ({"job_id": J3}, {"to_job": J3}, {"to_seq": 1}):
        with pytest.raises(ForwardRefused, match="another job or seq"):
            check_forward(r, sender=E1, header=header(output(**edit)))
    with pytest.raises(ForwardRefused, match="another requester"):
        check_forward(r, sender=E1, header=header(output(requester=E3)))
    # A signature that does not verify (assembled by hand, never through open_message).
    good = output()
    forged = Signed(dataclasses.replace(good.message, to_seq=5), good.envelope)
    with pytest.raises(ForwardRefused, match="does not verify"):
        check_forward(r, sender=E1, header=header(forged, seq=5))
    # The header must carry a signed StageOutput at all.
    with pytest.raises(ValidationError, match="signed StageOutput"):
        StageForward(to_job=J2, from_job=J1, seq=0, size=10, output=None)  # type: ignore[arg-type]


def test_the_payload_must_be_the_one_its_sender_signed_for() -> None:
    hdr = header()
    check_payload(hdr, content_digest(WIRE))
    other = {"h": {"dtype": "float32", "shape": [1], "data": b"\1" * 4}}
    with pytest.raises(ForwardRefused, match="not the one its sender signed"):
        check_payload(hdr, content_digest(other))


def test_a_signed_output_is_well_formed() -> None:
    with pytest.raises(ValidationError):
        output(output_digest=b"short")
    with pytest.raises(ValidationError, match="another stage's job"):
        output(to_job=J1)
    with pytest.raises(ValidationError):
        output(seq=-1)
    out = output()
    assert StageOutput.from_bytes(out.to_bytes()).message == out.message
    raw = bytearray(out.to_bytes())
    raw[-1] ^= 1
    with pytest.raises(ProtocolError):
        StageOutput.from_bytes(bytes(raw))


def test_a_shifted_route_maps_seqs_onto_the_downstream_that_took_over() -> None:
    """Stage 2's executor died and its replacement took over at job 5: its seq 0 is job 5.
    Stage 1 (seqs = job numbers) forwards its seq 5 as seq 0, and nothing below 5."""
    r = route(seq_shift=5)
    assert [forward_seq(r, s) for s in (0, 4, 5, 6, 9)] == [None, None, 0, 1, 4]
    # The replacement's own route to stage 3 (which still numbers by job): seq s is s + 5.
    assert forward_seq(route(seq_shift=-5), 0) == 5
    assert forward_seq(route(), 3) == 3
    assert forward_seq(route(downstream="", downstream_job=b""), 3) is None  # the last stage
    with pytest.raises(ValidationError, match="seq_shift without a downstream"):
        route(downstream="", downstream_job=b"", seq_shift=1)
    with pytest.raises(ValidationError):
        route(seq_shift=True)


def test_stage_frames_round_trip_and_a_route_must_be_signed_by_its_requester() -> None:
    signed = sign_message(key(1), route(seq_shift=-3))
    frames = [
        signed,
        header(seq=0, size=99),
        StagePayload(WIRE),
        StageReply(True),
        StageReply(False, "no"),
        StageReply(True, taken=(output(), output(seq=1, to_seq=1))),
        StageFetch(J1, 7),
    ]
    for f in frames:
        back = decode_stage_frame(encode_stage_frame(f), max_size=4096)
        assert back == f if not isinstance(f, type(signed)) else back.message == f.message
    m = bytearray(signed.to_bytes())
    m[-1] ^= 1  # a route whose signature does not verify
    with pytest.raises(ProtocolError):
        decode_stage_frame(encode({"t": "route", "m": bytes(m)}), max_size=4096)
    o = bytearray(output().to_bytes())
    o[-1] ^= 1  # a forward whose signed output does not verify
    fwd = {"t": "fwd", "to": J2, "from": J1, "seq": 0, "n": 10, "o": bytes(o)}
    with pytest.raises(ProtocolError):
        decode_stage_frame(encode(fwd), max_size=4096)
    with pytest.raises(DecodeError):  # a forward without its signed output
        decode_stage_frame(encode({k: v for k, v in fwd.items() if k != "o"}), max_size=4096)
    with pytest.raises(DecodeError):
        decode_stage_frame(encode_stage_frame(StageReply(True)) + b"", max_size=3)


def test_a_fetch_names_a_real_job_and_seq() -> None:
    with pytest.raises(ValidationError):
        StageFetch(b"short", 0)
    with pytest.raises(ValidationError):
        StageFetch(J1, -1)
    with pytest.raises(DecodeError):  # a fetch with an extra field
        decode_stage_frame(encode({"t": "get", "j": J1, "s": 0, "x": 1}), max_size=4096)


def test_a_forwarded_result_frame_carries_only_the_digest() -> None:
    f = JobForwarded(job_id=J1, seq=2, output_digest=b"d" * 32, to=E2, compute_ms=7)
    assert decode_frame(encode_frame(f)) == f
    with pytest.raises(ValidationError):
        JobForwarded(job_id=J1, seq=2, output_digest=b"d" * 31, to=E2, compute_ms=7)
    with pytest.raises(ValidationError):
        JobForwarded(job_id=J1, seq=2, output_digest=b"d" * 32, to="nobody", compute_ms=7)


# --- a take-over after the dead executor's answer was lost but its forward went on ------


def answered(taken: list[Signed[StageOutput]], **kw: object) -> list[int]:
    """Lease jobs that E1 (key 2; stage job J1, its seq 0 = job 0) forwarded to stage job J2
    (its seq 0 = job 0) from job 2 on, of jobs given up to 6."""
    base: dict[str, object] = {
        "requester": REQ,
        "executor": E1,
        "job_id": J1,
        "to_job": J2,
        "first": 2,
        "end": 6,
        "base": 0,
        "to_base": 0,
    }
    base.update(kw)
    return [n for n, _ in answered_downstream(taken, **base)]  # type: ignore[arg-type]


def outs(*seqs: int, **kw: object) -> list[Signed[StageOutput]]:
    return [output(**{"seq": n, "to_seq": n, **kw}) for n in seqs]


def test_jobs_the_lost_executor_forwarded_on_are_not_run_again() -> None:
    assert answered(outs(0, 1, 2, 3)) == [2, 3]  # before first: answered already, not asked
    assert answered(outs(3, 2)) == [2, 3]  # any order
    assert answered([]) == []
    assert answered(outs(2, 3, 4, 5, 6, 7)) == [2, 3, 4, 5]  # never past the jobs given
    assert answered(outs(2, 4)) == [2]  # an unbroken run: job 4 went on after a lost job 3?
    assert answered(outs(3, 4)) == []


def test_a_shifted_lease_maps_both_sides_seqs_onto_lease_jobs() -> None:
    # E1 took over stage 1 at job 1 (its seq s is job s + 1); stage 2's executor at job 2.
    taken = [output(seq=1, to_seq=0), output(seq=2, to_seq=1)]  # jobs 2 and 3
    assert answered(taken, base=1, to_base=2) == [2, 3]
    assert answered(taken, base=0, to_base=2) == []  # seq s would be job s: no match
    assert answered(taken, base=1, to_base=0) == []


@pytest.mark.parametrize(
    "edit",
    ["signature", "signer", "executor", "requester", "job_id", "to_job", "to_seq"],
)
def test_only_the_lost_executors_own_signed_outputs_for_exactly_that_job_count(
    edit: str,
) -> None:
    """The next stage's executor reports them; it must not be able to make a job look
    answered (the lost one then does not run it, and nobody would)."""
    good = outs(2)
    assert answered(good) == [2]
    bad: Signed[StageOutput]
    if edit == "signature":  # another message in a genuine envelope
        msg = dataclasses.replace(good[0].message, output_digest=b"x" * 32)
        bad = Signed(message=msg, envelope=good[0].envelope)
    elif edit == "signer":  # signed by another peer in E1's name: cannot verify
        msg = good[0].message
        bad = Signed(message=msg, envelope=output(signer=3, seq=2, to_seq=2).envelope)
    elif edit == "executor":  # a genuine signed output of another executor
        bad = output(signer=3, seq=2, to_seq=2)
    elif edit == "requester":
        bad = outs(2, requester=E3)[0]
    elif edit == "job_id":
        bad = outs(2, job_id=J3)[0]
    elif edit == "to_job":
        bad = outs(2, to_job=J3)[0]
    else:
        bad = output(seq=2, to_seq=3)
    assert answered([bad]) == []
