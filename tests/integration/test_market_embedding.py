"""The embedding API as apps use it: ``open_peer`` runs the market (``peer.infer``, ``.lease``)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import trio
from market_swarm import FakeHardware, add_tiny_model, config

from bootstrap.node import open_bootstrap
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer.node import open_peer
from protocols.receipt import Receipt


async def test_open_peer_serves_its_registry_and_a_plain_peer_runs_jobs(tmp_path: Path) -> None:
    add_tiny_model(tmp_path / "ex")
    seen: list[tuple[Receipt, str]] = []

    async def hook(receipt: Receipt, role: Any) -> None:
        seen.append((receipt, role))

    with ModelRuntime(Registry(tmp_path / "ex" / "models"), p50_runs=3) as runtime:
        async with AsyncExitStack() as stack:
            boot = await stack.enter_async_context(open_bootstrap(config(tmp_path, "boot")))
            joined = (boot.listen_addrs[0],)
            ex = await stack.enter_async_context(
                open_peer(
                    config(tmp_path, "ex", bootstrap=joined, price=0.25),
                    hardware=FakeHardware(),
                    runtime=runtime,
                )
            )
            # A plain peer: role "peer", an empty registry, no runtime: a pure requester.
            app = await stack.enter_async_context(
                open_peer(config(tmp_path, "app", bootstrap=joined), hardware=FakeHardware())
            )
            ex.receipts.on_receipt.append(hook)
            app.receipts.on_receipt.append(hook)
            assert ex.ad is not None and [m.name for m in ex.ad.models] == ["tiny_add"]
            x = np.arange(4, dtype=np.float32)
            with trio.fail_after(30):
                result = await app.infer("tiny_add", {"x": x, "y": x}, max_price=1.0, deadline=20)
                async with app.lease("tiny_add", max_jobs=10, seconds=20) as lease:
                    for i in range(10):
                        out = await lease.infer({"x": x, "y": np.full(4, i, np.float32)})
                        np.testing.assert_array_equal(out["z"], x + i)
                await ex.receipts.wait_for(2)
                for _ in range(500):  # hooks run in the market's nursery, right after
                    if len(seen) == 4:
                        break
                    await trio.sleep(0.01)
    np.testing.assert_array_equal(result.outputs["z"], 2 * x)
    assert result.executor == ex.peer_id and result.price == 250_000
    assert [r.count for r in lease.receipts] == [10]
    roles = sorted((r.count, role) for r, role in seen)
    assert roles == [(1, "executor"), (1, "requester"), (10, "executor"), (10, "requester")]
