"""Peers whose wall clocks are off by 5 s each way (10 s apart) still trade jobs and leases.

Market messages carry absolute times (request deadline, bid expiry, award deadline,
lease end); every peer here reads its own injected clock (``time.time() + offset``),
so each one judges those times by a clock that is off from the sender's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from market_swarm import market_swarm
from test_market import wait_providers


def offset_clock(offset: float):  # type: ignore[no-untyped-def]
    return lambda: time.time() + offset


@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor_offset", [-5.0, 5.0])
async def test_jobs_run_between_peers_5_s_apart(tmp_path: Path, executor_offset: float) -> None:
    async with market_swarm(tmp_path) as swarm:
        ex = await swarm.start("ex0", clock=offset_clock(executor_offset))
        # The requester is as far off the other way: the two clocks are 10 s apart.
        req = await swarm.start("req", serve=False, clock=offset_clock(-executor_offset))
        cid = next(iter(ex.market.served))
        await wait_providers(req, cid, 1)
        x = np.arange(3, dtype=np.float32)
        with trio.fail_after(90):
            for i in range(3):  # a 6 s deadline is shorter than the 10 s between the clocks
                result = await req.market.infer(cid, {"x": x, "y": x + i}, deadline=6 + 10 * i)
                np.testing.assert_array_equal(result.outputs["z"], 2 * x + i)
                assert result.executor == ex.peer_id
            async with req.market.lease(cid, max_jobs=20, seconds=10) as lease:
                for i in range(20):
                    out = await lease.infer({"x": x, "y": x * i})
                    np.testing.assert_array_equal(out["z"], x + x * i)
        assert len(req.market.receipts.receipts) == 4
