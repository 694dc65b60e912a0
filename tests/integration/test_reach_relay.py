"""Circuit relay v2 on loopback (no root needed): a peer nobody can dial serves through a relay."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import trio

from bootstrap.node import open_bootstrap
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer import metrics
from peer.config import Config
from peer.node import Peer, open_peer
from tests.integration.market_swarm import FakeHardware, add_tiny_model

LOCAL = ("/ip4/127.0.0.1/tcp/0",)
# A cheap test genesis. The default (27 bits) has the executor and the requester search
# their identity proof in threads for a CPU-minute; pure-Python hashing holds the GIL, and
# the three peers' event loop (one process) then ran so slowly that the relayed job missed
# its result deadline (6 of 8 runs failed next to 2 busy CPU loops; 0 of 15 with 8 bits).
POW_BITS = 8


async def wait_until(
    check: Callable[[], object], event: Callable[[], trio.Event], *, limit: float = 30
) -> None:
    """Wait until ``check()`` holds, re-checking whenever ``event()`` fires."""
    with trio.fail_after(limit):
        for _ in range(1000):
            if check():
                return
            await event().wait()
    raise AssertionError("the condition never held")


def relay_uses() -> tuple[float, float]:
    """edgeswarm_relay_connections_total (client, hop) in this process's metrics."""
    get = metrics.REGISTRY.get_sample_value
    name = "edgeswarm_relay_connections_total"
    return get(name, {"role": "client"}) or 0.0, get(name, {"role": "hop"}) or 0.0


async def test_an_executor_that_accepts_no_connection_serves_through_a_relay(
    tmp_path: Path,
) -> None:
    used_before = relay_uses()
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            open_bootstrap(
                Config(data_dir=tmp_path / "boot", listen=LOCAL, ledger_pow_bits=POW_BITS)
            )
        )
        cid = add_tiny_model(tmp_path / "ex")
        runtime = ModelRuntime(Registry(tmp_path / "ex" / "models"), p50_runs=1)
        stack.callback(runtime.close)
        # Listens nowhere: every connection to it goes out from it, or through a relay.
        ex: Peer = await stack.enter_async_context(
            open_peer(
                Config(data_dir=tmp_path / "ex", listen=(), bootstrap=(boot.listen_addrs[0],)),
                hardware=FakeHardware(),
                runtime=runtime,
            )
        )
        await wait_until(
            lambda: ex.reach.status == "private", lambda: ex.reach.reachability.changed
        )
        await wait_until(lambda: ex.reach.advertiser.relayed, lambda: ex.reach.reservations.changed)
        circuit = ex.reach.advertiser.relayed[0]
        assert f"/p2p/{boot.peer_id}/p2p-circuit" in circuit
        # The ad is re-published with it (rate-limited to one publish a second).
        with trio.fail_after(30):
            for _ in range(300):
                if ex.ad is not None and any("p2p-circuit" in a for a in ex.ad.addrs):
                    break
                await trio.sleep(0.1)
        req: Peer = await stack.enter_async_context(
            open_peer(
                Config(data_dir=tmp_path / "req", listen=LOCAL, bootstrap=(boot.listen_addrs[0],)),
                hardware=FakeHardware(),
            )
        )
        # The requester finds the executor (provider record, ad with the circuit) before
        # the job: the auction then waits for its bid instead of racing its discovery.
        with trio.fail_after(30):
            while True:
                found = {p.peer_id: p for p in await req.find_providers(cid)}
                if ex.peer_id in found and any("p2p-circuit" in a for a in found[ex.peer_id].addrs):
                    break
                await trio.sleep(0.1)

        x = np.arange(4, dtype=np.float32)
        with trio.fail_after(60):
            result = await req.infer(cid, {"x": x, "y": x}, max_price=5.0, deadline=30)
        assert result.executor == ex.peer_id
        np.testing.assert_array_equal(result.outputs["z"], x + x)
        conns = req.host.get_network().get_connections(ex.host.get_id())
        assert conns and all("p2p-circuit" in str(c.get_transport_addresses()) for c in conns)
        # /metrics counts it: circuits dialed through the relay, hop requests it served.
        client, hop = (a - b for a, b in zip(relay_uses(), used_before, strict=True))
        assert client >= 1 and hop >= 2  # the executor's reservation + the circuit
