"""A byzantine executor whose result frames do not match its signed commitment.

The executor below is a real market node (it advertises, bids, accepts the
award and runs the model), but its job streams pass through a tampering proxy
on the wire: every JobResult frame it writes carries outputs different from
the ones it computed, while its signed ResultCommitment still names the
digest of the honest outputs. The input digest and the declared output
names, dtypes and shapes all still check out, so the only rule that can
catch it is "the outputs received hash to the commitment's output digest".
Without that rule the receipt would prove the wrong thing and a fraud proof
built on the commitment would point at the honest digest.

Written against behaviour only (the public market API, the job wire format
and the host's stream handler), so it survives refactors of the market
modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from market_swarm import Node, market_swarm
from test_market import WINNER_WINDOW, wait_providers

from peer.job_stream import JOB_PROTOCOL
from protocols.codec import FrameDecoder, frame
from protocols.market import MAX_PAYLOAD_FRAME, JobResult, decode_frame, encode_frame
from protocols.receipt import Acceptance
from protocols.signed import Signed
from protocols.tensor import decode_tensors, encode_tensors


@dataclass
class WireLog:
    """What one byzantine executor wrote and read on its job streams (decoded frames)."""

    read: list[Any] = field(default_factory=list)
    tampered: int = 0
    tampered_event: trio.Event = field(default_factory=trio.Event)

    def acceptances(self) -> list[Any]:
        return [f for f in self.read if isinstance(f, Signed) and isinstance(f.message, Acceptance)]


def _tamper(result: JobResult) -> JobResult:
    """Same names, dtypes and shapes; different values (so only the digest can tell)."""
    arrays = decode_tensors(result.outputs)
    lied = {name: arr + np.ones_like(arr) for name, arr in arrays.items()}
    return JobResult(result.job_id, result.seq, encode_tensors(lied), result.compute_ms)


class TamperingStream:
    """Wraps the executor's side of a job stream: JobResult frames are rewritten on write."""

    def __init__(self, stream: Any, log: WireLog) -> None:
        self._stream = stream
        self._log = log
        self._out = FrameDecoder(max_size=MAX_PAYLOAD_FRAME)
        self._in = FrameDecoder(max_size=MAX_PAYLOAD_FRAME)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        self._out.feed(data)
        out = b""
        for raw in self._out.frames():
            item = decode_frame(raw)
            if isinstance(item, JobResult):
                item = _tamper(item)
                self._log.tampered += 1
                self._log.tampered_event.set()
                raw = encode_frame(item)
            out += frame(raw, max_size=MAX_PAYLOAD_FRAME)
        await self._stream.write(out)

    async def read(self, n: int | None = None) -> bytes:
        chunk: bytes = await self._stream.read(n)
        self._in.feed(chunk)
        self._log.read.extend(decode_frame(raw) for raw in self._in.frames())
        return chunk


def make_byzantine(node: Node) -> WireLog:
    """Route ``node``'s incoming job streams through a TamperingStream."""
    log = WireLog()
    host = node.peer.host
    honest = host.get_mux().handlers[JOB_PROTOCOL]
    assert honest is not None

    async def handler(stream: Any) -> None:
        await honest(TamperingStream(stream, log))

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
