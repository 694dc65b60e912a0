"""``edgeswarm infer --bootstrap MULTIADDR MODEL --input NAME=FILE.npy``: one market job.

Joins the network as a DHT client (no ad, nothing served), runs the job
(auction, award, result, receipt), writes each output to
``OUTPUT_DIR/<name>.npy`` and prints who ran it, the price and the receipt.
A spinner on stderr shows what it waits for. Expected failures (model nobody
serves, no executor, bad inputs, unreachable bootstrap) end with one line on
stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio
import typer

from peer.cli.common import fail, print_json
from peer.config import Config

DEFAULT_DEADLINE = 30.0
PAY_WAIT_S = 20.0


async def _pay(peer: Any, receipt: Any) -> str:
    """Wait (bounded) until the receipt is paid by a certified transfer; say how it ended.

    A payment that is not certified in time stays stored in this data dir's ledger
    and resumes the next time this identity runs a peer.
    """
    svc = peer.settlement
    if svc is None:
        return "left to the peer that owns this data dir's ledger (it pays after syncing)"
    ledger, me = svc.ledger, peer.peer_id
    now_ms = int(time.time() * 1000)
    headroom = ledger.spendable(me, now_ms) + ledger.credit_limit(me, now_ms)
    if headroom < receipt.price and not ledger.is_paid(receipt):
        return (
            f"pending: {receipt.price / 1e6:g} credits is over what this identity may owe now "
            f"({headroom / 1e6:g} credits: its credit limit grows with what it earns); kept in "
            "the ledger, paid once it has earned enough"
        )
    with trio.move_on_after(PAY_WAIT_S):
        await svc.wait_until(lambda: svc.ledger.is_paid(receipt))
        return "certified by the witnesses"
    return (
        f"pending after {PAY_WAIT_S:.0f} s (kept in the ledger; resumes when this identity "
        "runs again; `edgeswarm ledger receipts` shows it)"
    )


def infer_network(
    cfg: Config,
    model: str,
    input_args: list[str],
    out_dir: Path,
    json_out: bool,
    *,
    max_price: float | None,
    deadline: float | None,
    spot_check: float = 0.0,
) -> None:
    from edge_models.errors import EdgeModelError
    from peer.cli.models_cmd import parse_input_args, write_outputs
    from peer.host import AddressError, ListenError
    from peer.identity import IdentityError
    from peer.logging_setup import setup_logging
    from peer.market import MarketFailure, UnknownModel
    from peer.node import open_peer

    if not cfg.bootstrap:
        fail("network inference needs --bootstrap MULTIADDR (or EDGESWARM_BOOTSTRAP)", code=2)
    if not input_args:
        fail("give the model's inputs with --input NAME=FILE.npy", code=2)
    inputs = parse_input_args(input_args)
    setup_logging("ERROR")
    from rich.console import Console

    console = Console(stderr=True)
    outcome: dict[str, Any] = {}
    budget = deadline if deadline is not None else (cfg.job_timeout or DEFAULT_DEADLINE)

    async def main() -> None:
        with console.status("joining the network...") as status:
            # This data dir's identity: it is the account that owes the receipt's price.
            async with open_peer(cfg, role="client", market=True, settlement=True) as peer:
                if not peer.connected_peers():
                    outcome["error"] = (
                        f"cannot reach the bootstrap node(s) {', '.join(cfg.bootstrap)}"
                    )
                    return
                status.update(f"running {model} through the market (auction, award, result)...")
                try:
                    outcome["result"] = await peer.infer(
                        model,
                        inputs,
                        max_price=max_price,
                        deadline=budget,
                        spot_check=spot_check,
                    )
                except (MarketFailure, UnknownModel, EdgeModelError, ValueError) as exc:
                    outcome["error"] = str(exc)
                    return
                status.update("paying the executor (transfer certified by the witnesses)...")
                outcome["payment"] = await _pay(peer, outcome["result"].receipt)

    t0 = time.perf_counter()
    try:
        trio.run(main)
    except IdentityError as exc:
        fail(str(exc))
    except AddressError as exc:
        fail(str(exc), code=2)
    except ListenError as exc:
        fail(str(exc))
    if "error" in outcome:
        fail(outcome["error"])
    result = outcome["result"]
    written = write_outputs(result.outputs, out_dir)
    files = {w["name"]: w["path"] for w in written}
    if json_out:
        out = result.to_dict()
        out["outputs"] = files
        out["output_specs"] = written
        out["wall_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        out["payment"] = outcome["payment"]
        print_json(out)
        return
    r = result.receipt
    typer.echo(
        f"ran {model} on {result.executor} for {result.price / 1e6:g} credits "
        f"({result.price} micro) in {result.latency_ms:.1f} ms"
    )
    for w in written:
        typer.echo(f"  {w['name']}  {w['dtype']}{tuple(w['shape'])}  -> {w['path']}")
    typer.echo(f"payment  {outcome['payment']}")
    typer.echo(f"receipt {r.receipt_id.hex()}")
    typer.echo(f"  job {r.job_id.hex()}  count {r.count}  model {r.model_cid[:16]}")
    typer.echo(f"  requester {r.requester}")
    typer.echo(f"  executor  {r.executor}")
    typer.echo(f"  bytes {r.to_bytes().hex()}")
