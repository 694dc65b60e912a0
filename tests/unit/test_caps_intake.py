"""PubsubIntake: a bounded queue per forwarding peer and in all; our own messages bypass it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from peer.caps import PubsubIntake, RateBudget, StreamCaps

ME, FLOODER, OTHER = "me", "flooder", "other"


class FakePubsub:
    def __init__(self) -> None:
        self.my_id = ME
        self.pushed: list[tuple[Any, Any]] = []
        self.gate = trio.Event()

    async def push_msg(self, forwarder: Any, msg: Any) -> None:
        if forwarder != ME:
            await self.gate.wait()  # validation and forwarding are slow
        self.pushed.append((forwarder, msg))


async def test_a_flood_is_shed_per_peer_and_our_own_publishes_still_go_out() -> None:
    pubsub = FakePubsub()
    intake = PubsubIntake(pubsub, per_peer=4, total=6, workers=1).install()
    async with trio.open_nursery() as nursery:
        await nursery.start(intake.run)
        for i in range(20):
            await pubsub.push_msg(FLOODER, i)  # what pubsub's reader task calls
        await pubsub.push_msg(OTHER, "a")
        await pubsub.push_msg(ME, "mine")  # our own publish: straight through
        assert (ME, "mine") in pubsub.pushed
        # 4 queued (the per-peer cap): the other 16 of the flooder are shed.
        assert intake.stats.shed_by_peer[FLOODER] == 16
        assert OTHER not in intake.stats.shed_by_peer  # another peer still gets in
        pubsub.gate.set()
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
        assert len(pubsub.pushed) == 1 + 4 + 1  # ours, the flooder's 4, the other's 1
        nursery.cancel_scope.cancel()
    assert intake.stats.high_water <= 6


def test_stream_caps_per_peer_and_total() -> None:
    caps = StreamCaps(per_peer={"/p": 2}, total=3)
    a1, a2 = caps.try_open("/p", "a"), caps.try_open("/p", "a")
    assert a1 and a2 and caps.try_open("/p", "a") is None
    b1 = caps.try_open("/p", "b")
    assert b1 is not None and caps.try_open("/p", "c") is None  # the total is reached
    a1.release()
    a1.release()  # idempotent
    assert caps.try_open("/p", "c") is not None
    assert caps.refused == {"/p": 2} and caps.refused_by_peer == {"a": 1, "c": 1}
    with pytest.raises(ValueError):
        caps.set_limit("/p", 0)


def test_rate_budget_refills() -> None:
    budget = RateBudget(rate=0.5, burst=2)
    assert budget.take("a", 0.0) and budget.take("a", 0.0) and not budget.take("a", 0.0)
    assert budget.wait_s("a") == pytest.approx(2.0)
    assert budget.take("b", 0.0)  # per key
    assert budget.take("a", 2.0) and not budget.take("a", 2.0)
