"""A network is its genesis: one data dir in two networks, pins, unknown env names (processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import trio

from peer.local_swarm import local_swarm, peer_args
from peer.settlement_paths import read_genesis_file

CLI = [sys.executable, "-m", "peer.cli"]
LOCAL = "/ip4/127.0.0.1/tcp/0"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "EDGESWARM_LOG_LEVEL": "WARNING", **(env or {})}
    for name in ("EDGESWARM_BOOTSTRAP", "EDGESWARM_NETWORK", "EDGESWARM_GENESIS"):
        if env is None or name not in env:
            full.pop(name, None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full, timeout=120)


def one_error_line(r: subprocess.CompletedProcess[str], *, code: int, says: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("edgeswarm: error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr[-2000:]


async def test_one_data_dir_two_networks_and_a_pin(tmp_path: Path) -> None:
    data = tmp_path / "p"
    async with local_swarm(tmp_path) as swarm:
        a = await swarm.start("boot-a", "bootstrap", "--listen", LOCAL)
        b = await swarm.start("boot-b", "bootstrap", "--listen", LOCAL)
        ga = read_genesis_file(tmp_path / "boot-a" / "genesis.json")
        gb = read_genesis_file(tmp_path / "boot-b" / "genesis.json")
        assert ga.network_id != gb.network_id and ga.witnesses == (a.peer_id,)
        # The same data dir (so the same identity) in network A, then in network B.
        p = await swarm.start("p", *peer_args([a.address]))
        assert (data / "networks" / ga.network_id / "ledger.sqlite3").exists()
        assert await swarm.stop(p) == 0
        p = await swarm.start("p", *peer_args([b.address]))
        assert (data / "networks" / gb.network_id / "ledger.sqlite3").exists()
        assert await swarm.stop(p) == 0
        # Each ledger stays readable; the CLI reads the current one by default.
        for g in (ga, gb):
            r = await trio.to_thread.run_sync(
                lambda g=g: cli(
                    "ledger", "verify", "--data-dir", str(data), "--network", g.network_id[:12]
                )
            )
            assert r.returncode == 0 and g.network_id in r.stdout, r.stderr
        r = await trio.to_thread.run_sync(
            lambda: cli("ledger", "state-hash", "--data-dir", str(data))
        )
        assert r.returncode == 0 and len(r.stdout.strip()) == 64
        # Pinned to network A but pointed at B's bootstrap node: one line, exit 1.
        pin = {"EDGESWARM_NETWORK": ga.network_id}
        r = await trio.to_thread.run_sync(
            lambda: cli(
                "run", "--listen", LOCAL, "--bootstrap", b.address, "--data-dir", str(data), env=pin
            )
        )
        one_error_line(r, code=1, says="must join network")
        x = tmp_path / "x.npy"
        np.save(x, np.zeros((1, 4), dtype=np.int64))
        r = await trio.to_thread.run_sync(
            lambda: cli(
                "infer",
                "--bootstrap",
                b.address,
                "minilm",
                "--input",
                f"input_ids={x}",
                "--data-dir",
                str(data),
                env=pin,
            )
        )
        one_error_line(r, code=1, says="must join network")
        # A bad genesis file is one line too.
        (tmp_path / "bad.json").write_text("{}")
        r = await trio.to_thread.run_sync(
            lambda: cli(
                "run",
                "--listen",
                LOCAL,
                "--data-dir",
                str(tmp_path / "q"),
                env={"EDGESWARM_GENESIS": str(tmp_path / "bad.json")},
            )
        )
        one_error_line(r, code=1, says="not a valid genesis file")


def test_unknown_edgeswarm_variables_do_not_break_the_cli(tmp_path: Path) -> None:
    r = cli("id", "--data-dir", str(tmp_path), env={"EDGESWARM_TEST_MDNS": "1", "EDGESWARM_X": "y"})
    assert r.returncode == 0 and r.stdout.startswith("12D3KooW"), r.stderr


async def test_a_degraded_committee_is_visible_and_logged(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL)
        p = await swarm.start("p", *peer_args([boot.address]))
        r = await trio.to_thread.run_sync(
            lambda: cli("ledger", "status", "--json", "--data-dir", str(p.data_dir))
        )
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        genesis = read_genesis_file(tmp_path / "boot" / "genesis.json")
        assert status["network_id"] == genesis.network_id and status["account"] == p.peer_id
        c = status["committee"]
        assert (c["members"], c["size"], c["f"], c["degraded"]) == ([boot.peer_id], 1, 0, True)
        assert c["target_size"] == 4 and status["eligible_pool"]["needed"] == 4
        assert p.log_path is not None
        assert "degraded witness committee: 1 of 4" in p.log_path.read_text()


async def test_different_bootstrap_lists_one_network_one_state_hash(tmp_path: Path) -> None:
    """Peers that know different bootstrap nodes (or only another peer) are one network:
    one genesis, and their ledgers converge on one state hash."""
    fast = {"EDGESWARM_LEDGER_SYNC_INTERVAL": "0.5"}
    async with local_swarm(tmp_path) as swarm:
        b1 = await swarm.start("b1", "bootstrap", "--listen", LOCAL, env=fast)
        b2 = await swarm.start(
            "b2", "bootstrap", "--listen", LOCAL, "--bootstrap", b1.address, env=fast
        )
        p1 = await swarm.start("p1", *peer_args([b1.address]), env=fast)
        p2 = await swarm.start("p2", *peer_args([b2.address]), env=fast)
        # Not a bootstrap node at all: a running peer's address is enough to join.
        p3 = await swarm.start("p3", *peer_args([p1.address]), env=fast)
        nodes = [b1, b2, p1, p2, p3]
        genesis = read_genesis_file(tmp_path / "b1" / "genesis.json")
        assert not (tmp_path / "b2" / "genesis.json").exists()  # b2 joined, founded nothing
        for n in nodes:
            assert (n.data_dir / "networks" / genesis.network_id / "ledger.sqlite3").exists()
        hashes: dict[str, str] = {}
        with trio.fail_after(90):
            for _ in range(200):  # bounded; each pass reads every ledger once
                for n in nodes:
                    r = await trio.to_thread.run_sync(
                        lambda n=n: cli("ledger", "state-hash", "--data-dir", str(n.data_dir))
                    )
                    assert r.returncode == 0, r.stderr
                    hashes[n.name] = r.stdout.strip()
                if len(set(hashes.values())) == 1:
                    break
                await trio.sleep(1.0)  # anti-entropy runs every 0.5 s; poll the files
        assert len(set(hashes.values())) == 1, hashes
        # Every identity proof reached everyone: 5 facts (the founder needs none).
        r = await trio.to_thread.run_sync(
            lambda: cli("ledger", "verify", "--json", "--data-dir", str(p3.data_dir))
        )
        assert json.loads(r.stdout)["facts"] == 4


def test_settings_that_make_no_valid_genesis_are_one_line(tmp_path: Path) -> None:
    r = cli(
        "bootstrap",
        "--listen",
        LOCAL,
        "--data-dir",
        str(tmp_path),
        env={"EDGESWARM_LEDGER_POW_BITS": "99"},
    )
    one_error_line(r, code=1, says="do not make a valid genesis")
