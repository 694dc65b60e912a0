"""fetch_on_demand on real hosts: an executor bids for a model it lacks, wins, fetches, runs it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import trio
from test_model_transfer import net

from peer.model_on_demand import FIXED_MS
from tests import models


async def test_an_on_demand_executor_wins_fetches_runs_and_keeps_the_model(
    tmp_path: Path,
) -> None:
    src = models.tiny_matmul_model(tmp_path / "mm.onnx")
    cid = hashlib.sha256(src.read_bytes()).hexdigest()
    old = models.tiny_add_model(tmp_path / "add.onnx")
    old_cid = hashlib.sha256(old.read_bytes()).hexdigest()
    async with net(tmp_path) as n:
        # The only holder asks more than the requester pays: it never wins.
        holder = await n.start("holder", (src,), price=5.0)
        od = await n.start(
            "od",
            (old,),
            price=1.0,
            fetch_on_demand=True,
            # Room for the fetched model but not for both: the unused old one goes.
            model_store_bytes=src.stat().st_size + 16,
        )
        req = await n.start("req", max_price=2.0, bid_window=1.0)
        assert od.peer.market is not None and od.peer.market.executor is not None
        offers = od.peer.market.executor.offers
        with trio.fail_after(40):
            while True:  # until it has seen the holder's ad (it looks every 5 s)
                if cid in offers:
                    break
                await trio.sleep(0.2)
        assert cid not in od.registry
        assert offers[cid].p50_ms >= FIXED_MS  # the bid's eta includes the fetch
        x = np.ones((2, 4), dtype=np.float32)
        with trio.fail_after(60):
            result = await req.peer.infer(cid, {"x": x}, max_price=2.0, deadline=30)
        assert result.executor == od.peer.peer_id
        assert result.outputs["y"].shape == (2, 3)
        kept = od.registry.get(cid)
        assert kept.source == f"peers:{holder.peer.peer_id}"
        assert cid in od.peer.market.served and offers[cid].p50_ms < FIXED_MS  # measured now
        assert old_cid not in od.registry and old_cid not in od.peer.market.served
