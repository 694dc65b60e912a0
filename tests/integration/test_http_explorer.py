"""The explorer in real headless Chromium (Debian's chromium-headless-shell), driven over CDP."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import trio
from http_swarm import http_swarm
from test_http_v2 import delta, scrape

CDP_SCRIPT = Path(__file__).with_name("cdp_page.py")
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    BROWSER is None,
    reason="no headless Chromium on this machine (apt-get install chromium-headless-shell)",
)
async def test_explorer_renders_peers_models_jobs_and_ledger_in_chromium(tmp_path: Path) -> None:
    assert BROWSER is not None
    async with http_swarm(tmp_path) as door, door.client() as client:
        x = np.arange(3, dtype=np.float32)
        before = await scrape(client)
        with trio.fail_after(30):
            result = await door.peer.infer(door.cid, {"x": x, "y": x}, deadline=20)
            async with door.peer.lease(door.cid, max_jobs=3, seconds=20) as lease:
                for _ in range(3):
                    await lease.infer({"x": x, "y": x})
        after = await scrape(client)
        assert delta(after, before, "edgeswarm_jobs_requested_total", kind="lease") == 3
        assert delta(after, before, "edgeswarm_lease_job_seconds_count") == 3
        assert delta(after, before, "edgeswarm_jobs_requested_total", kind="infer") == 1
        receipt = result.receipt.receipt_id.hex()
        # Its JSON comes from GET endpoints, open to anyone.
        jobs = (await client.get("/api/jobs")).json()
        assert receipt in {r["receipt_id"] for r in jobs["receipts"]}
        assert all(r["verified"] is True for r in jobs["receipts"])
        models = (await client.get("/api/models")).json()
        assert door.cid in {m["cid"] for m in models["network"]}
        ledger = (await client.get("/api/ledger")).json()
        assert ledger["available"] and len(ledger["state_hash"]) == 64

        expect = [door.peer.peer_id, door.cid, door.ex.peer_id, receipt[:16], "valid"]
        with trio.fail_after(90):
            done = await trio.run_process(
                [sys.executable, str(CDP_SCRIPT), BROWSER, f"{door.url}/explorer?refresh=500",
                 "60", *expect],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        page = json.loads(done.stdout.decode().strip().splitlines()[-1])
        missing = [t for t in expect if t not in page["text"]]
        assert page["found"], f"missing {missing} in:\n{page['text'][:3000]}"
        assert page["refreshes"] >= 3  # it reloads its data by itself
        assert page["errors"] == []
        # The ledger section shows a state hash (it moves as payments are certified).
        assert re.search(r"state hash [0-9a-f]{64}", page["text"]), page["text"][-2000:]
