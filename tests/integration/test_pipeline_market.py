"""A pipeline across peers that each hold one stage: intermediates go executor to executor,
chained receipts, a stage executor killed mid-job re-run elsewhere (its input forwarded again),
a failed forward routed through the requester, a forward from a peer the requester did not name
refused, and a chain check that catches a stage run on other inputs."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import trio
from http_swarm import http_swarm
from market_swarm import Node, Swarm, market_swarm
from onnx import TensorProto, helper, numpy_helper
from test_market import wait_providers

from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from edge_models.split import plan_split, write_split
from peer.market import pipeline as pipeline_mod
from peer.market.pipeline import PipelineResult, pipeline_lease
from protocols.pipeline import ChainError, PipelineManifest, StageRoute
from protocols.receipt import batch_digest, content_digest
from protocols.tensor import encode_tensors


def mlp(path: Path) -> Path:
    """x[n, 8] -> 3 x (MatMul + Relu) -> y[n, 8]: three stages, one matrix each."""
    rng = np.random.default_rng(3)
    vi = helper.make_tensor_value_info
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == 2 else f"h{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [vi("x", TensorProto.FLOAT, ["n", 8])],
        [vi("y", TensorProto.FLOAT, ["n", 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


async def test_a_single_node_that_beats_the_split_runs_the_whole_model(tmp_path: Path) -> None:
    """Every stage has a holder, but one peer serves the whole model: with one market hop
    instead of three, the whole model wins the estimate and runs there, unsplit."""
    src, manifest, stages = split_mlp(tmp_path)
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    async with market_swarm(tmp_path) as swarm:
        await start_stage_peers(swarm, tmp_path, stages)
        hold(tmp_path / "whole", src)
        whole = await swarm.start("whole", price=5.0)
        req = await start_requester(swarm, tmp_path, manifest)
        for cid in [manifest.model, *(s.cid for s in manifest.stages)]:
            await wait_providers(req, cid, 1)
        with trio.fail_after(60):
            result = await req.market.infer(manifest.cid, {"x": x}, deadline=30)
        assert isinstance(result, PipelineResult)
        assert result.stages == [] and result.executor == whole.peer_id
        assert result.placement.startswith("whole"), result.placement
        assert result.receipts == [result.receipt] and result.receipt is not None
        assert result.receipt.model_cid == manifest.model
        np.testing.assert_allclose(result.outputs["y"], full_model(src, x), atol=1e-5)
        assert result.to_dict()["pipeline"]["split"] is False


def split_mlp(tmp_path: Path) -> tuple[Path, PipelineManifest, list[Path]]:
    src = mlp(tmp_path / "mlp.onnx")
    full_cid = Registry(tmp_path / "scratch").add_file(src).cid
    files = write_split(plan_split(onnx.load(str(src)), 3), full_cid, tmp_path / "split")
    return src, files.manifest, list(files.stage_paths)


def wire_of(**arrays: np.ndarray) -> Any:
    return encode_tensors(arrays)


def hold(data_dir: Path, *paths: Path) -> None:
    registry = Registry(data_dir / "models")
    for p in paths:
        registry.add_file(p)


class BlockingRuntime:
    """Holds every run after the first ``after`` until released: the stage executor is busy
    when the test kills it."""

    def __init__(self, inner: ModelRuntime, after: int = 0) -> None:
        self.inner = inner
        self.after = after
        self.runs = 0
        self.registry = inner.registry
        self.started = trio.Event()
        self.release = threading.Event()
        self._token = trio.lowlevel.current_trio_token()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, ref: str, inputs: Any, timeout: float | None = None) -> Any:
        self.runs += 1
        if self.runs > self.after:
            trio.from_thread.run_sync(self.started.set, trio_token=self._token)
            self.release.wait(timeout=30)
        return self.inner.run(ref, inputs, timeout=timeout)


def blockers(after: int = 0) -> tuple[list[BlockingRuntime], Any]:
    """The wrapped runtimes (filled as peers start) and the wrapper to start a peer with."""
    blocking: list[BlockingRuntime] = []

    def wrap(rt: ModelRuntime) -> BlockingRuntime:
        blocking.append(BlockingRuntime(rt, after))
        return blocking[-1]

    return blocking, wrap


async def start_stage_peers(
    swarm: Swarm, tmp_path: Path, stages: list[Path], *, wrap_last: Any = None, wrap: int = -1
) -> list[Node]:
    """One peer per stage; ``wrap_last`` wraps the runtime of stage ``wrap`` (default: last)."""
    nodes = []
    wrap = wrap % len(stages)
    for i, path in enumerate(stages):
        name = f"stage{i + 1}"
        hold(tmp_path / name, path)
        kw = {"wrap_runtime": wrap_last} if wrap_last and i == wrap else {}
        nodes.append(await swarm.start(name, price=1.0 + i, **kw))
    return nodes


async def start_requester(swarm: Swarm, tmp_path: Path, manifest: PipelineManifest) -> Node:
    Registry(tmp_path / "req" / "models").pipelines.add(manifest.to_bytes(), source="test")
    return await swarm.start("req", serve=False)


def full_model(src: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


async def test_a_pipeline_runs_across_peers_that_each_hold_one_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed, then streamed with stage 3 spot-checked: the cut into it goes through the
    requester, which has stage 3 run again on a dearer second holder (the check needs its
    inputs); the other cut still streams."""
    src, manifest, stages = split_mlp(tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    async with market_swarm(tmp_path) as swarm:
        nodes = await start_stage_peers(swarm, tmp_path, stages)
        req = await start_requester(swarm, tmp_path, manifest)
        for stage in manifest.stages:
            await wait_providers(req, stage.cid, 1)
        with trio.fail_after(60):
            result = await req.market.infer(manifest.cid, {"x": x}, deadline=30)
        assert isinstance(result, PipelineResult)
        np.testing.assert_allclose(result.outputs["y"], full_model(src, x), atol=1e-5)
        # Each stage ran where it is held, and each has its own receipt.
        assert [s.executor for s in result.stages] == [n.peer_id for n in nodes]
        assert result.price == sum(s.price for s in result.stages) == 6_000_000
        receipts = result.receipts
        for r in receipts:
            r.verify()
        # The receipts chain: stage i+1's input digest is stage i's output digest.
        cs = [r.commitment.message for r in receipts]
        assert cs[0].input_digest == content_digest(wire_of(x=x))
        assert cs[1].input_digest == cs[0].output_digest
        assert cs[2].input_digest == cs[1].output_digest
        assert [c.model_cid for c in cs] == [s.cid for s in manifest.stages]
        assert result.to_dict()["pipeline"]["cid"] == manifest.cid
        # Nobody serves the whole model; a DHT slowed by load may not say so within the
        # placement budget, which is reported as such (both run split).
        assert result.placement in {
            "no single peer serves the whole model",
            "no answer in time about the whole model",
        }, result.placement
        # Streamed: both intermediates went executor to executor, never through us.
        assert result.forwarded == 2 and result.to_dict()["pipeline"]["forwarded"] == 2
        assert [s.wire is None for s in result.stages] == [True, True, False]
        assert [n.market.links.forwards for n in nodes] == [1, 1, 0]

        # Spot checks on, a second holder of stage 3 for the second opinion, and the sampler
        # picks stage 3 only (drawn per stage, in order).
        hold(tmp_path / "second3", stages[2])
        second = await swarm.start("second3", price=9.0)
        await wait_providers(req, manifest.stages[2].cid, 2)
        picks = iter([False, False, True])
        monkeypatch.setattr(req.market.checker.sampler, "want", lambda p, **kw: next(picks))
        with trio.fail_after(60):
            checked = await req.market.infer(manifest.cid, {"x": x}, deadline=30, spot_check=1.0)
        assert isinstance(checked, PipelineResult)
        np.testing.assert_allclose(checked.outputs["y"], full_model(src, x), atol=1e-5)
        s1, s2, s3 = checked.stages
        assert (s1.spot_check, s2.spot_check, s3.spot_check) == (None, None, "agree")
        holders = {nodes[2].peer_id, second.peer_id}
        assert s3.executor in holders  # the checked executor's result stands
        # Cut 1 still streamed; cut 2 (into the checked stage) came through the requester.
        assert checked.forwarded == 1
        assert s1.wire is None and s2.wire is not None
        cs = [r.commitment.message for r in checked.receipts]
        assert cs[1].input_digest == cs[0].output_digest
        assert cs[2].input_digest == cs[1].output_digest == content_digest(s2.wire)
        # The second opinion ran stage 3 on the same inputs, on the other holder, and was paid.
        booked = [r.commitment.message for r in req.market.receipts.receipts]
        stage3 = [c.executor for c in booked if c.model_cid == manifest.stages[2].cid]
        assert len(stage3) == 3 and set(stage3[1:]) == holders, stage3


async def test_a_stage_executor_killed_mid_job_only_that_stage_reruns(tmp_path: Path) -> None:
    src, manifest, stages = split_mlp(tmp_path)
    blocking, wrap = blockers()

    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    async with market_swarm(tmp_path) as swarm:
        try:
            nodes = await start_stage_peers(swarm, tmp_path, stages, wrap_last=wrap)
            # A dearer second holder of stage 3: the job moves there when the first dies.
            hold(tmp_path / "backup3", stages[2])
            backup = await swarm.start("backup3", price=9.0)
            req = await start_requester(swarm, tmp_path, manifest)
            await wait_providers(req, manifest.stages[2].cid, 2)
            for stage in manifest.stages[:2]:
                await wait_providers(req, stage.cid, 1)
            results: list[Any] = []

            async def ask() -> None:
                results.append(
                    await req.market.infer(manifest.cid, {"x": x}, deadline=30, bid_window=0.5)
                )

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    await blocking[0].started.wait()  # stage 3's cheap executor is running it
                    links2 = nodes[1].market.links
                    while links2.forwards < 1:  # bounded by fail_after: its forward was taken
                        await links2.forwarded.wait()
                    await swarm.kill("stage3")
            (result,) = results
            np.testing.assert_allclose(result.outputs["y"], full_model(src, x), atol=1e-5)
            s1, s2, s3 = result.stages
            assert (s1.attempts, s2.attempts) == ([], [])  # stages 1 and 2 ran once
            assert [ex for ex, _ in s3.attempts] == [nodes[2].peer_id]
            assert s3.executor == backup.peer_id
            assert len(req.market.receipts.receipts) == 3  # one per stage, none twice
            # Stage 2's executor forwarded its held outputs again, to the backup.
            assert result.forwarded == 2 and nodes[1].market.links.forwards == 2
        finally:
            for b in blocking:
                b.release.set()


async def test_the_chain_check_catches_a_stage_run_on_other_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 2 is handed other inputs than stage 1 produced (what a dishonest relay of
    intermediates could do once they skip the requester): every stage's own receipt is
    valid, and only the chain check refuses the result."""
    _, manifest, stages = split_mlp(tmp_path)
    x = np.ones((1, 8), np.float32)
    async with market_swarm(tmp_path) as swarm:
        await start_stage_peers(swarm, tmp_path, stages)
        req = await start_requester(swarm, tmp_path, manifest)
        for stage in manifest.stages:
            await wait_providers(req, stage.cid, 1)
        auctions = req.market.auctions
        real = auctions.one_job

        async def tampered(spec: Any, wire: Any, **kw: Any) -> Any:
            if spec.cid == manifest.stages[1].cid:
                cut = manifest.cuts[0].names[0]
                wire = wire_of(**{cut: np.full((1, 8), 7.0, np.float32)})
            return await real(spec, wire, **kw)

        monkeypatch.setattr(auctions, "one_job", tampered)
        monkeypatch.setattr(pipeline_mod, "STREAM", False)  # intermediates via the requester
        with trio.fail_after(60), pytest.raises(ChainError, match="stage 2 committed to other"):
            await req.market.infer(manifest.cid, {"x": x}, deadline=30)


async def test_a_failed_forward_goes_through_the_requester_and_reruns_only_the_next_stage(
    tmp_path: Path,
) -> None:
    """Stage 3's executor dies while stage 2 runs: stage 2 cannot forward, so its outputs come
    back to the requester, which sends them to stage 3's backup; stages 1 and 2 ran once."""
    src, manifest, stages = split_mlp(tmp_path)
    blocking, wrap = blockers()

    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    async with market_swarm(tmp_path) as swarm:
        try:
            nodes = await start_stage_peers(swarm, tmp_path, stages, wrap_last=wrap, wrap=1)
            hold(tmp_path / "backup3", stages[2])
            backup = await swarm.start("backup3", price=9.0)
            req = await start_requester(swarm, tmp_path, manifest)
            await wait_providers(req, manifest.stages[2].cid, 2)
            for stage in manifest.stages[:2]:
                await wait_providers(req, stage.cid, 1)
            results: list[Any] = []

            async def ask() -> None:
                results.append(
                    await req.market.infer(manifest.cid, {"x": x}, deadline=30, bid_window=0.5)
                )

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    await blocking[0].started.wait()  # stage 2 runs, routed to stage3
                    await swarm.kill("stage3")
                    blocking[0].release.set()
            (result,) = results
            np.testing.assert_allclose(result.outputs["y"], full_model(src, x), atol=1e-5)
            s1, s2, s3 = result.stages
            assert (s1.attempts, s2.attempts) == ([], [])
            assert [ex for ex, _ in s3.attempts] == [nodes[2].peer_id]
            assert s3.executor == backup.peer_id
            assert result.forwarded == 1  # cut 1 streamed; cut 2 came back to us
            assert s1.wire is None and s2.wire is not None
            assert len(req.market.receipts.receipts) == 3
            cs = [r.commitment.message for r in result.receipts]
            assert cs[2].input_digest == cs[1].output_digest == content_digest(s2.wire)
        finally:
            for b in blocking:
                b.release.set()


async def test_a_stage_takes_forwarded_inputs_only_from_the_executor_the_requester_named(
    tmp_path: Path,
) -> None:
    """While stage 1 runs, another peer forwards made-up inputs to stage 2's executor for its
    job: refused before the payload is read (the stream's remote peer is not the upstream
    the requester's route names); the pipeline then completes on stage 1's real outputs."""
    src, manifest, stages = split_mlp(tmp_path)
    blocking, wrap = blockers()

    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    async with market_swarm(tmp_path) as swarm:
        try:
            nodes = await start_stage_peers(swarm, tmp_path, stages, wrap_last=wrap, wrap=0)
            rogue = await swarm.start("rogue", serve=False)
            req = await start_requester(swarm, tmp_path, manifest)
            for stage in manifest.stages:
                await wait_providers(req, stage.cid, 1)
            results: list[Any] = []

            async def ask() -> None:
                results.append(await req.market.infer(manifest.cid, {"x": x}, deadline=30))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    await blocking[0].started.wait()  # stage 1 runs; stages 2, 3 are routed
                    ex2 = nodes[1].market.executor
                    assert ex2 is not None
                    (session,) = ex2.sessions.values()
                    await session.route_set.wait()
                    route = session.route
                    assert route is not None and route.upstream == nodes[0].peer_id
                    # The rogue claims to be stage 1 (right job ids, its own peer id).
                    fake = StageRoute(
                        job_id=route.upstream_job,
                        requester=req.peer_id,
                        executor=rogue.peer_id,
                        upstream="",
                        upstream_job=b"",
                        downstream=nodes[1].peer_id,
                        downstream_job=route.job_id,
                        expires=route.expires,
                    )
                    bad = wire_of(**{manifest.cuts[0].names[0]: np.full((2, 8), 9.0, np.float32)})
                    why = await rogue.market.links._send_forward(
                        fake, 0, bad, route.expires, rogue.market.key
                    )
                    assert "refused the forward" in why and "requester named" in why, why
                    assert session.inputs == {} and session.running == 0
                    blocking[0].release.set()
            (result,) = results
            np.testing.assert_allclose(result.outputs["y"], full_model(src, x), atol=1e-5)
            assert result.forwarded == 2
            assert any("requester named" in w for w in nodes[1].market.links.refused)
        finally:
            for b in blocking:
                b.release.set()


async def test_the_http_front_door_runs_a_pipeline_by_name(tmp_path: Path) -> None:
    """``POST /v2/models/PIPELINE/infer`` on a peer that holds only the manifest: the stages
    run (streamed) on the peers that hold them, and the answer is the full model's."""
    src, manifest, stages = split_mlp(tmp_path)
    Registry(tmp_path / "door" / "models").pipelines.add(manifest.to_bytes(), source="test")
    x = np.random.default_rng(7).standard_normal((2, 8)).astype(np.float32)
    async with http_swarm(tmp_path, door_models=False) as door, door.client() as client:
        nodes = await start_stage_peers(door.swarm, tmp_path, stages)
        for stage in manifest.stages:
            await wait_providers(SimpleNamespace(peer=door.peer), stage.cid, 1)  # type: ignore[arg-type]
        body = {
            "inputs": [
                {"name": "x", "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        with trio.fail_after(90):
            r = await client.post(
                f"/v2/models/{manifest.cid[:16]}/infer", json=body, headers=door.auth
            )
        assert r.status_code == 200, r.text
        (out,) = r.json()["outputs"]
        assert out["name"] == "y" and out["shape"] == [2, 8]
        y = np.asarray(out["data"], np.float32).reshape(2, 8)
        np.testing.assert_allclose(y, full_model(src, x), atol=1e-5)
        params = r.json()["parameters"]
        assert params["executor"] == nodes[2].peer_id  # the last stage's executor answers
        assert params["price"] == 6_000_000  # every stage paid: 1 + 2 + 3 credits
        # A pipeline name nobody registered is a plain 404, one line.
        r = await client.post("/v2/models/no_such_pipeline/infer", json=body, headers=door.auth)
        assert r.status_code == 404 and "\n" not in r.json()["error"]


async def test_a_lease_over_a_pipeline_keeps_micro_batches_in_flight(tmp_path: Path) -> None:
    """One lease per stage, 6 micro-batches with 3 in flight: every output equals the full
    model's, every intermediate went executor to executor, and each stage's one batch
    receipt covers the 6 jobs and chains to the next (batch digests)."""
    src, manifest, stages = split_mlp(tmp_path)
    xs = [
        np.random.default_rng(10 + i).standard_normal((2, 8)).astype(np.float32) for i in range(6)
    ]
    async with market_swarm(tmp_path) as swarm:
        nodes = await start_stage_peers(swarm, tmp_path, stages)
        req = await start_requester(swarm, tmp_path, manifest)
        for stage in manifest.stages:
            await wait_providers(req, stage.cid, 1)
        got = []
        with trio.fail_after(90):
            async with pipeline_lease(req.market, manifest.cid, {"x": xs[0]}, seconds=60) as pl:
                async for out in pl.map([{"x": x} for x in xs], window=3):
                    got.append(out["y"])
        for x, y in zip(xs, got, strict=True):
            np.testing.assert_allclose(y, full_model(src, x), atol=1e-5)
        assert [n.market.links.forwards for n in nodes] == [6, 6, 0]
        cs = [r.commitment.message for r in pl.receipts]
        assert [c.count for c in cs] == [6, 6, 6]
        assert [c.executor for c in cs] == [n.peer_id for n in nodes]
        assert cs[0].input_digest == batch_digest([content_digest(wire_of(x=x)) for x in xs])
        assert cs[1].input_digest == cs[0].output_digest
        assert cs[2].input_digest == cs[1].output_digest
        assert len(req.market.receipts.receipts) == 3


async def test_a_stage_executor_killed_mid_lease_is_taken_over_and_streaming_goes_on(
    tmp_path: Path,
) -> None:
    """Stage 2's executor dies while it runs the lease's third job (jobs 0 and 1 went on to
    stage 3): its backup takes over from job 2 (its seq 0), stage 1's executor forwards its
    held outputs of jobs 2.. to it again (seq shift 2) and stage 3 takes the backup's (shift
    -2). Streaming goes on: every output equals the full model's, in order, each job is
    answered once, stages 1 and 3 run each job once, and no job is paid twice at stage 2
    (``check_lease_chain`` at ``aclose``)."""
    src, manifest, stages = split_mlp(tmp_path)
    blocking, wrap = blockers(after=2)
    xs = [
        np.random.default_rng(20 + i).standard_normal((2, 8)).astype(np.float32) for i in range(6)
    ]
    async with market_swarm(tmp_path) as swarm:
        try:
            nodes = await start_stage_peers(swarm, tmp_path, stages, wrap_last=wrap, wrap=1)
            hold(tmp_path / "backup2", stages[1])
            backup = await swarm.start("backup2", price=9.0)
            req = await start_requester(swarm, tmp_path, manifest)
            await wait_providers(req, manifest.stages[1].cid, 2)
            for stage in (manifest.stages[0], manifest.stages[2]):
                await wait_providers(req, stage.cid, 1)
            got: list[np.ndarray] = []

            async def kill_when_busy() -> None:
                await blocking[0].started.wait()  # stage 2's cheap executor runs job 2
                links2 = nodes[1].market.links
                while links2.forwards < 2:  # bounded by fail_after: jobs 0, 1 went on
                    await links2.forwarded.wait()
                await swarm.kill("stage2")

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_when_busy)
                    async with pipeline_lease(
                        req.market, manifest.cid, {"x": xs[0]}, seconds=60, bid_window=0.5
                    ) as pl:
                        async for out in pl.map([{"x": x} for x in xs], window=3):
                            got.append(out["y"])
            assert (pl.failure, pl.fallback) == ("", []), pl.failure
            assert len(got) == len(xs)
            for i, (x, y) in enumerate(zip(xs, got, strict=True)):
                assert np.allclose(y, full_model(src, x), atol=1e-5), i
            (moved,) = pl.failovers
            assert moved.startswith("stage 2 from job 2:"), moved
            assert moved.endswith(backup.peer_id)
            cs = [r.commitment.message for r in pl.receipts]
            assert [c.executor for c in cs] == [nodes[0].peer_id, backup.peer_id, nodes[2].peer_id]
            assert [c.count for c in cs] == [6, 4, 6]  # stages 1 and 3 ran each job once
            # What the dead executor was paid for (an accepted interim commitment, if any)
            # lies before job 2; the chain check at aclose proved it disjoint from the rest.
            assert all(g.end <= 2 for g in pl.paid_before[1])
            assert not pl.paid_before[0] and not pl.paid_before[2]
            # Stage 3 holds a signed output for each job it ran: the dead executor's jobs 0, 1
            # as its seqs 0, 1; the backup's seqs 0.. as jobs 2.. (shift -2).
            got_from = {
                (o.message.executor, o.message.seq, o.message.to_seq)
                for o in nodes[2].market.links.received.values()
            }
            dead, b = nodes[1].peer_id, backup.peer_id
            assert got_from == {(dead, 0, 0), (dead, 1, 1), *((b, j - 2, j) for j in range(2, 6))}
            # Whatever stage 1 forwarded to the backup went as job - 2 (the rest came back to
            # us when its forward to the dead executor failed, and we sent it on).
            from_1 = [
                o.message
                for o in backup.market.links.received.values()
                if o.message.executor == nodes[0].peer_id
            ]
            assert all(m.to_seq == m.seq - 2 for m in from_1), from_1
        finally:
            for b in blocking:
                b.release.set()
