"""The peer's Ed25519 identity on disk.

One key per data dir, created on first start. The file holds the raw 32-byte
seed and is created atomically with mode 0600: written to a private temp file
(``O_CREAT|O_EXCL``), fsynced, then hard-linked into place, so a crash never
leaves a half-written key and two processes starting at once end up with the
same key. A key file that is corrupt or readable by group/others stops start-up
with ``IdentityError`` saying what is wrong, which file, and how to fix it.

The same key is the libp2p host key (``libp2p_key_pair``), the ledger account
and the key that signs ads, bids and receipts.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import nacl.signing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from protocols.identity import peer_id_from_public_key

SEED_SIZE = 32


class IdentityError(Exception):
    """The identity key cannot be used; the message says why and how to fix it."""


def _check_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity key {path} is not a regular file; move it away")
    if os.name == "nt":  # POSIX permission bits do not apply
        return
    loose = st.st_mode & 0o077
    if loose:
        raise IdentityError(
            f"identity key {path} is readable or writable by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); anyone who can read it can spend "
            f"this peer's credit. Fix it with: chmod 600 {path}"
        )


def _load(path: Path) -> nacl.signing.SigningKey:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise IdentityError(f"cannot open identity key {path}: {exc.strerror}") from exc
    try:
        _check_mode(path, os.fstat(fd))
        data = os.read(fd, SEED_SIZE + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) != SEED_SIZE:
        raise IdentityError(
            f"identity key {path} is corrupt: expected {SEED_SIZE} bytes, found "
            f"{len(data) if len(data) <= SEED_SIZE else 'more'}. Restore it from a backup, "
            "or move it away to create a new identity (the old peer id and its "
            "balance are then lost)"
        )
    return nacl.signing.SigningKey(data)


def _create(path: Path) -> None:
    """Write a fresh key at ``path`` unless one appears there first (then keep that one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(nacl.signing.SigningKey.generate()))
            f.flush()
            os.fsync(f.fileno())
        # Atomic, and fails if a key already exists: then the other one wins.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_or_create_identity(path: Path) -> nacl.signing.SigningKey:
    """Load the key at ``path``, creating it (and its directory, mode 0700) on first start."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create data dir {path.parent}: {exc.strerror}") from exc
    if not path.exists() and not path.is_symlink():
        try:
            _create(path)
        except OSError as exc:
            raise IdentityError(f"cannot create identity key {path}: {exc.strerror}") from exc
    return _load(path)


def libp2p_key_pair(key: nacl.signing.SigningKey) -> KeyPair:
    """The libp2p key pair for ``key``; checks both libraries derive the same peer id."""
    pair = create_new_key_pair(bytes(key))
    libp2p_id = ID.from_pubkey(pair.public_key).to_base58()
    ours = peer_id_from_public_key(bytes(key.verify_key))
    if libp2p_id != ours:  # would mean the two derivations diverged: never run like that
        raise IdentityError(f"libp2p derives peer id {libp2p_id}, edgeswarm derives {ours}")
    return pair


def peer_id_of(key: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(key.verify_key))
