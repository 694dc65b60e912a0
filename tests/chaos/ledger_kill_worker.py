"""Subprocess for the kill -9 loop in tests/chaos/test_ledger_crash.py (light: no libp2p).

``python ledger_kill_worker.py DIR RUN``: opens the ledger at DIR, prints ``READY``, then
writes without pause from 4 tasks (receipts one by one and in batches, witness locks,
certificates continuing one payer's seq chain) and prints one line per write *after* it
returned (committed, fsync'd): ``R <id>``, ``L <account> <seq> <digest>``, ``C <id>``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nacl.signing
import trio

from peer.ledger_store import open_ledger_store
from protocols.certificate import CertificateAssembler, sign_vote
from protocols.committee import CommitteeRule
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, Transfer, sign_transfer
from protocols.ledger_state import FactKind
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest
from protocols.witness import LockRecord


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"kill-key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


WITNESSES = [key(100 + i) for i in range(4)]
RULE = CommitteeRule(beacon=b"kill-beacon", fallback=frozenset(pid(k) for k in WITNESSES))
PAYER, PAYEE = key(1), key(2)
LOCKERS = [key(1000 + i) for i in range(8)]
POLICY = CreditPolicy(genesis=frozenset({pid(PAYER)}), base_limit=10**12, max_limit=10**12)


def receipt(n: int) -> Receipt:
    c = commit(
        PAYEE,
        ResultCommitment(
            job_id=hashlib.sha256(b"job%d" % n).digest()[:16],
            requester=pid(PAYER),
            executor=pid(PAYEE),
            model_cid=hashlib.sha256(b"m").hexdigest(),
            input_digest=content_digest({"x": n}),
            output_digest=content_digest({"y": n}),
            price=1 + n % 5,
            compute_ms=1,
        ),
    )
    return Receipt.create(PAYER, c)


def transfer(r: Receipt, seq: int, payer: nacl.signing.SigningKey = PAYER) -> object:
    return sign_transfer(
        payer, Transfer(pid(payer), r.executor, r.price, seq, r.receipt_id, 1_700_000_000_000)
    )


def ack(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(data_dir: Path, run: int) -> None:
    async with open_ledger_store(data_dir, RULE, POLICY) as store:
        ack("READY")
        base = run * 1_000_000

        async def receipts(task: int) -> None:
            for i in range(100_000):
                n = base + task * 100_000 + i
                if i % 3 == 0:  # a batch, as sync delivers them
                    batch = [receipt(n * 10 + j) for j in range(4)]
                    await store.add_facts([(FactKind.RECEIPT, r.to_bytes()) for r in batch])
                    for r in batch:
                        ack(f"R {r.receipt_id.hex()}")
                else:
                    r = receipt(n * 10)
                    await store.add(r)
                    ack(f"R {r.receipt_id.hex()}")

        async def locks() -> None:
            for i in range(100_000):
                who = LOCKERS[i % len(LOCKERS)]
                record = LockRecord(transfer(receipt(base + 900_000 + i), base + i + 1, who))  # type: ignore[arg-type]
                await store.put_lock(record)
                ack(f"L {record.account} {record.seq} {record.digest.hex()}")

        async def certificates() -> None:
            committee = RULE.committee_for(pid(PAYER))
            signers = [k for k in WITNESSES if pid(k) in committee]
            for i in range(100_000):
                seq = store.ledger.next_seq(pid(PAYER))
                r = receipt(base + 800_000 + i)
                t = transfer(r, seq)
                asm = CertificateAssembler(t, committee)  # type: ignore[arg-type]
                cert = None
                for k in signers:
                    cert = asm.add_vote(sign_vote(k, t)) or cert  # type: ignore[arg-type]
                assert cert is not None
                await store.add_facts(
                    [(FactKind.RECEIPT, r.to_bytes()), (FactKind.CERTIFICATE, cert.to_bytes())]
                )
                ack(f"R {r.receipt_id.hex()}")
                ack(f"C {cert.digest.hex()}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receipts, 0)
            nursery.start_soon(receipts, 1)
            nursery.start_soon(locks)
            nursery.start_soon(certificates)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
