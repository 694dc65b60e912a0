"""Executors killed with SIGKILL mid-job and mid-lease: jobs complete elsewhere, paid once.

Real processes on 127.0.0.1: a bootstrap node and three ``edgeswarm run`` executors
(prices 1, 2, 3 credits, so the cheapest wins first); the requester is a peer in
this process. The victim is SIGKILLed right after it received a job's inputs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from edge_models.registry import Registry
from peer.config import Config
from peer.job_stream import FrameStream
from peer.local_swarm import SwarmProcess, local_swarm, peer_args
from peer.node import open_peer
from protocols.market import JobInput
from tests.models import tiny_add_model

LOCAL = "/ip4/127.0.0.1/tcp/0"


class Hardware:
    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "test cpu", "memory": 2**30}]


def kill_after_inputs(market: Any, victim: SwarmProcess, after: int) -> trio.Event:
    """SIGKILL ``victim`` once the requester has sent it ``after`` inputs (on any stream)."""
    killed = trio.Event()
    sent = [0]
    original = market.auctions.open_job_stream

    async def open_job_stream(executor: str, until: float) -> FrameStream:
        fs = await original(executor, until)
        if executor != victim.peer_id:
            return fs
        send, send_many = fs.send, fs.send_many

        def count(items: list[Any]) -> None:
            for item in items:
                if isinstance(item, JobInput) and not killed.is_set():
                    sent[0] += 1
                    if sent[0] >= after:
                        victim.process.kill()  # SIGKILL, mid-job
                        killed.set()

        async def send_then_maybe_kill(item: Any) -> None:
            await send(item)
            count([item])

        # A single job's Award and inputs go out in one write (send_many).
        async def send_many_then_maybe_kill(items: list[Any]) -> None:
            await send_many(items)
            count(items)

        fs.send = send_then_maybe_kill  # type: ignore[method-assign]
        fs.send_many = send_many_then_maybe_kill  # type: ignore[method-assign]
        return fs

    market.auctions.open_job_stream = open_job_stream
    return killed


async def executors(swarm: Any, root: Path, boot: str) -> tuple[str, list[SwarmProcess]]:
    out, cid = [], ""
    env = {"EDGESWARM_BID_WINDOW": "0.5", "EDGESWARM_LOG_LEVEL": "WARNING"}
    for i, price in enumerate(("1", "2", "3")):
        registry = Registry(root / f"ex{i}" / "models")
        cid = registry.add_file(tiny_add_model(root / f"src{i}" / "add.onnx"), "tiny_add").cid
        out.append(
            await swarm.start(f"ex{i}", *peer_args([boot]), env={**env, "EDGESWARM_PRICE": price})
        )
    return cid, out


async def wait_servers(peer: Any, cid: str, n: int) -> None:
    with trio.fail_after(120):
        for _ in range(600):
            if len(await peer.find_providers(cid)) >= n:
                return
            await trio.sleep(0.2)  # DHT records propagate: no event to wait on


def requester_config(root: Path, boot: str) -> Config:
    # No spot checks: a check is a second paid job (its own receipt), and these tests count
    # one receipt per job to prove a killed executor's job is never paid twice.
    return Config(
        data_dir=root / "req", listen=(LOCAL,), bootstrap=(boot,), bid_window=0.5, spot_check=0.0
    )


@pytest.mark.timeout(400)  # four processes start (onnxruntime imports): slow on a loaded box
async def test_an_executor_killed_mid_job_the_job_completes_elsewhere_once(
    tmp_path: Path,
) -> None:
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL)
        cid, procs = await executors(swarm, tmp_path / "swarm", boot.address)
        async with open_peer(requester_config(tmp_path, boot.address), hardware=Hardware()) as req:
            assert req.market is not None
            await wait_servers(req, cid, 3)
            killed = kill_after_inputs(req.market, procs[0], after=1)
            x = np.arange(4, dtype=np.float32)
            with trio.fail_after(60):
                results = [
                    await req.infer(cid, {"x": x, "y": x * i}, deadline=20) for i in range(5)
                ]
            assert killed.is_set() and procs[0].process.returncode == -9
            for i, r in enumerate(results):
                np.testing.assert_array_equal(r.outputs["z"], x + x * i)
            assert procs[0].peer_id in [e for e, _ in results[0].attempts]
            assert all(r.executor != procs[0].peer_id for r in results)
            jobs = Counter(rc.commitment.message.job_id for rc in req.market.receipts.receipts)
            assert len(jobs) == 5 and set(jobs.values()) == {1}  # each job paid once


@pytest.mark.timeout(400)
async def test_an_executor_killed_mid_lease_the_lease_moves_on(tmp_path: Path) -> None:
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", LOCAL)
        cid, procs = await executors(swarm, tmp_path / "swarm", boot.address)
        async with open_peer(requester_config(tmp_path, boot.address), hardware=Hardware()) as req:
            assert req.market is not None
            await wait_servers(req, cid, 3)
            killed = kill_after_inputs(req.market, procs[0], after=10)
            x = np.arange(4, dtype=np.float32)
            outs = []
            with trio.fail_after(90):
                async with req.market.lease(cid, max_jobs=40, seconds=60) as lease:
                    for i in range(40):
                        outs.append(await lease.infer({"x": x, "y": x * i}))
            assert killed.is_set() and procs[0].process.returncode == -9
            for i, out in enumerate(outs):
                np.testing.assert_array_equal(out["z"], x + x * i)
            receipts = req.market.receipts.receipts
            assert receipts and all(r.executor != procs[0].peer_id for r in receipts)
            # Every job is paid once: the batches that survived cover 40 - (lost unpaid) jobs,
            # never more than 40, and no batch job id repeats.
            jobs = Counter(rc.commitment.message.job_id for rc in receipts)
            assert set(jobs.values()) == {1}
            assert sum(rc.commitment.message.count for rc in receipts) <= 40
