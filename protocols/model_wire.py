"""``/edgeswarm/model/1``: models by content id, in verified chunks (pure, sans-IO).

A model's identity is the sha256 of its bytes (the registry's cid). A provider
cuts the file into ``CHUNK_SIZE`` chunks (256 KiB, kubo's default) and answers:

* ``{"op": "manifest", "cid"}`` -> ``Manifest``: size, chunk size and the
  sha256 of every chunk;
* ``{"op": "chunks", "cid", "idx": [i, ...]}`` (at most ``MAX_BATCH``) -> one
  ``{"i", "d"}`` frame per chunk, in the order asked;
* anything it cannot serve -> ``{"error", "code"}``.

Every chunk is checked against the manifest before it is written, and the
whole file against the cid before the registry admits it. The sha256 cid does
not commit to the manifest, so a lying provider is caught only by that final
check: the fetcher then bans whoever gave it the manifest.

The manifest also gives the file's IPFS CIDv1 (``ipfs_cid``) as kubo computes
it for ``ipfs add --cid-version=1`` (raw leaves, 256 KiB chunks, balanced DAG
of at most 174 links per node, correct Tsize). A one-chunk model's IPFS CID is
``bafkrei...`` of the same sha256, i.e. its provider key in any IPFS DHT is
our provider key. py-libp2p's MerkleDag writes Tsize=0 for raw leaves, so its
multi-chunk roots differ from these (and from kubo's).

All frames are canonical CBOR maps in ``uvarint(len)`` frames
(``protocols.codec``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from protocols.codec import decode, encode, encode_uvarint
from protocols.errors import DecodeError, LocalProtocolError, ValidationError

MODEL_PROTOCOL_ID = "/edgeswarm/model/1"
CHUNK_SIZE = 256 * 1024
MAX_MODEL_CHUNKS = 8192  # 2 GiB: protobuf cannot hold larger models anyway
MAX_BATCH = 16  # chunks per request
REQUEST_MAX = 1024
# One chunk frame: the chunk and a few bytes of CBOR around it.
CHUNK_FRAME_MAX = CHUNK_SIZE + 64
MANIFEST_FRAME_MAX = MAX_MODEL_CHUNKS * 35 + 256
ERROR_MAX = 512
MAX_LINKS = 174  # kubo's balanced layout: links per dag-pb node

_CID_RE = re.compile(r"[0-9a-f]{64}")
ERROR_CODES = ("not-found", "bad-request", "busy", "unavailable")


def check_cid(cid: object) -> str:
    """A model cid is 64 lowercase hex digits (sha256 of the bytes)."""
    if not isinstance(cid, str) or not _CID_RE.fullmatch(cid):
        raise ValidationError(f"a model cid is 64 lowercase hex digits, got {cid!r:.80}")
    return cid


@dataclass(frozen=True)
class Manifest:
    """How a model's bytes are chunked: ``hashes[i]`` = sha256 of chunk ``i``."""

    cid: str
    size: int
    chunk_size: int
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_cid(self.cid)
        if self.chunk_size != CHUNK_SIZE:
            raise ValidationError(f"chunk size must be {CHUNK_SIZE}, got {self.chunk_size}")
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValidationError(f"model size must be a positive integer, got {self.size!r}")
        count = -(-self.size // self.chunk_size)
        if count > MAX_MODEL_CHUNKS:
            raise ValidationError(f"model of {self.size} bytes has over {MAX_MODEL_CHUNKS} chunks")
        if len(self.hashes) != count:
            raise ValidationError(
                f"manifest for {self.size} bytes must list {count} chunk hashes, "
                f"got {len(self.hashes)}"
            )
        if any(not isinstance(h, bytes) or len(h) != 32 for h in self.hashes):
            raise ValidationError("every chunk hash must be 32 bytes (sha256)")

    @property
    def count(self) -> int:
        return len(self.hashes)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        if not 0 <= index < self.count:
            raise LocalProtocolError(f"chunk {index} out of range 0..{self.count - 1}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def chunk_ok(self, index: int, data: bytes) -> bool:
        """Does ``data`` have chunk ``index``'s length and hash?"""
        if not 0 <= index < self.count:
            return False
        return (
            len(data) == self.span(index)[1]
            and hashlib.sha256(data).digest() == (self.hashes[index])
        )

    def digest(self) -> bytes:
        """Identifies this chunking of the bytes (two honest providers agree on it)."""
        return hashlib.sha256(encode(self.to_wire())).digest()

    def to_wire(self) -> dict[str, Any]:
        return {
            "cid": self.cid,
            "size": self.size,
            "chunk": self.chunk_size,
            "hashes": list(self.hashes),
        }

    @classmethod
    def from_wire(cls, value: object) -> Manifest:
        if not isinstance(value, dict) or set(value) != {"cid", "size", "chunk", "hashes"}:
            raise DecodeError("a manifest is a map of cid, size, chunk and hashes")
        hashes = value["hashes"]
        if not isinstance(hashes, list):
            raise DecodeError("manifest hashes must be a list")
        size, chunk = value["size"], value["chunk"]
        if not isinstance(size, int) or not isinstance(chunk, int):
            raise DecodeError("manifest size and chunk must be integers")
        return cls(cid=value["cid"], size=size, chunk_size=chunk, hashes=tuple(hashes))

    def ipfs_cid(self) -> str:
        """The CIDv1 kubo gives these bytes (``ipfs add --cid-version=1``)."""
        return ipfs_cid_of(self.hashes, [self.span(i)[1] for i in range(self.count)])


def manifest_of_chunks(cid: str, chunks_hashes: list[bytes], size: int) -> Manifest:
    return Manifest(cid=cid, size=size, chunk_size=CHUNK_SIZE, hashes=tuple(chunks_hashes))


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class ManifestRequest:
    cid: str


@dataclass(frozen=True)
class ChunksRequest:
    cid: str
    indexes: tuple[int, ...]


Request = ManifestRequest | ChunksRequest


def encode_request(req: Request) -> bytes:
    if isinstance(req, ManifestRequest):
        return encode({"op": "manifest", "cid": req.cid})
    if not 0 < len(req.indexes) <= MAX_BATCH:
        raise LocalProtocolError(f"ask for 1..{MAX_BATCH} chunks at a time")
    return encode({"op": "chunks", "cid": req.cid, "idx": list(req.indexes)})


def decode_request(data: bytes) -> Request:
    value = decode(data, max_size=REQUEST_MAX)
    if not isinstance(value, dict):
        raise DecodeError("a request is a map")
    op = value.get("op")
    if op == "manifest" and set(value) == {"op", "cid"}:
        return ManifestRequest(check_cid(value["cid"]))
    if op == "chunks" and set(value) == {"op", "cid", "idx"}:
        idx = value["idx"]
        if (
            not isinstance(idx, list)
            or not 0 < len(idx) <= MAX_BATCH
            or not all(isinstance(i, int) and 0 <= i < MAX_MODEL_CHUNKS for i in idx)
        ):
            raise ValidationError(f"idx must list 1..{MAX_BATCH} chunk indexes")
        return ChunksRequest(check_cid(value["cid"]), tuple(idx))
    raise DecodeError(f"unknown request {str(op)[:40]!r}")


# ---------------------------------------------------------------- responses


@dataclass(frozen=True)
class Chunk:
    index: int
    data: bytes


@dataclass(frozen=True)
class TransferError:
    code: str
    message: str


def encode_chunk(index: int, data: bytes) -> bytes:
    return encode({"i": index, "d": data})


def encode_error(code: str, message: str) -> bytes:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown error code {code!r}")
    return encode({"error": message[:ERROR_MAX], "code": code})


def encode_manifest(m: Manifest) -> bytes:
    return encode(m.to_wire())


def decode_response(data: bytes, *, max_size: int) -> Chunk | TransferError | Manifest:
    """A chunk, an error or a manifest; anything else is a ``DecodeError``."""
    # Chunk bytes are hashed after decoding, never re-encoded: skip the canonical check.
    value = decode(data, max_size=max_size, canonical=False)
    if not isinstance(value, dict):
        raise DecodeError("a response is a map")
    keys = set(value)
    if keys == {"i", "d"}:
        i, d = value["i"], value["d"]
        if not isinstance(i, int) or not isinstance(d, bytes) or len(d) > CHUNK_SIZE:
            raise DecodeError("a chunk is {i: int, d: bytes of at most one chunk}")
        return Chunk(i, d)
    if keys == {"error", "code"}:
        code, msg = value["code"], value["error"]
        if not isinstance(code, str) or not isinstance(msg, str):
            raise DecodeError("an error is {error: str, code: str}")
        return TransferError(code[:32], msg[:ERROR_MAX])
    return Manifest.from_wire(value)


# ---------------------------------------------------------------- IPFS CIDv1

_RAW = 0x55
_DAG_PB = 0x70


def _multihash(digest: bytes) -> bytes:
    return b"\x12\x20" + digest


def _cid_bytes(codec: int, digest: bytes) -> bytes:
    return b"\x01" + encode_uvarint(codec) + _multihash(digest)


def cid_text(cid: bytes) -> str:
    """Multibase base32 (lower, unpadded): the ``bafy...`` form."""
    return "b" + base64.b32encode(cid).decode().lower().rstrip("=")


def _field(number: int, wire: int) -> bytes:
    return encode_uvarint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + encode_uvarint(len(payload)) + payload


def _file_node(links: list[tuple[bytes, int, int]]) -> tuple[bytes, int]:
    """dag-pb node of a UnixFS file over ``links`` (cid, tsize, file bytes); (block, filesize)."""
    filesize = sum(n for _, _, n in links)
    unixfs = _field(1, 0) + encode_uvarint(2)  # Type = File
    unixfs += _field(3, 0) + encode_uvarint(filesize)
    for _, _, n in links:
        unixfs += _field(4, 0) + encode_uvarint(n)  # blocksizes, not packed (proto2)
    body = b""
    for cid, tsize, _ in links:  # PBNode: Links (2) before Data (1), as dag-pb encodes
        link = _len_field(1, cid) + _len_field(2, b"") + _field(3, 0) + encode_uvarint(tsize)
        body += _len_field(2, link)
    body += _len_field(1, unixfs)
    return body, filesize


def ipfs_cid_of(
    hashes: tuple[bytes, ...] | list[bytes], sizes: list[int], *, raw_leaf_tsize: bool = True
) -> str:
    """kubo's CIDv1 for a file whose 256 KiB raw leaves have these sha256s and sizes.

    ``raw_leaf_tsize=False`` writes Tsize 0 for leaves, as py-libp2p's MerkleDag does
    (only to show where the two differ).
    """
    if not hashes or len(hashes) != len(sizes):
        raise LocalProtocolError("need one size per chunk hash")
    # (cid bytes, Tsize = cumulative block bytes, file bytes)
    level = [
        (_cid_bytes(_RAW, h), n if raw_leaf_tsize else 0, n)
        for h, n in zip(hashes, sizes, strict=True)
    ]
    if len(level) == 1:
        return cid_text(level[0][0])
    while len(level) > 1:
        parents = []
        for start in range(0, len(level), MAX_LINKS):
            group = level[start : start + MAX_LINKS]
            block, filesize = _file_node(group)
            cid = _cid_bytes(_DAG_PB, hashlib.sha256(block).digest())
            parents.append((cid, len(block) + sum(t for _, t, _ in group), filesize))
        level = parents
    return cid_text(level[0][0])
