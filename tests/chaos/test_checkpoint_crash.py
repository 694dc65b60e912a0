"""kill -9 while a checkpoint prunes the ledger loses nothing: the checkpoint, the deletion
of the facts it covers and the rewritten balances commit in one transaction, so a restart
finds either the old facts or the checkpoint that covers them."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from checkpoint_prune_worker import PAYEE, PAYER, POLICY, RULE, pid, price

from peer.ledger_store import open_ledger_store, read_snapshot, verify_snapshot

WORKER = Path(__file__).with_name("checkpoint_prune_worker.py")


async def read_line(stream: trio.abc.ReceiveStream, buf: bytearray) -> str:
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"worker exited early; last output {bytes(buf[-300:])!r}")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


@pytest.mark.parametrize("seed", [1, 2])
async def test_kill_9_mid_prune_loses_nothing(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    acked_seq = acked_epoch = 0
    for _round in range(3):  # crash, reopen and crash the same ledger again
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(WORKER), str(tmp_path)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            buf = bytearray()
            with trio.fail_after(120):
                assert await read_line(proc.stdout, buf) == "READY"
                for _ in range(rng.randrange(2, 7)):
                    kind, *rest = (await read_line(proc.stdout, buf)).split()
                    if kind == "C":
                        acked_seq = int(rest[0])
                    else:
                        acked_epoch = int(rest[0])
            # The worker goes straight on: the kill lands in a write or in a prune.
            proc.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await proc.wait()
            assert proc.returncode == -signal.SIGKILL
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
        snap = read_snapshot(tmp_path)
        report = verify_snapshot(snap)
        assert report.ok, report.problems
        async with open_ledger_store(tmp_path, RULE, POLICY) as store:
            ledger = store.ledger
            cp = ledger.checkpoint
            assert cp is not None and cp.epoch >= acked_epoch
            # Every acknowledged certificate is held or covered by the checkpoint ...
            top = ledger.next_seq(pid(PAYER)) - 1
            assert top >= acked_seq
            # ... and the balances are the fold of exactly seqs 1..top.
            assert ledger.balance(pid(PAYEE)) == sum(price(s) for s in range(1, top + 1))
            assert report.ledger is not None and report.ledger.balances() == ledger.balances()
            assert snap.balances == ledger.balances()
            # Bounded: the rows are the live tail and one checkpoint per epoch.
            assert store.fact_count() <= 2 * (top - cp.header.covered_count) + cp.epoch
