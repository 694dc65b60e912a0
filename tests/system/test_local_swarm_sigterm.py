"""SIGTERM to a process running a local swarm (the demo, a bench) stops and reaps its children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

REPO = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from peer.local_swarm import local_swarm

    async def main():
        async with local_swarm(Path(sys.argv[1])) as swarm:
            sp = await swarm.start("boot", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
            print(sp.process.pid, flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(120)
async def test_sigterm_stops_and_reaps_every_swarm_process(tmp_path: Path) -> None:
    repo = REPO
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "swarm")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=repo,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = b""
            with trio.fail_after(60):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(64)
                    assert chunk, "the swarm script exited before starting its child"
                    line += chunk
            child = int(line)
            assert alive(child)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await proc.wait()
            err = (await proc.stderr.receive_some(65536)).decode()
            assert code == -signal.SIGTERM, err  # it still dies of the signal, after reaping
            assert not alive(child), "the bootstrap child outlived its swarm"
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        nursery.cancel_scope.cancel()
