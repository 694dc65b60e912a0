"""Benchmark: how fast default settings catch an executor that returns wrong outputs (issue 10).

Swarm (one trio process, real hosts on 127.0.0.1, all through ``open_peer``): a bootstrap
node, five executors of the tiny add model, one of which (20 %) adds 1.0 to every output and
bids cheapest (so it wins every auction it is allowed into), four honest ones being the ledger
witnesses (so referee panels serve the model), and a requester that runs ``--jobs`` single jobs
with the **default** ``spot_check`` setting (``Config.spot_check``, 0.05), from a fresh random
seed per run. Per job: who ran it, whether it was checked, whether a fraud proof came back.

Figures: jobs the cheater won before it was caught, checks among the jobs it won (the catch
rate per job, expected p), whether it was caught and banned on every ledger with its escrowed
payouts reversed, wrong answers the app received, and honest executors accused (must be 0).
Baseline in the same run: the expected jobs until the first check, 1/p, and the chance of no
check in that many wins, (1-p)^n.

Prints the figures and writes bench/results/catch_rate.json (or --out PATH).

    python bench/catch_rate.py [--quick] [--jobs N] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from market_swarm import FakeHardware, add_tiny_model  # noqa: E402
from settlement_helpers import key, pid  # noqa: E402

from bootstrap.node import open_bootstrap  # noqa: E402
from edge_models.registry import Registry  # noqa: E402
from edge_models.runtime import ModelRuntime  # noqa: E402
from peer.config import Config  # noqa: E402
from peer.market.referee import SpotChecks  # noqa: E402
from peer.node import Peer, open_peer  # noqa: E402

HONEST = [key(740 + i) for i in range(4)]
CHEATER, REQUESTER = key(750), key(751)
WITNESSES = tuple(pid(k) for k in HONEST)


class NoisyRuntime:
    """Serves the model but returns perturbed outputs."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.inner = runtime
        self.registry = runtime.registry
        self.limits = runtime.limits

    def load(self, ref: str, **kw: Any) -> Any:
        return self.inner.load(ref, **kw)

    def run(self, ref: str, inputs: Any, *, timeout: float | None = None) -> Any:
        out = self.inner.run(ref, inputs, timeout=timeout)
        return {name: (a + 1.0).astype(a.dtype) for name, a in out.items()}

    def close(self) -> None:
        self.inner.close()


def config(root: Path, name: str, boot: str | None = None, **kw: Any) -> Config:
    return Config(
        data_dir=root / name,
        listen=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=(boot,) if boot else (),
        ledger_witnesses=WITNESSES,
        ledger_pow_bits=8,
        ledger_base_limit=1000.0,
        ledger_sync_interval=0.5,
        bid_window=0.5,
        job_timeout=20.0,
        **kw,
    )


async def run(jobs: int, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="catch-rate-") as tmp:
        root = Path(tmp)
        async with AsyncExitStack() as stack:
            boot = await stack.enter_async_context(open_bootstrap(config(root, "boot")))
            addr = boot.listen_addrs[0]

            async def executor(name: str, k: Any, price: float, noisy: bool) -> Peer:
                add_tiny_model(root / name)
                runtime = ModelRuntime(Registry(root / name / "models"), p50_runs=3)
                stack.callback(runtime.close)
                served: Any = NoisyRuntime(runtime) if noisy else runtime
                return await stack.enter_async_context(
                    open_peer(
                        config(root, name, addr, price=price),
                        key=k,
                        hardware=FakeHardware(),
                        runtime=served,
                    )
                )

            honest = [await executor(f"h{i}", k, 1.0, False) for i, k in enumerate(HONEST)]
            cheater = await executor("cheater", CHEATER, 0.5, True)
            req = await stack.enter_async_context(
                open_peer(config(root, "req", addr), key=REQUESTER, hardware=FakeHardware())
            )
            assert req.market is not None and cheater.market is not None
            default_p = req.config.spot_check
            req.market.spot_checks = SpotChecks(random.Random(seed))
            cid = next(iter(cheater.market.served))
            with trio.fail_after(60):
                for _ in range(300):  # DHT lookups: no event to wait on
                    if len({p.peer_id for p in await req.find_providers(cid)}) >= 5:
                        break
                    await trio.sleep(0.2)
            x = np.arange(4, dtype=np.float32)
            rows: list[dict[str, Any]] = []
            t0 = time.monotonic()
            for n in range(jobs):
                try:
                    with trio.fail_after(60):
                        r = await req.infer(cid, {"x": x, "y": x}, deadline=20)
                except Exception as exc:  # a failed job is a figure too
                    rows.append({"job": n, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                rows.append(
                    {
                        "job": n,
                        "executor": "cheater" if r.executor == cheater.peer_id else "honest",
                        "checked": r.spot_check is not None
                        and not str(r.spot_check).startswith("not checked"),
                        "spot_check": r.spot_check,
                        "offenders": [p.offender for p in r.fraud_proofs],
                        "right": bool(np.array_equal(r.outputs["z"], 2 * x)),
                    }
                )
            elapsed = time.monotonic() - t0
            ledgers = [p for p in (boot, req, cheater, *honest) if p.settlement is not None]
            with trio.move_on_after(30):  # let the proof and reversals spread (bounded)
                for p in ledgers:
                    service = p.settlement
                    assert service is not None
                    await service.wait_until(
                        functools.partial(service.ledger.is_banned, cheater.peer_id)
                    )
            banned_on = sum(
                1
                for p in ledgers
                if p.settlement and p.settlement.ledger.is_banned(cheater.peer_id)
            )
            forfeited = [
                p.settlement.ledger.forfeited().get(cheater.peer_id, 0)
                for p in ledgers
                if p.settlement
            ]
    done = [r for r in rows if "error" not in r]
    # Jobs the cheater ran: it won the auction (a caught one returns the honest re-run).
    won = [r for r in done if r["executor"] == "cheater" or cheater.peer_id in r["offenders"]]
    offenders = {o for r in done for o in r["offenders"]}
    caught_at = next((i for i, r in enumerate(won) if cheater.peer_id in r["offenders"]), None)
    checks_on_cheater = sum(1 for r in won if r["checked"])
    return {
        "seed": seed,
        "jobs": jobs,
        "failed_jobs": len(rows) - len(done),
        "default_spot_check": default_p,
        "cheater_won": len(won),
        "checks_on_cheater_jobs": checks_on_cheater,
        "catch_rate_per_job": checks_on_cheater / len(won) if won else None,
        "caught": caught_at is not None,
        "cheater_wins_before_caught": caught_at if caught_at is not None else len(won),
        "wrong_answers_returned": sum(1 for r in done if not r["right"]),
        "honest_accused": len(offenders - {cheater.peer_id}),
        "banned_on_ledgers": banned_on,
        "ledgers": len(ledgers),
        "forfeited_micro_on_ledgers": forfeited,
        "baseline_expected_jobs_to_first_check": 1 / default_p if default_p else None,
        "baseline_p_no_check_in_won": (1 - default_p) ** len(won) if won else None,
        "seconds": round(elapsed, 1),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 jobs instead of 100")
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="0: a fresh random seed")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "catch_rate.json")
    args = ap.parse_args()
    jobs = args.jobs or (40 if args.quick else 100)
    seed = args.seed or random.SystemRandom().randrange(1, 2**31)
    result = trio.run(run, jobs, seed)
    brief = {k: v for k, v in result.items() if k != "rows"}
    for k, v in brief.items():
        print(f"{k:40s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "catch_rate", "results": result}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
