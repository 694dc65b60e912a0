"""A refused single job is arbitrated, not lost (issue 10), end to end through the market.

Swarm (real hosts on 127.0.0.1, one trio process, all through ``open_peer``): a bootstrap
node, four serving peers that are the ledger witnesses (so the job's referee panel, drawn
by ``protocols.proofs.referee_panel``, serves the model) and a requester that gets its result
but never signs the Acceptance (its Acceptance frames are dropped on the wire, and its own
settlement never hears of the receipt it kept). The executor's refusal hook asks the panel
about its own result; the panel's ``ArbitratedReceipt`` goes to the requester's witnesses
and the requester, whose payer pays it: the executor is paid for the work it delivered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from market_swarm import FakeHardware, add_tiny_model
from settlement_helpers import key, pid

from bootstrap.node import open_bootstrap
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer.config import Config
from peer.job_stream import FrameStream
from peer.node import Peer, open_peer
from protocols.proofs import ArbitratedReceipt, referee_panel
from protocols.receipt import Acceptance
from protocols.signed import Signed

SERVING = [key(720 + i) for i in range(4)]
REQUESTER = key(730)
WITNESSES = tuple(pid(k) for k in SERVING)


def config(tmp_path: Path, name: str, boot: str | None = None, **kw: Any) -> Config:
    return Config(
        data_dir=tmp_path / name,
        listen=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=(boot,) if boot else (),
        ledger_witnesses=WITNESSES,
        ledger_pow_bits=8,
        ledger_base_limit=100.0,
        ledger_sync_interval=0.5,
        bid_window=0.5,
        job_timeout=20.0,
        **kw,
    )


@asynccontextmanager
async def swarm(tmp_path: Path) -> AsyncIterator[tuple[Peer, list[Peer]]]:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_bootstrap(config(tmp_path, "boot")))
        addr = boot.listen_addrs[0]
        serving = []
        for i, k in enumerate(SERVING):
            add_tiny_model(tmp_path / f"s{i}")
            runtime = ModelRuntime(Registry(tmp_path / f"s{i}" / "models"), p50_runs=3)
            stack.callback(runtime.close)
            serving.append(
                await stack.enter_async_context(
                    open_peer(
                        config(tmp_path, f"s{i}", addr),
                        key=k,
                        hardware=FakeHardware(),
                        runtime=runtime,
                    )
                )
            )
        requester = await stack.enter_async_context(
            open_peer(config(tmp_path, "req", addr), key=REQUESTER, hardware=FakeHardware())
        )
        yield requester, serving


@pytest.mark.timeout(300)
async def test_an_unaccepted_single_job_is_arbitrated_and_paid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = FrameStream.send

    async def never_accept(self: FrameStream, item: Any) -> None:
        if isinstance(item, Signed) and isinstance(item.message, Acceptance):
            return  # the requester "forgets" to sign: the executor never gets its receipt
        await original(self, item)

    monkeypatch.setattr(FrameStream, "send", never_accept)
    async with swarm(tmp_path) as (requester, serving):
        assert requester.market is not None and requester.settlement is not None
        requester.market.on_receipt.clear()  # its ledger never learns of a receipt it holds
        cid = next(iter(serving[0].market.served)) if serving[0].market else ""
        with trio.fail_after(60):
            for _ in range(200):  # DHT lookups: there is no event to wait on
                if len({p.peer_id for p in await requester.find_providers(cid)}) >= 4:
                    break
                await trio.sleep(0.2)
        x = np.arange(4, dtype=np.float32)
        with trio.fail_after(60):
            result = await requester.infer("tiny_add", {"x": x, "y": x}, deadline=20)
        np.testing.assert_array_equal(result.outputs["z"], 2 * x)
        executor = next(p for p in serving if p.peer_id == result.executor)
        assert executor.market is not None and executor.settlement is not None
        ledger = executor.settlement.ledger
        before = ledger.balance(executor.peer_id)
        price = result.receipt.price if result.receipt is not None else 0
        assert price > 0

        def arbitrated() -> list[ArbitratedReceipt]:
            assert executor.market is not None
            return executor.market.arbitrated

        # The executor waits for the Acceptance, gives up, asks the panel, settles.
        with trio.fail_after(90):
            await executor.settlement.wait_until(lambda: bool(arbitrated()))
        (arb,) = arbitrated()
        assert arb.commitment.message.job_id == result.receipt.commitment.message.job_id  # type: ignore[union-attr]
        assert arb.requester == requester.peer_id and arb.executor == executor.peer_id
        panel = referee_panel(ledger.rule, arb.commitment, arb.cp)
        assert {r.message.referee for r in arb.results} <= set(panel.members)
        # The requester's payer pays the arbitrated debt; the executor's balance shows it.
        with trio.fail_after(90):
            await executor.settlement.wait_until(lambda: ledger.is_paid(arb))
        assert ledger.balance(executor.peer_id) == before + price
        own = requester.settlement.ledger  # its own ledger stores the certificate too
        with trio.fail_after(30):
            await requester.settlement.wait_until(
                lambda: own.outstanding_debts(requester.peer_id) == []
            )
