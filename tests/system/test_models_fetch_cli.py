"""`edgeswarm models fetch` and `models list` provenance, as real processes on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import trio
from test_net_cli import LOCAL, run_cli, started, stop

from tests import models


async def test_models_fetch_from_a_running_peer_then_list_shows_where_it_came_from(
    tmp_path: Path,
) -> None:
    src = models.tiny_matmul_model(tmp_path / "mm.onnx")
    cid = hashlib.sha256(src.read_bytes()).hexdigest()
    holder_dir, fetch_dir = tmp_path / "holder", tmp_path / "fetcher"
    assert run_cli("models", "add", str(src), "--data-dir", str(holder_dir)).returncode == 0
    async with started("bootstrap", "--data-dir", str(tmp_path / "b"), "--listen", LOCAL) as boot:
        boot_addr = await boot.listen_addr()
        async with started("run", "--data-dir", str(holder_dir), "--bootstrap", boot_addr) as p:
            holder_id = (await p.listen_addr()).split("/p2p/")[1]
            fetch = await trio.to_thread.run_sync(
                lambda: run_cli(
                    "models", "fetch", cid, "--bootstrap", boot_addr,
                    "--data-dir", str(fetch_dir), "--json",
                )
            )  # fmt: skip
            assert fetch.returncode == 0, fetch.stderr
            out = json.loads(fetch.stdout)
            assert out["cid"] == cid and out["source"] == f"peers:{holder_id}"
            assert out["bytes_from"] == {holder_id: src.stat().st_size}
            again = await trio.to_thread.run_sync(
                lambda: run_cli(
                    "models", "fetch", cid, "--bootstrap", boot_addr, "--data-dir", str(fetch_dir)
                )
            )
            assert again.returncode == 0 and again.stdout.startswith("already here")
            assert await stop(p) == 0
        assert await stop(boot) == 0
    listed = run_cli("models", "list", "--data-dir", str(fetch_dir))
    assert listed.returncode == 0 and f"from peers {holder_id[:16]}..." in listed.stdout
    blob = fetch_dir / "models" / "blobs" / f"{cid}.onnx"
    assert blob.read_bytes() == src.read_bytes()


async def test_models_fetch_with_no_provider_is_one_error_line(tmp_path: Path) -> None:
    async with started("bootstrap", "--data-dir", str(tmp_path / "b"), "--listen", LOCAL) as boot:
        boot_addr = await boot.listen_addr()
        result = await trio.to_thread.run_sync(
            lambda: run_cli(
                "models", "fetch", "ab" * 32, "--bootstrap", boot_addr,
                "--data-dir", str(tmp_path / "f"),
            )
        )  # fmt: skip
        assert await stop(boot) == 0
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"edgeswarm: error: no peer provides model {'ab' * 32} (asked the DHT for 10 s)"
    ]
    assert list((tmp_path / "f" / "models" / "tmp").iterdir()) == []


def test_models_fetch_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["not-a-cid", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"], ["ab" * 32]):
        result = run_cli("models", "fetch", *args, "--data-dir", str(tmp_path))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
