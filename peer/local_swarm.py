"""A swarm of real ``edgeswarm`` processes on 127.0.0.1: one bootstrap node and N peers.

Used by ``edgeswarm demo`` (and handy in system tests). Each process is a
separate OS process started with this interpreter, in its own data dir, and
announces where it listens on stdout (``listening on <multiaddr>``). The
context manager always stops every process it started (SIGTERM, then SIGKILL
after a grace period) and reaps it, whatever happens inside.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

log = logging.getLogger(__name__)

LISTEN_PREFIX = "listening on "
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
_MAX_LINE = 64 * 1024


class SwarmError(RuntimeError):
    """A swarm process failed to start or announce its address."""


@dataclass
class SwarmProcess:
    name: str
    data_dir: Path
    process: trio.Process
    addrs: list[str] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def address(self) -> str:
        """The first announced multiaddr (ends in /p2p/<peer id>)."""
        return self.addrs[0]

    @property
    def peer_id(self) -> str:
        return self.address.rsplit("/p2p/", 1)[1]


def edgeswarm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "peer.cli", *args]


async def _read_listen_line(proc: trio.Process, name: str, log_path: Path) -> list[str]:
    """Read stdout until the first ``listening on`` line(s); keep draining afterwards elsewhere."""
    assert proc.stdout is not None
    buf = b""
    addrs: list[str] = []
    while True:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            tail = (await trio.Path(log_path).read_text(errors="replace"))[-2000:]
            raise SwarmError(f"{name} exited before announcing its address:\n{tail}")
        buf += chunk
        if len(buf) > _MAX_LINE:
            raise SwarmError(f"{name} printed an overlong line")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            if text.startswith(LISTEN_PREFIX):
                addrs.append(text[len(LISTEN_PREFIX) :])
            elif addrs:
                return addrs
        if addrs and not buf:
            return addrs


async def _drain(proc: trio.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.receive_some(4096):
        pass


async def _stop(proc: trio.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            return await proc.wait()
        log.warning("process %s ignored SIGTERM for %.0f s; killing it", proc.pid, STOP_GRACE)
        proc.kill()
    return await proc.wait()


class LocalSwarm:
    def __init__(self, root: Path, nursery: trio.Nursery) -> None:
        self.root = root
        self._nursery = nursery
        self.processes: list[SwarmProcess] = []
        self.exit_codes: dict[str, int] = {}

    async def start(
        self,
        name: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> SwarmProcess:
        """Start ``edgeswarm <args>``; ``prefix`` wraps the command (e.g. ``ip netns exec NS``)."""
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.root / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log_path.open("wb") as stderr:
            proc = await trio.lowlevel.open_process(
                [*prefix, *edgeswarm_argv(*args, "--data-dir", str(data_dir))],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=full_env,
            )
        sp = SwarmProcess(name=name, data_dir=data_dir, process=proc, log_path=log_path)
        self.processes.append(sp)
        with trio.fail_after(START_TIMEOUT):
            sp.addrs = await _read_listen_line(proc, name, log_path)
        self._nursery.start_soon(_drain, proc)
        return sp

    async def stop(self, sp: SwarmProcess) -> int:
        code = await _stop(sp.process)
        self.exit_codes[sp.name] = code
        return code

    async def stop_all(self) -> dict[str, int]:
        # Peers first, bootstrap last (it was started first).
        for sp in reversed(self.processes):
            if sp.process.returncode is None:  # (one name may have run more than once)
                await self.stop(sp)
        return dict(self.exit_codes)


class SwarmStopped(SwarmError):
    """SIGTERM arrived while the swarm ran; its processes were stopped and reaped first."""


@asynccontextmanager
async def local_swarm(root: Path) -> AsyncIterator[LocalSwarm]:
    """Yield a ``LocalSwarm``; every process it started is stopped and reaped on exit.

    SIGTERM to this process (a CI timeout, ``kill``) cancels the body, reaps every
    child, then ends the process by SIGTERM: Python's default action would end it at
    once and leave the children running.
    """
    signalled = False
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_sigterm() -> None:
                nonlocal signalled
                async for _ in signals:
                    signalled = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_sigterm)
            swarm = LocalSwarm(root, nursery)
            try:
                yield swarm
            finally:
                with trio.CancelScope(shield=True):
                    await swarm.stop_all()
                nursery.cancel_scope.cancel()
    if signalled:
        # Children are reaped; now die of the signal as its sender meant (a test runner or a
        # CI job must stop, not carry on after one failed test).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SwarmStopped("stopped by SIGTERM; every swarm process was stopped")


def peer_args(bootstrap: Sequence[str]) -> list[str]:
    args = ["run", "--listen", "/ip4/127.0.0.1/tcp/0"]
    for b in bootstrap:
        args += ["--bootstrap", b]
    return args
