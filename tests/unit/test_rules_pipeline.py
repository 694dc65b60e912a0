"""Rules of pipelines (protocols/pipeline.py) that no other test held.

A pipeline manifest names one computation by its cid, the chain rule decides whether a
requester pays for a run, and stage-stream frames come from untrusted peers. Found by
mutation testing (issue 17, docs/testing.md; ``python bench/mutation.py --paths
protocols/pipeline.py``): each test fails when its rule is removed.
"""

from __future__ import annotations

import dataclasses
import json

import cbor2
import pytest
from test_pipeline_attribution import (
    INS,
    PRODUCER,
    REFEREES,
    D,
    dispute,
    single,
    verdict,
)
from test_pipeline_rules import (
    E1,
    E2,
    E3,
    J1,
    J2,
    J3,
    REQ,
    answered,
    chain,
    cid,
    cuts,
    header,
    key,
    manifest,
    output,
    outs,
    route,
    seg,
    t,
)

from protocols.codec import encode
from protocols.committee import RefereePanel
from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.pipeline import (
    MAX_DIM,
    MAX_MANIFEST_BYTES,
    MAX_NAME_CHARS,
    MAX_RANK,
    MAX_STAGES,
    MAX_TAKEN,
    MAX_TENSORS,
    STAGE_REPLY_MAX,
    AttributionError,
    ChainError,
    CrossingTensor,
    Cut,
    LocalRun,
    PipelineManifest,
    Segment,
    Stage,
    StageDispute,
    StageFetch,
    StageForward,
    StagePayload,
    StageReply,
    StageRoute,
    check_chain,
    check_lease_chain,
    check_stage_dispute,
    choose_placement,
    decode_stage_frame,
    encode_stage_frame,
    forward_seq,
    stage_fraud,
)
from protocols.receipt import MAX_BATCH, content_digest
from protocols.signed import Signed, sign_message

KW = {"bytes_per_ms": 100_000.0, "hop_ms": 10.0}


# --- the manifest ------------------------------------------------------------------------------


def test_tensor_names_are_1_to_256_characters() -> None:
    t("a" * MAX_NAME_CHARS)
    with pytest.raises(ValidationError):
        t("a" * (MAX_NAME_CHARS + 1))


def test_a_tensor_shape_has_rank_at_most_16_and_dims_0_to_2_40_or_short_names() -> None:
    t("x", shape=(1,) * MAX_RANK)
    t("x", shape=(0, MAX_DIM, "b" * 64, None))
    for bad in ((1,) * (MAX_RANK + 1), (-1,), (MAX_DIM + 1,), ("b" * 65,), ("",)):
        with pytest.raises(ValidationError):
            t("x", shape=bad)
    with pytest.raises(ValidationError):  # a list is no shape (the tuple is what is hashed)
        CrossingTensor(name="x", dtype="float32", shape=[1, 2])  # type: ignore[arg-type]


def test_a_cut_carries_0_to_2_62_bytes() -> None:
    for ok in (0, 2**62):
        assert Cut(tensors=(t("h"),), bytes=ok).bytes == ok
    for bad in (-1, 2**62 + 1):
        with pytest.raises(ValidationError):
            Cut(tensors=(t("h"),), bytes=bad)


def test_names_and_tensor_lists_hold_1_to_1024_entries_and_must_be_lists() -> None:
    names = [f"n{i}" for i in range(MAX_TENSORS)]
    stage = Stage.from_dict({"cid": cid("s"), "inputs": names, "outputs": ["y"]})
    assert len(stage.inputs) == MAX_TENSORS
    with pytest.raises(ValidationError):
        Stage.from_dict({"cid": cid("s"), "inputs": [*names, "extra"], "outputs": ["y"]})
    tensors = [t(n).to_dict() for n in names]
    assert len(Cut.from_dict({"tensors": tensors, "bytes": 0}).tensors) == MAX_TENSORS
    with pytest.raises(ValidationError):
        Cut.from_dict({"tensors": [*tensors, t("extra").to_dict()], "bytes": 0})
    # Not lists: a typed error, never a TypeError from len() or a string read as names.
    for bad in (5, "x", None):
        with pytest.raises(ValidationError):
            Stage.from_dict({"cid": cid("s"), "inputs": bad, "outputs": ["y"]})
        with pytest.raises(ValidationError):
            Cut.from_dict({"tensors": bad, "bytes": 0})


