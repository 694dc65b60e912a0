"""The idle job-stream pool keeps direct streams for the next award, never relayed ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from peer.job_stream import FrameStream
from peer.market.stream_pool import StreamPool


@dataclass
class FakeConn:
    addrs: list[str]

    def get_transport_addresses(self) -> list[str]:
        return self.addrs


@dataclass
class FakeStream:
    muxed_conn: FakeConn
    closed: bool = field(default=False)

    async def close(self) -> None:
        self.closed = True


def stream(addr: str) -> tuple[FrameStream, FakeStream]:
    raw = FakeStream(FakeConn([addr]))
    return FrameStream(raw), raw


async def test_a_direct_stream_is_kept_for_the_next_award() -> None:
    pool = StreamPool(clock=lambda: 0.0)
    fs, raw = stream("/ip4/10.0.0.2/tcp/4001")
    await pool.give("ex", fs)
    assert await pool.take("ex") is fs and not raw.closed


async def test_a_relayed_stream_is_closed_not_kept() -> None:
    # Kept, it would hold later jobs on the relay after a hole punch made a direct path.
    pool = StreamPool(clock=lambda: 0.0)
    fs, raw = stream("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit")
    await pool.give("ex", fs)
    assert await pool.take("ex") is None
    assert raw.closed and len(pool) == 0


async def test_a_pool_that_does_not_keep_closes_every_stream() -> None:
    pool = StreamPool(clock=lambda: 0.0, keep=False)
    fs, raw = stream("/ip4/10.0.0.2/tcp/4001")
    await pool.give("ex", fs)
    assert await pool.take("ex") is None and raw.closed
