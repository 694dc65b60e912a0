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


async def wait_lines(sp: SwarmProcess, needle: str, count: int, *, limit: float = 60) -> None:
    """Wait until ``count`` lines of ``sp``'s log contain ``needle`` (polled, bounded)."""
    with trio.fail_after(limit):
        while sum(needle in line for line in log_text(sp).splitlines()) < count:
            if sp.process.returncode is not None:
                raise AssertionError(f"{sp.name} exited: {log_text(sp)[-3000:]}")
            await trio.sleep(0.1)


class LeaseClient:
    """``tests/reach/lease_client.py`` (or another ``script`` there taking the same
    arguments) in a namespace: jobs, as JSON lines."""

    def __init__(self, proc: trio.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.lines: list[dict[str, Any]] = []
        self._buf = b""

    @classmethod
    async def start(
        cls,
        host: Host,
        boots: list[str],
        data_dir: Path,
        jobs: int,
        *,
        script_name: str = "lease_client.py",
    ) -> LeaseClient:
        script = Path(__file__).with_name(script_name)
        log_path = data_dir.with_suffix(".log")
        await trio.Path(data_dir).mkdir(parents=True, exist_ok=True)
        env = {**ENV, "PYTHONPATH": str(script.parents[2])}
        with log_path.open("wb") as err:
            proc = await trio.lowlevel.open_process(
                host.argv([sys.executable, str(script), ",".join(boots), str(data_dir), str(jobs)]),
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        return cls(proc, log_path)

    async def __aenter__(self) -> LeaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await self.proc.wait()

    async def _read_line(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        parsed: dict[str, Any] = json.loads(line)
        self.lines.append(parsed)
        with self.log_path.with_suffix(".jsonl").open("ab") as out:  # kept for a post-mortem
            out.write(line + b"\n")
        return parsed

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def wait_jobs(self, n: int, *, limit: float = 120) -> list[dict[str, Any]]:
        with trio.fail_after(limit):
            while sum("i" in ln for ln in self.lines) < n:
                if await self._read_line() is None:
                    raise AssertionError(f"lease client exited: {self.lines} {self._tail()}")
        return [ln for ln in self.lines if "i" in ln]

    async def finish(self, *, limit: float = 180) -> list[dict[str, Any]]:
        with trio.fail_after(limit):
            while await self._read_line() is not None:
                pass
            await self.proc.wait()
        assert self.proc.returncode == 0, self._tail()
        return self.lines
