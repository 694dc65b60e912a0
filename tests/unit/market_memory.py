"""An in-memory network for ``peer/market``: no sockets, no real time.

``MemoryNet`` stands in for libp2p: each peer registers stream handlers, and
``open_stream`` hands the handler one end of ``trio.testing.memory_stream_pair``
(wrapped to look like an ``INetStream``: ``read``/``write``/``close``/``reset``
and ``muxed_conn.peer_id``). ``MemoryGossip`` delivers a requester's JobRequest
to every executor's ``on_request`` and their bids to the requester's bid sinks.
``MemoryDialer`` is the market's dialing seam over the same net. Run tests under
``trio.testing.MockClock`` with ``peer.market.clock.trio_clock``: bid windows,
etas and deadlines then pass in virtual time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import numpy as np
import trio
import trio.testing

from peer.market.clock import Clock
from peer.market.executor import ExecutorService
from peer.market.receipts import ReceiptBook
from protocols import executor as ex
from protocols.identity import peer_id_from_public_key
from protocols.market import Bid, JobRequest
from protocols.signed import Signed
from protocols.tensor import DEFAULT_LIMITS

Handler = Callable[[Any], Awaitable[None]]


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


@dataclass(frozen=True)
class _Conn:
    peer_id: str


class MemoryStream:
    """One end of an in-memory stream, shaped like py-libp2p's ``INetStream``."""

    def __init__(self, stream: trio.testing.StapledStream[Any, Any], remote: str) -> None:
        self._s = stream
        self.muxed_conn = _Conn(remote)

    async def write(self, data: bytes) -> None:
        await self._s.send_all(data)

    async def read(self, n: int) -> bytes:
        try:
            return bytes(await self._s.receive_some(n))
        except trio.ClosedResourceError:
            return b""

    async def close(self) -> None:
        await self._s.aclose()

    async def reset(self) -> None:
        await self._s.aclose()


@dataclass(eq=False)  # hashable: peer.caps keys its per-host caps by the host
class MemoryHost:
    peer_id: str
    net: MemoryNet
    handlers: dict[str, Handler] = field(default_factory=dict)

    def set_stream_handler(self, protocol: str, handler: Handler) -> None:
        self.handlers[protocol] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        self.handlers.pop(protocol, None)


class MemoryNet:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.hosts: dict[str, MemoryHost] = {}
        self.down: set[str] = set()  # peers that no longer answer dials
        self.streams_opened = 0

    def host(self, peer_id: str) -> MemoryHost:
        return self.hosts.setdefault(peer_id, MemoryHost(peer_id, self))

    async def open_stream(self, src: str, dst: str, protocol: str) -> MemoryStream:
        handler = self.hosts[dst].handlers.get(protocol) if dst in self.hosts else None
        if handler is None or dst in self.down:
            raise OSError(f"{dst} does not answer {protocol}")
        a, b = trio.testing.memory_stream_pair()
        self.streams_opened += 1
        self.nursery.start_soon(handler, MemoryStream(b, src))
        return MemoryStream(a, dst)


class MemoryGossip:
    """The market's gossip seam in memory: requests to executors, bids to jobs."""

    def __init__(self) -> None:
        self.executors: dict[str, ExecutorService] = {}
        self.bid_sinks: dict[bytes, Callable[[Bid], None]] = {}
        self.published: list[Any] = []

    async def join(self, cid: str, *, serve: bool = False) -> str:
        return cid

    def mesh_peers(self, cid: str) -> set[str]:
        return set(self.executors)

    def topic_peers(self, cid: str) -> set[str]:
        return set(self.executors)

    async def wait_for_mesh(self, cid: str, candidates: list[Any], limit: float) -> bool:
        return True

    async def publish(self, cid: str, signed: Signed[Any]) -> None:
        self.published.append(signed.message)
        m = signed.message
        if isinstance(m, JobRequest):
            for executor in list(self.executors.values()):
                executor.on_request(m)
        elif isinstance(m, Bid):
            sink = self.bid_sinks.get(m.job_id)
            if sink is not None:
                sink(m)


class MemoryDialer:
    """``peer.market.dialer.Dialer`` over a ``MemoryNet``."""

    def __init__(self, net: MemoryNet, me: str, gossip: MemoryGossip) -> None:
        self.net = net
        self.me = me
        self.gossip = gossip

    async def servers(self, cid: str) -> dict[str, tuple[str, ...]]:
        return {p: () for p in self.gossip.executors}

    async def connect(self, found: dict[str, tuple[str, ...]]) -> set[str]:
        return set(found)

    async def open_stream(self, peer_id: str, until: float, protocol: str) -> MemoryStream:
        return await self.net.open_stream(self.me, peer_id, protocol)


class DoublingWorker:
    """Stands in for ``peer.worker.Worker``: outputs ``z = 2 * x``, taking ``ms`` of
    (virtual) time per job, one job at a time like ``max_concurrent_jobs = 1``."""

    def __init__(self, ms: float = 5.0, *, hang: bool = False) -> None:
        self.ms = ms
        self.hang = hang
        self.limiter = trio.CapacityLimiter(1)
        self.ran = 0

    def check(self, cid: str, inputs: Any) -> None:
        pass

    async def run(self, cid: str, inputs: Any, *, deadline: float) -> tuple[Any, int]:
        async with self.limiter:
            if self.hang:
                await trio.sleep_forever()
            await trio.sleep(self.ms / 1000)
            self.ran += 1
            return {"z": (np.asarray(inputs["x"]) * 2).astype(np.float32)}, round(self.ms)


async def start_executor(
    nursery: trio.Nursery,
    net: MemoryNet,
    gossip: MemoryGossip,
    n: int,
    *,
    cid: str,
    price: int,
    clock: Clock,
    worker: DoublingWorker | None = None,
    p50_ms: int = 5,
) -> ExecutorService:
    k = key(n)
    me = pid(k)
    service = ExecutorService(
        key=k,
        peer_id=me,
        host=net.host(me),
        gossip=gossip,  # type: ignore[arg-type]
        worker=worker or DoublingWorker(),  # type: ignore[arg-type]
        config=ex.ExecutorConfig(
            peer_id=me, models={cid: ex.ModelOffer(price=price, p50_ms=p50_ms)}, max_concurrent=1
        ),
        receipts=ReceiptBook(),
        limits=DEFAULT_LIMITS,
        clock=clock,
    )
    await nursery.start(service.run)
    service.receipts.attach(nursery)
    gossip.executors[me] = service
    return service
