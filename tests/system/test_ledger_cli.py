"""`edgeswarm ledger ...` as a user runs it, including while a process writes the ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

CLI = [sys.executable, "-m", "peer.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
WORKER = Path(__file__).resolve().parents[1] / "chaos" / "ledger_crash_worker.py"


def ledger(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "ledger", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )


async def test_ledger_cli_while_writing_then_tampered(tmp_path: Path) -> None:
    data_dir = tmp_path / "peer"
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(WORKER), "writer", str(data_dir), "0", "150"],
        stdout=subprocess.PIPE,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        with trio.fail_after(60):
            while seen.count(b"\nC ") < 3:  # a few certificates are in
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "writer exited early"
                seen += chunk
        # The writer keeps writing while we read: WAL readers see a consistent snapshot.
        for _ in range(2):
            out = await trio.to_thread.run_sync(
                lambda: ledger("verify", "--json", data_dir=data_dir)
            )
            assert out.returncode == 0, out.stdout + out.stderr
            report = json.loads(out.stdout)
            assert report["ok"] and report["facts"] > 0 and report["problems"] == []
        out = await trio.to_thread.run_sync(lambda: ledger("balances", "--json", data_dir=data_dir))
        assert out.returncode == 0, out.stderr
        balances = json.loads(out.stdout)
        assert balances and sum(balances.values()) == 0
        assert all(isinstance(v, int) for v in balances.values())
    finally:
        proc.kill()
        with trio.move_on_after(10):
            await proc.wait()

    # Stopped: the answers are stable and agree with each other.
    hash_out = ledger("state-hash", "--json", data_dir=data_dir)
    assert hash_out.returncode == 0, hash_out.stderr
    state_hash = json.loads(hash_out.stdout)["state_hash"]
    assert len(bytes.fromhex(state_hash)) == 32
    verify = json.loads(ledger("verify", "--json", data_dir=data_dir).stdout)
    assert verify["state_hash"] == state_hash
    assert ledger("state-hash", data_dir=data_dir).stdout.strip() == state_hash
    receipts = json.loads(ledger("receipts", "--json", data_dir=data_dir).stdout)
    assert any(r["paid"] for r in receipts) and any(not r["paid"] for r in receipts)
    human = ledger("balances", data_dir=data_dir)
    assert human.returncode == 0 and "sum 0.000000" in human.stdout
    assert "ok" in ledger("verify", data_dir=data_dir).stdout

    # Someone edits the database: verify says what is wrong and exits non-zero.
    with sqlite3.connect(data_dir / "ledger.sqlite3") as conn:
        conn.execute(
            "UPDATE balances SET balance = balance + 1 WHERE account = "
            "(SELECT account FROM balances LIMIT 1)"
        )
        row = conn.execute("SELECT id, data FROM facts WHERE kind = 1 LIMIT 1").fetchone()
        data = bytearray(row[1])
        data[-3] ^= 0x40
        conn.execute("UPDATE facts SET data = ? WHERE id = ?", (bytes(data), row[0]))
    bad = ledger("verify", data_dir=data_dir)
    assert bad.returncode == 1
    assert "problem: fact" in bad.stdout and "stored balances differ" in bad.stdout
    bad_json = json.loads(ledger("verify", "--json", data_dir=data_dir).stdout)
    assert bad_json["ok"] is False and len(bad_json["problems"]) >= 2


def test_ledger_cli_without_a_ledger(tmp_path: Path) -> None:
    out = ledger("balances", data_dir=tmp_path / "nobody")
    assert out.returncode == 1
    assert "no ledger at" in out.stderr and "Traceback" not in out.stderr
