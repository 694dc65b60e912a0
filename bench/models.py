"""Benchmark: models travelling between peers over /edgeswarm/model/1 on 127.0.0.1.

For the packaged MiniLM (~23 MB) and a generated model of ``--big-mb`` MB
(default 200) it measures, in one run:

  * transfer MB/s from 1 and from 3 providers: each provider is its own
    ``edgeswarm run`` process holding the model; the fetcher is this
    process (``ModelFetcher``,
    verified chunks written to disk, whole-file hash and admission included
    in "fetch" but also timed alone as "admit");
  * the baseline: a raw TCP copy of the same bytes from another process into
    a file here (no encryption, no framing, no hashing), in the same run;
  * RSS of this process during the transfer and during admission, above its
    level before the fetch (goal: streams to disk, never the model twice);
  * time from starting ``edgeswarm run --serve CID`` on an empty data dir to
    its first served job, while the only holder (an ``edgeswarm run`` peer
    priced above the requester's max price, so it never wins) is up.

Prints JSON lines and writes bench/results/models.json.

    nice -n 10 python bench/models.py                 # ~3-5 min on 2 loaded cores
    python bench/models.py --big-mb 50 --repeat 1     # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio

from bootstrap.node import open_bootstrap
from edge_models import packaged
from edge_models.registry import Registry
from peer.config import Config
from peer.local_swarm import local_swarm, peer_args
from peer.model_transfer import ModelFetcher
from peer.node import open_peer

RESULTS = Path(__file__).parent / "results" / "models.json"
LOCAL = "/ip4/127.0.0.1/tcp/0"
HERE = Path(__file__).resolve()


class _Hardware:
    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "bench cpu", "memory": 2**30}]


def big_model(path: Path, mb: int) -> Path:
    """z = x + y with an unused random initializer: a valid ONNX model of about ``mb`` MB."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    pad = numpy_helper.from_array(rng.integers(0, 255, size=mb * 1024 * 1024, dtype=np.uint8), "p")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])], "big", [x, y], [z], initializer=[pad]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


# ------------------------------------------------------------ helper processes


