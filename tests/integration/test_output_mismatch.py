"""A byzantine executor whose result frames do not match its signed commitment.

The executor below is a real market node (it advertises, bids, accepts the
award and runs the model), but its job streams pass through a tampering proxy
on the wire: every JobResult frame it writes carries outputs different from
the ones it computed, while its signed ResultCommitment still names the
digest of the honest outputs (or, in the last test, it re-signs a commitment
that names other inputs). Everything else (the other digest, the declared
output names, dtypes and shapes) still checks out, so the only rule that can
catch it is "the outputs received and the inputs sent hash to the digests the
executor committed to". Without that rule the receipt would prove the wrong
thing and a fraud proof built on the commitment would point at the honest
digest.

Written against behaviour only (the public market API, the job wire format
and the host's stream handler), so it survives refactors of the market
modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import trio
from market_swarm import Node, market_swarm
from test_market import WINNER_WINDOW, wait_providers

from peer.job_stream import JOB_PROTOCOL
from protocols.codec import FrameDecoder, frame
from protocols.market import MAX_PAYLOAD_FRAME, JobFrame, JobResult, decode_frame, encode_frame
from protocols.receipt import Acceptance, ResultCommitment, commit, content_digest
from protocols.signed import Signed
from protocols.tensor import decode_tensors, encode_tensors

# None: send the frame as it is; a list: send these instead (possibly none, to hold it back).
Tamper = Callable[[Node, JobFrame], JobFrame | list[JobFrame] | None]


@dataclass
class WireLog:
    """What one byzantine executor wrote and read on its job streams (decoded frames)."""

    read: list[Any] = field(default_factory=list)
    tampered: int = 0

    def acceptances(self) -> list[Any]:
        return [f for f in self.read if isinstance(f, Signed) and isinstance(f.message, Acceptance)]


def other_outputs(node: Node, item: JobFrame) -> JobFrame | None:
    """JobResults with the same names, dtypes and shapes but other values (so only the
    digest can tell); the commitment still names the honest outputs."""
    if not isinstance(item, JobResult):
        return None
    arrays = decode_tensors(item.outputs)
    lied = {name: arr + np.ones_like(arr) for name, arr in arrays.items()}
    return JobResult(item.job_id, item.seq, encode_tensors(lied), item.compute_ms)


def other_inputs(node: Node, item: JobFrame) -> JobFrame | None:
    """The honest outputs, under a commitment (validly signed) that names other inputs."""
    if not (isinstance(item, Signed) and isinstance(item.message, ResultCommitment)):
        return None
    return commit(node.peer.key, replace(item.message, input_digest=b"\x42" * 32))


def undecodable_outputs() -> Tamper:
    """Outputs that do not decode (the data is a byte short), under a commitment re-signed
    to their digest (held back until the result is known): only the requester's decoding of
    untrusted outputs can catch it."""
    held: list[Signed[ResultCommitment]] = []

    def tamper(node: Node, item: JobFrame) -> JobFrame | list[JobFrame] | None:
        if isinstance(item, Signed) and isinstance(item.message, ResultCommitment):
            held.append(item)  # type: ignore[arg-type]
            return []
        if isinstance(item, JobResult) and held:
            broken = {n: {**t, "data": t["data"][:-1]} for n, t in item.outputs.items()}
            c = held.pop().message
            lie = commit(node.peer.key, replace(c, output_digest=content_digest(broken)))
            return [lie, JobResult(item.job_id, item.seq, broken, item.compute_ms)]
        return None

    return tamper


class TamperingStream:
    """Wraps the executor's side of a job stream: frames it writes pass through ``tamper``."""

    def __init__(self, stream: Any, node: Node, tamper: Tamper, log: WireLog) -> None:
        self._stream = stream
        self._node = node
        self._tamper = tamper
        self._log = log
        self._out = FrameDecoder(max_size=MAX_PAYLOAD_FRAME)
        self._in = FrameDecoder(max_size=MAX_PAYLOAD_FRAME)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        self._out.feed(data)
        out = b""
        for raw in self._out.frames():
            lie = self._tamper(self._node, decode_frame(raw))
            if lie is None:
                out += frame(raw, max_size=MAX_PAYLOAD_FRAME)
                continue
            self._log.tampered += 1
            for item in lie if isinstance(lie, list) else [lie]:
                out += frame(encode_frame(item), max_size=MAX_PAYLOAD_FRAME)
        if out:
            await self._stream.write(out)

    async def read(self, n: int | None = None) -> bytes:
        chunk: bytes = await self._stream.read(n)
        self._in.feed(chunk)
        self._log.read.extend(decode_frame(raw) for raw in self._in.frames())
        return chunk


def make_byzantine(node: Node, tamper: Tamper = other_outputs) -> WireLog:
    """Route ``node``'s incoming job streams through a TamperingStream."""
    log = WireLog()
    host = node.peer.host
    honest = host.get_mux().handlers[JOB_PROTOCOL]
    assert honest is not None

    async def handler(stream: Any) -> None:
        await honest(TamperingStream(stream, node, tamper, log))

    host.set_stream_handler(JOB_PROTOCOL, handler)
    return log


