"""Capability ads: build/parse round-trip and every rejection rule."""

from __future__ import annotations

import dataclasses
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.ad import (
    AD_DOMAIN,
    AD_MAX_SIZE,
    AD_MAX_TTL,
    CapabilityAd,
    Device,
    ModelOffer,
    ad_key,
    better_record,
    build_ad,
    parse_ad,
    parse_ad_record,
    peer_id_from_ad_key,
    select_best,
)
from protocols.codec import decode, encode
from protocols.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    SignatureError,
    ValidationError,
)
from protocols.identity import peer_id_from_public_key
from protocols.signing import seal

NOW = 1_800_000_000.0
KEY = nacl.signing.SigningKey(b"\x11" * 32)
OTHER = nacl.signing.SigningKey(b"\x22" * 32)
PID = peer_id_from_public_key(bytes(KEY.verify_key))
OTHER_PID = peer_id_from_public_key(bytes(OTHER.verify_key))


def make_ad(**changes: Any) -> CapabilityAd:
    base = CapabilityAd(
        peer_id=PID,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{PID}",),
        devices=(Device("cpu", "Xeon", 16 * 2**30), Device("gpu", "H100", 80 * 2**30)),
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        models=(ModelOffer("ab" * 32, "mobilenet", 12.5),),
        price=1.5,
        load=0.25,
        queue=3,
        seq=7,
        expires_at=NOW + 60,
    )
    return dataclasses.replace(base, **changes)


texts = st.text(min_size=1, max_size=20)
ads = st.builds(
    make_ad,
    devices=st.lists(
        st.builds(Device, texts, st.text(max_size=20), st.none() | st.integers(0, 2**40)),
        max_size=4,
    ).map(tuple),
    providers=st.lists(texts, max_size=4).map(tuple),
    models=st.lists(
        st.builds(
            ModelOffer,
            st.text("0123456789abcdef", min_size=64, max_size=64),
            st.text(max_size=20),
            st.floats(0, 1e6, allow_nan=False),
        ),
        max_size=6,
        unique_by=lambda m: m.cid,
    ).map(tuple),
    price=st.floats(0, 1e9, allow_nan=False),
    load=st.floats(0, 100, allow_nan=False),
    queue=st.integers(0, 1000),
    seq=st.integers(0, 2**63 - 1),
    expires_at=st.floats(NOW + 1, NOW + AD_MAX_TTL, allow_nan=False),
)


@settings(max_examples=100, deadline=None)
@given(ads)
def test_round_trip(ad: CapabilityAd) -> None:
    value = build_ad(KEY, ad)
    assert len(value) <= AD_MAX_SIZE
    assert parse_ad_record(ad_key(PID), value, NOW) == ad
    assert build_ad(KEY, ad) == value  # deterministic (Ed25519 too)