def raw_send_main(file: str) -> None:
    """Serve the file's bytes to the first connection on a free port (printed), then exit."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(f"port {srv.getsockname()[1]}", flush=True)
        conn, _ = srv.accept()
        with conn, open(file, "rb") as f:
            conn.sendfile(f)


# ------------------------------------------------------------ measurements


class RssSampler:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self.phase = "transfer"
        self.peaks: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            m = self.proc.memory_info()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), m.rss)
            anon = f"{self.phase}-anon"  # RSS less file-backed pages (e.g. the mapped model)
            self.peaks[anon] = max(self.peaks.get(anon, 0), m.rss - m.shared)
            await trio.sleep(0.01)  # sampling period

    def anon_now(self) -> int:
        m = self.proc.memory_info()
        return int(m.rss - m.shared)


def _start_sender(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE), "raw-send", "--file", str(path)],  # argv[3] = the file
        stdout=subprocess.PIPE,
        text=True,
    )


async def raw_copy(path: Path, dest: Path, size: int) -> float:
    proc = _start_sender(path)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        t0 = time.perf_counter()
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while data := await sock.recv(256 * 1024):
                os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
            sock.close()
        elapsed = time.perf_counter() - t0
        assert os.stat(dest).st_size == size
        return elapsed
    finally:
        proc.wait(timeout=30)


async def transfers(
    swarm: Any, boot_addr: str, work: Path, name: str, path: Path, repeat: int
) -> dict[str, Any]:
    size = os.stat(path).st_size
    cid = await trio.to_thread.run_sync(lambda: hashlib.sha256(path.read_bytes()).hexdigest())
    providers_up = []
    for i in range(3):  # three `edgeswarm run` peers that hold the model
        Registry(swarm.root / f"{name}-prov{i}" / "models").add_file(path, name)
        providers_up.append(await swarm.start(f"{name}-prov{i}", *peer_args([boot_addr])))
    cfg = Config(data_dir=work / f"{name}-fetch", listen=(LOCAL,), bootstrap=(boot_addr,))
    registry = Registry(cfg.data_dir / "models")
    out: dict[str, Any] = {"model": name, "bytes": size}
    async with open_peer(cfg, role="client", settlement=False, registry=registry) as peer:
        with trio.fail_after(60):
            while True:  # until all three provider records are in the DHT
                if len(await peer.find_providers(cid)) >= 3:
                    break
                await trio.sleep(0.2)
        for providers in (1, 3):
            runs: list[dict[str, float]] = []
            for _ in range(repeat):
                fetcher = ModelFetcher(
                    peer.host, registry, peer.discovery.find_providers, max_providers=providers
                )
                sampler = RssSampler()
                base = sampler.proc.memory_info().rss
                base_anon = sampler.anon_now()
                done_at: list[float] = []

                def progress(
                    done: int, total: int, sampler: Any = sampler, d: Any = done_at
                ) -> None:
                    if done == total:
                        sampler.phase = "admit"
                        d.append(time.perf_counter())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sampler.run)
                    t0 = time.perf_counter()
                    result = await fetcher.fetch(cid, progress=progress)
                    t1 = time.perf_counter()
                    nursery.cancel_scope.cancel()
                assert len(result.bytes_from) == providers, result.bytes_from
                runs.append(
                    {
                        "transfer_s": done_at[0] - t0,
                        "fetch_s": t1 - t0,
                        "admit_s": t1 - done_at[0],
                        "rss_transfer_mb": (sampler.peaks.get("transfer", base) - base) / 1e6,
                        "rss_admit_mb": (sampler.peaks.get("admit", base) - base) / 1e6,
                        "anon_transfer_mb": (sampler.peaks.get("transfer-anon", 0) - base_anon)
                        / 1e6,
                        "anon_admit_mb": (sampler.peaks.get("admit-anon", 0) - base_anon) / 1e6,
                    }
                )
                registry.remove(cid)
            best = min(runs, key=lambda r: r["transfer_s"])
            out[f"{providers}p"] = {
                "transfer_MBps": round(size / best["transfer_s"] / 1e6, 1),
                "transfer_s": round(best["transfer_s"], 3),
                "fetch_s_incl_admission": round(best["fetch_s"], 3),
                "admit_s": round(best["admit_s"], 3),
                "rss_above_base_transfer_mb": round(max(r["rss_transfer_mb"] for r in runs), 1),
                "rss_above_base_admit_mb": round(max(r["rss_admit_mb"] for r in runs), 1),
                "anon_above_base_transfer_mb": round(max(r["anon_transfer_mb"] for r in runs), 1),
                "anon_above_base_admit_mb": round(max(r["anon_admit_mb"] for r in runs), 1),
                "runs": len(runs),
            }
    for sp in providers_up:  # they would serve (and win) the jobs of the serve phase
        await swarm.stop(sp)
    raw = [await raw_copy(path, work / f"{name}-raw.bin", size) for _ in range(repeat)]
    out["raw_tcp_MBps"] = round(size / min(raw) / 1e6, 1)
    for p in ("1p", "3p"):
        out[p]["ratio_to_raw"] = round(out[p]["transfer_MBps"] / out["raw_tcp_MBps"], 3)
    return out


async def serve_to_first_job(
    swarm: Any, boot_addr: str, work: Path, name: str, path: Path, inputs: dict[str, Any]
) -> dict[str, Any]:
    entry = Registry(swarm.root / f"{name}-holder" / "models").add_file(path, name)
    await swarm.start(f"{name}-holder", *peer_args([boot_addr]), env={"EDGESWARM_PRICE": "5"})
    cfg = Config(
        data_dir=work / f"{name}-req", listen=(LOCAL,), bootstrap=(boot_addr,), max_price=2.0
    )
    async with open_peer(cfg, settlement=False, hardware=_Hardware()) as req:
        t0 = time.perf_counter()
        server = await swarm.start(f"{name}-server", *peer_args([boot_addr]), "--serve", entry.cid)
        attempts = 0
        with trio.fail_after(600):
            while True:
                attempts += 1
                try:
                    result = await req.infer(entry.cid, inputs, max_price=2.0, deadline=10)
                except Exception:  # nobody cheap enough serves it yet: ask again
                    await trio.sleep(0.5)
                    continue
                if result.executor == server.peer_id:
                    break
        first = time.perf_counter() - t0
    return {
        "model": name,
        "bytes": entry.size,
        "serve_to_first_job_s": round(first, 2),
        "attempts": attempts,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    minilm = packaged.get("minilm").path()
    big = big_model(work / "big.onnx", args.big_mb)
    from edge_models.text import minilm_tokenizer

    tokens = minilm_tokenizer().encode(["Models travel between peers."])
    x = np.ones(4, dtype=np.float32)
    cases = [
        ("minilm", minilm, tokens),
        (f"gen{args.big_mb}mb", big, {"x": x, "y": x}),
    ]
    results: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "transfer": [],
        "serve": [],
    }
    async with (
        open_bootstrap(Config(data_dir=work / "boot", listen=(LOCAL,))) as boot,
        local_swarm(work / "swarm") as swarm,
    ):
        boot_addr = boot.listen_addrs[0]
        for name, path, _inputs in cases:
            r = await transfers(swarm, boot_addr, work, name, path, args.repeat)
            print(json.dumps(r), flush=True)
            results["transfer"].append(r)
        if not args.skip_serve:
            for name, path, inputs in cases:
                r = await serve_to_first_job(swarm, boot_addr, work, name, path, inputs)
                print(json.dumps(r), flush=True)
                results["serve"].append(r)
    results["load_after"] = os.getloadavg()
    return results


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "raw-send":  # the baseline's sender process
        raw_send_main(sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = trio.run(main_async, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
