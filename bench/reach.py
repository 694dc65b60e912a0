"""Benchmark: reaching executors across NATs, in the network-namespace lab (tests/netlab.py).

Real ``edgeswarm`` processes: two bootstrap nodes (relays) and a public
executor on the public side, an executor behind a masquerading NAT, and a
requester app (this script in ``client`` mode) on the public side and behind
a second NAT. Measures

  * job latency p50/p99 over a lease (tiny model, 16 floats): direct (public
    executor), relayed (NATed executor, public requester) and relayed both
    ways (NATed requester and executor), and hole-punched (DCUtR: both behind
    NATs whose routers drop unsolicited packets; the lease starts after the
    punch, and ``relayed`` says whether its job stream went over a relay);
  * hole punching: success rate over ``--punches`` fresh requesters (each a new
    peer: dial through the relay, then punch) and time from the relayed
    connection to the direct one;
  * throughput for a 1 MiB input (two 512 KiB float32 tensors) direct and relayed;
  * time from a NATed executor's start to its first relay reservation, and to
    the first job it serves to a requester started at that moment;
  * relay memory per reservation: RSS of an ``edgeswarm bootstrap`` process on
    loopback before and after N peers (in this process) reserve on it.

Needs root, ``ip`` and ``iptables`` (else it exits saying why). Writes
bench/results/reach.json.

    nice -n 10 python bench/reach.py            # ~3-4 min on 2 cores
    nice -n 10 python bench/reach.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(pct(ms, 0.99), 2),
    }


# -- client mode (runs inside a namespace) ------------------------------------------


async def client(args: argparse.Namespace) -> None:

    from peer.config import load_config
    from peer.node import open_peer

    listen = ["/ip4/0.0.0.0/tcp/0"] if args.punch else []  # a punch dials from its listen port
    config = load_config(
        cli={"bootstrap": args.boots.split(","), "data_dir": args.data_dir, "listen": listen}
    )
    out: dict[str, Any] = {}
    async with open_peer(config, role="client", market=True) as peer:
        punch: dict[str, Any] = {}
        if args.punch:  # one job through the relay (its dial asks for the punch), then wait
            x = np.arange(16, dtype=np.float32)
            first = await peer.infer(args.cid, {"x": x, "y": x}, max_price=5.0, deadline=30)
            with trio.fail_after(60):
                while first.executor not in peer.reach.punch.results:
                    await peer.reach.punch.changed.wait()
            p = peer.reach.punch.results[first.executor]
            punch = {"ok": p.ok, "seconds": round(p.seconds, 3), "addr": p.addr}
        if args.punch_only:
            out = {"punch": punch}
        elif args.first_job_since:
            x = np.arange(16, dtype=np.float32)
            with trio.fail_after(300):
                while True:
                    try:
                        await peer.infer(args.cid, {"x": x, "y": x}, max_price=5.0, deadline=5)
                        break
                    except Exception as exc:  # not found / not reachable yet: ask again
                        out["last_error"] = f"{type(exc).__name__}: {exc}"[:200]
            out["first_job_s"] = time.time() - args.first_job_since
        else:
            small = np.arange(16, dtype=np.float32)
            big = np.ones(128 * 1024, dtype=np.float32)  # 512 KiB; x + y = 1 MiB in
            async with peer.lease(args.cid, max_jobs=10_000, seconds=600, max_price=5.0) as lease:
                for _ in range(3):  # warm-up
                    await lease.infer({"x": small, "y": small})
                lat = []
                for _ in range(args.jobs):
                    t = time.perf_counter()
                    await lease.infer({"x": small, "y": small})
                    lat.append((time.perf_counter() - t) * 1000)
                big_lat = []
                for _ in range(args.big_jobs):
                    t = time.perf_counter()
                    await lease.infer({"x": big, "y": big})
                    big_lat.append((time.perf_counter() - t) * 1000)
                route = lease.route or ""  # the connection the lease's job stream is on
            out = {
                "tiny": summary(lat),
                "mib_in": summary(big_lat),
                "mib_per_s_in": round(1000 / statistics.median(big_lat), 2),
                "relayed": "p2p-circuit" in route,
                "job_conn": route or None,
            }
            if punch:
                out["punch"] = punch
    print(json.dumps(out), flush=True)


# -- orchestration ------------------------------------------------------------------


def add_model(data_dir: Path, name: str) -> str:
    from edge_models.registry import Registry
    from tests.models import _save, add_model_proto

    path = _save(add_model_proto(name=name), data_dir.parent / f"{name}.onnx")
    return Registry(data_dir / "models").add_file(path, name).cid


async def run_client(host: Any, boots: list[str], data_dir: Path, *extra: str) -> dict[str, Any]:
    from tests.reach.lab_swarm import ENV

    argv = [sys.executable, __file__, "client", "--boots", ",".join(boots)]
    argv += ["--data-dir", str(data_dir), *extra]
    done = await trio.run_process(
        host.argv(argv), capture_stdout=True, capture_stderr=True, check=False, env=ENV
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace")[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def lab_figures(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from peer.local_swarm import local_swarm
    from tests import netlab
    from tests.reach.lab_swarm import ENV, start_bootstrap, wait_lines

    results: dict[str, Any] = {}
    jobs = ["--jobs", str(args.jobs), "--big-jobs", str(args.big_jobs)]
    with netlab.lab() as lab:
        b1, b2 = lab.public("boot1"), lab.public("boot2")
        exd_host, exn_host = lab.public("exd"), lab.home("exn")
        req_host, reqn_host = lab.public("req"), lab.home("reqn")
        async with local_swarm(tmp / "swarm") as swarm:
            boots = [
                await start_bootstrap(swarm, "boot1", b1),
                await start_bootstrap(swarm, "boot2", b2),
            ]
            run = ["run", "--listen", "/ip4/0.0.0.0/tcp/0"]
            for b in boots:
                run += ["--bootstrap", b]
            direct_cid = add_model(tmp / "swarm" / "exd", "add_direct")
            await swarm.start("exd", *run, env=ENV, prefix=exd_host.argv([]))
            results["direct"] = await run_client(
                req_host, boots, tmp / "c1", "--cid", direct_cid, *jobs
            )
            print("direct", results["direct"], flush=True)

            nat_cid = add_model(tmp / "swarm" / "exn", "add_nat")
            # Time to first job: from the executor's start (process spawn) to the first job
            # a requester started once the executor holds a relay slot gets served.
            t0 = time.time()
            exn = await swarm.start("exn", *run, env=ENV, prefix=exn_host.argv([]))
            await wait_lines(exn, "reserved a slot on relay", 1, limit=120)
            results["nated_reserved_s"] = round(time.time() - t0, 2)
            since = ["--first-job-since", str(t0)]
            first = await run_client(req_host, boots, tmp / "c2", "--cid", nat_cid, *since)
            results["nated_first_job_s"] = round(first["first_job_s"], 2)
            print("first job", first, flush=True)
            await wait_lines(exn, "reserved a slot on relay", 2, limit=120)
            results["relayed"] = await run_client(
                req_host, boots, tmp / "c3", "--cid", nat_cid, *jobs
            )
            print("relayed", results["relayed"], flush=True)
            results["relayed_both_nated"] = await run_client(
                reqn_host, boots, tmp / "c4", "--cid", nat_cid, *jobs
            )
            print("relayed, NATed requester", results["relayed_both_nated"], flush=True)

            # Hole punching: both behind routers that drop unsolicited packets.
            exp_host, reqp_host = lab.home("exp", drops=True), lab.home("reqp", drops=True)
            punch_cid = add_model(tmp / "swarm" / "exp", "add_punch")
            exp = await swarm.start("exp", *run, env=ENV, prefix=exp_host.argv([]))
            await wait_lines(exp, "reserved a slot on relay", 2, limit=120)
            results["punched"] = await run_client(
                reqp_host, boots, tmp / "c5", "--cid", punch_cid, "--punch", *jobs
            )
            print("hole-punched", results["punched"], flush=True)
            punches = [results["punched"]["punch"]]
            for i in range(args.punches - 1):
                extra = ["--cid", punch_cid, "--punch", "--punch-only"]
                punches.append((await run_client(reqp_host, boots, tmp / f"p{i}", *extra))["punch"])
            times = [p["seconds"] for p in punches if p["ok"]]
            results["hole_punch"] = {
                "attempts": len(punches),
                "direct": len(times),
                "success_rate": round(len(times) / len(punches), 3),
                "to_direct_s_p50": round(statistics.median(times), 3) if times else None,
                "to_direct_s_max": round(max(times), 3) if times else None,
                "addrs": sorted({str(p["addr"]) for p in punches if p["ok"]}),
            }
            print("hole punching", results["hole_punch"], flush=True)
    return results


async def relay(args: argparse.Namespace) -> None:
    """Relay mode: a hop relay on loopback (per-IP cap lifted: every client is 127.0.0.1);
    prints its address, then its RSS in bytes for every line read on stdin."""
    import nacl.signing
    import psutil

    from peer.host import build_host, running_host
    from peer.reach.relay import HopLimits, RelayService

    host = build_host(nacl.signing.SigningKey.generate())
    limits = HopLimits(max_reservations=100_000, max_reservations_per_ip=100_000)
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]) as addrs, trio.open_nursery() as n:
        await n.start(RelayService(host, hop=True, limits=limits).run)
        print(addrs[0], flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some(64):
            print(psutil.Process().memory_info().rss, flush=True)
        n.cancel_scope.cancel()


@asynccontextmanager
async def relay_client() -> AsyncIterator[tuple[Any, Any]]:
    """A host with a relay client (stop side), running until the context exits."""
    import nacl.signing

    from peer.host import build_host, running_host
    from peer.reach.relay import RelayService

    host = build_host(nacl.signing.SigningKey.generate())
    service = RelayService(host)
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]), trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield host, service
        finally:
            nursery.cancel_scope.cancel()


async def relay_memory(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from libp2p.peer.id import ID

    from peer.reach import reach_of

    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "relay"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    buf = b""

    async def line() -> str:
        nonlocal buf
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)  # type: ignore[union-attr]
            if not chunk:
                raise RuntimeError("the relay process exited")
            buf += chunk
        text, buf = buf.split(b"\n", 1)
        return text.decode()

    async def rss() -> int:
        await proc.stdin.send_all(b"rss\n")  # type: ignore[union-attr]
        return int(await line())

    try:
        addr = await line()
        rid = ID.from_base58(addr.rsplit("/p2p/", 1)[1])
        baseline = await rss()
        async with AsyncExitStack() as stack:
            services = []
            for _ in range(args.reservations):
                host, service = await stack.enter_async_context(relay_client())
                await reach_of(host).connect(rid, [addr], deadline=10)
                services.append(service)
            await trio.sleep(2)  # bench, not test: let identify settle before measuring
            with_connections = await rss()
            for service in services:
                await service.reserve(rid)
            await trio.sleep(2)
            with_reservations = await rss()
    finally:
        proc.kill()
        await proc.wait()
    n = args.reservations
    return {
        "reservations": n,
        "relay_rss_mb_idle": round(baseline / 2**20, 1),
        "kib_per_connection": round((with_connections - baseline) / n / 1024, 1),
        "relay_rss_mb_with_connections": round(with_connections / 2**20, 1),
        "relay_rss_mb_with_reservations": round(with_reservations / 2**20, 1),
        "kib_per_reservation": round((with_reservations - with_connections) / n / 1024, 1),
    }


async def main(args: argparse.Namespace) -> None:
    from tests import netlab

    why = netlab.unavailable()
    if why:
        sys.exit(f"bench/reach.py: {why}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results: dict[str, Any] = {} if args.memory_only else {"lab": await lab_figures(args, tmp)}
        results["relay_memory"] = await relay_memory(args, tmp)
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "uptime": (await trio.run_process(["uptime"], capture_stdout=True)).stdout.decode().strip(),
        "args": vars(args),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "client", "relay"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--big-jobs", type=int, default=10)
    parser.add_argument("--reservations", type=int, default=40)
    parser.add_argument("--out", default="reach.json")
    parser.add_argument("--memory-only", action="store_true", help="only relay memory")
    parser.add_argument("--boots", default="")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--cid", default="")
    parser.add_argument("--first-job-since", type=float, default=0.0)
    parser.add_argument("--punches", type=int, default=10, help="fresh requesters that punch")
    parser.add_argument("--punch", action="store_true", help="client: listen, punch first")
    parser.add_argument("--punch-only", action="store_true", help="client: punch, no lease")
    ns = parser.parse_args()
    if ns.quick:
        ns.jobs, ns.big_jobs, ns.reservations, ns.punches = 20, 3, 8, 3
    trio.run({"client": client, "relay": relay, "bench": main}[ns.mode], ns)