def test_a_pipeline_has_2_to_16_stages() -> None:
    for n in (2, MAX_STAGES):
        m = manifest(n)
        assert len(m.stages) == n
        assert PipelineManifest.from_bytes(m.to_bytes()) == m
    big = manifest(MAX_STAGES).to_dict()
    big["stages"].append(big["stages"][-1])
    with pytest.raises(ValidationError):
        PipelineManifest.from_dict(big)


def test_stages_and_cuts_that_are_not_lists_are_refused_with_a_typed_error() -> None:
    d = manifest().to_dict()
    for field, bad in (("stages", 5), ("cuts", 5), ("stages", "ab"), ("cuts", {"a": 1})):
        with pytest.raises(ValidationError):
            PipelineManifest.from_dict({**d, field: bad})


def test_a_manifest_of_exactly_the_size_cap_is_read() -> None:
    data = manifest().to_bytes()
    padded = data + b" " * (MAX_MANIFEST_BYTES - len(data))
    assert len(padded) == MAX_MANIFEST_BYTES
    assert PipelineManifest.from_bytes(padded).cid == manifest().cid


def test_canonical_bytes_escape_non_ascii_names() -> None:
    """The cid is sha256 of ASCII JSON: a non-ASCII name is written as a \\u escape, so
    every peer (whatever its JSON library's default) hashes the same bytes."""
    m = manifest(2)
    renamed = dataclasses.replace(
        m,
        inputs=(t("x\u00e9"),),
        stages=(dataclasses.replace(m.stages[0], inputs=("x\u00e9",)), m.stages[1]),
    )
    data = renamed.to_bytes()
    assert data.isascii() and b"x\\u00e9" in data
    assert json.loads(data) == renamed.to_dict()


# --- the chain rule ----------------------------------------------------------------------------


def test_a_pipeline_the_requester_ran_entirely_itself_chains() -> None:
    m = manifest()
    first = content_digest({"x": b"in"})
    cs = chain(m, first)
    check_chain(m, first, [LocalRun(c.output_digest) for c in cs], cs[-1].output_digest)


def test_a_one_job_lease_chains() -> None:
    m = manifest()
    ds = [c[:1] for c in cuts(m)]
    check_lease_chain(m, ds, [[seg(m, ds, i, 0, 1)] for i in range(3)])


def test_every_cut_of_a_lease_has_exactly_one_digest_per_job() -> None:
    """A cut with a digest more than the lease's jobs is refused (the segments would never
    read it, so nothing else would notice)."""
    m = manifest()
    ds = cuts(m)
    segs = [[seg(m, ds, i, 0, len(ds[0]))] for i in range(3)]
    check_lease_chain(m, ds, segs)
    longer = [*ds[:2], [*ds[2], ds[2][0]], ds[3]]
    with pytest.raises(ChainError):
        check_lease_chain(m, longer, segs)
    with pytest.raises(ChainError):
        check_lease_chain(m, [[] for _ in ds], [[], [], []])


def test_a_lease_with_no_commitment_at_all_is_a_chain_error() -> None:
    m = manifest()
    with pytest.raises(ChainError):
        check_lease_chain(m, cuts(m), [[], [], []])


def test_a_segments_first_job_is_a_job_of_a_batch() -> None:
    c = seg(manifest(), cuts(manifest()), 0, 0, 1).commitment
    assert Segment(MAX_BATCH - 1, c).first == MAX_BATCH - 1
    for bad in (-1, MAX_BATCH):
        with pytest.raises(ValidationError):
            Segment(bad, c)


# --- placement ---------------------------------------------------------------------------------


def test_placement_needs_a_positive_link_speed_and_a_non_negative_hop() -> None:
    choose_placement(1.0, [1.0, 1.0], [10], bytes_per_ms=0.5, hop_ms=0.0)
    for speed, hop in ((0.0, 1.0), (-1.0, 1.0), (1.0, -1.0)):
        with pytest.raises(ValidationError):
            choose_placement(1.0, [1.0, 1.0], [10], bytes_per_ms=speed, hop_ms=hop)


