"""Ad rules that mutation testing found no test holding (issue 17). Each test names one rule
and fails when that rule is broken (``python bench/mutation.py --paths protocols/ad.py``)."""

from __future__ import annotations

import pytest
from test_ad import KEY, NOW, PID, make_ad

from protocols.ad import (
    AD_DOMAIN,
    AD_MAX_SIZE,
    AD_MAX_TTL,
    MAX_ADDRS,
    CapabilityAd,
    ModelOffer,
    ad_key,
    build_ad,
    parse_ad,
    select_best,
)
from protocols.errors import LocalProtocolError, ProtocolError
from protocols.signing import seal


def test_an_invalid_record_before_valid_ones_is_skipped_not_the_end_of_the_search() -> None:
    values = [b"garbage", build_ad(KEY, make_ad(seq=1)), build_ad(KEY, make_ad(seq=2))]
    assert select_best(ad_key(PID), values, NOW) == 2


def test_ad_caps_are_inclusive() -> None:
    """queue up to 2**31 - 1, a model cid up to 128 characters, up to MAX_ADDRS addresses."""
    assert make_ad(queue=2**31 - 1).queue == 2**31 - 1
    assert ModelOffer("c" * 128, "m", 1.0).cid == "c" * 128
    addrs = tuple(f"/ip4/127.0.0.{i}/tcp/4001/p2p/{PID}" for i in range(MAX_ADDRS + 1))
    assert len(make_ad(addrs=addrs[:MAX_ADDRS]).addrs) == MAX_ADDRS
    for bad in (
        lambda: make_ad(queue=2**31),
        lambda: ModelOffer("c" * 129, "m", 1.0),
        lambda: make_ad(addrs=addrs),
    ):
        with pytest.raises(ProtocolError):
            bad()


def test_numbers_in_an_ad_are_ints_or_floats_never_bools_or_text() -> None:
    for bad in (True, "1.5"):
        with pytest.raises(ProtocolError):
            make_ad(price=bad)


def test_an_ad_may_expire_exactly_max_ttl_from_now() -> None:
    assert parse_ad(build_ad(KEY, make_ad(expires_at=NOW + AD_MAX_TTL)), NOW).seq == 7
    with pytest.raises(ProtocolError):
        parse_ad(build_ad(KEY, make_ad(expires_at=NOW + AD_MAX_TTL + 1)), NOW)


def _signed_size(ad: CapabilityAd) -> int:
    return len(seal(KEY, AD_DOMAIN, ad.to_body()).to_bytes())


def test_an_ad_of_exactly_the_size_cap_is_built_and_parsed() -> None:
    models = [ModelOffer(f"{i:064x}", "n" * 100, 1.0) for i in range(60)]
    ad = make_ad()
    for n in range(1, len(models) + 1):  # grow until one more model would pass the cap
        ad = make_ad(models=tuple(models[:n]))
        if _signed_size(ad) > AD_MAX_SIZE - 150:
            break
    gap = AD_MAX_SIZE - _signed_size(ad)
    last = ad.models[-1]
    exact = make_ad(models=(*ad.models[:-1], ModelOffer(last.cid, "n" * (100 + gap), 1.0)))
    assert _signed_size(exact) == AD_MAX_SIZE
    value = build_ad(KEY, exact)
    assert len(value) == AD_MAX_SIZE and parse_ad(value, NOW) == exact
    over = make_ad(models=(*ad.models[:-1], ModelOffer(last.cid, "n" * (101 + gap), 1.0)))
    with pytest.raises(LocalProtocolError):
        build_ad(KEY, over)
