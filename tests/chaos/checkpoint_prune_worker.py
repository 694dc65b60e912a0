"""Subprocess for tests/chaos/test_checkpoint_crash.py (light: no libp2p).

``python checkpoint_prune_worker.py DIR``: opens the ledger at DIR, prints ``READY``, then
without pause: stores a batch of certificates continuing one payer's seq chain (prints
``C <last seq>`` once committed), adopts a checkpoint covering all but the last few of them
(prints ``A <epoch> <next seq it covers up to>`` once committed: pruning done), and again.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nacl.signing
import trio

from peer.ledger_store import open_ledger_store
from protocols.certificate import make_certificate, sign_vote
from protocols.checkpoint import checkpoint_committee, make_checkpoint, rule_id, sign_checkpoint
from protocols.committee import CommitteeRule
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, Transfer, sign_transfer
from protocols.ledger_state import FactKind
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"prune-key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


WITNESSES = [key(100 + i) for i in range(4)]
RULE = CommitteeRule(beacon=b"prune-beacon", fallback=frozenset(pid(k) for k in WITNESSES))
PAYER, PAYEE = key(1), key(2)
POLICY = CreditPolicy(genesis=frozenset({pid(PAYER)}), base_limit=10**12, max_limit=10**12)
T0 = 1_700_000_000_000
BATCH = 150


def price(seq: int) -> int:
    return 1 + seq % 7


def time_of(seq: int) -> int:
    return T0 + seq * 10


def receipt(seq: int) -> Receipt:
    c = commit(
        PAYEE,
        ResultCommitment(
            job_id=hashlib.sha256(b"job%d" % seq).digest()[:16],
            requester=pid(PAYER),
            executor=pid(PAYEE),
            model_cid=hashlib.sha256(b"m").hexdigest(),
            input_digest=content_digest({"x": seq}),
            output_digest=content_digest({"y": seq}),
            price=price(seq),
            compute_ms=1,
        ),
    )
    return Receipt.create(PAYER, c)


def ack(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(data_dir: Path) -> None:
    committee = RULE.committee_for(pid(PAYER))
    signers = [k for k in WITNESSES if pid(k) in committee][: committee.quorum]
    async with open_ledger_store(data_dir, RULE, POLICY) as store:
        ack("READY")
        while True:
            first = store.ledger.next_seq(pid(PAYER))
            items = []
            for seq in range(first, first + BATCH):
                r = receipt(seq)
                t = sign_transfer(
                    PAYER,
                    Transfer(pid(PAYER), r.executor, r.price, seq, r.receipt_id, time_of(seq)),
                )
                cert = make_certificate(t, [sign_vote(k, t) for k in signers])
                items += [(FactKind.CERTIFICATE, cert.to_bytes()), (FactKind.RECEIPT, r.to_bytes())]
            await store.add_facts(items)
            ack(f"C {first + BATCH - 1}")
            cut = time_of(first + BATCH - 10)  # the last 10 stay live
            header, _ = store.ledger.checkpoint_draft(cut, rule_id(RULE))
            cc = checkpoint_committee(RULE, header.epoch)
            votes = [sign_checkpoint(k, header) for k in WITNESSES if pid(k) in cc]
            await store.adopt_checkpoint(make_checkpoint(header, votes[: cc.quorum]))
            ack(f"A {header.epoch} {first + BATCH - 10}")


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
