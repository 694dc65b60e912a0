"""`edgeswarm models split` then `edgeswarm infer PIPELINE_CID --bootstrap ...` against two
`edgeswarm run` peers that each hold one stage: real processes on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_models.registry import Registry
from peer.local_swarm import local_swarm, peer_args
from tests.system.test_infer_cli import LOCAL, cli


def mlp(path: Path) -> Path:
    rng = np.random.default_rng(5)
    vi = helper.make_tensor_value_info
    nodes, inits, prev = [], [], "x"
    for i in range(2):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), f"w{i}")
        )
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        prev = "y" if i == 1 else f"h{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [prev]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [vi("x", TensorProto.FLOAT, ["n", 6])],
        [vi("y", TensorProto.FLOAT, ["n", 6])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


async def test_infer_runs_a_pipeline_across_two_run_peers(tmp_path: Path) -> None:
    src = mlp(tmp_path / "mlp.onnx")
    req = tmp_path / "req"
    added = await cli("models", "add", str(src), "--data-dir", str(req))
    assert added.returncode == 0, added.stderr.decode()
    done = await cli(
        "models", "split", "mlp", "--stages", "2", "--out", str(tmp_path / "split"),
        "--json", "--data-dir", str(req),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    split = json.loads(done.stdout)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL)
        for i, stage in enumerate(split["stages"]):
            Registry(tmp_path / "swarm" / f"s{i}" / "models").add_file(Path(stage["path"]))
            await swarm.start(f"s{i}", *peer_args([boot.address]))
        done = await cli(
            "infer", split["pipeline"], "--bootstrap", boot.address,
            "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "out"),
            "--json", "--data-dir", str(req),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        report = json.loads(done.stdout)
        text = await cli(
            "infer", split["pipeline"][:12], "--bootstrap", boot.address,
            "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "out2"),
            "--data-dir", str(req),
        )  # fmt: skip
        assert text.returncode == 0, text.stderr.decode()[-3000:]
        lines = text.stdout.decode().splitlines()
        assert lines[0].startswith(f"ran pipeline {split['pipeline'][:12]} in 2 stages"), lines
        assert lines[1].startswith("  stage 1 ") and lines[2].startswith("  stage 2 "), lines
    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(report["outputs"]["y"]), want, atol=1e-5)
    assert report["pipeline"]["cid"] == split["pipeline"]
    stages = report["pipeline"]["stages"]
    assert [s["model_cid"] for s in stages] == [s["cid"] for s in split["stages"]]
    holders = {p.name: p.peer_id for p in swarm.processes}
    assert [s["executor"] for s in stages] == [holders["s0"], holders["s1"]]
    assert all(s["receipt"] for s in stages)
