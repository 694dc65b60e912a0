"""The CLI as a user runs it: real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

CLI = [sys.executable, "-m", "peer.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGESWARM_LOG_LEVEL": "INFO"}
ENV.pop("EDGESWARM_BOOTSTRAP", None)
ENV.pop("EDGESWARM_LISTEN", None)
LOCAL = "/ip4/127.0.0.1/tcp/0"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )


class Running:
    """A long-running CLI process whose stdout we read line by line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.buffer = b""
        self.lines: list[str] = []

    async def read_line(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"process exited early (rc {self.proc.poll()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.lines.append(line.decode())
        return self.lines[-1]

    async def listen_addr(self) -> str:
        with trio.fail_after(30):
            while True:
                line = await self.read_line()
                if line.startswith("listening on "):
                    return line.split()[-1]


@asynccontextmanager
async def started(*args: str) -> AsyncIterator[Running]:
    proc = await trio.lowlevel.open_process(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        yield Running(proc)
    finally:  # always reaped, whatever happened
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def stop(running: Running) -> int:
    running.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        return await running.proc.wait()


async def test_bootstrap_three_peers_and_peers_json(tmp_path: Path) -> None:
    async with started("bootstrap", "--data-dir", str(tmp_path / "b"), "--listen", LOCAL) as boot:
        boot_addr = await boot.listen_addr()
        assert boot_addr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in boot_addr
        async with (
            started("run", "--data-dir", str(tmp_path / "p1"), "--bootstrap", boot_addr) as p1,
            started("run", "--data-dir", str(tmp_path / "p2"), "--bootstrap", boot_addr) as p2,
            started("run", "--data-dir", str(tmp_path / "p3"), "--bootstrap", boot_addr) as p3,
        ):
            addrs = [await p.listen_addr() for p in (p1, p2, p3)]
            ids = {a.split("/p2p/")[1] for a in addrs}
            result = await trio.to_thread.run_sync(
                lambda: run_cli(
                    "peers",
                    "--bootstrap",
                    boot_addr,
                    "--json",
                    "--expect",
                    "3",
                    "--wait",
                    "30",
                    "--data-dir",
                    str(tmp_path / "client"),
                )
            )
            assert result.returncode == 0, result.stderr
            ads = json.loads(result.stdout)
            assert {ad["peer_id"] for ad in ads} == ids
            for ad in ads:
                for key in ("addrs", "devices", "providers", "models", "price", "load"):
                    assert key in ad
                assert ad["expires_at"] > 0
                assert any(a.endswith("/p2p/" + ad["peer_id"]) for a in ad["addrs"])
                assert ad["devices"] and ad["devices"][0]["kind"] == "cpu"
                assert "CPUExecutionProvider" in ad["providers"]
            # The table form works too.
            table = await trio.to_thread.run_sync(
                lambda: run_cli("peers", "--bootstrap", boot_addr, "--expect", "3")
            )
            assert table.returncode == 0 and "3 peer(s)" in table.stdout
            for p in (p1, p2, p3):
                assert await stop(p) == 0
        assert await stop(boot) == 0


async def test_bootstrap_keeps_its_id_and_address_across_restarts(tmp_path: Path) -> None:
    args = ("bootstrap", "--data-dir", str(tmp_path / "b"), "--listen", LOCAL)
    async with started(*args) as boot:
        first = await boot.listen_addr()
        assert await stop(boot) == 0
    async with started(*args) as boot:
        assert await boot.listen_addr() == first
        assert await stop(boot) == 0


def test_id_is_created_once_and_stable(tmp_path: Path) -> None:
    first = run_cli("id", "--data-dir", str(tmp_path))
    assert first.returncode == 0 and first.stdout.strip().startswith("12D3KooW")
    again = run_cli("id", "--data-dir", str(tmp_path), "--json")
    assert json.loads(again.stdout)["peer_id"] == first.stdout.strip()


def test_unsafe_key_file_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    run_cli("id", "--data-dir", str(tmp_path))
    os.chmod(tmp_path / "identity.key", 0o644)
    result = run_cli("run", "--data-dir", str(tmp_path), "--listen", LOCAL)
    assert result.returncode == 1
    assert "chmod 600" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--listen", "not-a-multiaddr"],
        ["run", "--bootstrap", "/ip4/127.0.0.1/tcp/4001"],  # no /p2p/<id>
        ["peers", "--bootstrap", "/ip4/999.1.1.1/tcp/1/p2p/x"],
        ["bootstrap", "--listen", "/dns4/"],
        ["peers"],
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(*args, "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_exits_2() -> None:
    result = run_cli("run", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no-such-flag" in result.stderr


@pytest.mark.parametrize("command", ["id", "run", "bootstrap", "peers"])
def test_help_everywhere(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "--data-dir" in result.stdout


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async with started("bootstrap", "--data-dir", str(tmp_path / "a"), "--listen", LOCAL) as a:
        taken = (await a.listen_addr()).split("/p2p/")[0]
        result = await trio.to_thread.run_sync(
            lambda: run_cli("run", "--data-dir", str(tmp_path / "b"), "--listen", taken)
        )
        assert result.returncode == 1
        assert taken in result.stderr and "in use" in result.stderr
        assert "Traceback" not in result.stderr
        assert await stop(a) == 0
