"""The README's demo, run as a user runs it: a real swarm of processes, jobs, settlement."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_demo_runs_jobs_and_ledgers_agree(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peer.cli",
            "demo",
            "--jobs",
            "4",
            "--lease-jobs",
            "20",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "found 3 serving peers' capability ads" in out
    assert "all 4 receipts verify offline" in out
    assert "lease: 20 jobs" in out
    assert "every receipt is paid by a certified transfer" in out
    assert "all 5 ledgers agree on state hash" in out
    assert "bootstrap exit 0, peer1 exit 0, peer2 exit 0, peer3 exit 0" in out
