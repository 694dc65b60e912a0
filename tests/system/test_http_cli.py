"""`edgeswarm run --http` and the CLI through a running peer's control API: real processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from edge_models.registry import Registry
from peer.local_swarm import local_swarm, peer_args
from tests.models import tiny_add_model, tiny_matmul_model

CLI = [sys.executable, "-m", "peer.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGESWARM_BID_WINDOW": "0.5"}
for _var in ("EDGESWARM_BOOTSTRAP", "EDGESWARM_LISTEN", "EDGESWARM_PRICE", "EDGESWARM_HTTP"):
    ENV.pop(_var, None)
LOCAL = "/ip4/127.0.0.1/tcp/0"


async def cli(*args: str, limit: float = 90) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(limit):
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, env=ENV
        )


def endpoint(data_dir: Path) -> tuple[str, str]:
    url = json.loads((data_dir / "http.json").read_text())["url"]
    return url, (data_dir / "http.token").read_text().strip()


async def jobs_requested(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('edgeswarm_jobs_requested_total{kind="infer"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.timeout(600)
async def test_the_cli_uses_the_running_peer_through_its_control_api(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", x)
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL, "--http", "127.0.0.1:0")
        registry = Registry(tmp_path / "swarm" / "ex" / "models")
        cid = registry.add_file(tiny_add_model(tmp_path / "tiny.onnx"), "tiny_add").cid
        ex = await swarm.start("ex", *peer_args([boot.address]), env={"EDGESWARM_PRICE": "0.5"})
        door = await swarm.start("door", *peer_args([boot.address]), "--http", "127.0.0.1:0")
        url, token = endpoint(door.data_dir)
        assert url.startswith("http://127.0.0.1:")
        assert stat.S_IMODE(os.stat(door.data_dir / "http.token").st_mode) == 0o600
        dd = ["--data-dir", str(door.data_dir)]
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
            # The bootstrap node serves the explorer and metrics too.
            boot_url, _ = endpoint(boot.data_dir)
            async with httpx.AsyncClient(base_url=boot_url, trust_env=False) as b:
                node = (await b.get("/api/node")).json()
                assert node["role"] == "bootstrap" and node["peer_id"] == boot.peer_id
                assert (await b.get("/explorer")).status_code == 200

            # infer: no --bootstrap, no second peer: the running door requests and pays.
            before = await jobs_requested(http)
            done = await cli(
                "infer", "tiny_add", "-i", f"x={tmp_path / 'x.npy'}", "-i",
                f"y={tmp_path / 'y.npy'}", "-o", str(tmp_path / "out"), "--json", *dd,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()[-3000:]
            report = json.loads(done.stdout)
            np.testing.assert_array_equal(np.load(report["outputs"]["z"]), 2 * x)
            assert report["executor"] == ex.peer_id and report["price"] == 500_000
            assert report["receipt"]["requester"] == door.peer_id
            assert report["payment"]  # certified, or pending with the reason
            assert await jobs_requested(http) == before + 1

            # models add / remove through the running peer: served at once, then gone.
            mm = tiny_matmul_model(tmp_path / "mm.onnx")
            done = await cli("models", "add", str(mm), "--name", "mm", "--json", *dd)
            assert done.returncode == 0, done.stderr.decode()
            added = json.loads(done.stdout)
            assert added["served"] is True
            meta = (await http.get("/v2/models/mm")).json()
            assert meta["parameters"] == {"cid": added["cid"], "local": True}
            done = await cli("models", "remove", "mm", *dd)
            assert done.returncode == 0 and "removed mm" in done.stdout.decode()
            assert (await http.get("/v2/models/mm")).status_code == 404

            # models fetch through the running peer: its own links find the provider.
            done = await cli("models", "fetch", cid, "--json", *dd, limit=120)
            assert done.returncode == 0, done.stderr.decode()
            assert json.loads(done.stdout)["cid"] == cid

            # ledger reads the live ledger. Payments and synced facts may land between
            # two reads, so compare only a CLI read bracketed by two equal live reads
            # (the hash never returns to an old value: facts are only ever added).
            for _ in range(20):
                first = (await http.get("/api/ledger")).json()["state_hash"]
                done = await cli("ledger", "state-hash", "--json", *dd)
                assert done.returncode == 0, done.stderr.decode()
                last = (await http.get("/api/ledger")).json()["state_hash"]
                if first == last:
                    break
            assert first == last, "the ledger never stood still for one CLI read"
            assert json.loads(done.stdout)["state_hash"] == last
            done = await cli("ledger", "receipts", "--json", *dd)
            assert done.returncode == 0, done.stderr.decode()
            rows = json.loads(done.stdout)
            assert report["receipt"]["id"] in {r["receipt_id"] for r in rows}

            # A wrong token is refused; the right one stops the peer, which exits 0.
            r = await http.post("/control/shutdown", headers={"Authorization": "Bearer x"})
            assert r.status_code == 401
            r = await http.post("/control/shutdown", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
        with trio.fail_after(30):
            assert await door.process.wait() == 0
        assert not (door.data_dir / "http.json").exists()


async def test_bad_http_values_are_usage_errors(tmp_path: Path) -> None:
    for value in ("nonsense", "127.0.0.1:99999", "example.com:80"):
        done = await cli("run", "--http", value, "--data-dir", str(tmp_path / "d"), limit=30)
        err = done.stderr.decode()
        assert done.returncode == 2, err
        assert "--http" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_an_http_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await cli(
            "run", "--http", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), limit=60
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "http.json").exists()
