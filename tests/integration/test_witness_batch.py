"""The witness side of ``certify_many`` on a real ledger store (no network): a payer's
pipelined transfers are decided in order and locked with one fsync; a member that cannot be
read is answered alone and spoils nothing else; no vote exists before its lock is durable."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from settlement_helpers import key, make_receipt, make_transfer, now_ms, pid, policy, rule_for

from peer.ledger_store import open_ledger_store
from peer.settlement.base import LedgerFacts, Stats
from peer.settlement.witness_server import WitnessServer
from protocols.certificate import WitnessVote
from protocols.ledger_rpc import CertifyMany
from protocols.signed import Signed
from protocols.witness import Refusal, Refuse, TransferRequest, decode_reply

WITNESSES = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESSES)
PAYER, PAYEE = key(1), key(2)


def _request(seq: int, price: int = 10) -> bytes:
    r = make_receipt(PAYER, PAYEE, price, seq)
    return TransferRequest(make_transfer(PAYER, r, seq), r).to_bytes()


def _vote(answer: bytes | str) -> Signed[WitnessVote]:
    assert isinstance(answer, bytes), answer
    reply = decode_reply(answer)
    assert isinstance(reply, Signed), reply
    return reply


async def test_a_batch_is_voted_in_order_with_one_fsync(tmp_path: Path) -> None:
    async with open_ledger_store(tmp_path, RULE, policy()) as store:
        server = WitnessServer(
            WITNESSES[0], LedgerFacts(store), lambda *_: None, Stats(), now_ms=now_ms
        )
        commits = store.commits
        reply = await server.certify_many(CertifyMany(tuple(_request(s) for s in range(1, 9))))
        assert [_vote(a).message.seq for a in reply.rs] == list(range(1, 9))
        assert store.commits == commits + 1  # eight locks (and receipts), one transaction
        assert sorted(r.seq for r in store.locks()) == list(range(1, 9))


async def test_a_bad_member_is_answered_alone(tmp_path: Path) -> None:
    async with open_ledger_store(tmp_path, RULE, policy()) as store:
        server = WitnessServer(
            WITNESSES[0], LedgerFacts(store), lambda *_: None, Stats(), now_ms=now_ms
        )
        garbage = b"\xa1\x61v\x01"  # a CBOR map that is no TransferRequest
        other = make_receipt(PAYER, PAYEE, 10, 99)
        forged = bytearray(TransferRequest(make_transfer(PAYER, other, 2), other).to_bytes())
        forged[-80] ^= 1  # a flipped bit: its transfer or receipt no longer verifies
        reqs = (_request(1), garbage, bytes(forged), _request(2), _request(4))
        reply = await server.certify_many(CertifyMany(reqs))
        assert _vote(reply.rs[0]).message.seq == 1
        assert isinstance(reply.rs[1], str)  # unreadable: its own error
        assert isinstance(reply.rs[2], str) or isinstance(decode_reply(reply.rs[2]), Refuse)
        assert _vote(reply.rs[3]).message.seq == 2  # the bad members spoiled nothing
        gap = decode_reply(reply.rs[4])  # seq 3 was never asked: no lock to vote 4 ahead of
        assert isinstance(gap, Refuse) and gap.reason is Refusal.MISSING_HISTORY
        assert sorted(r.seq for r in store.locks()) == [1, 2]


async def test_no_vote_leaves_when_the_batch_lock_cannot_be_stored(tmp_path: Path) -> None:
    async with open_ledger_store(tmp_path, RULE, policy()) as store:
        server = WitnessServer(
            WITNESSES[0], LedgerFacts(store), lambda *_: None, Stats(), now_ms=now_ms
        )

        async def broken(*_: object, **__: object) -> None:
            await trio.lowlevel.checkpoint()
            raise OSError("disk full")

        store.put_locks = broken  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await server.certify_many(CertifyMany((_request(1), _request(2))))
        # The pending locks were dropped: nothing is locked, and nothing was voted.
        assert server.witness.lock_for(pid(PAYER), 1) is None
        assert server.witness.lock_for(pid(PAYER), 2) is None
        assert server.stats.votes == 0
