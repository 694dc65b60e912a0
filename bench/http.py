"""Benchmark: what the HTTP front door adds to a market job, in one process and one run.

A bootstrap node, one executor serving the tiny graph (z = x + y, 16 floats)
and all-MiniLM-L6-v2 (int8, one sentence), and a requester peer with the
front door (``--http 127.0.0.1:0``), all in one trio process on loopback. For
each model, the same jobs go, interleaved round-robin so drift hits all paths
alike, through

  (a) direct   ``peer.infer`` (the baseline: auction, award, result, receipt)
  (b) json     ``POST /v2/models/{cid}/infer`` with JSON tensors (httpx client)
  (c) binary   the same with the binary tensor extension

and reports p50/p99 of each and the overhead (b)-(a), (c)-(a); then jobs/s with
8 concurrent clients, direct vs binary HTTP; and the bare HTTP floor
(``GET /v2/health/live``). The HTTP client runs in the same process, so its cost
is in the figures (as it would be for any client). Writes bench/results/http.json.

    python bench/http.py            # full run (~2 min on 2 cores)
    python bench/http.py --quick    # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is bench/http.py: run as a script, its folder comes first on sys.path and
# would shadow the standard library's ``http`` package. Put the repository root there.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from contextlib import AsyncExitStack  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402

from bench.market import Hardware, tiny_add  # noqa: E402
from bootstrap.node import open_bootstrap  # noqa: E402
from edge_models.registry import Registry  # noqa: E402
from edge_models.runtime import ModelRuntime  # noqa: E402
from edge_models.text import minilm_tokenizer  # noqa: E402
from peer.config import Config  # noqa: E402
from peer.http import v2  # noqa: E402
from peer.node import open_peer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BID_WINDOW = 0.5  # a fallback: the auction closes as soon as the one expected server bids
CONCURRENCY = 8


class HttpFailed(Exception):
    pass


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1e3


async def run(quick: bool) -> dict[str, Any]:
    n_jobs = {"tiny": 30 if quick else 200, "minilm": 15 if quick else 60}
    conc_jobs = 40 if quick else 160
    out: dict[str, Any] = {
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": os.getloadavg(),
        },
        "bid_window_s": BID_WINDOW,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        registry = Registry(tmp / "ex" / "models")
        tiny = registry.add_file(tiny_add(tmp / "tiny.onnx", 16), "tiny_add")
        minilm = registry.add_packaged("minilm")
        with ModelRuntime(registry, p50_runs=3) as runtime:
            async with AsyncExitStack() as stack:

                def cfg(name: str, **kw: Any) -> Config:
                    return Config(
                        data_dir=tmp / name,
                        listen=("/ip4/127.0.0.1/tcp/0",),
                        bid_window=BID_WINDOW,
                        **kw,
                    )

                boot = await stack.enter_async_context(open_bootstrap(cfg("boot")))
                joined = (boot.listen_addrs[0],)
                await stack.enter_async_context(
                    open_peer(
                        cfg("ex", bootstrap=joined, max_concurrent_jobs=CONCURRENCY),
                        hardware=Hardware(),
                        runtime=runtime,
                    )
                )
                door = await stack.enter_async_context(
                    open_peer(
                        cfg("door", bootstrap=joined, http="127.0.0.1:0"), hardware=Hardware()
                    )
                )
                assert door.http is not None
                auth = {"Authorization": f"Bearer {door.http.token}"}
                client = await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=door.http.url,
                        trust_env=False,
                        timeout=60,
                        limits=httpx.Limits(max_connections=CONCURRENCY * 2),
                    )
                )
                x = np.arange(16, dtype=np.float32)
                inputs = {
                    "tiny": (tiny.cid, {"x": x, "y": x}),
                    "minilm": (
                        minilm.cid,
                        minilm_tokenizer().encode(
                            ["Edge devices can run neural networks locally."]
                        ),
                    ),
                }

                def path_fns(cid: str, arrays: Any) -> dict[str, Callable[[], Awaitable[Any]]]:
                    bodies = {b: v2.encode_request(arrays, binary=b) for b in (False, True)}

                    async def direct() -> None:
                        await door.infer(cid, arrays, deadline=30)

                    def over_http(binary: bool) -> Callable[[], Awaitable[Any]]:
                        body, headers = bodies[binary]

                        async def call() -> None:
                            r = await client.post(
                                f"/v2/models/{cid}/infer",
                                content=body,
                                headers={**headers, **auth},
                            )
                            if r.status_code != 200:
                                raise HttpFailed(f"HTTP {r.status_code}: {r.text[:300]}")
                            v2.decode_response(
                                r.content, r.headers.get(v2.HEADER_LENGTH)
                            )  # the client decodes, as any client does

                        return call

                    return {"direct": direct, "json": over_http(False), "binary": over_http(True)}

                for name, (cid, arrays) in inputs.items():
                    fns = path_fns(cid, arrays)
                    for fn in fns.values():  # warm-up: mesh, sessions, connections
                        for _ in range(3):
                            with contextlib.suppress(Exception):  # a loaded market may fail one
                                await fn()
                    ms: dict[str, list[float]] = {k: [] for k in fns}
                    failures: dict[str, list[str]] = {k: [] for k in fns}
                    for _ in range(n_jobs[name]):
                        for key, fn in fns.items():
                            try:
                                ms[key].append(await timed(fn))
                            except Exception as exc:  # a loaded market: counted, reported
                                failures[key].append(type(exc).__name__)
                    res: dict[str, Any] = {
                        k: {**summary(v), "failed": len(failures[k])} for k, v in ms.items()
                    }
                    for key in ("json", "binary"):
                        res[f"{key}_overhead"] = {
                            "p50_ms": round(res[key]["p50_ms"] - res["direct"]["p50_ms"], 3),
                            "p99_ms": round(res[key]["p99_ms"] - res["direct"]["p99_ms"], 3),
                        }
                    out["models"][name] = res
                    print(name, json.dumps(res), flush=True)

                # Jobs/s with 8 concurrent clients (tiny model), direct vs HTTP binary.
                cid, arrays = inputs["tiny"]
                fns = path_fns(cid, arrays)
                rates: dict[str, dict[str, Any]] = {}
                for key in ("direct", "binary"):
                    left, failed = [conc_jobs], [0]
                    reasons: dict[str, int] = {}

                    async def worker(
                        fn: Callable[[], Awaitable[Any]],
                        left: list[int] = left,
                        failed: list[int] = failed,
                        reasons: dict[str, int] = reasons,
                    ) -> None:
                        while left[0] > 0:
                            left[0] -= 1
                            try:
                                await fn()
                            except Exception as exc:  # counted, not fatal: a loaded market
                                failed[0] += 1
                                why = f"{type(exc).__name__}: {str(exc)[:160]}"
                                why = re.sub(r"[0-9a-f]{64}|12D3KooW\w+|[0-9.]+ s", "*", why)
                                reasons[why] = reasons.get(why, 0) + 1

                    t0 = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        for _ in range(CONCURRENCY):
                            nursery.start_soon(worker, fns[key])
                    wall = time.perf_counter() - t0
                    rates[key] = {
                        "jobs": conc_jobs,
                        "ok_per_s": round((conc_jobs - failed[0]) / wall, 1),
                        "failed": failed[0],
                        "failures": reasons,
                    }
                out["concurrent_8_tiny"] = rates
                print("8 concurrent clients:", rates, flush=True)

                # The v2 codec alone (server decode + encode, client encode + decode), no I/O.
                hidden = np.zeros((1, 12, 384), np.float32)  # MiniLM's output, one sentence
                codec: dict[str, Any] = {}
                for name, (arrays, outputs) in {
                    "tiny": (inputs["tiny"][1], {"z": x + x}),
                    "minilm": (inputs["minilm"][1], {"last_hidden_state": hidden}),
                }.items():
                    for binary in (False, True):
                        req = v2.Tensors(arrays={}, binary_default=binary)
                        runs = []
                        for _ in range(50 if quick else 300):
                            t0 = time.perf_counter()
                            body, headers = v2.encode_request(arrays, binary=binary)
                            v2.decode_request(body, headers.get(v2.HEADER_LENGTH))
                            body, headers = v2.encode_response(
                                model_name="m", outputs=outputs, request=req, parameters={}
                            )
                            v2.decode_response(body, headers.get(v2.HEADER_LENGTH))
                            runs.append((time.perf_counter() - t0) * 1e3)
                        codec[f"{name}_{'binary' if binary else 'json'}"] = summary(runs)
                out["codec_round_trip"] = codec
                print("v2 codec, request + response, both sides:", codec, flush=True)

                floor = [await timed(lambda: client.get("/v2/health/live")) for _ in range(200)]
                out["http_floor_health_live"] = summary(floor)
                print("GET /v2/health/live:", out["http_floor_health_live"], flush=True)
    out["host"]["load_after"] = os.getloadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    result = trio.run(run, args.quick)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("http_quick.json" if args.quick else "http.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
