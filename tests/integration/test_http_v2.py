"""The Open Inference Protocol (KServe v2 REST) on a peer: real hosts, real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from http_swarm import http_swarm
from prometheus_client.parser import text_string_to_metric_families
from test_market import BlockingRuntime

from edge_models.runtime import ModelRuntime
from peer import metrics
from peer.http import v2
from protocols.tensor import TensorLimits

TRITON_SCRIPT = Path(__file__).with_name("triton_client.py")


async def _triton(url: str, model: str, mode: str, token: str) -> dict:
    host_port = url.removeprefix("http://")
    with trio.fail_after(240):  # six jobs and a client process on a loaded 2-core box
        done = await trio.run_process(
            [sys.executable, str(TRITON_SCRIPT), host_port, model, mode, token],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Sample:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Sample = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def delta(after: Sample, before: Sample, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.timeout(400)
async def test_stock_tritonclient_runs_jobs_through_the_market_json_and_binary(
    tmp_path: Path,
) -> None:
    async with http_swarm(tmp_path) as door, door.client() as client:
        before = await scrape(client)
        token_file = door.peer.config.data_dir / "http.token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        for mode in ("json", "binary"):
            out = await _triton(door.url, "tiny_add", mode, door.token)
            assert out["live"] and out["ready"] and out["model_ready"]
            assert out["metadata"]["parameters"]["cid"] == door.cid
            assert [i["name"] for i in out["metadata"]["inputs"]] == ["x", "y"]
            assert out["metadata"]["inputs"][0]["datatype"] == "FP32"
            expected = (np.arange(6, dtype=np.float32) + 0.5).tolist()
            assert out["z"] == expected and out["z_dtype"] == "float32"
            assert out["z_default"] == expected
            # The cheaper executor won the auction; the receipt says so.
            assert out["parameters"]["executor"] == door.ex.peer_id
            assert out["parameters"]["model_cid"] == door.cid
            assert len(out["parameters"]["receipt_id"]) == 64
            binary_meta = "binary_data_size" in out["output_meta"][0].get("parameters", {})
            assert binary_meta == (mode == "binary")
            assert "401" in out["no_token"] or "Authorization" in out["no_token"]
            assert "no_such_model" in out["unknown"]
        # Receipts the door requested are the ones the triton client got back.
        ids = {r.receipt_id.hex() for r in door.peer.receipts.receipts}
        assert out["parameters"]["receipt_id"] in ids
        # Prometheus: the four jobs, their bids and auctions, the HTTP answers, live gauges.
        after = await scrape(client)
        jobs = delta(after, before, "edgeswarm_jobs_requested_total", kind="infer")
        assert jobs >= 6  # 4 that ran + the unknown model (x2 modes)
        assert delta(after, before, "edgeswarm_jobs_failed_total", reason="unknown_model") == 2
        # Both sides of each job live in this process: requester and executor receipts.
        assert delta(after, before, "edgeswarm_jobs_run_total", role="requester") == 4
        assert delta(after, before, "edgeswarm_jobs_run_total", role="executor") == 4
        assert delta(after, before, "edgeswarm_bids_total", direction="received") >= 4
        assert delta(after, before, "edgeswarm_auction_seconds_count") >= 4
        assert delta(after, before, "edgeswarm_job_seconds_count") >= 4
        route = "/v2/models/{model}/infer"
        assert delta(after, before, "edgeswarm_http_requests_total", route=route, status="200") == 4
        assert delta(after, before, "edgeswarm_http_requests_total", route=route, status="401") == 2
        for gauge in ("connections", "peers_known", "receipts_held", "ledger_facts"):
            assert (f"edgeswarm_{gauge}", frozenset()) in after
        assert after[("edgeswarm_receipts_held", frozenset())] >= 4
        # The gauges are the peer's live state, read in the same tick (links come and go).
        live = {m.name: m.samples[0].value for m in metrics.PeerCollector(door.peer).collect()}
        assert live["edgeswarm_connections"] == len(door.peer.host.get_connected_peers())
        assert live["edgeswarm_peers_known"] == len(door.peer.discovery.known_peer_ids())
        assert live["edgeswarm_receipts_held"] == len(door.peer.receipts.receipts)
        assert door.peer.settlement is not None
        assert live["edgeswarm_ledger_facts"] == len(door.peer.settlement.ledger)


async def test_v2_by_cid_with_httpx_and_error_statuses(tmp_path: Path) -> None:
    async with http_swarm(tmp_path) as door, door.client() as client:
        x = np.arange(4, dtype=np.float32)
        body, headers = v2.encode_request({"x": x, "y": x}, binary=True)
        r = await client.post(
            f"/v2/models/{door.cid}/infer", content=body, headers={**headers, **door.auth}
        )
        assert r.status_code == 200, r.text
        header, outputs = v2.decode_response(
            r.content, r.headers.get("inference-header-content-length")
        )
        np.testing.assert_array_equal(outputs["z"], 2 * x)
        assert header["parameters"]["executor"] == door.ex.peer_id

        infer = f"/v2/models/{door.cid}/infer"
        # 401: no token, a wrong token, another scheme.
        for auth in ({}, {"Authorization": "Bearer nope"}, {"Authorization": door.token}):
            r = await client.post(infer, content=body, headers={**headers, **auth})
            assert r.status_code == 401 and "error" in r.json()
        # 400: malformed JSON, bad shapes, wrong element counts, header length out of range.
        bad = [
            (b"{", {}),
            (b'{"inputs": []}', {}),
            (
                json.dumps(
                    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}
                ).encode(),
                {},
            ),
            (
                json.dumps(
                    {"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}
                ).encode(),
                {},
            ),
            (
                json.dumps(
                    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": []}]}
                ).encode(),
                {},
            ),
            (body, {"inference-header-content-length": str(len(body) + 1)}),
            # x + y with a wrong input name: the model's input check (local registry) says no.
            (
                json.dumps(
                    {"inputs": [{"name": "q", "datatype": "FP32", "shape": [1], "data": [1]}]}
                ).encode(),
                {},
            ),
        ]
        for content, extra in bad:
            r = await client.post(infer, content=content, headers={**door.auth, **extra})
            assert r.status_code == 400, (content[:80], r.status_code, r.text)
            assert isinstance(r.json()["error"], str)
        # 413: a declared body over the cap is refused before it is read ...
        host, port = door.url.removeprefix("http://").rsplit(":", 1)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    f"POST {infer} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {door.token}"
                    f"\r\ncontent-length: {10**12}\r\n\r\n".encode()
                )
                head = await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 413"), head[:100]
        # ... and a streamed (chunked) one as soon as it passes the cap.
        door.peer.http.app.state.front_door.limits = TensorLimits(max_total_bytes=1000)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b" " * 4096

        r = await client.post(infer, content=chunks(), headers=door.auth)
        assert r.status_code == 413, r.text
        door.peer.http.app.state.front_door.limits = TensorLimits()
        # 404: unknown model (cid nobody serves -> 503 no executor; a name nobody has -> 404).
        r = await client.get("/v2/models/no_such_model")
        assert r.status_code == 404
        r = await client.post(
            "/v2/models/no_such_model/infer", content=body, headers={**headers, **door.auth}
        )
        assert r.status_code == 404, r.text
        r = await client.post(
            "/v2/models/" + "ab" * 32 + "/infer",
            content=body,
            headers={**headers, **door.auth},
            params={},
        )
        assert r.status_code == 503, r.text
        # Request parameters are checked: a deadline or max price out of range is a 400.
        for params in ({"deadline": 0.01}, {"deadline": 1e6}, {"max_price": -1}, {"deadline": "x"}):
            bad_body, bad_headers = v2.encode_request(
                {"x": x, "y": x}, binary=False, parameters=params
            )
            r = await client.post(infer, content=bad_body, headers={**bad_headers, **door.auth})
            assert r.status_code == 400 and "parameter" in r.json()["error"], (params, r.text)
        # The peer is still fine.
        r = await client.get("/v2/health/live")
        assert r.status_code == 200


class SlowBidder(BlockingRuntime):
    """Never answers, and bids with an ETA of 0.6 x the job's deadline (its p50 says so).

    The requester waits 2 x ETA + 1 s for a result before it tries someone else, so
    the deadline comes first, however slow the auction was (it only has to award
    before 0.4 x the deadline, or the executor would not bid at all).
    """

    P50_MS = 6000.0

    def load(self, ref: str, **kw: Any) -> Any:
        return _WithP50(super().load(ref, **kw), self.P50_MS)


class _WithP50:
    def __init__(self, loaded: Any, p50_ms: float) -> None:
        self._loaded, self.p50_ms = loaded, p50_ms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loaded, name)


async def test_v2_answers_504_when_the_executor_misses_the_deadline(tmp_path: Path) -> None:
    stuck: list[SlowBidder] = []

    def wrap(rt: ModelRuntime) -> SlowBidder:
        stuck.append(SlowBidder(rt))
        return stuck[-1]

    async with (
        http_swarm(tmp_path, door_models=False, wrap_runtime=wrap) as door,
        door.client() as client,
    ):
        x = np.arange(3, dtype=np.float32)
        body, headers = v2.encode_request(
            {"x": x, "y": x}, binary=False, parameters={"deadline": SlowBidder.P50_MS / 600}
        )
        # The front door answers by deadline + DEADLINE_GRACE_S (15 s) at the latest.
        with trio.fail_after(60):
            r = await client.post(
                f"/v2/models/{door.cid}/infer", content=body, headers={**headers, **door.auth}
            )
        assert stuck[0].started.is_set()  # it was awarded the job
        assert r.status_code == 504, r.text
        assert "deadline" in r.json()["error"]
