"""`edgeswarm run --serve CID`: an empty peer fetches a model at start and serves it (processes)."""

from __future__ import annotations

import json
from pathlib import Path

import nacl.signing
import numpy as np
import trio
from test_infer_cli import LOCAL, cli

from edge_models.registry import Registry
from peer.config import Config
from peer.local_swarm import local_swarm, peer_args
from peer.node import open_peer
from tests.models import tiny_add_model


async def wait_provider(boot: str, cid: str, peer_id: str, tmp_path: Path) -> None:
    """Until ``peer_id`` provides ``cid`` in the DHT: it is served (real queries, bounded)."""
    cfg = Config(data_dir=tmp_path / "watch", listen=(LOCAL,), bootstrap=(boot,))
    key = nacl.signing.SigningKey.generate()
    async with open_peer(cfg, role="client", key=key, settlement=False) as watcher:
        with trio.fail_after(90):
            while True:
                if peer_id in {p.peer_id for p in await watcher.find_providers(cid)}:
                    return
                await trio.sleep(0.5)


async def test_run_serve_fetches_at_start_and_serves_after_the_holder_stops(
    tmp_path: Path,
) -> None:
    x = np.arange(4, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", x)
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL)
        holder_store = Registry(tmp_path / "swarm" / "holder" / "models")
        cid = holder_store.add_file(tiny_add_model(tmp_path / "add.onnx"), "tiny_add").cid
        holder = await swarm.start("holder", *peer_args([boot.address]))
        server = await swarm.start("server", *peer_args([boot.address]), "--serve", cid)
        await wait_provider(boot.address, cid, server.peer_id, tmp_path)
        assert await swarm.stop(holder) == 0
        done = await cli(
            "infer", cid, "--bootstrap", boot.address,
            "--input", f"x={tmp_path / 'x.npy'}", "--input", f"y={tmp_path / 'y.npy'}",
            "--data-dir", str(tmp_path / "req"), "--output-dir", str(tmp_path / "out"),
            "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        report = json.loads(done.stdout)
        assert report["executor"] == server.peer_id
        np.testing.assert_array_equal(np.load(report["outputs"]["z"]), x + x)
    fetched = Registry(tmp_path / "swarm" / "server" / "models").get(cid)
    assert fetched.source == f"peers:{holder.peer_id}" and fetched.name == "tiny_add"


async def test_run_serve_with_a_bad_cid_is_a_usage_error(tmp_path: Path) -> None:
    done = await cli("run", "--serve", "minilm", "--data-dir", str(tmp_path), "--listen", LOCAL)
    assert done.returncode == 2
    err = done.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "is not a model cid" in err[0], err
