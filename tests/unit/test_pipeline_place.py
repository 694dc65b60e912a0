"""Placement when the lookups are slow: the ads this peer already holds answer for a lookup
that is late, so a DHT slowed by load does not make a split win over a known whole-model
server (``peer.market.pipeline.place``)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from peer.market import pipeline as pipeline_mod
from peer.market.pipeline import cached_p50, place
from protocols.pipeline import CrossingTensor, Cut, PipelineManifest, Stage


def cid(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


WHOLE, S1, S2 = cid("whole"), cid("s1"), cid("s2")
NOW = 1_000.0


def ad(peer: str, *served: tuple[str, float], expires_at: float = NOW + 60) -> Any:
    models = [SimpleNamespace(cid=c, p50_ms=p) for c, p in served]
    return SimpleNamespace(peer_id=peer, expires_at=expires_at, models=models)


def market(*ads: Any, bans: frozenset[str] = frozenset()) -> Any:
    cache = SimpleNamespace(entries={a.peer_id: (a, 0.0) for a in ads})
    return SimpleNamespace(
        peer=SimpleNamespace(discovery=SimpleNamespace(ad_cache=cache)),
        auctions=SimpleNamespace(bans=bans),
        clock=lambda: NOW,
        settings=SimpleNamespace(bid_window=0.1),
    )


def test_cached_p50_is_the_best_unexpired_unbanned_ad() -> None:
    m = market(
        ad("a", (WHOLE, 9.0)),
        ad("b", (WHOLE, 4.0), (S1, 1.0)),
        ad("c", (WHOLE, 1.0), expires_at=NOW - 1),  # expired
        ad("d", (WHOLE, 2.0)),
        bans=frozenset({"d"}),
    )
    assert cached_p50(m, WHOLE) == 4.0
    assert cached_p50(m, S1) == 1.0
    assert cached_p50(m, S2) is None
    assert cached_p50(SimpleNamespace(peer=None), WHOLE) is None  # no discovery: no ads


def entry() -> Any:
    t = CrossingTensor
    manifest = PipelineManifest(
        model=WHOLE,
        inputs=(t("x", "float32", ("n", 8)),),
        outputs=(t("y", "float32", ("n", 8)),),
        stages=(Stage(S1, ("x",), ("h",)), Stage(S2, ("h",), ("y",))),
        cuts=(Cut((t("h", "float32", ("n", 8)),), 64),),
    )
    return SimpleNamespace(manifest=manifest, name="p")


@pytest.mark.parametrize("held", [True, False])
async def test_a_late_lookup_is_answered_by_the_ads_held(
    monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """The whole model's lookup never answers within the budget; the stages' do. With an ad
    of a fast whole-model server held, the whole model runs there; without, the reason says
    the lookup was late (never "nobody serves it")."""

    async def best_p50(market: Any, c: str) -> float | None:
        if c == WHOLE:
            await trio.sleep_forever()
        return 5.0

    monkeypatch.setattr(pipeline_mod, "best_p50", best_p50)
    monkeypatch.setattr(pipeline_mod, "PLACE_BUDGET_S", 0.05)
    m = market(ad("w", (WHOLE, 1.0))) if held else market()
    with trio.fail_after(5):
        p = await place(m, entry(), None)
    if held:
        assert not p.split and p.why.startswith("whole"), p.why
    else:
        assert p.split and p.why.startswith("no answer in time about the whole model"), p.why
