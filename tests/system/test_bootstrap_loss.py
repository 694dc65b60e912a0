"""A network outlives its bootstrap node (real processes, issue 10).

One bootstrap node founds the network: the genesis names it as the *only* witness
(n = 1, f = 0). Four serving peers join; at every epoch the checkpoint committee
certifies a pool checkpoint listing the live, eligible peers (protocols.epochs), and
once the pool has 4 aged members, payment committees are drawn from it and no longer
from the genesis witness. Then the bootstrap node is SIGKILLed, a serving peer's
address is given as --bootstrap, and jobs keep running with their payments certified.
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
from peer.local_swarm import local_swarm, peer_args
from tests.models import tiny_add_model

CLI = [sys.executable, "-m", "peer.cli"]
LOCAL = "/ip4/127.0.0.1/tcp/0"
BEFORE, AFTER = 2, 6
SERVING = 4


async def cli_json(env: dict[str, str], *args: str) -> dict[str, object]:
    with trio.fail_after(120):
        done = await trio.run_process(
            [*CLI, *args, "--json"], capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report: dict[str, object] = json.loads(done.stdout)
    return report


async def wait_for_pool(
    env: dict[str, str], data_dir: Path, boot: str, size: int, model: str
) -> dict:
    """Poll the peer's ``ledger status`` (bounded) until committees are drawn from a pool of
    ``size`` members that does not hold the bootstrap node, all recorded as serving
    ``model`` (its referee panels are drawn from them)."""
    epochs: dict = {}
    with trio.fail_after(120):
        for _ in range(200):  # bounded; each status call is a CLI process (~1 s)
            status = await cli_json(env, "ledger", "status", "--data-dir", str(data_dir))
            epochs = status.get("epochs") or {}  # type: ignore[assignment]
            pool = epochs.get("pool") or []
            serving = (epochs.get("serving") or {}).get(model, 0)
            if len(pool) >= size and boot not in pool and serving >= size:
                return epochs
            await trio.sleep(0.5)  # polling a separate process's files: nothing to wait on
    raise AssertionError(f"the pool never reached {size}: {epochs}")


@pytest.mark.timeout(600)
async def test_payments_are_certified_after_the_only_bootstrap_node_is_killed(
    tmp_path: Path,
) -> None:
    root = tmp_path / "swarm"
    env = {
        "EDGESWARM_LEDGER_EPOCH": "1",
        "EDGESWARM_LEDGER_ELIGIBLE_AGE": "1",
        "EDGESWARM_LEDGER_ELIGIBLE_EARNED": "0",
        "EDGESWARM_LEDGER_POW_BITS": "8",
        "EDGESWARM_LEDGER_BASE_LIMIT": "100",
        "EDGESWARM_LEDGER_SYNC_INTERVAL": "0.5",
        "EDGESWARM_BID_WINDOW": "0.5",
    }
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    for var in (
        "EDGESWARM_BOOTSTRAP",
        "EDGESWARM_LISTEN",
        "EDGESWARM_DATA_DIR",
        "EDGESWARM_LEDGER_WITNESSES",
    ):
        full.pop(var, None)
    x = np.arange(4, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    async with local_swarm(root) as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL, env=env)
        cid = ""
        peers = []
        for n in range(SERVING):
            registry = Registry(root / f"p{n}" / "models")
            cid = registry.add_file(tiny_add_model(tmp_path / "tiny.onnx"), "tiny_add").cid
            peers.append(await swarm.start(f"p{n}", *peer_args([boot.address]), env=env))
        # The genesis names only the bootstrap node; committees move to the pool.
        genesis = await cli_json(full, "ledger", "status", "--data-dir", str(peers[0].data_dir))
        assert genesis["genesis"]["witnesses"] == [boot.peer_id]  # type: ignore[index]
        epochs = await wait_for_pool(full, peers[0].data_dir, boot.peer_id, SERVING, cid)
        print(f"pool before the kill: {epochs}")
        common = ["--input", f"x={tmp_path / 'x.npy'}", "--input", f"y={tmp_path / 'x.npy'}"]
        common += ["--data-dir", str(tmp_path / "app"), "--output-dir", str(tmp_path / "out")]
        payments = []
        for _ in range(BEFORE):
            report = await cli_json(full, "infer", cid, "--bootstrap", boot.address, *common)
            payments.append(str(report["payment"]))
        boot.process.kill()  # SIGKILL: no goodbye
        with trio.fail_after(10):
            await boot.process.wait()
        for i in range(AFTER):
            entry = peers[i % len(peers)].address  # any running peer's address works
            report = await cli_json(full, "infer", cid, "--bootstrap", entry, *common)
            payments.append(str(report["payment"]))
        certified = [p for p in payments if p.startswith("certified")]
        print(f"certified {len(certified)} of {len(payments)} ({AFTER} after the SIGKILL)")
        assert len(certified) == BEFORE + AFTER, payments
