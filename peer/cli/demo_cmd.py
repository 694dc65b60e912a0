"""`edgeswarm demo`: a local swarm of real processes on 127.0.0.1, shown end to end.

Starts a bootstrap node and three serving peers (each its own OS process and
data dir, each holding the packaged MiniLM model), finds their capability ads
through the DHT and prints them, then stops every process and reports how
each one exited.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import nacl.signing
import trio
import typer

from peer.cli import app
from peer.cli.common import fail
from peer.config import Config

log = logging.getLogger("edgeswarm.demo")

DEMO_PRICES = (1.0, 2.0, 3.0)


async def _wait_for_ads(bootstrap: str, expect: int, wait_s: float) -> list[Any]:
    from peer.node import open_peer

    config = Config(
        data_dir=Path(tempfile.mkdtemp(prefix="edgeswarm-demo-client-")),
        listen=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=(bootstrap,),
    )
    key = nacl.signing.SigningKey.generate()
    ads: list[Any] = []
    async with open_peer(config, role="client", key=key) as client:
        with trio.move_on_after(wait_s):
            while len(ads) < expect:  # bounded by the timeout; each pass is a real DHT query
                ads = await client.find_ads()
                if len(ads) < expect:
                    await trio.sleep(0.5)
    return ads


@app.command("demo")
def demo_command(
    peers: Annotated[int, typer.Option("--peers", min=1, max=10, help="Serving peers.")] = 3,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep the swarm's data dirs and logs here (default: temp)."),
    ] = None,
) -> None:
    """Start a bootstrap node and serving peers on 127.0.0.1, show their ads, stop them."""
    from rich.console import Console

    from edge_models.registry import Registry
    from peer.cli.net_cmd import _print_table
    from peer.local_swarm import local_swarm, peer_args

    console = Console(stderr=True)
    root = workdir or Path(tempfile.mkdtemp(prefix="edgeswarm-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]edgeswarm demo[/bold]: data dirs and logs in {root}")

    for i in range(peers):
        entry = Registry(root / f"peer{i + 1}" / "models").add_packaged("minilm")
    console.print(f"each peer holds model [cyan]{entry.name}[/cyan] ({entry.cid[:16]}…)")

    async def main() -> dict[str, int]:
        async with local_swarm(root) as swarm:
            boot = await swarm.start("bootstrap", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
            console.print(f"bootstrap node listening on {boot.address}", soft_wrap=True)
            for i in range(peers):
                price = DEMO_PRICES[i % len(DEMO_PRICES)]
                sp = await swarm.start(
                    f"peer{i + 1}", *peer_args([boot.address]), env={"EDGESWARM_PRICE": str(price)}
                )
                console.print(
                    f"peer{i + 1} ({price:g} credits/job) listening on {sp.address}", soft_wrap=True
                )
            t0 = time.monotonic()
            ads = await _wait_for_ads(boot.address, peers, wait_s=60.0)
            console.print(
                f"found {len(ads)} capability ads through the DHT in {time.monotonic() - t0:.2f} s"
            )
            _print_table(sorted(ads, key=lambda a: a.price), 120.0, time.time())
            if len(ads) < peers:
                raise RuntimeError(f"only {len(ads)} of {peers} ads were found")
            return await swarm.stop_all()

    try:
        codes = trio.run(main)
    except Exception as exc:
        fail(f"demo failed: {exc} (logs in {root})")
    console.print(
        "stopped: " + ", ".join(f"{name} exit {code}" for name, code in sorted(codes.items()))
    )