async def test_result_not_matching_the_commitment_is_refused_and_retried_elsewhere(
    tmp_path: Path,
) -> None:
    """Rule: a requester signs an Acceptance only for outputs whose digest is the one the
    executor committed to. A mismatch is refused like a failed award: the job goes to the
    next bidder, the cheater gets no Acceptance and no receipt names it."""
    async with market_swarm(tmp_path) as swarm:
        cheater = await swarm.start("cheater", price=0.5)  # cheapest: it wins the auction
        honest = await swarm.start("honest", price=2.0)
        req = await swarm.start("req", serve=False)
        wire = make_byzantine(cheater)
        cid = next(iter(honest.market.served))
        await wait_providers(req, cid, 2)
        x = np.arange(4, dtype=np.float32)
        y = np.full(4, 10, dtype=np.float32)
        with trio.fail_after(60):
            result = await req.market.infer(
                cid, {"x": x, "y": y}, deadline=30, bid_window=WINNER_WINDOW
            )
        # The cheater won the auction and sent its lie (so the rule was exercised) ...
        assert wire.tampered == 1
        assert [e for e, _ in result.attempts] == [cheater.peer_id]
        (why,) = [r for e, r in result.attempts if e == cheater.peer_id]
        assert "output digest" in why
        # ... the job completed on the honest bidder with the honest outputs ...
        assert result.executor == honest.peer_id
        np.testing.assert_array_equal(result.outputs["z"], x + y)
        with trio.fail_after(30):
            await honest.market.receipts.wait_for(1)
        result.receipt.verify()
        assert result.receipt.commitment.message.executor == honest.peer_id
        # ... and nothing was signed for the cheater: no Acceptance went to it, and the
        # only receipt either side holds is the honest one.
        assert wire.acceptances() == []
        assert list(req.market.receipts.receipts) == [result.receipt]
        assert list(honest.market.receipts.receipts) == [result.receipt]
        assert list(cheater.market.receipts.receipts) == []


async def test_outputs_that_do_not_decode_are_refused_even_when_committed_to(
    tmp_path: Path,
) -> None:
    """Rule: outputs are decoded under the tensor limits before anything is signed; outputs
    that do not decode are refused (and retried elsewhere) even when the commitment names
    exactly them."""
    async with market_swarm(tmp_path) as swarm:
        cheater = await swarm.start("cheater", price=0.5)
        honest = await swarm.start("honest", price=2.0)
        req = await swarm.start("req", serve=False)
        wire = make_byzantine(cheater, undecodable_outputs())
        cid = next(iter(honest.market.served))
        await wait_providers(req, cid, 2)
        x = np.arange(4, dtype=np.float32)
        with trio.fail_after(60):
            result = await req.market.infer(
                cid, {"x": x, "y": x}, deadline=30, bid_window=WINNER_WINDOW
            )
        assert wire.tampered >= 1  # the result (and the commitment, if it got that far)
        assert [e for e, _ in result.attempts] == [cheater.peer_id]
        assert "do not decode" in result.attempts[0][1]
        assert result.executor == honest.peer_id
        np.testing.assert_array_equal(result.outputs["z"], 2 * x)
        assert wire.acceptances() == []
        assert list(cheater.market.receipts.receipts) == []


async def _lease_on_a_byzantine_holder(tmp_path: Path, tamper: Tamper) -> None:
    """The cheapest executor holds the lease and lies; at BatchClose its commitment does not
    match what was sent and received, so the batch is never signed: no Acceptance, no receipt."""
    async with market_swarm(tmp_path) as swarm:
        cheater = await swarm.start("cheater", price=0.5)
        honest = await swarm.start("honest", price=2.0)
        req = await swarm.start("req", serve=False)
        wire = make_byzantine(cheater, tamper)
        cid = next(iter(honest.market.served))
        await wait_providers(req, cid, 2)
        with trio.fail_after(60):
            async with req.market.lease(
                cid, max_jobs=100, seconds=30, bid_window=WINNER_WINDOW
            ) as lease:
                for i in range(3):
                    x = np.full(2, i, dtype=np.float32)
                    await lease.infer({"x": x, "y": x})
                    assert lease.executor == cheater.peer_id  # the lie was exercised
        assert wire.tampered >= 1
        assert lease.jobs_done == 3
        assert [r.executor for r in lease.receipts] == []
        assert wire.acceptances() == []
        assert list(req.market.receipts.receipts) == []
        assert list(cheater.market.receipts.receipts) == []


async def test_lease_batch_whose_outputs_do_not_match_its_commitment_is_never_signed(
    tmp_path: Path,
) -> None:
    """Rule: a batch's outputs must hash (batch digest) to the commitment's output digest."""
    await _lease_on_a_byzantine_holder(tmp_path, other_outputs)


async def test_lease_batch_committed_to_other_inputs_is_never_signed(tmp_path: Path) -> None:
    """Rule: a batch's commitment must name the batch digest of the inputs that were sent
    (for a lease only the requester's I/O layer knows them: the machine cannot check)."""
    await _lease_on_a_byzantine_holder(tmp_path, other_inputs)
