"""`edgeswarm infer --bootstrap ...` against `edgeswarm run` peers: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import trio

from edge_models.registry import Registry
from peer.local_swarm import local_swarm, peer_args
from tests.models import tiny_add_model

CLI = [sys.executable, "-m", "peer.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
for _var in ("EDGESWARM_BOOTSTRAP", "EDGESWARM_LISTEN", "EDGESWARM_PRICE", "EDGESWARM_DATA_DIR"):
    ENV.pop(_var, None)
LOCAL = "/ip4/127.0.0.1/tcp/0"


async def cli(*args: str, limit: float = 90) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(limit):
        # A wide bid window: the cheapest peer's bid must make it even on a loaded box.
        env = {**ENV, "EDGESWARM_BID_WINDOW": "0.5"}
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, env=env
        )


async def test_infer_runs_a_job_on_the_cheapest_run_peer(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32)
    y = np.full(6, 0.5, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL)
        cid = ""
        for i, price in enumerate(("3", "1.25", "2")):
            registry = Registry(tmp_path / "swarm" / f"p{i}" / "models")
            cid = registry.add_file(tiny_add_model(tmp_path / "tiny.onnx"), "tiny_add").cid
            await swarm.start(f"p{i}", *peer_args([boot.address]), env={"EDGESWARM_PRICE": price})
        common = [
            "--bootstrap",
            boot.address,
            "--input",
            f"x={tmp_path / 'x.npy'}",
            "--input",
            f"y={tmp_path / 'y.npy'}",
            "--data-dir",
            str(tmp_path / "req"),
        ]
        out = tmp_path / "out"
        done = await cli("infer", cid, *common, "--output-dir", str(out), "--json")
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        report = json.loads(done.stdout)
        np.testing.assert_array_equal(np.load(report["outputs"]["z"]), x + y)
        assert report["price"] == 1_250_000
        assert report["receipt"]["executor"] == report["executor"]
        assert report["receipt"]["count"] == 1
        assert report["latency_ms"] > 0
        # 1.25 credits is over a fresh identity's 1-credit limit: honest "pending", no wait.
        assert report["payment"].startswith("pending: 1.25 credits is over")
        p1 = next(p for p in swarm.processes if p.name == "p1")
        assert report["executor"] == p1.peer_id

        # By name (resolved through the ads), human output.
        done = await cli("infer", "tiny_add", *common, "--output-dir", str(tmp_path / "out2"))
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        text = done.stdout.decode()
        assert "receipt " in text and p1.peer_id in text
        np.testing.assert_array_equal(np.load(tmp_path / "out2" / "z.npy"), x + y)

        # A model nobody serves: one line, non-zero exit, no traceback.
        done = await cli("infer", "no_such_model", *common, "--deadline", "5")
        err = done.stderr.decode()
        assert done.returncode != 0
        assert "Traceback" not in err
        assert "no peer serves a model named 'no_such_model'" in err
        assert len([line for line in err.splitlines() if line.startswith("edgeswarm:")]) == 1
