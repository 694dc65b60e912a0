"""Subprocess for tests/chaos/test_ledger_crash.py: writes to a ledger until killed.

``python ledger_crash_worker.py writer DIR RUN [LIMIT]``: 8 concurrent tasks store receipts,
certificates, witness locks and outgoing transfers; after each write returns
(committed, fsync'd) it prints one line naming what was acknowledged; after LIMIT rounds per task
it prints ``DONE`` and idles with the database open.

``python ledger_crash_worker.py witness DIR RUN``: a peer whose settlement service
witnesses transfers over /edgeswarm/ledger/1; prints ``LISTEN <multiaddr>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import trio
from settlement_helpers import (
    certify_offline,
    key,
    make_receipt,
    make_transfer,
    pid,
    policy,
    rule_for,
    settlement_node,
)

from peer.ledger_store import open_ledger_store
from peer.settlement import SettlementConfig
from protocols.witness import LockRecord

WITNESS_KEYS = [key(100 + i) for i in range(4)]
WRITER_RULE = rule_for(WITNESS_KEYS)
PAYERS = [key(1000 + i) for i in range(64)]
PAYEE = key(2)
POLICY = policy(genesis=frozenset(pid(k) for k in [*PAYERS, key(1)]))
WITNESS = key(300)
WITNESS_RULE = rule_for([WITNESS])  # a committee of one (f = 0): its lock is everything


def ack(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def writer(data_dir: Path, run: int, limit: int = 100_000) -> None:
    payer = key(1)
    certs, receipts = [], []
    for seq in range(1, 41):
        r = make_receipt(payer, PAYEE, 1000 + seq, 10_000 + seq)
        certs.append(
            certify_offline(
                WITNESS_KEYS,
                WRITER_RULE,
                POLICY,
                make_transfer(payer, r, seq, time_ms=1_700_000_000_000 + seq),
                r,
                certs,
            )
        )
        receipts.append(r)
    async with open_ledger_store(data_dir, WRITER_RULE, POLICY) as store:
        ack("READY")

        async def work(task: int) -> None:
            for i in range(limit):
                n = run * 10_000_000 + task * 100_000 + i
                r = make_receipt(PAYERS[n % 64], PAYEE, 10, n)
                await store.add(r)
                ack(f"R {r.receipt_id.hex()}")
                if i % 5 == 0:
                    record = LockRecord(make_transfer(PAYERS[task], r, run * 1_000_000 + i + 1))
                    await store.put_lock(record)
                    ack(f"L {record.account} {record.seq} {record.digest.hex()}")
                if task == 0 and i < len(certs):
                    await store.add(receipts[i])
                    await store.add(certs[i])
                    ack(f"C {certs[i].digest.hex()}")

        async with trio.open_nursery() as nursery:
            for task in range(8):
                nursery.start_soon(work, task)
        ack("DONE")
        await trio.sleep_forever()  # stay up like a peer would, holding the database open


async def witness(data_dir: Path, run: int) -> None:
    config = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)
    async with settlement_node(data_dir, WITNESS, WITNESS_RULE, POLICY, config) as node:
        ack(f"LISTEN {node.addr}")
        await trio.sleep_forever()


if __name__ == "__main__":
    mode, directory, run = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if mode == "writer":
        trio.run(writer, directory, run, int(sys.argv[4]) if len(sys.argv) > 4 else 100_000)
    else:
        trio.run(witness, directory, run)
