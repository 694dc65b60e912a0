"""Rules of a network's genesis (protocols/genesis.py) that no other test held.

The genesis is read from untrusted peers (``/edgeswarm/genesis/1``) and names the network:
every bound below is a rule (each test fails when it is removed; issue 17, docs/testing.md).
"""

from __future__ import annotations

import dataclasses

import pytest

from protocols.codec import encode
from protocols.committee import MAX_COMMITTEE
from protocols.errors import ProtocolError, ValidationError
from protocols.genesis import (
    GENESIS_REPLY_MAX,
    GENESIS_REQUEST_MAX,
    Genesis,
    check_genesis_request,
    genesis_reply,
    genesis_request,
    parse_genesis_reply,
)
from tests.unit.settlement_fixtures import key, pid

W = tuple(sorted(pid(key(i)) for i in range(3)))
# Fixed fields -> fixed network id: a change of the genesis encoding or its domain tag
# would split every network from its own peers on the previous release.
NETWORK_ID = "c8da41df68b864c679f6921b517ee93a9942667b5f6cec43f9de8f9add0e8aae"


def genesis(**kw: object) -> Genesis:
    return Genesis.create("testnet", b"\x01" * 32, W, pow_bits=8, **kw)  # type: ignore[arg-type]


# field -> (lowest allowed, highest allowed)
BOUNDS: dict[str, tuple[int, int]] = {
    "f": (0, (MAX_COMMITTEE - 1) // 3),
    "pow_bits": (0, 40),
    "base_limit": (0, 10**15),
    "epoch_ms": (100, 30 * 24 * 3600 * 1000),
    "eligible_age": (0, 10_000),
    "eligible_earned": (0, 10**15),
    "beacon_lag": (1, 10_000),
    "referee_panel_size": (1, MAX_COMMITTEE),
}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_parameter_takes_its_bounds_and_nothing_past_them(name: str) -> None:
    lo, hi = BOUNDS[name]
    g = genesis()
    for ok in (lo, hi):
        assert getattr(dataclasses.replace(g, **{name: ok}), name) == ok  # type: ignore[arg-type]
    for bad in (lo - 1, hi + 1, True if lo <= 1 <= hi else None, float(lo)):
        with pytest.raises(ValidationError):
            dataclasses.replace(g, **{name: bad})  # type: ignore[arg-type]


def test_a_name_is_1_to_64_of_letters_digits_dash_underscore_and_dot() -> None:
    assert genesis().name == "testnet"
    ok = "aZ0-_." + "x" * 58
    assert dataclasses.replace(genesis(), name=ok).name == ok
    for bad in ("", "x" * 65, "a/b", "é"):
        with pytest.raises(ValidationError):
            dataclasses.replace(genesis(), name=bad)


def test_the_beacon_seed_is_exactly_32_bytes() -> None:
    for bad in (b"\x01" * 31, b"\x01" * 33):
        with pytest.raises(ValidationError):
            dataclasses.replace(genesis(), beacon_seed=bad)


def test_witnesses_are_a_sorted_distinct_tuple_of_1_to_max_committee_peer_ids() -> None:
    many = tuple(sorted(pid(key(1000 + i)) for i in range(MAX_COMMITTEE + 1)))
    assert len(dataclasses.replace(genesis(), witnesses=many[:MAX_COMMITTEE]).witnesses) == 64
    for bad in (many, (), list(W), (W[0], W[0]), (W[1], W[0])):
        with pytest.raises(ValidationError):
            dataclasses.replace(genesis(), witnesses=bad)  # type: ignore[arg-type]
    assert Genesis.create("testnet", b"\x01" * 32, [W[2], W[0], W[1], W[0]]).witnesses == W


def test_the_network_id_of_a_fixed_genesis_is_fixed() -> None:
    g = genesis()
    assert g.network_id == g.digest.hex()
    assert g.network_id == NETWORK_ID


def test_witnesses_on_the_wire_must_be_a_list() -> None:
    body = genesis().to_body()
    assert type(body["witnesses"]) is list
    body["witnesses"] = {w: 1 for w in W}
    with pytest.raises(ProtocolError):
        Genesis.from_bytes(encode(body))


def test_genesis_bytes_are_capped_at_max_bytes() -> None:
    g = genesis()
    padded = g.to_bytes()
    assert Genesis.from_bytes(padded) == g
    body = g.to_body()
    body["witnesses"] = [pid(key(2000 + i)) for i in range(200)]  # over 8 KiB
    with pytest.raises(ProtocolError):
        Genesis.from_bytes(encode(body))


def test_the_genesis_wire_asks_with_an_empty_versioned_map_and_answers_with_the_bytes() -> None:
    check_genesis_request(genesis_request())
    assert len(genesis_request()) <= GENESIS_REQUEST_MAX
    for bad in (encode({"v": 2}), encode({"v": 1, "x": 1}), encode({"v": 1, "pad": "x" * 80})):
        with pytest.raises(ProtocolError):
            check_genesis_request(bad)
    g = genesis()
    reply = genesis_reply(g)
    assert len(reply) <= GENESIS_REPLY_MAX
    assert parse_genesis_reply(reply) == g
    for bad in (
        encode({"v": 1, "genesis": b""}),
        encode({"v": 1, "genesis": "text"}),
        encode({"v": 2, "genesis": g.to_bytes()}),
        encode({"v": 1, "genesis": g.to_bytes(), "extra": 1}),
    ):
        with pytest.raises(ProtocolError):
            parse_genesis_reply(bad)


def test_rule_and_policy_carry_every_parameter_they_need() -> None:
    g = genesis(f=2, referee_panel_size=5, base_limit=7)
    rule = g.rule(pool=[W[0]])
    assert rule.beacon == g.beacon_seed
    assert rule.pool == frozenset({W[0]})
    assert rule.fallback == frozenset(W)
    assert (rule.f, rule.referee_panel_size) == (2, 5)
    policy = g.policy()
    assert (policy.base_limit, policy.pow_bits, policy.genesis) == (7, 8, frozenset(W))


def test_describe_shows_every_field_the_seed_in_hex_and_the_network_id() -> None:
    g = genesis()
    d = g.describe()
    assert "v" not in d
    assert d["beacon_seed"] == "01" * 32
    assert d["network_id"] == g.network_id
    assert d["witnesses"] == list(W)
    assert set(d) == set(Genesis._FIELDS) | {"network_id"}
