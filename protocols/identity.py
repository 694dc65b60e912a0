"""Peer ids from Ed25519 public keys, computed the way libp2p does, without libp2p.

A libp2p peer id for an Ed25519 key is the identity multihash of the
protobuf-encoded public key (``KeyType=Ed25519 (1)``, ``Data=key``), shown
in base58btc. Keeping this pure lets protocols/ name peers in messages and
errors while only peer/ imports libp2p; a test checks both agree.
"""

from __future__ import annotations

from functools import lru_cache

from protocols.errors import ValidationError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
# protobuf: field 1 (Type) varint = 1 (Ed25519); field 2 (Data) length 32.
_PB_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
# multihash: identity (0x00), length 36.
_MH_PREFIX = bytes([0x00, 0x24])


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValidationError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


# Every signature check names its signer by peer id, and the same few accounts sign most
# messages: base58 in pure Python cost a third of a receipt's verification. Bounded caches.
@lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> str:
    return b58encode(_MH_PREFIX + _PB_PREFIX + public_key)


@lru_cache(maxsize=4096)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of ``peer_id_from_public_key`` for Ed25519 peer ids."""
    if len(peer_id) > 64:
        raise ValidationError("peer id is too long")
    raw = b58decode(peer_id)
    prefix = _MH_PREFIX + _PB_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValidationError(f"{peer_id!r} is not an Ed25519 peer id")
    return raw[len(prefix) :]
