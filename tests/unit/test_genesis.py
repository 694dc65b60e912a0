"""A network's genesis: canonical, validated, the network's identity; its wire and file form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from settlement_fixtures import key, pid

from peer.config import Config
from peer.settlement.network import check_pin, genesis_from_settings
from peer.settlement_paths import (
    NetworkError,
    genesis_from_json,
    genesis_to_json,
    ledger_dir,
    read_genesis_file,
    remember_network,
    write_genesis_file,
)
from protocols.codec import encode
from protocols.errors import ProtocolError
from protocols.genesis import (
    Genesis,
    genesis_reply,
    parse_genesis_reply,
)

W = tuple(sorted(pid(key(i)) for i in range(3)))


def genesis(**kw: object) -> Genesis:
    return Genesis.create("testnet", b"\x01" * 32, W, pow_bits=8, **kw)  # type: ignore[arg-type]


def test_round_trip_and_identity() -> None:
    g = genesis()
    assert Genesis.from_bytes(g.to_bytes()) == g
    assert parse_genesis_reply(genesis_reply(g)) == g
    assert genesis_from_json(genesis_to_json(g), "x") == g
    assert len(g.network_id) == 64
    # Every parameter is part of the identity: change one, get another network.
    for change in ({"f": 0}, {"pow_bits": 9}, {"epoch_ms": 1000}, {"eligible_earned": 1}):
        assert dataclasses.replace(g, **change).network_id != g.network_id  # type: ignore[arg-type]
    assert Genesis.create("testnet", b"\x02" * 32, W, pow_bits=8).network_id != g.network_id
    # Witness order does not matter (canonical), the set does.
    assert Genesis.create("testnet", b"\x01" * 32, reversed(W), pow_bits=8) == g


def test_rule_and_policy_follow_the_genesis() -> None:
    g = genesis(f=0, base_limit=5)
    assert g.rule().fallback == frozenset(W) and g.rule().f == 0
    assert g.policy().pow_bits == 8 and g.policy().base_limit == 5
    assert g.policy().genesis == frozenset(W)  # genesis witnesses need no proof of work


@pytest.mark.parametrize(
    "change",
    [
        {"name": ""},
        {"name": "has space"},
        {"beacon_seed": b"short"},
        {"witnesses": ()},
        {"witnesses": (W[1], W[0])},
        {"witnesses": ("not-a-peer-id",)},
        {"pow_bits": 41},
        {"epoch_ms": 5},
        {"beacon_lag": 0},
        {"f": -1},
    ],
)
def test_invalid_genesis_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        dataclasses.replace(genesis(), **change)  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_garbage_bytes_raise_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Genesis.from_bytes(data)


def test_extra_or_missing_fields_are_refused() -> None:
    body = genesis().to_body()
    with pytest.raises(ProtocolError):
        Genesis.from_bytes(encode({**body, "bootstrap": ["/ip4/1.2.3.4/tcp/1"]}))
    body.pop("pow_bits")
    with pytest.raises(ProtocolError):
        Genesis.from_bytes(encode(body))
    text = genesis_to_json(genesis()).replace('"pow_bits": 8,', "")
    with pytest.raises(NetworkError, match="missing pow_bits"):
        genesis_from_json(text, "g.json")


def test_settings_give_one_genesis_whatever_the_bootstrap_list() -> None:
    a = Config(ledger_witnesses=W, bootstrap=(), ledger_pow_bits=8)
    b = Config(
        ledger_witnesses=W, bootstrap=("/ip4/127.0.0.1/tcp/1/p2p/" + W[0],), ledger_pow_bits=8
    )
    assert genesis_from_settings(a, W) == genesis_from_settings(b, W)
    c = Config(ledger_witnesses=W, ledger_pow_bits=9)
    assert genesis_from_settings(c, W) != genesis_from_settings(a, W)


def test_network_pin() -> None:
    g = genesis()
    check_pin(Config(), g, "x")
    check_pin(Config(network=g.network_id[:8]), g, "x")
    with pytest.raises(NetworkError, match="must join network"):
        check_pin(Config(network="00000000"), g, "peer P")
    with pytest.raises(NetworkError, match="network id"):
        check_pin(Config(network="abc"), g, "x")


def test_a_data_dir_keeps_one_ledger_dir_per_network(tmp_path: Path) -> None:
    g1, g2 = genesis(), genesis(f=0)
    assert ledger_dir(tmp_path) == tmp_path  # nothing yet: a ledger from before networks
    p1 = remember_network(tmp_path, g1)
    assert ledger_dir(tmp_path) == p1
    p2 = remember_network(tmp_path, g2)
    assert p1 != p2 and ledger_dir(tmp_path) == p2  # the current one
    assert ledger_dir(tmp_path, g1.network_id[:10]) == p1
    assert read_genesis_file(p1 / "genesis.json") == g1
    with pytest.raises(NetworkError, match="no network"):
        ledger_dir(tmp_path, "ffffffffff")
    write_genesis_file(tmp_path / "g.json", g2)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(NetworkError, match="not a valid genesis"):
        read_genesis_file(tmp_path / "bad.json")
    with pytest.raises(NetworkError, match="cannot read"):
        read_genesis_file(tmp_path / "missing.json")


def test_describe_committee_says_when_it_is_degraded() -> None:
    from protocols.committee import describe_committee

    four = tuple(sorted(pid(key(i)) for i in range(10, 14)))
    g = Genesis.create("testnet", b"\x01" * 32, four, pow_bits=8)
    full = describe_committee(g.rule().committee_for(pid(key(1))), g.rule())
    assert (full["size"], full["f"], full["quorum"], full["degraded"]) == (4, 1, 3, False)
    one = Genesis.create("testnet", b"\x01" * 32, four[:1], pow_bits=8)
    d = describe_committee(one.rule().committee_for(pid(key(1))), one.rule())
    assert (d["size"], d["f"], d["quorum"], d["degraded"]) == (1, 0, 1, True)
