"""Peer ids (pure derivation vs libp2p's) and the identity key file on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peer.identity import IdentityError, libp2p_key_pair, load_or_create_identity, peer_id_of
from protocols.errors import ValidationError
from protocols.identity import (
    b58decode,
    b58encode,
    peer_id_from_public_key,
    public_key_from_peer_id,
)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_peer_id_matches_libp2p(seed: bytes) -> None:
    pair = create_new_key_pair(seed)
    ours = peer_id_from_public_key(nacl.signing.SigningKey(seed).verify_key.encode())
    assert ours == ID.from_pubkey(pair.public_key).to_base58()
    assert ours.startswith("12D3KooW")
    assert public_key_from_peer_id(ours) == pair.public_key.to_bytes()


@settings(max_examples=100)
@given(st.binary(max_size=50))
def test_base58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize("bad", ["", "0OIl", "Qm" + "x" * 44, "12D3KooW" + "1" * 70])
def test_bad_peer_ids_are_rejected(bad: str) -> None:
    with pytest.raises(ValidationError):
        public_key_from_peer_id(bad)


def test_created_on_first_start_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "identity.key"
    key = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert bytes(load_or_create_identity(path)) == bytes(key)  # stable across starts
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp left


def test_libp2p_key_pair_has_our_peer_id(tmp_path: Path) -> None:
    key = load_or_create_identity(tmp_path / "k")
    pair = libp2p_key_pair(key)
    assert ID.from_pubkey(pair.public_key).to_base58() == peer_id_of(key)


def test_world_readable_key_is_refused_with_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError) as err:
        load_or_create_identity(path)
    msg = str(err.value)
    assert str(path) in msg and "0644" in msg and f"chmod 600 {path}" in msg


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    os.chmod(path, 0o640)
    with pytest.raises(IdentityError, match="group/others"):
        load_or_create_identity(path)


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 33, b"x" * 1000])
def test_corrupt_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(IdentityError) as err:
        load_or_create_identity(path)
    assert "corrupt" in str(err.value) and str(path) in str(err.value)


def test_directory_in_place_of_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.mkdir()
    with pytest.raises(IdentityError, match=str(path)):
        load_or_create_identity(path)


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    seed = b"\x07" * 32
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, seed)
    os.close(fd)
    assert bytes(load_or_create_identity(path)) == seed
