"""Spot checks are on by default (the spot_check setting) and never announced to executors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
from market_swarm import market_swarm
from test_market import wait_providers

from protocols.market import JobRequest


async def test_requests_never_announce_the_spot_check(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        a = await swarm.start("a", price=1.0)
        b = await swarm.start("b", price=2.0)
        req = await swarm.start("req", serve=False)
        cid = next(iter(a.market.served))
        # What executors see: every request that reaches their market.
        seen: list[JobRequest] = []
        for ex in (a, b):
            executor = ex.market.executor
            original = executor.on_request

            def spy(request: JobRequest, *rest, original=original) -> None:  # type: ignore[no-untyped-def]
                seen.append(request)
                original(request, *rest)  # (a reply path when it came on an auction stream)

            executor.on_request = spy  # type: ignore[method-assign]
        await wait_providers(req, cid, 2)
        x = np.linspace(0, 1, 8, dtype=np.float32)
        with trio.fail_after(40):
            result = await req.market.infer(
                cid, {"x": x, "y": x}, deadline=30, bid_window=0.5, spot_check=1.0
            )
        assert result.spot_check == "agree"  # it was checked on both executors...
        assert {r.executor for r in req.market.receipts.receipts} == {a.peer_id, b.peer_id}
        assert seen and all(r.spot_check == 0.0 for r in seen)  # ...and neither was told


async def test_peer_infer_checks_at_the_configured_rate(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        a = await swarm.start("a", price=1.0)
        await swarm.start("b", price=2.0)
        req = await swarm.start("req", serve=False)
        assert req.peer.config.spot_check == 0.05  # the default
        calls: list[float] = []
        market = req.market
        req.peer.market = market  # (this swarm starts each market beside its peer)
        original = market.infer

        async def spy(model: str, inputs: object, **kw: object) -> object:
            calls.append(kw["spot_check"])  # type: ignore[arg-type]
            return await original(model, inputs, **kw)  # type: ignore[arg-type]

        market.infer = spy  # type: ignore[method-assign]
        cid = next(iter(a.market.served))
        x = np.linspace(0, 1, 8, dtype=np.float32)
        with trio.fail_after(40):
            await req.peer.infer(cid, {"x": x, "y": x}, deadline=30)
        assert calls == [0.05]