def test_every_placement_reports_the_estimates_it_had() -> None:
    p = choose_placement(50.0, [1.0, None], [0], **KW)
    assert (p.split, p.split_ms, p.unsplit_ms) == (False, None, 60.0)
    p = choose_placement(None, [1.0, None], [0], **KW)
    assert (p.split, p.why, p.split_ms, p.unsplit_ms) == (
        True,
        "nobody serves the whole model",
        None,
        None,
    )
    p = choose_placement(None, [1.0, None], [0], late=[0], **KW)
    assert (p.split_ms, p.unsplit_ms) == (None, None)
    p = choose_placement(None, [1.0, 2.0], [100_000], late=[0], **KW)
    assert (p.split_ms, p.unsplit_ms) == (1 + 2 + 20 + 1, None)
    p = choose_placement(None, [1.0, 2.0], [100_000], **KW)
    assert (p.split_ms, p.unsplit_ms) == (1 + 2 + 20 + 1, None)


# --- streaming frames --------------------------------------------------------------------------


def test_a_forward_names_a_job_seq_below_the_batch_cap_and_at_least_one_byte() -> None:
    header(seq=MAX_BATCH - 1, size=1)
    with pytest.raises(ValidationError):
        header(seq=MAX_BATCH, size=1)
    with pytest.raises(ValidationError):
        header(seq=0, size=0)


def test_a_signed_outputs_seqs_are_jobs_of_a_batch() -> None:
    for field in ("seq", "to_seq"):
        assert getattr(output(**{field: MAX_BATCH - 1}).message, field) == MAX_BATCH - 1
        with pytest.raises(ValidationError):
            output(**{field: MAX_BATCH})


def test_a_routes_seq_shift_is_within_a_batch_both_ways() -> None:
    for ok in (1 - MAX_BATCH, MAX_BATCH - 1):
        assert route(seq_shift=ok).seq_shift == ok
    for bad in (-MAX_BATCH, MAX_BATCH):
        with pytest.raises(ValidationError):
            route(seq_shift=bad)


def test_a_shift_never_maps_a_job_past_the_downstreams_batch() -> None:
    r = route(seq_shift=-1)
    assert forward_seq(r, MAX_BATCH - 2) == MAX_BATCH - 1
    assert forward_seq(r, MAX_BATCH - 1) is None


def test_a_fetch_asks_for_a_job_of_a_batch() -> None:
    assert StageFetch(J1, MAX_BATCH - 1).seq == MAX_BATCH - 1
    with pytest.raises(ValidationError):
        StageFetch(J1, MAX_BATCH)
    frame = {"t": "get", "j": J1, "s": 3}
    assert decode_stage_frame(encode(frame), max_size=4096) == StageFetch(J1, 3)
    for bad in ({**frame, "extra": 1}, {**frame, "t": "other"}):
        with pytest.raises(ProtocolError):
            decode_stage_frame(encode(bad), max_size=4096)


def test_a_reply_says_why_in_at_most_512_characters() -> None:
    assert StageReply(False, "w" * 512).why == "w" * 512
    with pytest.raises(ValidationError):
        StageReply(False, "w" * 513)


def test_a_routes_expiry_is_a_float_and_inclusive() -> None:
    r = route(expires=1000)
    assert type(r.expires) is float and r.expires == 1000.0
    r.check_time(1000.0)
    with pytest.raises(ValidationError):
        r.check_time(1000.001)


def test_a_requester_side_names_no_job_and_the_other_side_is_still_checked() -> None:
    with pytest.raises(ValidationError):
        route(upstream="", upstream_job=b"\x01")
    with pytest.raises(ValidationError, match="downstream stage is this stage"):
        route(upstream="", upstream_job=b"", downstream=E2)
    with pytest.raises(ValidationError):
        route(upstream="", upstream_job=b"", downstream=E3, downstream_job=b"short")


def test_a_route_is_opened_with_its_signature_and_expiry_checked() -> None:
    r = route(expires=1000.0)
    signed = sign_message(key(1), r)
    assert StageRoute.from_bytes(signed.to_bytes(), now=999.0).message == r
    assert StageRoute.from_bytes(signed.to_bytes()).message == r
    with pytest.raises(ProtocolError):
        StageRoute.from_bytes(signed.to_bytes(), now=1000.5)
    forged = bytearray(signed.to_bytes())
    forged[-1] ^= 1  # a signature that does not verify
    with pytest.raises(ProtocolError):
        StageRoute.from_bytes(bytes(forged), now=999.0)


