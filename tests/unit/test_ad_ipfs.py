"""The capability ad's model offers carry the IPFS CIDv1 of the bytes, optionally."""

from __future__ import annotations

import pytest

from protocols.ad import ModelOffer
from protocols.errors import ValidationError

CID = "ab" * 32
IPFS = "bafkreifmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvmvm"


def test_an_offer_with_an_ipfs_cid_round_trips() -> None:
    offer = ModelOffer(cid=CID, name="m", p50_ms=2.0, ipfs=IPFS)
    assert offer.to_body()["ipfs"] == IPFS
    assert ModelOffer.from_body(offer.to_body()) == offer


def test_an_offer_without_one_keeps_the_old_encoding() -> None:
    offer = ModelOffer(cid=CID, name="m", p50_ms=2.0)
    assert offer.to_body() == {"cid": CID, "name": "m", "p50_ms": 2.0}
    assert ModelOffer.from_body({"cid": CID, "name": "m", "p50_ms": 2.0}) == offer


@pytest.mark.parametrize("ipfs", [7, "x" * 129])
def test_a_bad_ipfs_cid_is_refused(ipfs: object) -> None:
    with pytest.raises(ValidationError):
        ModelOffer.from_body({"cid": CID, "name": "m", "p50_ms": 2.0, "ipfs": ipfs})
