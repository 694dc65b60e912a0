"""Real ``edgeswarm`` processes in the network lab: start them in a namespace, run the CLI there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import trio

from edge_models.registry import Registry
from peer.local_swarm import LocalSwarm, SwarmProcess
from tests.models import tiny_add_model
from tests.netlab import Host

ENV = {k: v for k, v in os.environ.items() if not k.startswith("EDGESWARM_")}
ENV.update(PYTHONUNBUFFERED="1", EDGESWARM_BID_WINDOW="0.5")
ANY = "/ip4/0.0.0.0/tcp/0"


def addr_on(sp: SwarmProcess, host: Host) -> str:
    """The announced address of ``sp`` on ``host``'s lab IP."""
    for a in sp.addrs:
        if f"/ip4/{host.ip}/" in a:
            return a
    raise AssertionError(f"{sp.name} does not listen on {host.ip}: {sp.addrs}")


def add_tiny_model(data_dir: Path) -> str:
    registry = Registry(data_dir / "models")
    return registry.add_file(tiny_add_model(data_dir.parent / "tiny.onnx"), "tiny_add").cid


async def start_bootstrap(swarm: LocalSwarm, name: str, host: Host, *extra: str) -> str:
    sp = await swarm.start(
        name, "bootstrap", "--listen", ANY, *extra, env=ENV, prefix=host.argv([])
    )
    return addr_on(sp, host)


async def start_executor(
    swarm: LocalSwarm, name: str, host: Host, boots: list[str], *extra: str, env: Any = None
) -> SwarmProcess:
    add_tiny_model(swarm.root / name)
    args = ["run", "--listen", ANY, *extra]
    for b in boots:
        args += ["--bootstrap", b]
    return await swarm.start(name, *args, env={**ENV, **(env or {})}, prefix=host.argv([]))


async def infer(
    tmp: Path, host: Host, boots: list[str], *extra: str, limit: float = 120
) -> dict[str, Any]:
    """``edgeswarm infer tiny_add`` from ``host`` as a user runs it; the JSON report."""
    x = np.arange(6, dtype=np.float32)
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", x)
    args = [sys.executable, "-m", "peer.cli", "infer", "tiny_add", "--json"]
    for b in boots:
        args += ["--bootstrap", b]
    args += ["--input", f"x={tmp / 'x.npy'}", "--input", f"y={tmp / 'y.npy'}"]
    args += ["--data-dir", str(tmp / "req"), "--output-dir", str(tmp / "out"), *extra]
    with trio.fail_after(limit):
        done = await trio.run_process(
            host.argv(args), capture_stdout=True, capture_stderr=True, check=False, env=ENV
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    report: dict[str, Any] = json.loads(done.stdout)
    np.testing.assert_array_equal(np.load(report["outputs"]["z"]), x + x)
    return report


def log_text(sp: SwarmProcess) -> str:
    assert sp.log_path is not None
    return sp.log_path.read_text(errors="replace")


async def wait_log(sp: SwarmProcess, needle: str, *, limit: float = 60) -> str:
    """The first line of ``sp``'s log containing ``needle`` (polled, bounded by ``limit``)."""
    with trio.fail_after(limit):
        while True:
            for line in log_text(sp).splitlines():
                if needle in line:
                    return line
            if sp.process.returncode is not None:
                raise AssertionError(f"{sp.name} exited: {log_text(sp)[-3000:]}")
            await trio.sleep(0.1)


def run_in(host: Host, *cmd: str) -> str:
    return subprocess.run(host.argv(list(cmd)), capture_output=True, text=True, check=False).stdout
