"""A payer's identity proof reaches every peer it asks for anything, before the request.

A witness that never got the proof grants no credit and refuses every transfer of its
payer; 3 of 4 votes still certify, so the refuser stays hidden while the committee
tolerates no fault. ``LedgerClient`` (peer/settlement/ledger_rpc.py) introduces us on
the first call to a peer; these tests check that a first call that failed (the peer not
reachable yet, the push cut short by the timeout, the push refused) leaves the
introduction to the next call instead of marking the peer introduced. In memory: the
real client and server over ``trio.testing`` streams, virtual time.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from market_memory import MemoryNet, key, pid

from peer.settlement.base import SettlementConfig, SettlementError, Stats
from peer.settlement.ledger_rpc import PROTOCOL_ID, LedgerClient
from peer.settlement.server import LedgerServer
from protocols.errors import ValidationError
from protocols.ledger import IdentityProof
from protocols.ledger_rpc import Certify, CertifyReply, Push, PushReply
from protocols.ledger_state import FactKind, decode_item

PAYER, WITNESS = pid(key(1)), pid(key(2))


class Recorder:
    """The witness's ``certify`` and ``push`` handlers: logs what arrives, in order;
    ``push_hangs`` / ``push_fails`` spoil the next pushes."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.known = False  # whether the witness holds the payer's identity proof
        self.certified_unknown = 0  # certify requests that came before the proof
        self.push_hangs = 0
        self.push_fails = 0

    async def answer_push(self, req: Push, peer: str = "?") -> PushReply:
        [(kind, _)] = [decode_item(i) for i in req.items]
        assert kind is FactKind.IDENTITY_PROOF
        self.log.append("push")
        if self.push_hangs:
            self.push_hangs -= 1
            await trio.sleep_forever()
        if self.push_fails:
            self.push_fails -= 1
            raise ValidationError("over budget")
        self.known = True
        return PushReply(1, 0)

    async def certify(self, req: Certify) -> CertifyReply:
        self.log.append("certify")
        if not self.known:
            self.certified_unknown += 1
        return CertifyReply(b"vote")


class LedgerHost:
    """What ``LedgerClient`` uses of a libp2p host, over a ``MemoryNet``."""

    def __init__(self, net: MemoryNet, me: str) -> None:
        self.net, self.me = net, me

    async def new_stream(self, peer: Any, protocols: list[str]) -> Any:
        return await self.net.open_stream(self.me, str(peer), protocols[0])


async def _world(nursery: trio.Nursery) -> tuple[LedgerClient, Recorder, MemoryNet]:
    net = MemoryNet(nursery)
    rec = Recorder()
    server = LedgerServer(None, rec, rec, SettlementConfig(), Stats())  # type: ignore[arg-type]
    net.host(WITNESS).set_stream_handler(PROTOCOL_ID, server.handle_stream)
    client = LedgerClient(LedgerHost(net, PAYER), PAYER, request_timeout=5.0)  # type: ignore[arg-type]
    client.identity = IdentityProof(PAYER, 7)
    return client, rec, net


async def _certify(client: LedgerClient) -> CertifyReply:
    return await client.call(WITNESS, Certify(b"t"), CertifyReply)


async def test_a_peer_not_reachable_at_first_is_introduced_once_it_is() -> None:
    async with trio.open_nursery() as nursery:
        client, rec, net = await _world(nursery)
        net.down.add(WITNESS)  # a restarted payer pays before it has connected
        with pytest.raises(SettlementError, match="cannot open"):
            await _certify(client)
        net.down.clear()
        await _certify(client)
        await _certify(client)
        assert rec.log == ["push", "certify", "certify"]
        assert rec.certified_unknown == 0
        nursery.cancel_scope.cancel()


async def test_an_introduction_cut_short_by_the_timeout_is_made_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        client, rec, _ = await _world(nursery)
        rec.push_hangs = 1
        with pytest.raises(SettlementError, match="did not answer"):
            await _certify(client)
        await _certify(client)
        assert rec.log == ["push", "push", "certify"]
        assert rec.certified_unknown == 0
        nursery.cancel_scope.cancel()


async def test_a_call_waiting_on_a_failed_introduction_introduces_us_itself() -> None:
    async with trio.open_nursery() as nursery:
        client, rec, _ = await _world(nursery)
        rec.push_fails = 1
        outcomes: list[object] = []

        async def one() -> None:
            try:
                outcomes.append(await _certify(client))
            except SettlementError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as calls:
            calls.start_soon(one)
            calls.start_soon(one)  # concurrent: a payer's pipelined requests
        assert rec.certified_unknown == 0
        assert rec.log == ["push", "push", "certify"]
        assert sum(isinstance(o, CertifyReply) for o in outcomes) == 1
        nursery.cancel_scope.cancel()
