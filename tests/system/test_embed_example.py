"""The README's embedding example (docs/examples/embed.py) runs against real processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from edge_models.registry import Registry
from peer.local_swarm import local_swarm, peer_args

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "embed.py"


@pytest.mark.timeout(240)
async def test_embedding_example_runs_jobs_and_a_lease(tmp_path: Path) -> None:
    Registry(tmp_path / "swarm" / "peer1" / "models").add_packaged("minilm")
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("bootstrap", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
        server = await swarm.start("peer1", *peer_args([boot.address]))
        env_dir = tmp_path / "app"
        with trio.fail_after(180):
            done = await trio.run_process(
                [sys.executable, str(EXAMPLE), boot.address],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "EDGESWARM_DATA_DIR": str(env_dir)},
            )
        out = done.stdout.decode()
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert out.splitlines()[0].startswith(server.peer_id)
        assert "(1, 384)" in out
        assert "1 batch receipt(s) for 100 jobs" in out
    assert swarm.exit_codes == {"bootstrap": 0, "peer1": 0}
