"""Self-award through the front door: a peer that serves a model wins its own auction.

A lone peer with ``--http`` and a local model answers v2 infer itself (before self-award it
answered 503: its executor never bids on its own requests). Nothing is owed: no receipt,
no payment, nothing in the ledger. With a cheaper remote executor in the network the job
still goes remote (``test_http_v2``'s door serves the model at 2.0, the executor at 0.5).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from http_swarm import http_swarm
from market_swarm import FakeHardware, add_tiny_model, config
from test_http_v2 import delta, scrape

from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer.http import v2
from peer.node import open_peer


@pytest.mark.timeout(120)
async def test_a_lone_peer_answers_v2_infer_with_its_own_model(tmp_path: Path) -> None:
    cid = add_tiny_model(tmp_path / "solo")
    conf = config(tmp_path, "solo", http="127.0.0.1:0", bid_window=0.2, spot_check=0.0)
    with ModelRuntime(Registry(tmp_path / "solo" / "models")) as runtime:
        async with open_peer(conf, hardware=FakeHardware(), runtime=runtime) as peer:
            assert peer.http is not None and peer.market is not None
            auth = {"Authorization": f"Bearer {peer.http.token}"}
            x = np.arange(6, dtype=np.float32)
            y = np.full(6, 0.5, dtype=np.float32)
            async with httpx.AsyncClient(
                base_url=peer.http.url, trust_env=False, timeout=60
            ) as client:
                before = await scrape(client)
                for binary in (False, True):
                    body, headers = v2.encode_request({"x": x, "y": y}, binary=binary)
                    r = await client.post(
                        "/v2/models/tiny_add/infer", content=body, headers={**headers, **auth}
                    )
                    assert r.status_code == 200, r.text
                    header, outputs = v2.decode_response(r.content, r.headers.get(v2.HEADER_LENGTH))
                    np.testing.assert_array_equal(outputs["z"], x + y)
                    p = header["parameters"]
                    assert p["executor"] == peer.peer_id and p["local"] is True
                    assert p["receipt_id"] is None and p["receipt"] is None
                    assert p["price"] == 0 and p["model_cid"] == cid
                after = await scrape(client)
            # Two jobs ran on our own executor; none of them left a receipt to pay.
            assert delta(after, before, "edgeswarm_jobs_run_total", role="local") == 2
            assert delta(after, before, "edgeswarm_jobs_run_total", role="requester") == 0
            assert peer.market.receipts.count == 0

            # peer.infer says the same (the CLI's and the embedding app's path).
            result = await peer.infer("tiny_add", {"x": x, "y": y}, spot_check=1.0)
            assert result.local and result.receipt is None and result.price == 0
            assert result.executor == peer.peer_id
            assert result.spot_check == "not checked: it ran on this peer's own executor"
            assert result.to_dict()["receipt"] is None


async def _infer(client: httpx.AsyncClient, auth: dict[str, str], binary: bool) -> dict:
    x = np.arange(6, dtype=np.float32)
    body, headers = v2.encode_request({"x": x, "y": x}, binary=binary)
    r = await client.post("/v2/models/tiny_add/infer", content=body, headers={**headers, **auth})
    assert r.status_code == 200, r.text
    header, outputs = v2.decode_response(r.content, r.headers.get(v2.HEADER_LENGTH))
    np.testing.assert_array_equal(outputs["z"], x + x)
    params: dict = header["parameters"]
    return params


@pytest.mark.timeout(180)
async def test_a_cheaper_remote_wins_and_alone_the_door_runs_it_itself(tmp_path: Path) -> None:
    """The door serves tiny_add at 2.0, the executor at 0.5: the job goes remote (a real
    receipt, settled as usual). Once the executor is gone the door's own bid wins: no
    receipt, and the door's settlement (on: a bootstrap node founded the network) holds
    nothing more than before."""
    async with http_swarm(tmp_path) as door, door.client() as client:
        remote = await _infer(client, door.auth, binary=True)
        assert remote["executor"] == door.ex.peer_id and remote["local"] is False
        assert len(remote["receipt_id"]) == 64 and remote["price"] == 500_000
        market = door.peer.market
        assert market is not None and market.receipts.count == 1
        svc = door.peer.settlement
        assert svc is not None

        await door.swarm.kill("ex")
        mine = await _infer(client, door.auth, binary=False)
        assert mine["executor"] == door.peer.peer_id and mine["local"] is True
        assert mine["receipt_id"] is None and mine["price"] == 0
        assert market.receipts.count == 1  # still only the remote job's receipt
        owed = {r.receipt_id for r in svc.unpaid()}
        assert owed <= {bytes.fromhex(remote["receipt_id"])}
