"""What a peer advertises (its ad and identify): usable addresses, --announce first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from peer.config import Config
from peer.node import open_peer
from tests.integration.test_peer_network import FakeHardware

ANNOUNCED = "/ip4/203.0.113.7/tcp/4001"


async def test_ad_lists_announce_first_and_no_loopback_beside_real_interfaces(
    tmp_path: Path,
) -> None:
    config = Config(data_dir=tmp_path / "p", listen=("/ip4/0.0.0.0/tcp/0",), announce=(ANNOUNCED,))
    async with open_peer(config, hardware=FakeHardware(), market=False, settlement=False) as peer:
        ad = peer.ad
        assert ad is not None
        assert ad.addrs[0] == f"{ANNOUNCED}/p2p/{peer.peer_id}"
        assert not [a for a in ad.addrs if a.startswith("/ip4/127.")], ad.addrs
        assert all(a.endswith(f"/p2p/{peer.peer_id}") for a in ad.addrs)
        # identify tells peers the same list (py-libp2p's addrs_factory).
        assert [str(a) for a in peer.host.get_addrs()] == list(ad.addrs)


async def test_loopback_only_peer_advertises_loopback(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "p", listen=("/ip4/127.0.0.1/tcp/0",))
    async with open_peer(config, hardware=FakeHardware(), market=False, settlement=False) as peer:
        assert peer.ad is not None
        assert list(peer.ad.addrs) == peer.listen_addrs


def test_bad_announce_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for bad in ("/ip4/0.0.0.0/tcp/4001", "/ip4/1.2.3.4/udp/4001", "nonsense"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "peer.cli",
                "run",
                "--data-dir",
                str(tmp_path),
                "--announce",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgeswarm: error: --announce:"), lines
