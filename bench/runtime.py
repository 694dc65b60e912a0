"""Benchmark: the edge_models execution path against a bare InferenceSession.run.

For a tiny graph (z = x + y) and the real model (all-MiniLM-L6-v2 int8), in one
run, measures per-call latency (p50/p99) and sequential throughput of

  (a) direct   ``session.run(None, feeds)`` on the InferenceSession that
               the runtime itself holds for the model
  (b) edge     CBOR bytes -> ``codec.decode`` -> ``decode_tensors`` (caps) ->
               ``ModelRuntime.run`` (registry lookup, input checks, slot,
               watchdog timeout, session cache) -> outputs

with the same session options, alternating blocks of (a) and (b) so drift hits
both. Also session load time and memory per loaded model. Prints a table and
writes bench/results/runtime.json.

    python bench/runtime.py            # full run (~1 min on 2 cores)
    python bench/runtime.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from onnx import TensorProto, helper

from edge_models.hardware import probe
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from edge_models.text import minilm_tokenizer
from protocols import codec
from protocols.tensor import TensorLimits, decode_tensors, encode_tensors

RESULTS = Path(__file__).resolve().parent / "results" / "runtime.json"
MAX_MESSAGE = 80 * 1024 * 1024


def tiny_add(path: Path, n: int) -> Path:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "bench_add",
        [vi("x", TensorProto.FLOAT, [n]), vi("y", TensorProto.FLOAT, [n])],
        [vi("z", TensorProto.FLOAT, [n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


def timed(fn: Callable[[], object], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_us": round(statistics.median(s) * 1e6, 2),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6, 2),
        "mean_us": round(statistics.fmean(s) * 1e6, 2),
        "throughput_per_s": round(len(s) / sum(s), 1),
        "calls": len(s),
    }


def compare(
    name: str,
    session: ort.InferenceSession,
    runtime: ModelRuntime,
    ref: str,
    feeds: dict[str, np.ndarray],
    iters: int,
) -> dict[str, Any]:
    wire = codec.encode(encode_tensors(feeds))
    limits = TensorLimits()

    def direct() -> object:
        return session.run(None, feeds)

    def edge() -> object:
        arrays = decode_tensors(codec.decode(wire, max_size=MAX_MESSAGE), limits=limits)
        return runtime.run(ref, arrays)

    # Same answer first, then warm both paths.
    np.testing.assert_array_equal(direct()[0], next(iter(edge().values())))  # type: ignore[index,attr-defined]
    timed(direct, max(iters // 10, 5))
    timed(edge, max(iters // 10, 5))
    # Alternate single calls (a, b, b, a, ...) so a noisy neighbour or a
    # frequency change hits both paths alike; the differences are paired.
    a: list[float] = []
    b: list[float] = []
    # Thread CPU time as well: with intra_op_threads=1 ORT runs on this thread,
    # so CPU time ignores what other processes on the machine steal.
    cpu_a: list[float] = []
    cpu_b: list[float] = []
    clock, cpu = time.perf_counter, time.thread_time
    gc_was = gc.isenabled()
    gc.disable()  # collections would land randomly in one path or the other
    try:
        for i in range(iters):
            for first in (direct, edge) if i % 2 == 0 else (edge, direct):
                c0 = cpu()
                t0 = clock()
                first()
                t1 = clock()
                c1 = cpu()
                if first is direct:
                    a.append(t1 - t0)
                    cpu_a.append(c1 - c0)
                else:
                    b.append(t1 - t0)
                    cpu_b.append(c1 - c0)
    finally:
        if gc_was:
            gc.enable()
    sa, sb = summary(a), summary(b)
    return {
        "model": name,
        "input_bytes": int(sum(v.nbytes for v in feeds.values())),
        "wire_bytes": len(wire),
        "direct": sa,
        "edge": sb,
        "added_p50_us": round(sb["p50_us"] - sa["p50_us"], 2),
        "added_paired_median_us": round(
            statistics.median(y - x for x, y in zip(a, b, strict=True)) * 1e6, 2
        ),
        "added_mean_us": round(sb["mean_us"] - sa["mean_us"], 2),
        "edge_over_direct_p50": round(sb["p50_us"] / sa["p50_us"], 4),
        "edge_over_direct_mean": round(sb["mean_us"] / sa["mean_us"], 4),
        "thread_cpu_p50_us": {
            "direct": round(statistics.median(cpu_a) * 1e6, 2),
            "edge": round(statistics.median(cpu_b) * 1e6, 2),
            "note": "calling thread only: complete when intra_op_threads=1",
        },
    }


def load_costs(path: Path, runtime: ModelRuntime, ref: str, repeats: int) -> dict[str, Any]:
    """Session creation time and RSS growth per loaded session (after a first run)."""
    proc = psutil.Process()
    create_ms: list[float] = []
    rss: list[int] = []
    keep = []  # hold sessions so each one's memory stays counted
    feeds = None
    for _ in range(repeats):
        gc.collect()
        before = proc.memory_info().rss
        t0 = time.perf_counter()
        s = ort.InferenceSession(
            str(path), runtime._session_options(), providers=list(runtime.providers)
        )
        create_ms.append((time.perf_counter() - t0) * 1e3)
        if feeds is None:
            from edge_models.runtime import sample_inputs

            feeds = sample_inputs(runtime.registry.get(ref))
        s.run(None, feeds)
        rss.append(proc.memory_info().rss - before)
        keep.append(s)
    runtime.evict(ref)
    t0 = time.perf_counter()
    loaded = runtime.load(ref)
    full_ms = (time.perf_counter() - t0) * 1e3
    return {
        "session_create_ms_p50": round(statistics.median(create_ms), 2),
        "session_create_ms_all": [round(x, 2) for x in create_ms],
        "runtime_load_ms": round(full_ms, 2),
        "runtime_load_includes": f"session + warm-up + {runtime.p50_runs} timed runs",
        "rss_per_session_mb_median": round(statistics.median(rss) / 1e6, 1),
        "rss_per_session_mb_all": [round(x / 1e6, 1) for x in rss],
        "runtime_estimate_mb": round(loaded.est_bytes / 1e6, 1),
        "load_p50_ms": None if loaded.load_p50_ms is None else round(loaded.load_p50_ms, 3),
        "provider": loaded.provider,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument("--tiny-iters", type=int, default=20000)
    parser.add_argument("--minilm-iters", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.tiny_iters, args.minilm_iters = 2000, 100

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = Registry(root / "models")
        tiny_n = 16
        registry.add_file(tiny_add(root / "tiny.onnx", tiny_n), "tiny")
        minilm = registry.add_packaged("minilm")
        runtime = ModelRuntime(registry, intra_op_threads=args.threads, max_concurrent=2)
        try:
            providers = list(runtime.providers)
            rng = np.random.default_rng(0)
            tiny_feeds = {
                "x": rng.standard_normal(tiny_n).astype(np.float32),
                "y": rng.standard_normal(tiny_n).astype(np.float32),
            }
            sentence = "Edge inference lets every peer sell what its own hardware can run."
            minilm_feeds = minilm_tokenizer().encode([sentence])
            batch_feeds = minilm_tokenizer().encode([sentence] * 8)
            # (a) runs on the very session (b) uses: two sessions of one model
            # can differ by several percent (memory placement), which would
            # swamp the overhead being measured.
            tiny_session = runtime.load("tiny").session
            minilm_session = runtime.load("minilm").session
            runs = [
                compare(
                    "tiny_add[16]",
                    tiny_session,
                    runtime,
                    "tiny",
                    tiny_feeds,
                    args.tiny_iters,
                ),
                compare(
                    f"minilm batch=1 seq={minilm_feeds['input_ids'].shape[1]}",
                    minilm_session,
                    runtime,
                    "minilm",
                    minilm_feeds,
                    args.minilm_iters,
                ),
                compare(
                    f"minilm batch=8 seq={batch_feeds['input_ids'].shape[1]}",
                    minilm_session,
                    runtime,
                    "minilm",
                    batch_feeds,
                    max(args.minilm_iters // 4, 20),
                ),
            ]
            loads = {
                "tiny": load_costs(registry.path_of(registry.get("tiny").cid), runtime, "tiny", 3),
                "minilm": load_costs(registry.path_of(minilm.cid), runtime, "minilm", 3),
            }
        finally:
            runtime.close()

    hw = probe()
    result = {
        "bench": "runtime",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": hw.cpu_model,
            "cores": hw.cpu_cores,
            "ram_gb": round(hw.ram_bytes / 1e9, 1),
            "providers_available": list(hw.providers),
            "provider_used": providers[0],
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "intra_op_threads": args.threads,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "calls": runs,
        "load": loads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)

    print(f"{hw.cpu_model}, {hw.cpu_cores} cores, onnxruntime {ort.__version__}, {providers[0]}")
    print(f"{'model':<26}{'path':<8}{'p50 µs':>10}{'p99 µs':>10}{'calls/s':>10}")
    for r in runs:
        for path in ("direct", "edge"):
            s = r[path]
            print(
                f"{r['model']:<26}{path:<8}{s['p50_us']:>10.1f}{s['p99_us']:>10.1f}{s['throughput_per_s']:>10.0f}"
            )
        print(
            f"{'':<26}added p50 {r['added_p50_us']:.1f} µs, paired median "
            f"{r['added_paired_median_us']:.1f} µs, mean {r['added_mean_us']:.1f} µs; "
            f"edge/direct p50 {r['edge_over_direct_p50']:.3f}, "
            f"mean {r['edge_over_direct_mean']:.3f}"
        )
        c = r["thread_cpu_p50_us"]
        print(f"{'':<26}thread CPU p50: direct {c['direct']:.1f} µs, edge {c['edge']:.1f} µs")
    for name, ld in loads.items():
        print(
            f"load {name}: session create p50 {ld['session_create_ms_p50']} ms, runtime.load "
            f"{ld['runtime_load_ms']} ms ({ld['runtime_load_includes']}), RSS/session "
            f"{ld['rss_per_session_mb_median']} MB (estimate {ld['runtime_estimate_mb']} MB)"
        )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
