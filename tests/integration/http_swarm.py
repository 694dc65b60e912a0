"""A bootstrap node, a cheap executor and a peer with the HTTP front door, in one trio process.

The front-door peer ("door") serves the same tiny model (z = x + y) at a higher
price, so jobs it requests go through a real auction to the cheaper executor
("ex"); its registry also knows the model by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from market_swarm import FakeHardware, Node, Swarm, add_tiny_model, config, market_swarm

from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer.market import MarketSettings
from peer.node import Peer, open_peer


@dataclass
class Door:
    swarm: Swarm
    ex: Node
    peer: Peer
    url: str
    token: str
    cid: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kw: Any) -> httpx.AsyncClient:
        # trust_env=False: never a proxy from the environment for 127.0.0.1.
        return httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=60, **kw)


@asynccontextmanager
async def http_swarm(
    tmp_path: Path,
    *,
    door_models: bool = True,
    ex_model: str = "add",
    wrap_runtime: Callable[[ModelRuntime], Any] | None = None,
    **cfg: Any,
) -> AsyncIterator[Door]:
    settings = MarketSettings(bid_window=0.3, job_timeout=20.0)
    async with market_swarm(tmp_path, settings) as swarm, AsyncExitStack() as stack:
        ex = await swarm.start("ex", price=0.5, model=ex_model, wrap_runtime=wrap_runtime)
        runtime = None
        if door_models:
            add_tiny_model(tmp_path / "door")
            runtime = stack.enter_context(ModelRuntime(Registry(tmp_path / "door" / "models")))
        conf = config(
            tmp_path,
            "door",
            bootstrap=(swarm.boot.listen_addrs[0],),
            price=2.0,
            bid_window=0.3,
            http="127.0.0.1:0",
            **cfg,
        )
        # (No fail_after around it: a cancel scope must not end inside the peer's nurseries;
        # pytest-timeout bounds the start.)
        peer = await stack.enter_async_context(
            open_peer(conf, hardware=FakeHardware(), runtime=runtime)
        )
        assert peer.http is not None
        cid = next(iter(ex.market.served))
        yield Door(swarm, ex, peer, peer.http.url, peer.http.token, cid)
