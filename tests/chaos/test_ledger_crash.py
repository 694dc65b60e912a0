"""kill -9 during ledger writes and during witnessing loses nothing that was acknowledged."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from ledger_crash_worker import (
    PAYEE,
    PAYERS,
    POLICY,
    WITNESS,
    WITNESS_RULE,
    WRITER_RULE,
)
from libp2p.peer.id import ID
from settlement_helpers import key, make_receipt, make_transfer, pid, settlement_node

from peer.ledger_store import open_ledger_store, read_snapshot, verify_snapshot
from peer.settlement import SettlementConfig, SettlementError
from protocols.ledger_rpc import Certify, CertifyReply
from protocols.proofs import EquivocationProof
from protocols.signed import Signed
from protocols.witness import TransferRequest, decode_reply

WORKER = Path(__file__).with_name("ledger_crash_worker.py")


class Lines:
    """Line reader over a subprocess's stdout."""

    def __init__(self, proc: trio.Process) -> None:
        assert proc.stdout is not None
        self.stream = proc.stdout
        self.buf = b""

    async def next(self) -> str:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"worker exited early; last output {self.buf[-300:]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


@asynccontextmanager
async def worker(
    mode: str, data_dir: Path, run: int = 0
) -> AsyncIterator[tuple[trio.Process, Lines]]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(WORKER), mode, str(data_dir), str(run)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc, Lines(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kill_9_mid_write_loses_nothing_acknowledged(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    receipts: set[bytes] = set()
    locks: dict[tuple[str, int], bytes] = {}
    certs: set[bytes] = set()
    for _round in range(2):  # crash, reopen and crash the same ledger again
        kill_after = rng.randrange(20, 400)
        async with worker("writer", tmp_path, _round) as (proc, lines):
            with trio.fail_after(60):
                assert await lines.next() == "READY"
                for _ in range(kill_after):
                    kind, *rest = (await lines.next()).split()
                    if kind == "R":
                        receipts.add(bytes.fromhex(rest[0]))
                    elif kind == "L":
                        locks[(rest[0], int(rest[1]))] = bytes.fromhex(rest[2])
                    elif kind == "C":
                        certs.add(bytes.fromhex(rest[0]))
            proc.send_signal(signal.SIGKILL)  # mid-write: the worker writes non-stop
            await proc.wait()
            assert proc.returncode == -signal.SIGKILL
        snap = read_snapshot(tmp_path)
        ids = {f[0] for f in snap.facts}
        assert receipts <= ids
        assert certs <= ids
        stored_locks = {(a, s): d for a, s, d, _ in snap.locks}
        assert all(stored_locks.get(k) == d for k, d in locks.items())
        report = verify_snapshot(snap)
        assert report.ok, report.problems
        if seed == 1:  # and as an operator would check it
            cli = await trio.run_process(
                [sys.executable, "-m", "peer.cli", "ledger", "verify", "--data-dir", str(tmp_path)],
                capture_stdout=True,
                check=False,
            )
            assert cli.returncode == 0, cli.stdout
        # The ledger reopens (replaying and re-verifying every row) and keeps working.
        async with open_ledger_store(tmp_path, WRITER_RULE, POLICY) as store:
            assert receipts <= set(store.ledger.fact_ids())
            assert await store.add(make_receipt(key(1), PAYEE, 1, 10**9 + _round))


async def test_kill_9_witness_mid_certification_keeps_its_locks(tmp_path: Path) -> None:
    """Fire transfers at a witness process, kill -9 it after a random number of votes,
    restart it: every vote it gave is backed by a stored lock, and it refuses any other
    transfer for those seqs (the payer's two signatures come back as a proof)."""
    rng = random.Random(7)
    witness_dir = tmp_path / "witness"
    config = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)
    firsts = {
        pid(p): make_transfer(p, make_receipt(p, PAYEE, 10, n), 1) for n, p in enumerate(PAYERS)
    }
    receipts = {pid(p): make_receipt(p, PAYEE, 10, n) for n, p in enumerate(PAYERS)}
    voted: dict[str, bytes] = {}
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            settlement_node(tmp_path / "client", key(301), WITNESS_RULE, POLICY, config)
        )

        async def ask(account: str, transfer: Signed) -> object:  # type: ignore[type-arg]
            req = TransferRequest(transfer, receipts[account]).to_bytes()
            reply = await client.svc.client.call(pid(WITNESS), Certify(req), CertifyReply)
            return decode_reply(reply.r)

        kill_after = rng.randrange(5, 40)
        async with worker("witness", witness_dir) as (proc, lines):
            with trio.fail_after(60):
                addr = (await lines.next()).split()[1]
                await client.peer.connect(addr)
                enough = trio.Event()

                async def one(account: str) -> None:
                    try:
                        got = await ask(account, firsts[account])
                    except SettlementError:
                        return  # in flight when the witness died: no vote, nothing promised
                    if isinstance(got, Signed):
                        voted[account] = got.message.transfer
                        if len(voted) >= kill_after:
                            enough.set()

                async with trio.open_nursery() as nursery:
                    for account in firsts:
                        nursery.start_soon(one, account)
                    await enough.wait()
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
        assert len(voted) >= kill_after
        async with worker("witness", witness_dir, 1) as (proc, lines):
            with trio.fail_after(60):
                addr = (await lines.next()).split()[1]
                # py-libp2p dials one TCP address per peer (the first it knows) and blocks
                # re-dialing a peer that just failed: forget the dead address.
                witness_id = ID.from_base58(pid(WITNESS))
                client.peer.host.get_network().unblock_peer(witness_id)
                client.peer.host.get_peerstore().clear_addrs(witness_id)
                await client.peer.connect(addr)
                # Read while the witness runs: WAL readers see every committed lock.
                stored = {(a, s): d for a, s, d, _ in read_snapshot(witness_dir).locks}
                for account, digest in voted.items():
                    assert stored[(account, 1)] == digest
                    assert firsts[account].digest == digest
                for account in list(voted)[:10]:
                    payer = next(p for p in PAYERS if pid(p) == account)
                    other = make_transfer(
                        payer, receipts[account], 1, time_ms=firsts[account].message.time_ms + 1
                    )
                    got = await ask(account, other)
                    assert isinstance(got, EquivocationProof), got
                    again = await ask(account, firsts[account])
                    assert isinstance(again, Signed) and again.message.transfer == voted[account]
    assert verify_snapshot(read_snapshot(witness_dir)).ok


