"""Signed messages keep the bytes they came in, and only canonical ones.

A parsed envelope's ``to_bytes`` is the received bytes, and a verified ``Signed`` is not
checked again (both are frozen). What makes that safe is guarded here: a message signed
over a non-canonical encoding of its body is refused (one message, one digest), and a
non-canonical envelope never parses, so the bytes kept are the ones ``to_bytes`` would
encode.
"""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from settlement_fixtures import key, receipt, transfer

from protocols.errors import ProtocolError, ValidationError
from protocols.ledger import Transfer
from protocols.receipt import Receipt
from protocols.signed import Signed, message_digest, open_message
from protocols.signing import Envelope, sign

PAYER, EXECUTOR = key(1), key(2)


def _non_canonical(t: Signed[Transfer]) -> Signed[Transfer]:
    """``t``'s message, signed (validly) over its body with the map keys in reverse order."""
    body = t.message.to_body()
    data = cbor2.dumps(dict(reversed(sorted(body.items()))))
    assert data != t.envelope.body
    env = Envelope(
        domain=t.envelope.domain,
        signer=t.envelope.signer,
        body=data,
        signature=sign(PAYER, t.envelope.domain, data),
    )
    return Signed(message=t.message, envelope=env)


def test_a_message_signed_over_a_non_canonical_body_is_refused_every_time() -> None:
    t = transfer(PAYER, receipt(PAYER, EXECUTOR, 10, 1), 1)
    bad = _non_canonical(t)
    # Its signature is good, but its digest would differ from the message's own.
    assert bad.digest != message_digest(t.message)
    for _ in range(2):  # a refusal is not remembered as a success
        with pytest.raises(ValidationError, match="does not match the bytes"):
            bad.verify()
    with pytest.raises(ProtocolError):
        open_message(Transfer, bad.to_bytes())


def test_a_verified_message_is_checked_again_with_another_envelope() -> None:
    r = receipt(PAYER, EXECUTOR, 10, 1)
    t1, t2 = transfer(PAYER, r, 1), transfer(PAYER, r, 2)
    t1.verify()
    mixed = dataclasses.replace(t1, envelope=t2.envelope)
    with pytest.raises(ValidationError, match="does not match the bytes"):
        mixed.verify()


def test_a_parsed_envelope_gives_back_exactly_the_canonical_bytes() -> None:
    t = transfer(PAYER, receipt(PAYER, EXECUTOR, 10, 1), 1)
    data = t.to_bytes()
    parsed = open_message(Transfer, data)
    fresh = dataclasses.replace(parsed.envelope)  # nothing kept: encodes its fields
    assert parsed.to_bytes() == data == fresh.to_bytes()
    # Another encoding of the same envelope never parses, so it is never kept.
    wire = cbor2.loads(data)
    shuffled = cbor2.dumps(dict(reversed(sorted(wire.items()))))
    assert shuffled != data
    with pytest.raises(ProtocolError):
        open_message(Transfer, shuffled)


def test_a_receipt_encodes_once_and_round_trips() -> None:
    r = receipt(PAYER, EXECUTOR, 10, 1)
    data = r.to_bytes()
    assert r.to_bytes() is data
    back = Receipt.from_bytes(data)
    assert back.to_bytes() == data and back.receipt_id == r.receipt_id
