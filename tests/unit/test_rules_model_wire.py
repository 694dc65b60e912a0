"""Rules of /edgeswarm/model/1 (protocols/model_wire.py) that no other test held.

Model bytes come from untrusted providers: every bound here keeps one from making us hold
or hash more than a model's worth, or admit a chunk the manifest did not promise. Found
by mutation testing (issue 17, docs/testing.md): each test fails when its rule is removed.
"""

from __future__ import annotations

import hashlib
import os

import cbor2
import pytest

from protocols.codec import encode
from protocols.errors import DecodeError, LocalProtocolError, RemoteProtocolError, ValidationError
from protocols.model_wire import (
    CHUNK_FRAME_MAX,
    CHUNK_SIZE,
    MAX_BATCH,
    MAX_MODEL_CHUNKS,
    Chunk,
    ChunksRequest,
    Manifest,
    TransferError,
    decode_request,
    decode_response,
    encode_request,
    ipfs_cid_of,
    manifest_of_chunks,
)
from tests.unit.test_model_wire import CID, _py_libp2p_root, manifest_of

H = hashlib.sha256(b"chunk").digest()


def test_a_chunks_request_asks_for_1_to_max_batch_chunks_both_ways() -> None:
    for n in (1, MAX_BATCH):
        req = ChunksRequest(CID, tuple(range(n)))
        assert decode_request(encode_request(req)) == req
    for n in (0, MAX_BATCH + 1):
        with pytest.raises(LocalProtocolError):
            encode_request(ChunksRequest(CID, tuple(range(n))))
        with pytest.raises(RemoteProtocolError):
            decode_request(encode({"op": "chunks", "cid": CID, "idx": list(range(n))}))


def test_a_chunk_index_is_below_max_model_chunks() -> None:
    last = decode_request(encode({"op": "chunks", "cid": CID, "idx": [MAX_MODEL_CHUNKS - 1]}))
    assert last == ChunksRequest(CID, (MAX_MODEL_CHUNKS - 1,))
    for bad in (MAX_MODEL_CHUNKS, -1):
        with pytest.raises(RemoteProtocolError):
            decode_request(encode({"op": "chunks", "cid": CID, "idx": [bad]}))


def test_a_chunks_request_with_other_fields_or_another_op_is_refused() -> None:
    for bad in (
        {"op": "chunks", "cid": CID, "idx": [0], "extra": 1},
        {"op": "manifest", "cid": CID, "idx": [0]},
        {"op": "chunks", "cid": CID},
    ):
        with pytest.raises(RemoteProtocolError):
            decode_request(encode(bad))


def test_a_chunk_of_exactly_chunk_size_is_read() -> None:
    frame = encode({"i": 0, "d": b"x" * CHUNK_SIZE})
    assert decode_response(frame, max_size=CHUNK_FRAME_MAX) == Chunk(0, b"x" * CHUNK_SIZE)


def test_a_chunk_frame_need_not_be_canonical_cbor() -> None:
    """Chunk bytes are hashed against the manifest, never re-encoded: a provider whose
    CBOR encoder orders keys differently is still read."""
    frame = cbor2.dumps({"i": 1, "d": b"abc"})  # "i" before "d": not canonical order
    assert frame != encode({"i": 1, "d": b"abc"})
    assert decode_response(frame, max_size=CHUNK_FRAME_MAX) == Chunk(1, b"abc")


def test_an_error_codes_text_is_cut_to_32_characters() -> None:
    frame = encode({"error": "no", "code": "c" * 40})
    assert decode_response(frame, max_size=CHUNK_FRAME_MAX) == TransferError("c" * 32, "no")


def test_a_manifest_whose_size_or_chunk_is_not_an_integer_is_a_decode_error() -> None:
    base = manifest_of(b"abc").to_wire()
    for change in ({"size": "3"}, {"chunk": "262144"}, {"size": 3.0}):
        with pytest.raises(DecodeError):
            decode_response(encode({**base, **change}), max_size=CHUNK_FRAME_MAX)


def test_a_model_is_1_byte_to_max_model_chunks_chunks() -> None:
    assert Manifest(cid=CID, size=1, chunk_size=CHUNK_SIZE, hashes=(H,)).count == 1
    biggest = MAX_MODEL_CHUNKS * CHUNK_SIZE
    assert Manifest(CID, biggest, CHUNK_SIZE, (H,) * MAX_MODEL_CHUNKS).count == MAX_MODEL_CHUNKS
    with pytest.raises(ValidationError):
        Manifest(CID, biggest + 1, CHUNK_SIZE, (H,) * (MAX_MODEL_CHUNKS + 1))
    for size in (0, -1):
        with pytest.raises(ValidationError):
            Manifest(cid=CID, size=size, chunk_size=CHUNK_SIZE, hashes=())


def test_every_chunk_hash_is_32_bytes() -> None:
    for bad in (H[:31], H + b"x", H.hex()[:32]):
        with pytest.raises(ValidationError):
            Manifest(cid=CID, size=1, chunk_size=CHUNK_SIZE, hashes=(bad,))  # type: ignore[arg-type]


def test_manifest_of_chunks_builds_the_manifest_of_those_chunks() -> None:
    data = os.urandom(CHUNK_SIZE + 10)
    m = manifest_of(data)
    assert manifest_of_chunks(m.cid, list(m.hashes), len(data)) == m


def test_a_manifests_digest_is_the_sha256_of_its_canonical_wire_form() -> None:
    m = manifest_of(b"abc")
    assert m.digest() == hashlib.sha256(encode(m.to_wire())).digest()
    assert m.digest().hex() == "61ee59030cba15ba2e4cfebd72cca204ea9b08b409d4dcb6510042ca367b2130"
    other = Manifest(m.cid, 3, CHUNK_SIZE, (H,))
    assert other.digest() != m.digest()


def test_ipfs_cid_needs_one_size_per_hash_and_at_least_one() -> None:
    for hashes, sizes in (([], []), ([H], [1, 2]), ([H, H], [1])):
        with pytest.raises(LocalProtocolError):
            ipfs_cid_of(hashes, sizes)


async def test_a_two_chunk_models_ipfs_cid_is_its_dag_root_not_a_leaf() -> None:
    data = os.urandom(CHUNK_SIZE + 1000)
    m = manifest_of(data)
    sizes = [m.span(i)[1] for i in range(m.count)]
    root = ipfs_cid_of(m.hashes, sizes, raw_leaf_tsize=False)
    assert root == await _py_libp2p_root(data)
    assert root.startswith("bafybei")
    assert m.ipfs_cid().startswith("bafybei")
