"""One peer per data dir: a second `edgeswarm run` on it is refused before it starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from peer.local_swarm import local_swarm, peer_args


@pytest.mark.timeout(120)
async def test_second_peer_on_one_data_dir_is_refused(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as swarm:
        boot = await swarm.start("bootstrap", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
        first = await swarm.start("peer", *peer_args([boot.address]))
        with trio.fail_after(60):
            second = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "peer.cli",
                    *peer_args([boot.address]),
                    "--data-dir",
                    str(first.data_dir),
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        err = second.stderr.decode()
        assert second.returncode == 1, err
        assert "listening on" not in second.stdout.decode()  # refused before it started
        assert f"the data dir {first.data_dir} is in use by another edgeswarm peer" in err
        assert "Traceback" not in err
    assert swarm.exit_codes == {"bootstrap": 0, "peer": 0}