@settings(max_examples=100, deadline=None)
@given(ads, st.data())
def test_any_bit_flip_is_rejected(ad: CapabilityAd, data: st.DataObject) -> None:
    raw = bytearray(build_ad(KEY, ad))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(RemoteProtocolError):
        parse_ad_record(ad_key(PID), bytes(raw), NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_rejected(value: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_ad_record(ad_key(PID), value, NOW)


def test_key_helpers() -> None:
    assert ad_key(PID) == f"/edgeswarm-ad/{PID}"
    assert peer_id_from_ad_key(ad_key(PID)) == PID
    for bad in ("/pk/" + PID, "/edgeswarm-ad/", "/edgeswarm-ad/notapeer", PID):
        with pytest.raises(ValidationError):
            peer_id_from_ad_key(bad)


def test_forged_signature_is_rejected() -> None:
    # OTHER signs an ad that claims to be PID's.
    forged = seal(OTHER, AD_DOMAIN, make_ad().to_body()).to_bytes()
    with pytest.raises(SignatureError, match="signed by another key"):
        parse_ad_record(ad_key(PID), forged, NOW)


def test_ad_stored_under_someone_elses_key_is_rejected() -> None:
    value = build_ad(KEY, make_ad())
    with pytest.raises(ValidationError, match="stored under the key of"):
        parse_ad_record(ad_key(OTHER_PID), value, NOW)


def test_ad_signed_for_another_domain_is_rejected() -> None:
    value = seal(KEY, "edgeswarm/bid/v1", make_ad().to_body()).to_bytes()
    with pytest.raises(SignatureError):
        parse_ad(value, NOW)


def test_expired_and_too_long_lived_ads_are_rejected() -> None:
    with pytest.raises(ValidationError, match="expired"):
        parse_ad(build_ad(KEY, make_ad(expires_at=NOW - 1)), NOW)
    with pytest.raises(ValidationError, match="expired"):
        parse_ad(build_ad(KEY, make_ad(expires_at=NOW)), NOW)
    with pytest.raises(ValidationError, match="limit"):
        parse_ad(build_ad(KEY, make_ad(expires_at=NOW + AD_MAX_TTL + 10)), NOW)


def test_oversize_ads_cannot_be_built_or_parsed() -> None:
    many = tuple(ModelOffer(f"{i:064x}", "m" * 200, 1.0) for i in range(60))
    with pytest.raises(LocalProtocolError, match="limit"):
        build_ad(KEY, make_ad(models=many))
    body = make_ad(models=many).to_body()
    value = seal(KEY, AD_DOMAIN, body).to_bytes()
    assert len(value) > AD_MAX_SIZE
    with pytest.raises(ValidationError, match="limit"):
        parse_ad(value, NOW)


def test_cannot_sign_an_ad_for_another_peer() -> None:
    with pytest.raises(LocalProtocolError):
        build_ad(OTHER, make_ad())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: {**b, "extra": 1},
        lambda b: {k: v for k, v in b.items() if k != "price"},
        lambda b: {**b, "price": -1.0},
        lambda b: {**b, "price": float("inf")},
        lambda b: {**b, "load": "high"},
        lambda b: {**b, "queue": -1},
        lambda b: {**b, "queue": True},
        lambda b: {**b, "seq": 2**64},
        lambda b: {**b, "addrs": ["not-a-multiaddr"]},
        lambda b: {**b, "addrs": ["/ip4/1.2.3.4/tcp/1"] * 17},
        lambda b: {**b, "devices": [{"kind": "cpu"}]},
        lambda b: {**b, "devices": "cpu"},
        lambda b: {**b, "models": [{"cid": "", "name": "x", "p50_ms": 1.0}]},
        lambda b: {**b, "models": [b["models"][0], b["models"][0]]},
        lambda b: {**b, "providers": ["x" * 300]},
        lambda b: {**b, "peer_id": "QmNotEd25519"},
        lambda b: [b],
    ],
)
def test_malformed_bodies_are_rejected(mutate: Any) -> None:
    body = mutate(make_ad().to_body())
    value = seal(KEY, AD_DOMAIN, body).to_bytes()
    with pytest.raises(RemoteProtocolError):
        parse_ad_record(ad_key(PID), value, NOW)


def test_better_record_higher_seq_wins_and_ties_are_deterministic() -> None:
    old, new = make_ad(seq=1), make_ad(seq=2, expires_at=NOW + 1)
    assert better_record(old, new) == new and better_record(new, old) == new
    a, b = make_ad(seq=5, load=0.1), make_ad(seq=5, load=0.9)
    assert better_record(a, b) == better_record(b, a)
    c = make_ad(seq=5, expires_at=NOW + 100)
    assert better_record(a, c) == c


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=6))
def test_select_best_picks_the_highest_valid_seq(seqs: list[int]) -> None:
    values = [build_ad(KEY, make_ad(seq=s)) for s in seqs]
    values.append(b"garbage")
    values.append(build_ad(KEY, make_ad(seq=1000, expires_at=NOW - 5)))  # expired: loses
    best = select_best(ad_key(PID), values, NOW)
    assert decode(decode(values[best], max_size=AD_MAX_SIZE)["b"], max_size=AD_MAX_SIZE)[
        "seq"
    ] == max(seqs)


def test_select_best_with_nothing_valid_returns_zero() -> None:
    assert select_best(ad_key(PID), [b"x", encode({"a": 1})], NOW) == 0


def test_to_dict_is_json_friendly() -> None:
    import json

    d = make_ad().to_dict()
    assert json.loads(json.dumps(d)) == d
    for key in ("peer_id", "addrs", "devices", "providers", "models", "price", "load"):
        assert key in d
    assert d["models"][0]["cid"] == "ab" * 32 and d["models"][0]["name"] == "mobilenet"
