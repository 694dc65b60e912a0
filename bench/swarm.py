"""A swarm of N peers over P processes on this machine, with executors killed mid-run.

    python bench/swarm.py --peers 200 --processes 8 --jobs 500 --kill 10 --out PATH

What runs (every peer a real libp2p host with its own identity and data dir, on
127.0.0.1):

* a bootstrap node (``edgeswarm bootstrap`` process; also the ledger witness);
* ``E = kill + max(4, kill // 2)`` executors, each its own ``edgeswarm run``
  process serving a tiny model (so each one can be SIGKILLed alone);
* ``R = 4`` requesters (market + settlement) in this process;
* the other ``N - E - R`` peers spread over ``P`` worker processes
  (``--worker``: many ``open_peer`` peers in one trio loop; each publishes its
  ad; the first 50 subscribe to a bench gossip topic).

It measures: the time from the first start until a DHT client in this process
finds the ad of every peer (``all_ads_findable_s``); ``find_ad`` latency over
200 random peers (``lookup_ms_p50/p99``); how long a gossip message takes to
reach the 50 subscribed peers (``gossip_reach_ms_p99``, over 20 messages); RSS
per extra peer in a worker process (``rss_mb_per_peer``: (RSS with all its peers
- RSS with one) / (peers - 1), the mean over workers). Then it runs ``J`` jobs
(``market.infer``, 8 at a time over the requesters) while killing ``K``
executors with SIGKILL at random moments, and counts jobs requested,
completed, failed with a typed market error, lost (neither) and paid twice (a
job with receipts from two executors, or one receipt paid by two
certificates), by reading every surviving ledger after the run.

JSON (``--out``, default ``bench/results/swarm.json``): ``results`` holds the
binding keys (peers, processes, all_ads_findable_s, lookup_ms_p50,
lookup_ms_p99, gossip_reach_ms_p99, rss_mb_per_peer, jobs_requested,
jobs_completed, jobs_lost, jobs_paid_twice, killed) and more.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peer.local_swarm
from edge_models.registry import Registry
from peer.config import Config
from peer.local_swarm import local_swarm, peer_args
from peer.node import open_peer
from tests.models import tiny_add_model

RESULTS = Path(__file__).resolve().parent / "results"
GOSSIP_TOPIC = "edgeswarm/bench/swarm"
GOSSIP_PEERS = 50
GOSSIP_MESSAGES = 20
LOOKUP_PARALLEL = 8
REQUESTERS = 4
START_BATCH = 8
# Ads are re-published at half their TTL: a first publish lost on a loaded box is retried
# after 30 s (a 600 s TTL left ads unfindable for 5 minutes).
AD_TTL = 60.0
IN_FLIGHT = 8
JOB_DEADLINE_S = 20.0
FINDABLE_LIMIT_S = 600.0


class Hardware:
    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "bench cpu", "memory": 2**30}]


def say(t0: float, what: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)


def rss_mb(pid: int | None = None) -> float:
    return float(psutil.Process(pid or os.getpid()).memory_info().rss) / 2**20


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cfg(root: Path, name: str, boot: str, **kw: Any) -> Config:
    return Config(data_dir=root / name, listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=(boot,), **kw)


# --- worker process: many peers in one trio loop ----------------------------------------------


async def worker(args: argparse.Namespace) -> None:
    """Start ``--count`` peers; print ``peer <id>`` each, ``ready <rss1> <rssN>``, then one
    ``G <idx> <msg> <delay_ms>`` line per bench gossip message received, until SIGTERM."""
    root = Path(args.root)
    out = sys.stdout

    async def one(i: int, started: list[Any], task_status: Any) -> None:
        c = cfg(root, f"w{args.index}-{i}", args.bootstrap, ad_ttl=AD_TTL)
        async with open_peer(
            c, hardware=Hardware(), models=[], market=False, settlement=False
        ) as p:
            started.append(p)
            sub = await p.pubsub.subscribe(GOSSIP_TOPIC) if i < args.subscribe else None
            out.write(f"peer {p.peer_id}\n")
            out.flush()
            task_status.started()
            if sub is None:
                await trio.sleep_forever()
            async for msg in sub:
                sent_at, msg_id = json.loads(bytes(msg.data))
                out.write(f"G {args.index}-{i} {msg_id} {(time.time() - sent_at) * 1e3:.2f}\n")
                out.flush()

    started: list[Any] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(one, 0, started)
        rss_one = rss_mb()
        # The others START_BATCH at a time (each one joins through the bootstrap node).
        for first in range(1, args.count, START_BATCH):
            async with trio.open_nursery() as batch:
                for i in range(first, min(args.count, first + START_BATCH)):
                    batch.start_soon(nursery.start, one, i, started)
        out.write(f"ready {rss_one:.1f} {rss_mb():.1f}\n")
        out.flush()
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# --- the coordinator ---------------------------------------------------------------------------


class Worker:
    def __init__(self, proc: trio.Process, index: int) -> None:
        self.proc = proc
        self.index = index
        self.peer_ids: list[str] = []
        self.ready = trio.Event()
        self.rss = (0.0, 0.0)
        self.gossip: list[tuple[str, int, float]] = []

    async def read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := await self.proc.stdout.receive_some(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                parts = raw.decode().split()
                if not parts:
                    continue
                if parts[0] == "peer":
                    self.peer_ids.append(parts[1])
                elif parts[0] == "ready":
                    self.rss = (float(parts[1]), float(parts[2]))
                    self.ready.set()
                elif parts[0] == "G":
                    self.gossip.append((parts[1], int(parts[2]), float(parts[3])))


async def start_worker(
    nursery: trio.Nursery, root: Path, index: int, count: int, subscribe: int, boot: str
) -> Worker:
    log = (root / f"worker{index}.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            __file__,
            "--worker",
            "--index",
            str(index),
            "--count",
            str(count),
            "--subscribe",
            str(subscribe),
            "--bootstrap",
            boot,
            "--root",
            str(root),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    w = Worker(proc, index)
    nursery.start_soon(w.read)
    return w


def seed_tiny(data_dir: Path) -> None:
    registry = Registry(data_dir / "models")
    registry.add_file(tiny_add_model(data_dir / "src" / "add.onnx"), "tiny_add")


async def find_all_ads(client: Any, ids: list[str], t0: float, limit: float) -> float:
    """Seconds from ``t0`` until every id in ``ids`` has a findable ad (bounded)."""
    missing = set(ids)
    limiter = trio.CapacityLimiter(16)

    async def one(pid: str) -> None:
        async with limiter:
            if await client.find_ad(pid) is not None:
                missing.discard(pid)

    with trio.fail_after(limit):
        while missing:
            async with trio.open_nursery() as nursery:
                for pid in list(missing):
                    nursery.start_soon(one, pid)
            if missing:
                print(
                    f"[{time.monotonic() - t0:7.1f} s] {len(missing)} ads not found yet, e.g. "
                    f"{sorted(missing)[:3]}",
                    file=sys.stderr,
                    flush=True,
                )
                await trio.sleep(1.0)  # a bounded poll of the real DHT: no event exists
    return time.monotonic() - t0


def ledgers_summary(data_dirs: list[Path]) -> tuple[int, dict[str, int]]:
    """(jobs paid twice, counters) over the ledgers under ``data_dirs``."""
    from peer.http.explorer import receipt_rows
    from peer.ledger_store import DB_NAME, StoreError, read_snapshot
    from protocols.certificate import Certificate
    from protocols.ledger_state import FactKind

    receipts: dict[str, set[str]] = defaultdict(set)  # job id -> receipt ids
    certs: dict[bytes, set[bytes]] = defaultdict(set)  # receipt id -> certificate ids
    read = 0
    for d in data_dirs:
        for db in d.rglob(DB_NAME):
            try:
                snap = read_snapshot(db)
            except StoreError:
                continue
            read += 1
            rows, _bad = receipt_rows((k, data) for _fid, k, data in snap.facts)
            for row in rows:
                receipts[row["job_id"]].add(row["receipt_id"])
            for fid, kind, data in snap.facts:
                if kind == FactKind.CERTIFICATE:
                    certs[Certificate.from_bytes(data).transfer.message.receipt_id].add(fid)
    twice = sum(1 for r in receipts.values() if len(r) > 1)
    twice += sum(1 for c in certs.values() if len(c) > 1)
    return twice, {
        "ledgers_read": read,
        "receipts": sum(len(r) for r in receipts.values()),
        "certificates": sum(len(c) for c in certs.values()),
    }


async def coordinator(args: argparse.Namespace) -> dict[str, Any]:
    executors_n = args.kill + max(4, args.kill // 2)
    bulk = args.peers - executors_n - REQUESTERS
    if bulk < args.processes:
        raise SystemExit(f"--peers {args.peers} is too few for {executors_n} executors + ...")
    res: dict[str, Any] = {
        "peers": args.peers,
        "processes": args.processes,
        "executor_processes": executors_n,
        "requesters_in_coordinator": REQUESTERS,
        "load_before": os.getloadavg(),
    }
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="edgeswarm-swarm-"))
    t0 = time.monotonic()
    async with AsyncExitStack() as stack:
        swarm = await stack.enter_async_context(local_swarm(root))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        boot = await swarm.start("boot", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
        # Bulk peers first (they take longest), executors while they start.
        per = [bulk // args.processes + (i < bulk % args.processes) for i in range(args.processes)]
        sub_per = [
            GOSSIP_PEERS // args.processes + (i < GOSSIP_PEERS % args.processes)
            for i in range(args.processes)
        ]
        workers = [
            await start_worker(nursery, root, i, n, min(n, s), boot.address)
            for i, (n, s) in enumerate(zip(per, sub_per, strict=True))
        ]

        async def stop_workers() -> None:
            for w in workers:
                if w.proc.returncode is None:
                    w.proc.send_signal(signal.SIGTERM)
            for w in workers:
                with trio.move_on_after(20):
                    await w.proc.wait()
                if w.proc.returncode is None:
                    w.proc.kill()
                    await w.proc.wait()

        stack.push_async_callback(stop_workers)
        env = {
            "EDGESWARM_BID_WINDOW": "0.3",
            "EDGESWARM_JOB_TIMEOUT": "20",
            "EDGESWARM_LOG_LEVEL": "WARNING",
            "EDGESWARM_AD_TTL": str(AD_TTL),
        }
        executors: list[Any] = []

        async def start_executor(i: int) -> None:
            seed_tiny(root / f"ex{i}")
            executors.append(
                await swarm.start(
                    f"ex{i}", *peer_args([boot.address]), env={**env, "EDGESWARM_PRICE": "1.0"}
                )
            )

        peer.local_swarm.START_TIMEOUT = 600.0  # a loaded box imports onnxruntime slowly
        start_limiter = trio.CapacityLimiter(2)

        async def start_limited(i: int) -> None:
            async with start_limiter:
                await start_executor(i)

        async with trio.open_nursery() as starting:
            for i in range(executors_n):
                starting.start_soon(start_limited, i)
        requesters = []
        for i in range(REQUESTERS):
            requesters.append(
                await stack.enter_async_context(
                    open_peer(
                        cfg(root, f"req{i}", boot.address, ad_ttl=AD_TTL, bid_window=1.0),
                        hardware=Hardware(),
                        models=[],
                    )
                )
            )
        with trio.fail_after(FINDABLE_LIMIT_S):
            for w in workers:
                await w.ready.wait()
        res["start_up_s"] = round(time.monotonic() - t0, 2)
        say(t0, f"{args.peers} peers started")
        ids = [p for w in workers for p in w.peer_ids]
        ids += [e.peer_id for e in executors] + [r.peer_id for r in requesters]
        res["peer_ids_known"] = len(ids)
        client = requesters[0]
        res["all_ads_findable_s"] = round(await find_all_ads(client, ids, t0, FINDABLE_LIMIT_S), 2)
        say(t0, "every ad findable")
        # Lookups: a full walk for random peers' ads, LOOKUP_PARALLEL at a time.
        lat: list[float] = []
        misses = [0]
        lookup_limiter = trio.CapacityLimiter(LOOKUP_PARALLEL)

        async def lookup(pid: str) -> None:
            async with lookup_limiter:
                s = time.perf_counter()
                found = await requesters[1 % REQUESTERS].find_ad(pid)
                lat.append((time.perf_counter() - s) * 1e3)
                misses[0] += found is None

        async with trio.open_nursery() as lookups:
            for pid in rng.choices(ids, k=args.lookups):
                lookups.start_soon(lookup, pid)
        res["lookup_ms_p50"] = round(pct(lat, 50), 1)
        res["lookup_ms_p99"] = round(pct(lat, 99), 1)
        res["lookups"] = f"{args.lookups}, {LOOKUP_PARALLEL} at a time"
        res["lookup_misses"] = misses[0]
        say(t0, "lookups done")
        # Gossip reach: the publisher joins the topic; 50 worker peers are subscribed.
        pub = requesters[2 % REQUESTERS]
        await pub.pubsub.subscribe(GOSSIP_TOPIC)
        with trio.move_on_after(15):  # let the publisher graft into the topic mesh
            for _ in range(75):
                if pub.pubsub.router.mesh.get(GOSSIP_TOPIC):
                    break
                await trio.sleep(0.2)
        for m in range(GOSSIP_MESSAGES):
            await pub.pubsub.publish(GOSSIP_TOPIC, json.dumps([time.time(), m]).encode())
            await trio.sleep(0.5)
        await trio.sleep(3.0)  # stragglers
        delays = [d for w in workers for (_p, _m, d) in w.gossip]
        got = {(p, m) for w in workers for (p, m, _d) in w.gossip}
        res["gossip_reach_ms_p50"] = round(pct(delays, 50), 1)
        res["gossip_reach_ms_p99"] = round(pct(delays, 99), 1)
        res["gossip_deliveries"] = f"{len(got)} of {GOSSIP_PEERS * GOSSIP_MESSAGES}"
        res["rss_mb_per_peer"] = round(
            statistics.mean(
                (w.rss[1] - w.rss[0]) / max(1, n - 1) for w, n in zip(workers, per, strict=True)
            ),
            2,
        )
        res["rss_mb_worker_process"] = [w.rss[1] for w in workers]
        res["rss_mb_executor_process"] = round(
            statistics.mean(rss_mb(e.process.pid) for e in executors), 1
        )
        say(t0, "gossip done")
        # Jobs with kills.
        cid = Registry(root / "ex0" / "models").get("tiny_add").cid
        outcome: dict[str, int] = defaultdict(int)
        errors: dict[str, int] = defaultdict(int)
        progress = [trio.Event()]
        finished = [0]
        x = np.ones(4, np.float32)

        async def job(i: int, limiter: trio.CapacityLimiter) -> None:
            async with limiter:
                req = requesters[i % REQUESTERS]
                try:
                    with trio.fail_after(JOB_DEADLINE_S + 15):
                        await req.infer(cid, {"x": x, "y": x * i}, deadline=JOB_DEADLINE_S)
                    outcome["completed"] += 1
                except trio.TooSlowError:
                    outcome["lost"] += 1
                except Exception as exc:
                    from peer.market import MarketFailure  # typed market errors

                    if isinstance(exc, MarketFailure):
                        outcome["failed_clearly"] += 1
                        errors[f"{type(exc).__name__}: {exc}"[:160]] += 1
                    else:
                        outcome["lost"] += 1
                        errors[f"unexpected {type(exc).__name__}: {exc}"[:120]] += 1
                finished[0] += 1
                progress[0].set()
                progress[0] = trio.Event()

        killed: list[str] = []

        async def killer() -> None:
            victims = rng.sample(executors, args.kill)
            marks = sorted(rng.uniform(0.05, 0.8) * args.jobs for _ in victims)
            for mark, sp in zip(marks, victims, strict=True):
                for _ in range(args.jobs + 1):
                    if finished[0] >= mark:
                        break
                    await progress[0].wait()
                await trio.sleep(rng.uniform(0, 0.2))  # mid-job, not between jobs
                sp.process.kill()  # SIGKILL
                killed.append(sp.name)

        t_jobs = time.monotonic()
        if args.jobs:
            limiter = trio.CapacityLimiter(IN_FLIGHT)
            async with trio.open_nursery() as jobs_nursery:
                jobs_nursery.start_soon(killer)
                for i in range(args.jobs):
                    jobs_nursery.start_soon(job, i, limiter)
        res["jobs_wall_s"] = round(time.monotonic() - t_jobs, 1)
        say(t0, f"jobs done: {dict(outcome)} {dict(errors)}")
        res["jobs_requested"] = args.jobs
        res["jobs_completed"] = outcome["completed"]
        res["jobs_failed_clearly"] = outcome["failed_clearly"]
        res["jobs_lost"] = outcome["lost"]
        res["job_errors"] = dict(errors)
        res["killed"] = len(killed)
        # Let settlement pay what it owes, then read every surviving ledger.
        await trio.sleep(args.settle_s)
        for r in requesters:
            assert r.market is not None
        own = [r.market.receipts.receipts for r in requesters]  # type: ignore[union-attr]
        per_job: dict[bytes, int] = defaultdict(int)
        for book in own:
            for rc in book:
                per_job[rc.commitment.message.job_id] += 1
        res["requester_receipts"] = sum(per_job.values())
        survivors = [e for e in executors if e.name not in killed]
        for sp in survivors:
            await swarm.stop(sp)
        await swarm.stop(boot)
        twice, counts = ledgers_summary(
            [root / e.name for e in survivors]
            + [root / "boot"]
            + [root / f"req{i}" for i in range(REQUESTERS)]
        )
        res["jobs_paid_twice"] = twice + sum(1 for n in per_job.values() if n > 1)
        res.update(counts)
    res["total_wall_s"] = round(time.monotonic() - t0, 1)
    res["load_after"] = os.getloadavg()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--kill", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "swarm.json")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument(
        "--settle-s", type=float, default=10.0, help="wait for payments before reading ledgers"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--subscribe", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default="", help=argparse.SUPPRESS)
    ap.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        trio.run(worker, args)
        return
    t = time.time()
    results = trio.run(coordinator, args)
    doc = {
        "bench": "swarm",
        "command": " ".join(sys.argv),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
