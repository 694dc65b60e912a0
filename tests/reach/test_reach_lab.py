"""Multi-host tests: real ``edgeswarm`` processes in network namespaces (tests/netlab.py).

They need root, ``ip`` and ``iptables``; elsewhere they skip, saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.local_swarm import local_swarm
from tests.netlab import Lab
from tests.reach.lab_swarm import infer, start_bootstrap, start_executor, wait_log

pytestmark = pytest.mark.timeout(300)


async def test_public_executor_with_several_addresses_only_one_reachable(
    lab: Lab, tmp_path: Path
) -> None:
    boot_host = lab.public("boot")
    ex_host = lab.public("ex", dead_first=True)  # lists 10.99.x.2 (a black hole) first
    req_host = lab.home("req")  # behind NAT: the requester dials out
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await start_bootstrap(swarm, "boot", boot_host)
        ex = await start_executor(swarm, "ex", ex_host, [boot])
        # The executor advertises both addresses, the unreachable one first.
        assert ex_host.dead_ip is not None
        advertised = await wait_log(ex, "advertising ")
        assert advertised.index(ex_host.dead_ip) < advertised.index(f"/ip4/{ex_host.ip}/")
        assert "/ip4/127." not in advertised
        report = await infer(tmp_path, req_host, [boot])
        assert report["executor"] == ex.peer_id
