"""`edgeswarm demo`: a local swarm of real processes on 127.0.0.1, shown end to end.

1. A bootstrap node and three serving peers start, each its own OS process and
   data dir, each holding the packaged MiniLM model at a different price.
2. Their capability ads are found through the DHT and printed.
3. An app peer (this process, using the embedding API) runs a stream of real
   sentence-embedding jobs through the market, then a lease, with a progress
   bar, and prints who ran what, at what price, with receipts.
4. Settlement: the app pays every receipt through the witnesses (the four
   swarm processes), the ledgers reconcile, and the demo shows the balances and
   that every ledger agrees on one state hash.
5. Every process is stopped; their exit codes are reported.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import trio
import typer

from peer.cli import app
from peer.cli.common import fail
from peer.config import Config
from peer.logging_setup import exception_leaves

log = logging.getLogger("edgeswarm.demo")

DEMO_PRICES = (1.0, 2.0, 3.0)
# Everyone in one network must agree on these settlement parameters.
DEMO_BASE_LIMIT = 1000.0  # credits a new identity may owe
DEMO_SYNC_INTERVAL = 1.0  # seconds between anti-entropy rounds
DEMO_POW_BITS = 12  # a cheap test genesis: identities cost ~2 ms, not a CPU-minute
WAIT_S = 90.0
# Share of jobs also run on a second executor and compared (referees settle a dispute).
SPOT_CHECK = 0.25

SENTENCES = (
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today.",
    "Shares dropped as investors panicked.",
    "A cat sleeps on the warm windowsill.",
    "The kitten is napping in the sun by the window.",
    "Edge devices can run neural networks locally.",
    "Small computers at the edge execute AI models.",
    "It is raining heavily in the mountains.",
    "Storms bring heavy rain to the hills.",
    "She baked fresh bread this morning.",
    "Warm loaves came out of her oven at dawn.",
)


def _settlement_env(witnesses: list[str]) -> dict[str, str]:
    return {
        "EDGESWARM_LEDGER_WITNESSES": ",".join(witnesses),
        "EDGESWARM_LEDGER_BASE_LIMIT": str(DEMO_BASE_LIMIT),
        "EDGESWARM_LEDGER_SYNC_INTERVAL": str(DEMO_SYNC_INTERVAL),
        "EDGESWARM_LEDGER_POW_BITS": str(DEMO_POW_BITS),
    }


@app.command("demo")
def demo_command(
    peers: Annotated[int, typer.Option("--peers", min=1, max=10, help="Serving peers.")] = 3,
    jobs: Annotated[
        int, typer.Option("--jobs", min=1, max=10_000, help="Single jobs run through auctions.")
    ] = 12,
    lease_jobs: Annotated[
        int, typer.Option("--lease-jobs", min=0, max=100_000, help="Jobs run over one lease.")
    ] = 100,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep the swarm's data dirs and logs here (default: temp)."),
    ] = None,
) -> None:
    """Run a local swarm on 127.0.0.1: ads, real inference jobs, receipts and settlement."""
    from rich.console import Console

    from edge_models.registry import Registry
    from peer.identity import load_or_create_identity, peer_id_of

    console = Console(stderr=True)
    root = workdir or Path(tempfile.mkdtemp(prefix="edgeswarm-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]edgeswarm demo[/bold]: data dirs and logs in {root}")

    names = ["bootstrap"] + [f"peer{i + 1}" for i in range(peers)]
    for name in names[1:]:
        entry = Registry(root / name / "models").add_packaged("minilm")
    console.print(f"each serving peer holds [cyan]{entry.name}[/cyan] (cid {entry.cid[:16]}…)")
    # Identities first, so every process can be told who the ledger witnesses are.
    ids = {
        name: peer_id_of(load_or_create_identity(Config(data_dir=root / name).key_path))
        for name in names
    }
    witnesses = list(ids.values()) if len(ids) >= 4 else [ids["bootstrap"]]
    env = _settlement_env(witnesses)
    who = {pid: name for name, pid in ids.items()}

    try:
        codes = trio.run(_demo, console, root, peers, jobs, lease_jobs, env, witnesses, who)
    except Exception as exc:
        # One line naming the real cause, not trio's "Exceptions from Trio nursery".
        leaves = list(exception_leaves(exc)) or [exc]
        what = "; ".join(f"{type(e).__name__}: {e}" for e in leaves[:3])
        fail(f"demo failed: {what} (logs in {root})")
    console.print(
        "stopped: " + ", ".join(f"{name} exit {code}" for name, code in sorted(codes.items()))
    )
    if any(codes.values()):
        fail("a swarm process did not exit cleanly")


async def _demo(
    console: Any,
    root: Path,
    peers: int,
    jobs: int,
    lease_jobs: int,
    env: dict[str, str],
    witnesses: list[str],
    who: dict[str, str],
) -> dict[str, int]:
    from peer.local_swarm import local_swarm, peer_args
    from peer.node import open_peer

    async with local_swarm(root) as swarm:
        boot = await swarm.start(
            "bootstrap", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", env=env
        )
        console.print(f"bootstrap node listening on {boot.address}", soft_wrap=True)
        for i in range(peers):
            price = DEMO_PRICES[i % len(DEMO_PRICES)]
            sp = await swarm.start(
                f"peer{i + 1}",
                *peer_args([boot.address]),
                env={**env, "EDGESWARM_PRICE": str(price)},
            )
            console.print(
                f"peer{i + 1} ({price:g} credits/job) listening on {sp.address}", soft_wrap=True
            )
        config = Config(
            data_dir=root / "app",
            listen=("/ip4/127.0.0.1/tcp/0",),
            bootstrap=(boot.address,),
            ledger_witnesses=tuple(witnesses),
            ledger_base_limit=DEMO_BASE_LIMIT,
            ledger_sync_interval=DEMO_SYNC_INTERVAL,
            ledger_pow_bits=DEMO_POW_BITS,
            log_level="WARNING",
        )
        async with open_peer(config) as app_peer:
            who[app_peer.peer_id] = "app"
            await _show_ads(console, app_peer, peers)
            await _run_jobs(console, app_peer, jobs, who)
            if lease_jobs:
                await _run_lease(console, app_peer, lease_jobs, who)
            await _settle(console, app_peer, root, who)
        return await swarm.stop_all()


async def _show_ads(console: Any, peer: Any, expect: int) -> None:
    from peer.cli.net_cmd import _print_table

    t0 = time.monotonic()
    serving: list[Any] = []
    with trio.move_on_after(WAIT_S):
        while len(serving) < expect:  # bounded by WAIT_S; each pass is a real DHT query
            serving = [ad for ad in await peer.find_ads() if ad.models]
            if len(serving) < expect:
                await trio.sleep(0.5)
    console.print(
        f"found {len(serving)} serving peers' capability ads through the DHT "
        f"in {time.monotonic() - t0:.2f} s"
    )
    _print_table(sorted(serving, key=lambda a: a.price), 120.0, time.time())
    if len(serving) < expect:
        raise RuntimeError(f"only {len(serving)} of {expect} serving peers' ads were found")


async def _run_jobs(console: Any, peer: Any, jobs: int, who: dict[str, str]) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from edge_models.text import minilm_tokenizer, sentence_embeddings

    tokenizer = minilm_tokenizer()
    results: list[tuple[int, str, Any, Any]] = []
    limiter = trio.CapacityLimiter(4)  # a few jobs in flight, so the load spreads

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("jobs through the market", total=jobs)

        async def one(i: int) -> None:
            sentence = SENTENCES[i % len(SENTENCES)]
            inputs = tokenizer.encode([sentence])
            async with limiter:
                result = await peer.infer(
                    "minilm", inputs, max_price=5.0, deadline=30.0, spot_check=SPOT_CHECK
                )
            results.append((i, sentence, inputs, result))
            progress.advance(task)

        async with trio.open_nursery() as nursery:
            for i in range(jobs):
                nursery.start_soon(one, i)

    results.sort(key=lambda r: r[0])
    table = Table(title=f"{jobs} jobs, each a full auction (MiniLM sentence embeddings)")
    for column in ("#", "sentence", "executor", "price", "latency", "receipt"):
        table.add_column(column)
    for i, sentence, _inputs, r in results:
        table.add_row(
            str(i + 1),
            sentence,
            who.get(r.executor, r.executor[:12]),
            f"{r.price / 1e6:g}",
            f"{r.latency_ms:.0f} ms",
            r.receipt.receipt_id.hex()[:16],
        )
    console.print(table)
    ran = Counter(who.get(r.executor, r.executor[:12]) for *_, r in results)
    console.print("jobs per executor: " + ", ".join(f"{k} {v}" for k, v in sorted(ran.items())))
    for r in results:
        r[3].receipt.verify()  # anyone can check a receipt offline
    console.print(f"all {len(results)} receipts verify offline (executor + requester signatures)")
    checks = Counter(r.spot_check for *_, r in results if r.spot_check is not None)
    console.print(
        f"spot checks (p = {SPOT_CHECK:g}): {sum(checks.values())} job(s) re-run on a second "
        "executor: " + (", ".join(f"{n} {what}" for what, n in checks.items()) or "none drawn")
    )
    # Real inference: paired sentences should be closer than unrelated ones.
    if len(results) >= 4:
        vecs = [sentence_embeddings(r.outputs, inp)[0] for _, _, inp, r in results[:4]]
        same, other = float(np.dot(vecs[0], vecs[1])), float(np.dot(vecs[0], vecs[2]))
        console.print(
            f"cosine('{results[0][1]}', '{results[1][1]}') = {same:.2f}  vs  "
            f"cosine('{results[0][1]}', '{results[2][1]}') = {other:.2f}"
        )


async def _run_lease(console: Any, peer: Any, count: int, who: dict[str, str]) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from edge_models.text import minilm_tokenizer

    inputs = minilm_tokenizer().encode([SENTENCES[0]])
    t0 = time.monotonic()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("jobs over one lease", total=count)
        async with peer.lease("minilm", max_jobs=count, seconds=60.0, max_price=5.0) as lease:
            for _ in range(count):
                await lease.infer(inputs)
                progress.advance(task)
    elapsed = time.monotonic() - t0
    receipts = list(lease.receipts)
    for r in receipts:
        r.verify()
    desc = ", ".join(
        f"{who.get(r.executor, r.executor[:12])}: {r.count} jobs for {r.price / 1e6:g} credits"
        for r in receipts
    )
    console.print(
        f"lease: {count} jobs in {elapsed:.2f} s ({count / elapsed:.0f} jobs/s) "
        f"settled by {len(receipts)} batch receipt(s) ({desc})"
    )


async def _settle(console: Any, peer: Any, root: Path, who: dict[str, str]) -> None:
    from rich.table import Table

    from peer.ledger_store import format_credits, read_snapshot
    from peer.settlement_paths import ledger_dir

    svc = peer.settlement
    if svc is None:
        raise RuntimeError("settlement did not start (no witnesses configured)")
    owed = len(peer.receipts.receipts)
    console.print(f"settlement: paying {owed} receipts through the witnesses' certificates…")
    t0 = time.monotonic()
    with trio.fail_after(WAIT_S):
        await svc.wait_until(lambda: not svc.unpaid() and not svc.store.outgoing())
    console.print(f"every receipt is paid by a certified transfer ({time.monotonic() - t0:.2f} s)")

    names = sorted(n for n in who.values() if n != "app")
    hashes: dict[str, str] = {}
    t0 = time.monotonic()
    with trio.move_on_after(WAIT_S):
        while True:  # bounded by WAIT_S; each pass reads every ledger once
            mine = svc.state_hash().hex()
            hashes = {"app": mine}
            for name in names:
                try:
                    where = ledger_dir(root / name)
                    snap = await trio.to_thread.run_sync(read_snapshot, where)
                    hashes[name] = snap.state_hash.hex() if snap.state_hash else "-"
                except Exception as exc:  # a ledger being created: read again next pass
                    hashes[name] = f"unreadable ({exc})"
            if len(set(hashes.values())) == 1:
                break
            await trio.sleep(0.5)
    agreed = len(set(hashes.values())) == 1

    balances = svc.balances()
    table = Table(title="balances (mutual credit, in credits)")
    table.add_column("account")
    table.add_column("peer id")
    table.add_column("balance", justify="right")
    for account, micro in sorted(balances.items(), key=lambda kv: kv[1]):
        table.add_row(who.get(account, "?"), account, format_credits(micro))
    table.add_row("sum", "", format_credits(sum(balances.values())))
    console.print(table)
    for name, h in sorted(hashes.items()):
        console.print(f"  ledger state hash of {name:<10} {h[:32]}")
    if not agreed:
        raise RuntimeError("the ledgers did not converge on one state hash")
    console.print(
        f"all {len(hashes)} ledgers agree on state hash {next(iter(hashes.values()))[:16]}… "
        f"({time.monotonic() - t0:.2f} s after payment)"
    )