KILL_WORKER = Path(__file__).with_name("ledger_kill_worker.py")
KILLS = 100


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_kill_9_during_writes_100_times_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """One ledger, 100 writer processes in a row, each killed with SIGKILL after a random
    number of acknowledged writes: every acknowledged fact and lock is on disk, and the
    ledger verifies after every kill (the next writer also replays and re-verifies it)."""
    rng = random.Random(11)
    facts: set[bytes] = set()
    locks: dict[tuple[str, int], bytes] = {}
    for run in range(KILLS):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(KILL_WORKER), str(tmp_path), str(run)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            lines = Lines(proc)
            with trio.fail_after(60):
                assert await lines.next() == "READY"
                for _ in range(rng.randrange(1, 60)):
                    kind, *rest = (await lines.next()).split()
                    if kind in ("R", "C"):
                        facts.add(bytes.fromhex(rest[0]))
                    elif kind == "L":
                        locks[(rest[0], int(rest[1]))] = bytes.fromhex(rest[2])
            proc.send_signal(signal.SIGKILL)  # mid-write: the worker writes non-stop
            await proc.wait()
            assert proc.returncode == -signal.SIGKILL
        finally:
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
        snap = read_snapshot(tmp_path)
        missing = facts - {f[0] for f in snap.facts}
        assert not missing, (run, len(missing))
        stored = {(a, s): d for a, s, d, _ in snap.locks}
        assert all(stored.get(k) == d for k, d in locks.items()), run
        report = verify_snapshot(snap)
        assert report.ok, (run, report.problems)
    cli = await trio.run_process(
        [sys.executable, "-m", "peer.cli", "ledger", "verify", "--data-dir", str(tmp_path)],
        capture_stdout=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout
