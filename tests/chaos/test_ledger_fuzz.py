"""Fuzzed /edgeswarm/ledger/1 requests: every one gets a reply, never a crash or a bad write."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from settlement_helpers import (
    certify_offline,
    key,
    make_receipt,
    make_transfer,
    policy,
    rule_for,
)

from peer.ledger_store import open_ledger_store, read_snapshot, verify_snapshot
from peer.settlement import MAX_FRAME, SettlementConfig, SettlementService
from protocols.codec import decode, encode
from protocols.ledger_state import FactKind, encode_item
from protocols.reconcile import Reconciler
from protocols.witness import TransferRequest

WITNESS = key(100)
RULE = rule_for([WITNESS])
POLICY = policy()
PAYER, PAYEE = key(1), key(2)


def seeds() -> list[bytes]:
    r = make_receipt(PAYER, PAYEE, 10, 1)
    t = make_transfer(PAYER, r, 1)
    return [
        encode({"v": 1, "op": "certify", "req": TransferRequest(t, r).to_bytes()}),
        encode({"v": 1, "op": "push", "items": [encode_item(FactKind.RECEIPT, r.to_bytes())]}),
        encode({"v": 1, "op": "sync", "m": Reconciler([r.receipt_id]).initiate()}),
        encode({"v": 1, "op": "get", "ids": [r.receipt_id, b"\x00" * 32]}),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif choice == 1 and b:
            del b[rng.randrange(len(b)) :]
        elif choice == 2:
            b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randrange(1, 16))
        else:
            b = bytearray(rng.randbytes(rng.randrange(0, 64)))
    return bytes(b)


async def test_fuzzed_requests_always_get_a_well_formed_reply(tmp_path: Path) -> None:
    rng = random.Random(1234)
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        svc = SettlementService(None, WITNESS, store, SettlementConfig(sync_interval=0))  # type: ignore[arg-type]
        base = seeds()
        errors = ok = 0
        for n in range(1500):
            data = base[n % len(base)] if n < len(base) else mutate(rng, rng.choice(base))
            reply = await svc.answer(data)
            decoded = decode(encode(reply), max_size=MAX_FRAME)  # a reply always encodes
            assert decoded["v"] == 1
            if "err" in decoded:
                errors += 1
                assert isinstance(decoded["err"], str) and decoded["err"]
            else:
                ok += 1
        assert errors > 500 and ok >= len(base)
        # Valid frames carrying mangled facts: counted as bad, never raised.
        r5 = make_receipt(PAYER, PAYEE, 3, 5)
        cert = certify_offline([WITNESS], RULE, POLICY, make_transfer(PAYER, r5, 1), r5)
        facts = [(FactKind.RECEIPT, r5.to_bytes()), (FactKind.CERTIFICATE, cert.to_bytes())]
        for n in range(600):
            kind, data = rng.choice(facts)
            item = encode_item(
                FactKind(rng.randrange(1, 7)) if n % 3 == 0 else kind, mutate(rng, data)
            )
            reply = await svc.answer(encode({"v": 1, "op": "push", "items": [item]}))
            assert set(reply) == {"v", "new", "bad"} and reply["new"] + reply["bad"] <= 1
        # Whatever was written passed the rules: the ledger verifies and the witness
        # locked at most one transfer per (account, seq).
        keys = [(r.account, r.seq) for r in store.locks()]
        assert len(keys) == len(set(keys))
    assert verify_snapshot(read_snapshot(tmp_path)).ok