def test_stage_frames_need_not_be_canonical_cbor() -> None:
    data = cbor2.dumps({"why": "", "ok": True, "t": "reply"})  # keys out of canonical order
    assert data != encode({"t": "reply", "ok": True, "why": ""})
    assert decode_stage_frame(data, max_size=4096) == StageReply(True)


def test_stage_frames_with_other_fields_or_shapes_are_decode_errors() -> None:
    signed = sign_message(key(1), route())
    fwd = {"t": "fwd", "to": J2, "from": J1, "seq": 0, "n": 5, "o": output().to_bytes()}
    bad = [
        {"t": "route", "m": signed.to_bytes(), "extra": 1},
        {**fwd, "extra": 1},
        {"t": "x", "x": {}, "extra": 1},
        {"t": "reply", "ok": True, "why": "", "extra": 1},
        {"t": "other", "x": {}},
        {"t": "other", "ok": True, "why": ""},
        {**fwd, "t": "other"},
        {"t": "other", "m": signed.to_bytes()},
    ]
    for frame in bad:
        with pytest.raises(ProtocolError):
            decode_stage_frame(encode(frame), max_size=4096)
    for shape in ([1, 2], "route", 5):
        with pytest.raises(DecodeError):
            decode_stage_frame(encode(shape), max_size=4096)
    assert decode_stage_frame(encode({"t": "x", "x": {}}), max_size=4096) == StagePayload({})
    assert isinstance(decode_stage_frame(encode(fwd), max_size=4096), StageForward)
    assert REQ and E1  # the fixture's parties


# --- take-overs and referee attribution (#18's newest rules) -----------------------------------


def test_unusable_reported_outputs_before_good_ones_do_not_hide_them() -> None:
    """answered_downstream skips each unusable signed output and reads on: the next stage's
    executor cannot hide the jobs the dead one forwarded by reporting junk first."""
    good = outs(2)
    forged = Signed(
        message=dataclasses.replace(good[0].message, output_digest=b"x" * 32),
        envelope=good[0].envelope,
    )
    for junk in (forged, output(signer=3, seq=2, to_seq=2), outs(2, to_job=J3)[0]):
        assert answered([junk, *good]) == [2]
    assert answered([output(seq=2, to_seq=3), *good]) == [2]


def test_a_reply_reports_up_to_64_signed_outputs_and_keeps_its_why() -> None:
    taken = tuple(output(seq=n, to_seq=n) for n in range(MAX_TAKEN))
    reply = StageReply(False, "no", taken=taken)
    back = decode_stage_frame(encode_stage_frame(reply), max_size=STAGE_REPLY_MAX)
    assert isinstance(back, StageReply) and back.why == "no" and len(back.taken) == MAX_TAKEN
    with pytest.raises(ValidationError):
        StageReply(True, taken=(*taken, output(seq=99, to_seq=99)))
    with pytest.raises(ValidationError):  # a tuple, not a list
        StageReply(True, taken=list(taken[:1]))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):  # signed outputs only
        StageReply(True, taken=(sign_message(key(1), route()),))  # type: ignore[arg-type]
    for k in ([5], [output().to_bytes()] * (MAX_TAKEN + 1)):
        with pytest.raises(ProtocolError):
            decode_stage_frame(
                encode({"t": "reply", "ok": True, "why": "", "k": k}), max_size=STAGE_REPLY_MAX
            )


def test_a_dispute_gives_per_job_digests_on_both_sides_or_on_neither() -> None:
    s = single()
    check_stage_dispute(s, D)
    for ins, outs_ in (((), (D,)), ((INS[0],), ())):
        with pytest.raises(AttributionError):
            check_stage_dispute(StageDispute(s.output, s.commitment, ins, outs_), D)


def test_a_verdict_by_a_party_does_not_stop_the_count() -> None:
    d = dispute()
    c = d.commitment
    panel = RefereePanel(job_id=J1, members=(*REFEREES[:2], PRODUCER))
    assert stage_fraud(d, D, [verdict(2, c), verdict(10, c), verdict(11, c)], panel) is not None
