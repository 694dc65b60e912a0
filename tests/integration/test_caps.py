"""Caps on what one peer can cost another, each attacked by a misbehaving raw libp2p client.

Real hosts on 127.0.0.1: a market swarm (bootstrap node, an executor that also
runs the ledger and the referee service), and an attacker that is a bare
libp2p host with its own key (or a real peer driving the protocol by hand).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.records.record import make_signed_put_record
from market_swarm import Node, market_swarm
from test_market import BlockingRuntime, wait_providers

from edge_models.runtime import ModelRuntime
from peer import caps
from peer.host import build_host, connect, running_host
from peer.job_stream import JOB_PROTOCOL, FrameStream
from peer.market.gossip import topic_for
from peer.market.referee import RUNS_BURST, Claim, RefereeError, ask_referee
from peer.market.requester import new_request
from protocols.ad import ad_key
from protocols.codec import encode_uvarint
from protocols.identity import peer_id_from_public_key
from protocols.market import Award, Bid, JobInput, JobResult, LeaseTerms
from protocols.receipt import ResultCommitment, commit, content_digest
from protocols.signed import sign_message
from protocols.signing import seal
from protocols.tensor import encode_tensors
from protocols.verification import outputs_digest


@asynccontextmanager
async def raw_client(target: Node) -> AsyncIterator[Any]:
    """A bare libp2p host (own key, no edgeswarm services) connected to ``target``."""
    key = nacl.signing.SigningKey.generate()
    host = build_host(key)
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
        await connect(host, target.peer.listen_addrs[0])
        host.key = key  # type: ignore[attr-defined]
        yield host


async def ends_promptly(stream: Any, limit: float = 5.0) -> None:
    """The stream is reset or closed by the other side within ``limit`` (never left hanging)."""
    with trio.fail_after(limit):
        try:
            while await stream.read(1024):
                pass
        except StreamError:
            pass


async def refused_promptly(host: Any, peer: ID, protocol: str, limit: float = 5.0) -> None:
    """A new stream is reset (while opening or right after) or ended within ``limit``."""
    with trio.fail_after(limit):
        try:
            stream = await host.new_stream(peer, [TProtocol(protocol)])
        except Exception:  # reset during negotiation: py-libp2p's StreamFailure
            return
        await ends_promptly(stream, limit)


async def still_serves(swarm: Any, ex: Node) -> None:
    """A fresh requester gets a job done by ``ex`` (the attack left it working)."""
    req = await swarm.start("req", serve=False)
    cid = next(iter(ex.market.served))
    await wait_providers(req, cid, 1)
    x = np.ones(2, np.float32)
    with trio.fail_after(30):
        result = await req.market.infer(cid, {"x": x, "y": x}, deadline=20)
    assert result.executor == ex.peer_id


async def hangs(stream: Any, limit: float = 0.3) -> bool:
    """True if nothing (no data, no end) comes on ``stream`` for ``limit`` seconds."""
    with trio.move_on_after(limit):
        try:
            await stream.read(1024)
        except StreamError:
            return False
        return False
    return True


@pytest.mark.parametrize("protocol", [caps.JOB, caps.LEDGER])
async def test_streams_over_the_per_peer_cap_are_reset_at_once(
    tmp_path: Path, protocol: str
) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        assert ex.peer.settlement is not None  # the ledger handler runs too
        limit = ex.peer.caps.limit(protocol)
        victim = ID.from_base58(ex.peer_id)
        async with raw_client(ex) as attacker:
            with trio.fail_after(30):
                held = [
                    await attacker.new_stream(victim, [TProtocol(protocol)]) for _ in range(limit)
                ]
                for _ in range(3):
                    await refused_promptly(attacker, victim, protocol)
                # The streams under the cap are still served (waiting for their first frame).
                assert await hangs(held[-1])
                assert ex.peer.caps.refused[protocol] == 3
                assert ex.peer.caps.open[(protocol, str(attacker.get_id()))] == limit
                for s in held:
                    await s.reset()
            await still_serves(swarm, ex)  # another peer is not affected


async def test_referee_streams_beyond_one_per_peer_never_hang(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        victim = ID.from_base58(ex.peer_id)
        async with raw_client(ex) as attacker:
            with trio.fail_after(30):
                first = await attacker.new_stream(victim, [TProtocol(caps.REFEREE)])
                assert await hangs(first)  # admitted: the referee waits for its header
                for _ in range(4):  # busy (one request per peer at a time) or reset
                    await refused_promptly(attacker, victim, caps.REFEREE)
                await first.reset()


def _claims(cid: str, attacker: nacl.signing.SigningKey, inputs: Any, n: int) -> Claim:
    """A well-formed dispute about a job the attacker 'ran' for itself with a second key."""
    sybil = nacl.signing.SigningKey.generate()
    arrays = {"z": np.full(2, n, np.float32)}
    c = ResultCommitment(
        job_id=hashlib.sha256(b"fake%d" % n).digest()[:16],
        requester=peer_id_from_public_key(bytes(attacker.verify_key)),
        executor=peer_id_from_public_key(bytes(sybil.verify_key)),
        model_cid=cid,
        input_digest=content_digest(inputs),
        output_digest=outputs_digest(arrays),
        price=1,
        compute_ms=1,
    )
    return Claim(commit(sybil, c), encode_tensors(arrays))


async def test_one_requester_gets_a_bounded_number_of_referee_runs(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        ex.market.referee.rule = lambda: None  # any requester may ask: worst case
        ex.market.referee.clock = lambda: 0.0  # the budget does not refill during the test
        cid = next(iter(ex.market.served))
        inputs = encode_tensors({"x": np.ones(2, np.float32), "y": np.ones(2, np.float32)})
        victim = ID.from_base58(ex.peer_id)
        async with raw_client(ex) as attacker:

            async def open_stream(peer: str, until: float) -> Any:
                return await attacker.new_stream(victim, [TProtocol(caps.REFEREE)])

            outcomes: list[str] = []
            with trio.fail_after(60):
                for n in range(int(RUNS_BURST) + 3):
                    claim = _claims(cid, attacker.key, inputs, n)
                    try:
                        await ask_referee(
                            open_stream,
                            ex.peer_id,
                            [claim],
                            inputs,
                            limits=ex.market.settings.limits,
                            until=time.time() + 10,
                        )
                        outcomes.append("judged")
                    except RefereeError as exc:
                        outcomes.append("budget" if "budget" in str(exc) else str(exc))
        assert outcomes[: int(RUNS_BURST)] == ["judged"] * int(RUNS_BURST)
        assert outcomes[int(RUNS_BURST) :] == ["budget"] * 3
        assert ex.market.referee.stats["judged"] == RUNS_BURST
        assert ex.market.referee.stats["over_budget"] == 3


async def test_a_requester_streaming_inputs_gets_backpressure_not_our_memory(
    tmp_path: Path,
) -> None:
    blocking: list[BlockingRuntime] = []

    def wrap(rt: ModelRuntime) -> BlockingRuntime:
        blocking.append(BlockingRuntime(rt))
        return blocking[-1]

    async with market_swarm(tmp_path) as swarm:
        try:
            ex = await swarm.start("ex0", wrap_runtime=wrap)
            req = await swarm.start("req", serve=False)
            executor = ex.market.executor
            assert executor is not None
            cap = executor.inputs_in_flight
            cid = next(iter(ex.market.served))
            wire = encode_tensors({"x": np.ones(2, np.float32), "y": np.ones(2, np.float32)})
            jobs = 3 * cap + 5
            with trio.fail_after(60):
                until = time.time() + 40
                await req.market.auctions.prepare(cid, until)
                request = new_request(
                    requester=req.peer_id,
                    cid=cid,
                    wire=wire,
                    max_price=10**7,
                    deadline=until,
                    bid_window=0.2,
                    lease=LeaseTerms(max_jobs=jobs, until=until),
                )
                heard = trio.Event()
                bids: list[Bid] = []
                req.market.gossip.bid_sinks[request.job_id] = lambda b: (
                    bids.append(b),
                    heard.set(),
                )
                await req.market.gossip.publish(cid, sign_message(req.peer.key, request))
                await heard.wait()  # the executor's bid, heard on gossip
                bid = bids[0]
                award = Award(
                    job_id=request.job_id,
                    requester=req.peer_id,
                    executor=ex.peer_id,
                    model_cid=cid,
                    price=bid.price,
                    deadline=until,
                    lease=request.lease,
                )
                stream = await req.peer.host.new_stream(ID.from_base58(ex.peer_id), [JOB_PROTOCOL])
                fs = FrameStream(stream)
                await fs.send(sign_message(req.peer.key, award))

                async def flood() -> None:  # every input at once, never waiting for results
                    for seq in range(jobs):
                        await fs.send(JobInput(request.job_id, seq, wire))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood)
                    await blocking[0].started.wait()
                    await executor.backpressured.wait()  # the reader stopped: no free slot
                    assert executor.stats["inputs_high_water"] == cap
                    blocking[0].release.set()
                    results = 0
                    while results < jobs:
                        item = await fs.receive()
                        assert isinstance(item, JobResult), item
                        results += 1
            assert executor.stats["inputs_high_water"] == cap
            await fs.reset()
        finally:
            for b in blocking:
                b.release.set()


async def test_gossip_flood_is_shed_visibly_and_the_peer_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        cid = next(iter(ex.market.served))
        intake = ex.peer.intake
        topic = topic_for(cid)
        victim = ID.from_base58(ex.peer_id)
        flood = intake.per_peer + 200
        async with raw_client(ex) as attacker:
            rpc = rpc_pb2.RPC()
            rpc.subscriptions.add(subscribe=True, topicid=topic)
            for i in range(flood):
                rpc.publish.add(
                    from_id=attacker.get_id().to_bytes(),
                    data=os.urandom(64),
                    seqno=i.to_bytes(8, "big"),
                    topicIDs=[topic],
                )
            data = rpc.SerializeToString()
            with caplog.at_level(logging.WARNING, logger="peer.caps"), trio.fail_after(30):
                stream = await attacker.new_stream(victim, [PROTOCOL_ID_V11])
                await stream.write(encode_uvarint(len(data)) + data)
                await intake.stats.wait_shed(flood - intake.per_peer)
            assert intake.stats.shed_by_peer[str(attacker.get_id())] >= 200
            assert any("shedding" in r.getMessage() for r in caplog.records)
            await stream.reset()
        await still_serves(swarm, ex)  # the flood was bounded


async def test_an_ad_planting_addresses_for_another_peer_is_not_stored(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0")
        liar = await swarm.start("liar", serve=False)
        # The liar signs its own ad but lists an address that names the executor
        # (built by hand: our own constructor would refuse it).
        honest = liar.peer.ad
        assert honest is not None
        body = honest.to_body()
        body["addrs"] = [f"/ip4/127.0.0.1/tcp/9/p2p/{ex.peer_id}"]
        body["seq"] = honest.seq + 1
        value = seal(liar.peer.key, "edgeswarm/ad/v1", body).to_bytes()
        key = ad_key(liar.peer_id).encode()
        with trio.fail_after(20):
            record = make_signed_put_record(key, value, liar.peer.host.get_private_key())
            stored = await liar.peer.dht.value_store._store_at_peer(
                ID.from_base58(ex.peer_id), key, value, record
            )
            seen = await ex.peer.discovery.find_ad(liar.peer_id)
        assert not stored
        held = ex.peer.dht.value_store.get(key)
        assert held is None or held.value != value
        assert seen is None or all(ex.peer_id not in a for a in seen.addrs)
