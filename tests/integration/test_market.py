"""The job market over real libp2p hosts on 127.0.0.1 (one trio process, tiny ONNX models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
from market_swarm import market_swarm


async def test_request_bids_award_result_and_both_hold_the_receipt(tmp_path: Path) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", price=2.0)
        req = await swarm.start("req", serve=False)
        x = np.arange(4, dtype=np.float32)
        y = np.ones(4, dtype=np.float32)
        with trio.fail_after(30):
            result = await req.market.infer("tiny_add", {"x": x, "y": y}, deadline=20)
            await ex.market.receipts.wait_for(1)
        np.testing.assert_array_equal(result.outputs["z"], x + y)
        assert result.executor == ex.peer_id
        assert result.price == 2_000_000
        result.receipt.verify()
        assert ex.market.receipts.receipts[-1] == result.receipt
        assert list(req.market.receipts.receipts) == [result.receipt]
