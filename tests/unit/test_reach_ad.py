"""The capability ad's ``reachability`` (AutoNAT's verdict) and relay circuit addresses."""

from __future__ import annotations

import dataclasses

import pytest

from protocols.ad import CapabilityAd, build_ad, parse_ad_record
from protocols.codec import decode, encode
from protocols.errors import ValidationError
from tests.unit.test_ad import KEY, NOW, PID, make_ad

RELAY = "12D3KooWGRUVh8RYiwoMwwUGmrLNXxPvZrPvDEv1GXxvNMnQ3NkK"


@pytest.mark.parametrize("value", ["public", "private"])
def test_reachability_round_trips(value: str) -> None:
    circuit = f"/ip4/10.77.0.2/tcp/4101/p2p/{RELAY}/p2p-circuit/p2p/{PID}"
    ad = make_ad(reachability=value, addrs=(circuit,))
    parsed = parse_ad_record(f"/edgeswarm-ad/{PID}", build_ad(KEY, ad), NOW)
    assert parsed == ad and parsed.reachability == value


def test_unknown_reachability_is_absent_so_old_ads_keep_their_bytes() -> None:
    ad = make_ad()
    assert "reachability" not in ad.to_body()
    assert CapabilityAd.from_body(decode(encode(ad.to_body()), max_size=8192)) == ad


def test_bad_reachability_is_rejected() -> None:
    with pytest.raises(ValidationError):
        make_ad(reachability="maybe")
    body = dataclasses.replace(make_ad(), reachability="public").to_body()
    body["reachability"] = "x" * 100
    with pytest.raises(ValidationError):
        CapabilityAd.from_body(body)
