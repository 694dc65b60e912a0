"""Multi-host tests: real ``edgeswarm`` processes in network namespaces (tests/netlab.py).

They need root, ``ip`` and ``iptables``; elsewhere they skip, saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.local_swarm import local_swarm
from tests.netlab import Lab
from tests.reach.lab_swarm import (
    LeaseClient,
    infer,
    start_bootstrap,
    start_executor,
    wait_lines,
    wait_log,
)

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


async def test_nated_executor_serves_a_public_and_a_nated_requester(
    lab: Lab, tmp_path: Path
) -> None:
    b1, b2 = lab.public("boot1"), lab.public("boot2")
    ex_host = lab.home("ex")  # behind NAT, no port forward
    pub_req, nat_req = lab.public("reqpub"), lab.home("reqnat")
    async with local_swarm(tmp_path / "swarm") as swarm:
        boots = [
            await start_bootstrap(swarm, "boot1", b1),
            await start_bootstrap(swarm, "boot2", b2),
        ]
        ex = await start_executor(swarm, "ex", ex_host, boots)
        await wait_log(ex, "reachability: private")
        await wait_lines(ex, "reserved a slot on relay", 2)
        for host, name in ((pub_req, "pub"), (nat_req, "nat")):
            (tmp_path / name).mkdir()
            report = await infer(tmp_path / name, host, boots)
            assert report["executor"] == ex.peer_id, name


async def test_relay_dies_mid_lease_and_the_lease_goes_on_through_the_second_relay(
    lab: Lab, tmp_path: Path
) -> None:
    b1, b2 = lab.public("boot1"), lab.public("boot2")
    ex_host, req_host = lab.home("ex"), lab.home("req")
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot_addrs = {
            "boot1": await start_bootstrap(swarm, "boot1", b1),
            "boot2": await start_bootstrap(swarm, "boot2", b2),
        }
        ex = await start_executor(swarm, "ex", ex_host, list(boot_addrs.values()))
        await wait_lines(ex, "reserved a slot on relay", 2)
        jobs = 30
        client = await LeaseClient.start(
            req_host, list(boot_addrs.values()), tmp_path / "req", jobs
        )
        async with client:
            first = await client.wait_jobs(5)
            relay = first[-1]["via"]
            assert relay is not None, first  # NAT to NAT: through a relay
            victim = next(p for p in swarm.processes if p.peer_id == relay)
            await swarm.stop(victim)
            lines = await client.finish()
        done = [ln for ln in lines if "i" in ln]
        assert [ln["i"] for ln in done] == list(range(jobs)), lines
        assert {ln["executor"] for ln in done} == {ex.peer_id}
        after = done[-1]["via"]
        assert after is not None and after != relay, lines
        survivor = next(p for p in swarm.processes if p.name != victim.name and p.peer_id == after)
        assert survivor.name.startswith("boot")


async def test_two_nated_peers_punch_a_hole_and_later_job_streams_go_direct(
    lab: Lab, tmp_path: Path
) -> None:
    boot_host = lab.public("boot")
    # Routers that drop unsolicited packets (see tests/netlab.py: why not ones that refuse).
    ex_host, req_host = lab.home("ex", drops=True), lab.home("req", drops=True)
    async with local_swarm(tmp_path / "swarm") as swarm:
        boot = await start_bootstrap(swarm, "boot", boot_host)
        ex = await start_executor(swarm, "ex", ex_host, [boot])
        await wait_log(ex, "reserved a slot on relay")
        client = await LeaseClient.start(
            req_host, [boot], tmp_path / "req", 3, script_name="punch_client.py"
        )
        async with client:
            lines = await client.finish()
        await wait_log(ex, "hole punched with")
    jobs = [ln for ln in lines if "i" in ln]
    assert [j["executor"] for j in jobs] == [ex.peer_id] * 3, lines
    # The requester reached the NATed executor through the relay (only then does it punch),
    # then punched a hole to the executor's NAT (its public side, listen port preserved) ...
    punch = next(ln["punch"] for ln in lines if "punch" in ln)
    assert punch["ok"] and punch["addr"].startswith(f"/ip4/{ex_host.wan}/tcp/"), punch
    # ... the first job's stream went over the relay, or already over the direct
    # connection when the punch beat the award (it takes ~0.3 s here) ...
    first = jobs[0]["conn"]
    assert len(first) == 1 and ("/p2p-circuit" in first[0] or first[0] == punch["addr"]), lines
    # ... and every job after the punch went over the direct connection: on a new stream
    # there, or on the idle stream an earlier direct job left (relayed streams are not kept).
    path = first[0]
    for job in jobs[1:]:
        if job["conn"]:
            assert job["conn"] == [punch["addr"]], lines
            path = job["conn"][0]
        else:
            assert path == punch["addr"], lines
