"""Pipeline manifests (canonical, self-consistent) and the chain rule over stage commitments."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import DecodeError, ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.pipeline import (
    ChainError,
    CrossingTensor,
    Cut,
    LocalRun,
    PipelineManifest,
    Stage,
    check_chain,
    choose_placement,
)
from protocols.receipt import ResultCommitment, content_digest


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
