"""Golden vectors of the ledger's state hash: fixed facts -> fixed hex.

Every peer runs the same code, so a change to the hash's format (the domain tag, the
count's width or byte order, the set digest's element function, a fact id) never makes
two peers disagree in a test, yet it silently splits the network from peers on the
previous release and breaks every stored ``state_hash``. These vectors make such a change
a decision: a deliberate one updates them (and says so in its commit), an accidental one
fails here.
"""

from __future__ import annotations

import hashlib

from protocols.ledger_state import (
    DIGEST_BITS,
    LedgerState,
    digest_element,
    digest_of,
    state_hash_of,
)
from tests.unit.settlement_fixtures import World, key, pid, policy, receipt, rule, transfer

EMPTY = "383ff566407bdc9c20b558ad30f4541db27b168957f133edc084bdcd5dc198b2"
ELEMENT_OF_ZERO_ID = "907f3b26e8b756d0419ada955e0fd794ba69054729498afebfbde35fc7cc443c"
TWO_IDS = "e6b53e3de3625d51bbe3599882f21913a675f8d9d10bb408ec34488943460856"
RECEIPT_ID = "03633b0348196b32f10d6a596c9dca99a3088b582d6ecf5691df2c084f35b591"
ONE_RECEIPT = "92d0a16c6584024d41f5dcadd04d841f00e85dfaf0bb2e3058f50c6d480d6903"
RECEIPT_AND_CERTIFICATE = "d9cc44a18db64092ffaeac3fc736429a49cc84f757377b596957ab8bac47832a"


def test_the_empty_ledgers_state_hash_is_fixed() -> None:
    assert LedgerState(rule(), policy()).state_hash().hex() == EMPTY
    assert state_hash_of(0, 0).hex() == EMPTY


def test_a_facts_term_of_the_set_digest_is_fixed() -> None:
    element = digest_element(bytes(32))
    assert element.bit_length() <= DIGEST_BITS
    assert hashlib.sha256(element.to_bytes(DIGEST_BITS // 8, "little")).hexdigest() == (
        ELEMENT_OF_ZERO_ID
    )


def test_the_state_hash_of_a_set_of_ids_is_fixed_and_ignores_order_and_repeats() -> None:
    a, b = bytes(32), b"\x01" * 32
    assert state_hash_of(*digest_of([a, b])).hex() == TWO_IDS
    assert state_hash_of(*digest_of([b, a, b])).hex() == TWO_IDS


def test_a_ledger_of_fixed_facts_has_a_fixed_state_hash() -> None:
    """Fixed keys sign the same bytes (Ed25519 is deterministic): the fact ids, and so the
    hash, are fixed too. Pins the receipt id and the certificate digest as well."""
    w = World(policy(genesis=frozenset({pid(key(1))})))
    r = receipt(key(1), key(2), 10, 1)
    assert r.receipt_id.hex() == RECEIPT_ID
    alone = LedgerState(w.rul, w.pol)
    assert alone.ingest_receipt(r)
    assert alone.state_hash().hex() == ONE_RECEIPT
    assert w.certify(transfer(key(1), r, 1), r) is not None
    ledger = w.ledgers[0]
    assert len(ledger) == 2
    assert ledger.state_hash().hex() == RECEIPT_AND_CERTIFICATE
    assert ledger.state_hash() == state_hash_of(*digest_of(ledger.fact_ids()))
