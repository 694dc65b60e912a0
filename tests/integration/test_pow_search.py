"""The identity proof-of-work search runs in a child process: right answer, killed on cancel."""

from __future__ import annotations

import nacl.signing
import psutil
import pytest
import trio

from peer.settlement.pow_search import search_in_process
from protocols.identity import peer_id_from_public_key
from protocols.ledger import IdentityProof, solve_pow

PEER = peer_id_from_public_key(bytes(nacl.signing.SigningKey(b"\x07" * 32).verify_key))


@pytest.mark.timeout(60)
async def test_the_child_finds_the_same_proof_as_the_pure_search() -> None:
    with trio.fail_after(30):
        nonce = await search_in_process(PEER, 10, 0)
    assert nonce == solve_pow(PEER, 10)
    assert nonce is not None
    IdentityProof(PEER, nonce).verify(10)


@pytest.mark.timeout(60)
async def test_cancelling_the_search_kills_the_child() -> None:
    me = psutil.Process()
    with trio.move_on_after(1.0):
        await search_in_process(PEER, 60, 0)  # never found in a second
    assert not [c for c in me.children(recursive=True) if "pow_search" in " ".join(c.cmdline())]
