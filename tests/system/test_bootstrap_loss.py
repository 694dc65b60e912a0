"""A network outlives its bootstrap node (real processes): the only bootstrap node is
SIGKILLed, a serving peer's address is given as --bootstrap, and jobs keep running and
their payments keep being certified.

The network's genesis names four witnesses (the bootstrap node and the three serving
peers, as the demo's does), so the committee of 4 (f = 1) certifies with 3 of them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

from edge_models.registry import Registry
from peer.config import Config
from peer.identity import load_or_create_identity, peer_id_of
from peer.local_swarm import local_swarm, peer_args
from tests.models import tiny_add_model

CLI = [sys.executable, "-m", "peer.cli"]
LOCAL = "/ip4/127.0.0.1/tcp/0"
BEFORE, AFTER = 2, 4


async def infer(env: dict[str, str], *args: str) -> dict[str, object]:
    with trio.fail_after(120):
        done = await trio.run_process(
            [*CLI, "infer", *args, "--json"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report: dict[str, object] = json.loads(done.stdout)
    return report


@pytest.mark.timeout(600)
async def test_payments_are_certified_after_the_bootstrap_node_is_killed(tmp_path: Path) -> None:
    root = tmp_path / "swarm"
    names = ["boot", "p0", "p1", "p2"]
    ids = [peer_id_of(load_or_create_identity(Config(data_dir=root / n).key_path)) for n in names]
    env = {
        "EDGESWARM_LEDGER_WITNESSES": ",".join(ids),
        "EDGESWARM_LEDGER_BASE_LIMIT": "100",
        "EDGESWARM_LEDGER_SYNC_INTERVAL": "0.5",
        "EDGESWARM_BID_WINDOW": "0.5",
    }
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    for var in ("EDGESWARM_BOOTSTRAP", "EDGESWARM_LISTEN", "EDGESWARM_DATA_DIR"):
        full.pop(var, None)
    x = np.arange(4, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    async with local_swarm(root) as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL, env=env)
        cid = ""
        peers = []
        for n in names[1:]:
            registry = Registry(root / n / "models")
            cid = registry.add_file(tiny_add_model(tmp_path / "tiny.onnx"), "tiny_add").cid
            peers.append(await swarm.start(n, *peer_args([boot.address]), env=env))
        common = ["--input", f"x={tmp_path / 'x.npy'}", "--input", f"y={tmp_path / 'x.npy'}"]
        common += ["--data-dir", str(tmp_path / "app"), "--output-dir", str(tmp_path / "out")]
        payments = []
        for _ in range(BEFORE):
            report = await infer(full, cid, "--bootstrap", boot.address, *common)
            payments.append(str(report["payment"]))
        boot.process.kill()  # SIGKILL: no goodbye
        with trio.fail_after(10):
            await boot.process.wait()
        for i in range(AFTER):
            entry = peers[i % len(peers)].address  # any running peer's address works
            report = await infer(full, cid, "--bootstrap", entry, *common)
            payments.append(str(report["payment"]))
        certified = [p for p in payments if p.startswith("certified")]
        print(f"certified {len(certified)} of {len(payments)} ({AFTER} after the SIGKILL)")
        assert len(certified) == BEFORE + AFTER, payments
