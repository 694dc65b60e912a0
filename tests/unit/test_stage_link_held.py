"""What a stage executor holds of the outputs it forwarded, to re-feed a new executor of the
next stage (``StageLinks._hold``): a lease's latest results, bounded per job and in all,
the oldest dropped first; a take-over needs only the latest (those the requester's window
can have in flight)."""

from __future__ import annotations

import nacl.signing
import pytest

from peer.market import stage_link
from peer.market.stage_link import MAX_HELD_SEQS, StageLinks
from protocols.identity import peer_id_from_public_key
from protocols.pipeline import StageRoute


def pid(n: int) -> str:
    return peer_id_from_public_key(bytes(nacl.signing.SigningKey(bytes([n]) * 32).verify_key))


def route(job: int) -> StageRoute:
    return StageRoute(
        job_id=bytes([job]) * 16,
        requester=pid(1),
        executor=pid(2),
        upstream="",
        upstream_job=b"",
        downstream=pid(3),
        downstream_job=b"\xff" * 16,
        expires=1e9,
    )


def wire(n: int = 4) -> dict[str, dict[str, object]]:
    return {"h": {"dtype": "uint8", "shape": [n], "data": b"\0" * n}}


def links() -> StageLinks:
    return StageLinks(host=None, dialer=None, clock=lambda: 0.0)


def test_a_lease_keeps_its_latest_results() -> None:
    sl = links()
    for seq in range(MAX_HELD_SEQS + 10):
        sl._hold(pid(1), route(1), seq, wire())
    (held,) = sl.held.values()
    assert sorted(held.wires) == list(range(10, MAX_HELD_SEQS + 10))
    assert held.nbytes == sl.held_bytes == 4 * MAX_HELD_SEQS


def test_over_the_byte_budget_the_oldest_results_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the whole lease's: the results a take-over may need are the newest."""
    monkeypatch.setattr(stage_link, "MAX_HELD_BYTES", 10)
    sl = links()
    for seq in range(5):
        sl._hold(pid(1), route(1), seq, wire())
    (held,) = sl.held.values()
    assert sorted(held.wires) == [3, 4] and sl.held_bytes == 8
    sl._hold(pid(1), route(2), 0, wire(8))  # another job's: job 1's oldest go, then job 1
    assert list(sl.held) == [bytes([2]) * 16] and sl.held_bytes == 8
