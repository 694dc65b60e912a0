"""Tiny ONNX graphs for tests, built with onnx.helper (no files checked in).

Import as ``from tests.models import tiny_add_model`` (pytest puts the
repository root on sys.path: ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime >= 1.14


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _model(graph: onnx.GraphProto, *, opset: int = OPSET, **kw: object) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION, **kw
    )
    return model


def add_model_proto(
    dim: int | str = "n", dtype: int = TensorProto.FLOAT, name: str = "tiny_add"
) -> onnx.ModelProto:
    """z = x + y, both inputs of shape [dim] (symbolic by default)."""
    x = helper.make_tensor_value_info("x", dtype, [dim])
    y = helper.make_tensor_value_info("y", dtype, [dim])
    z = helper.make_tensor_value_info("z", dtype, [dim])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], name, [x, y], [z])
    return _model(graph)


def tiny_add_model(path: Path, dim: int | str = "n", dtype: int = TensorProto.FLOAT) -> Path:
    """Write z = x + y (float32, shape [n]) to ``path``."""
    return _save(add_model_proto(dim, dtype), path)


def tiny_matmul_model(path: Path, k: int = 4, m: int = 3, seed: int = 0) -> Path:
    """y = x @ W + b with x: [batch, k] float32 and fixed random W: [k, m], b: [m]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((k, m)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", m])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny_matmul", [x], [y], initializer=[w, b])
    return _save(_model(graph), path)


def tiny_padded_model(path: Path, pad_bytes: int, seed: int = 0) -> Path:
    """z = x + y plus an unused initializer of ``pad_bytes`` random bytes.

    Different seeds give different files (different cids), and the size is
    controllable, for cache-budget tests.
    """
    rng = np.random.default_rng(seed)
    blob = numpy_helper.from_array(
        rng.integers(0, 255, size=max(pad_bytes, 1), dtype=np.uint8), "pad"
    )
    model = add_model_proto()
    model.graph.initializer.append(blob)
    return _save(model, path)


def slow_loop_model(path: Path) -> Path:
    """y = x after ``iters`` (an int64 scalar input) iterations of a Loop.

    With a large ``iters`` it runs for as long as you like, and it checks the
    terminate flag between iterations, so it can test timeouts without sleeps.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    iters = helper.make_tensor_value_info("iters", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Sin", ["v_in"], ["s"]),
            helper.make_node("Cos", ["s"], ["c"]),
            helper.make_node("Add", ["v_in", "c"], ["t"]),
            helper.make_node("Sub", ["t", "c"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4]),
        ],
    )
    true = numpy_helper.from_array(np.array(True), "true")
    nodes = [helper.make_node("Loop", ["iters", "true", "x"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "slow_loop", [x, iters], [y], initializer=[true])
    return _save(_model(graph), path)


def custom_domain_model(path: Path, domain: str = "com.example.custom") -> Path:
    """A graph with one node from a custom-op domain (needs native code: rejected)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Mystery", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "custom", [x], [y])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(domain, 1)],
        ir_version=IR_VERSION,
    )
    return _save(model, path)


def external_data_model(path: Path) -> Path:
    """y = x + W where W is stored in an external file next to ``path`` (rejected)."""
    path = Path(path)
    w = numpy_helper.from_array(np.ones(1024, dtype=np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "ext", [x], [y], initializer=[w]
    )
    model = _model(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def all_dtypes_model(path: Path) -> Path:
    """One Identity per numpy-representable ONNX type: input ``in_<t>`` -> output ``out_<t>``."""
    types = {
        "bool": TensorProto.BOOL,
        "int8": TensorProto.INT8,
        "int16": TensorProto.INT16,
        "int32": TensorProto.INT32,
        "int64": TensorProto.INT64,
        "uint8": TensorProto.UINT8,
        "uint16": TensorProto.UINT16,
        "uint32": TensorProto.UINT32,
        "uint64": TensorProto.UINT64,
        "float16": TensorProto.FLOAT16,
        "float32": TensorProto.FLOAT,
        "float64": TensorProto.DOUBLE,
    }
    inputs = [helper.make_tensor_value_info(f"in_{n}", t, ["n"]) for n, t in types.items()]
    outputs = [helper.make_tensor_value_info(f"out_{n}", t, ["n"]) for n, t in types.items()]
    nodes = [helper.make_node("Identity", [f"in_{n}"], [f"out_{n}"]) for n in types]
    graph = helper.make_graph(nodes, "all_dtypes", inputs, outputs)
    return _save(_model(graph), path)


def tiny_reshape_model(path: Path) -> Path:
    """y = Reshape(x, shape): fails at run time when ``shape`` does not fit ``x``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "tiny_reshape", [x, shape], [y]
    )
    return _save(_model(graph), path)


def sequence_input_model(path: Path) -> Path:
    """A model whose input is a sequence of tensors (not supported: rejected)."""
    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    pos = numpy_helper.from_array(np.array(0, dtype=np.int64), "pos")
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["xs", "pos"], ["y"])],
        "seq",
        [seq],
        [y],
        initializer=[pos],
    )
    return _save(_model(graph), path)


def broken_graph_model(path: Path) -> Path:
    """Parses as ONNX but fails the checker: a node reads a value nobody produces."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "ghost"], ["y"])], "broken", [x], [y])
    return _save(_model(graph), path)


TEXT_LABELS = {"cat": 1, "dog": 2}  # tiny_text_model's LabelEncoder (others -> 0)


def tiny_text_model(path: Path) -> Path:
    """A string-tensor model: ``text`` (string [n]) -> ``shout`` = text + "!" (string [n],
    StringConcat) and ``label`` (int64 [n], ai.onnx.ml LabelEncoder over TEXT_LABELS)."""
    text = helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])
    shout = helper.make_tensor_value_info("shout", TensorProto.STRING, ["n"])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])
    bang = helper.make_tensor("bang", TensorProto.STRING, [], [b"!"])
    nodes = [
        helper.make_node("StringConcat", ["text", "bang"], ["shout"]),
        helper.make_node(
            "LabelEncoder",
            ["text"],
            ["label"],
            domain="ai.onnx.ml",
            keys_strings=list(TEXT_LABELS),
            values_int64s=list(TEXT_LABELS.values()),
            default_int64=0,
        ),
    ]
    graph = helper.make_graph(nodes, "tiny_text", [text], [shout, label], initializer=[bang])
    model = helper.make_model(
        graph,
        # StringConcat is ONNX opset 20 (IR 9, onnxruntime >= 1.17).
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("ai.onnx.ml", 3)],
        ir_version=9,
    )
    return _save(model, path)
