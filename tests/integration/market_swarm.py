"""A market swarm in one trio process: a bootstrap node, executors serving tiny models, requesters.

Every host is real (TCP + Noise + yamux on 127.0.0.1, port 0). Each executor
has its own data dir and registry holding the same tiny model (same bytes,
same cid), its own ModelRuntime and price; each runs in its own cancel scope
so a test can kill one mid-job.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bootstrap.node import open_bootstrap  # noqa: E402
from edge_models.registry import Registry  # noqa: E402
from edge_models.runtime import ModelRuntime  # noqa: E402
from peer.config import Config  # noqa: E402
from peer.market import MarketService, MarketSettings, open_market  # noqa: E402
from peer.node import Peer, open_peer  # noqa: E402
from tests import models  # noqa: E402


class FakeHardware:
    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "test cpu", "memory": 2**30}]


def config(tmp_path: Path, name: str, **kw: Any) -> Config:
    kw.setdefault("ledger_pow_bits", 8)  # a cheap test genesis (the default costs a CPU-minute)
    return Config(data_dir=tmp_path / name, listen=("/ip4/127.0.0.1/tcp/0",), **kw)


@dataclass
class Node:
    name: str
    peer: Peer
    market: MarketService
    scope: trio.CancelScope
    runtime: ModelRuntime | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id


def add_tiny_model(data_dir: Path, kind: str = "add") -> str:
    registry = Registry(data_dir / "models")
    src = data_dir / "src"
    if kind == "add":
        entry = registry.add_file(models.tiny_add_model(src / "add.onnx"), "tiny_add")
    elif kind == "text":  # string tensors (KServe v2 BYTES)
        entry = registry.add_file(models.tiny_text_model(src / "text.onnx"), "tiny_text")
    else:
        entry = registry.add_file(models.tiny_matmul_model(src / "mm.onnx"), "tiny_mm")
    return entry.cid


@dataclass
class Swarm:
    tmp_path: Path
    nursery: trio.Nursery
    boot: Peer
    settings: MarketSettings
    nodes: dict[str, Node] = field(default_factory=dict)

    async def start(
        self,
        name: str,
        *,
        price: float = 1.0,
        serve: bool = True,
        model: str = "add",
        wrap_runtime: Callable[[ModelRuntime], Any] | None = None,
        settings: MarketSettings | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Node:
        data_dir = self.tmp_path / name
        runtime = None
        if serve:
            add_tiny_model(data_dir, model)
            runtime = ModelRuntime(Registry(data_dir / "models"), p50_runs=3)
        cfg = config(self.tmp_path, name, bootstrap=(self.boot.listen_addrs[0],), price=price)
        base = settings or self.settings
        node_settings = MarketSettings(
            price=price,
            max_price=base.max_price,
            bid_window=base.bid_window,
            job_timeout=base.job_timeout,
            max_concurrent=base.max_concurrent,
            limits=base.limits,
            policy=base.policy,
            # A wrapped runtime may block in run() (slow or gated test doubles): keep every
            # run in a worker thread then, as for a model over 1 ms.
            inline_p50_ms=0.0 if wrap_runtime else base.inline_p50_ms,
        )
        ready: list[Node] = []
        started = trio.Event()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            holder: list[MarketService] = []
            try:
                with trio.CancelScope() as scope:
                    async with (
                        open_peer(
                            cfg,
                            hardware=FakeHardware(),
                            models=lambda: holder[0].models_source() if holder else [],
                            market=False,  # started below, with the test's settings
                        ) as peer,
                        open_market(
                            peer,
                            runtime=wrap_runtime(runtime) if wrap_runtime and runtime else runtime,
                            settings=node_settings,
                            **({} if clock is None else {"clock": clock}),
                        ) as market,
                    ):
                        holder.append(market)
                        node = Node(name, peer, market, scope, runtime)
                        ready.append(node)
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                if runtime is not None:
                    runtime.close()
                if ready:
                    ready[0].stopped.set()
                started.set()

        await self.nursery.start(run)
        node = ready[0]
        self.nodes[name] = node
        return node

    async def kill(self, name: str) -> None:
        node = self.nodes[name]
        node.scope.cancel()
        with trio.fail_after(15):
            await node.stopped.wait()


@asynccontextmanager
async def market_swarm(
    tmp_path: Path, settings: MarketSettings | None = None
) -> AsyncIterator[Swarm]:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_bootstrap(config(tmp_path, "boot")))
        nursery = await stack.enter_async_context(trio.open_nursery())
        swarm = Swarm(
            tmp_path,
            nursery,
            boot,
            settings or MarketSettings(bid_window=0.15, job_timeout=20.0),
        )
        try:
            yield swarm
        finally:
            nursery.cancel_scope.cancel()
