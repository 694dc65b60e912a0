"""`edgeswarm models split` / `models add manifest.json` / `models list`, as a user runs them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.system.test_models_cli import edgeswarm, error_line, ok, tiny_add


def test_split_json_registers_stages_and_the_pipeline(tmp_path: Path) -> None:
    data = tmp_path / "peer"
    ok(edgeswarm("models", "add", "--packaged", "minilm", data_dir=data))
    out = tmp_path / "stages"
    got = json.loads(
        ok(
            edgeswarm(
                "models", "split", "minilm", "--stages", "2", "--out", out, "--json", data_dir=data
            )
        )
    )
    assert set(got) == {"pipeline", "manifest", "stages", "crossing_bytes"}
    manifest = Path(got["manifest"]).read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == got["pipeline"]
    assert len(got["stages"]) == 2 and len(got["crossing_bytes"]) == 1
    for stage in got["stages"]:
        assert hashlib.sha256(Path(stage["path"]).read_bytes()).hexdigest() == stage["cid"]
    listed = json.loads(ok(edgeswarm("models", "list", "--json", data_dir=data)))
    pipes = [e for e in listed if e.get("kind") == "pipeline"]
    assert [p["cid"] for p in pipes] == [got["pipeline"]]
    assert pipes[0]["stages"] == [s["cid"] for s in got["stages"]]
    models = {e["cid"] for e in listed if "kind" not in e}
    assert {s["cid"] for s in got["stages"]} <= models
    assert "pipeline of 2 stages" in ok(edgeswarm("models", "list", data_dir=data))

    # Another peer registers the same pipeline from the manifest alone.
    other = tmp_path / "other"
    added = json.loads(ok(edgeswarm("models", "add", got["manifest"], "--json", data_dir=other)))
    assert added["cid"] == got["pipeline"] and added["kind"] == "pipeline"


def test_split_errors_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "peer"
    ok(edgeswarm("models", "add", tiny_add(tmp_path / "add.onnx"), data_dir=data))
    line = error_line(edgeswarm("models", "split", "add", "--stages", "2", data_dir=data), 1)
    assert "too small" in line
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "edgeswarm-pipeline/1"}')
    assert "not a pipeline manifest" in error_line(
        edgeswarm("models", "add", bad, data_dir=data), 1
    )
