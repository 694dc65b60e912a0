"""Rules of transfers, credit policy and identity proof-of-work (protocols/ledger.py)
that no other test held.

Found by mutation testing (issue 17, docs/testing.md): each test fails when its rule is
removed. (tests/unit/test_rules_ledger.py holds rules of the ledger state.)
"""

from __future__ import annotations

import dataclasses

import pytest
from settlement_fixtures import key, pid

from protocols.codec import decode, encode
from protocols.errors import LocalProtocolError, ProtocolError, ValidationError
from protocols.ledger import (
    MAX_AMOUNT,
    MAX_SEQ,
    MAX_TIME_MS,
    CreditPolicy,
    IdentityProof,
    Transfer,
    leading_zero_bits,
    open_transfer,
    sign_transfer,
    solve_pow,
)

PAYER, PAYEE = key(1), key(2)
PEER = pid(key(3))


def transfer(**over: object) -> Transfer:
    fields: dict[str, object] = {
        "payer": pid(PAYER),
        "payee": pid(PAYEE),
        "amount": 5,
        "seq": 1,
        "receipt_id": bytes(32),
        "time_ms": 0,
    }
    fields.update(over)
    return Transfer(**fields)  # type: ignore[arg-type]


def test_transfer_numbers_are_bounded_inclusively() -> None:
    for name, top in (("amount", MAX_AMOUNT), ("seq", MAX_SEQ), ("time_ms", MAX_TIME_MS)):
        assert getattr(transfer(**{name: top}), name) == top
        with pytest.raises(ValidationError):
            transfer(**{name: top + 1})


def test_a_transfer_opened_without_verifying_skips_only_the_signature() -> None:
    signed = sign_transfer(PAYER, transfer())
    envelope = decode(signed.to_bytes(), max_size=Transfer.MAX_BYTES)
    envelope["s"] = bytes([envelope["s"][0] ^ 1]) + envelope["s"][1:]
    forged = encode(envelope)
    assert open_transfer(forged, verify=False).message == signed.message
    with pytest.raises(ProtocolError):
        open_transfer(forged)


def test_credit_policy_bounds() -> None:
    base = CreditPolicy()
    for ok in ({"earn_den": 1, "earn_num": 0}, {"pow_bits": 0}, {"pow_bits": 64}):
        dataclasses.replace(base, **ok)  # type: ignore[arg-type]
    for bad in (
        {"earn_den": 0},
        {"earn_num": -1},
        {"pow_bits": -1},
        {"pow_bits": 65},
        {"base_limit": 1.5},
        {"max_limit": -1},
    ):
        with pytest.raises(LocalProtocolError):
            dataclasses.replace(base, **bad)  # type: ignore[arg-type]


def test_leading_zero_bits_counts_from_the_first_byte() -> None:
    assert leading_zero_bits(bytes(32)) == 256
    assert leading_zero_bits(b"\x00\x01" + bytes(30)) == 15
    assert leading_zero_bits(b"\x80" + bytes(31)) == 0
    assert leading_zero_bits(b"\x01") == 7


def test_solve_pow_returns_the_first_nonce_with_enough_bits() -> None:
    first = next(n for n in range(10_000) if IdentityProof(PEER, n).bits >= 7)
    assert IdentityProof(PEER, first).bits == 7  # so "more than 7" would find another
    assert solve_pow(PEER, 7) == first
    assert solve_pow(PEER, 0) == 0
    assert solve_pow(PEER, 0, start=5) == 5
    assert solve_pow(PEER, 7, start=first + 1, max_tries=0) is None


def test_solve_pow_stops_at_the_last_8_byte_nonce() -> None:
    assert solve_pow(PEER, 256, start=2**64 - 2, max_tries=10) is None


def test_an_identity_nonce_is_8_bytes() -> None:
    IdentityProof(PEER, 2**64 - 1)
    with pytest.raises(ValidationError):
        IdentityProof(PEER, 2**64)
