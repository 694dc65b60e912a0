"""``edgeswarm infer --bootstrap MULTIADDR MODEL --input NAME=FILE.npy``: one market job.

Joins the network as a DHT client (no ad, nothing served), runs the job
(auction, award, result, receipt), writes each output to
``OUTPUT_DIR/<name>.npy`` and prints who ran it, the price and the receipt.
A spinner on stderr shows what it waits for. Expected failures (model nobody
serves, no executor, bad inputs, unreachable bootstrap) end with one line on
stderr and exit 1, never a traceback.

Reach: joining a network that is not on loopback, the client listens on every
interface (a random TCP port) instead of loopback only, so that it can punch a
hole (DCUtR) to a NATed executor it reached through a relay. The punch starts
in the background the moment the executor is dialed; the job does not wait for
it (one job would pay the punch's time, up to 30 s when it fails, to save a
relay hop). The job's stream takes the direct connection if it is up by the
award, else the relay. The report says which (``route``: ``direct``,
``relayed`` with the relay and why, or ``hole-punched``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import typer

from peer.cli.common import fail, print_json
from peer.config import Config

if TYPE_CHECKING:
    from peer.cli.local_api import LocalApi

DEFAULT_DEADLINE = 30.0
PAY_WAIT_S = 20.0
WIDE_LISTEN = "/ip4/0.0.0.0/tcp/0"


LOCAL_PAYMENT = "none: this peer's own executor ran it (a peer owes itself nothing)"


async def _pay(peer: Any, receipt: Any) -> str:
    from peer.http.control import payment_status

    if receipt is None:
        return LOCAL_PAYMENT

    return await payment_status(peer, receipt, PAY_WAIT_S)


def client_listen(cfg: Config) -> Config:
    """``cfg`` listening on every interface when it joins a network beyond loopback with
    the default (loopback) listen address: a hole punch dials from the listen port."""
    loopback = ("/ip4/127.", "/ip6/::1/")
    if cfg.listen != Config().listen or all(b.startswith(loopback) for b in cfg.bootstrap):
        return cfg
    return dataclasses.replace(cfg, listen=(WIDE_LISTEN,))


def job_route(peer: Any, routes: Any, result: Any) -> dict[str, Any] | None:
    """How the job's stream reached its executor (``peer.reach.routes.route_of``), with a
    ``note`` saying why when it went through a relay; None for a local or split run."""
    from peer.caps import JOB
    from peer.reach.routes import RELAYED, route_of

    if result.receipt is None or getattr(result, "stages", None):
        return None
    punch = peer.reach.punch
    tried = punch.results.get(result.executor) if punch is not None else None
    route = route_of(
        routes.last(result.executor, JOB),
        tried.addr if tried else None,
        relayed_first=punch is not None and result.executor in punch.relayed_first,
    )
    if route["kind"] == RELAYED:
        if punch is None:
            why = "this client cannot punch holes (it listens on no TCP address)"
        elif tried is None:
            why = "no hole was punched before the job started"
        elif not tried.ok:
            why = f"the hole punch failed after {tried.seconds:.1f} s"
        else:
            why = "the hole was punched only after the job started"
        route["note"] = f"the executor is behind NAT: the job went through a relay ({why})"
    return route


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
    from peer.cli.models_cmd import parse_input_args
    from peer.host import AddressError, ListenError
    from peer.identity import IdentityError
    from peer.ledger_store import StoreError
    from peer.logging_setup import setup_logging
    from peer.market import MarketFailure, UnknownModel
    from peer.node import open_peer
    from peer.reach.routes import StreamRoutes
    from peer.settlement_paths import NetworkError

    if not cfg.bootstrap:
        fail("network inference needs --bootstrap MULTIADDR (or EDGESWARM_BOOTSTRAP)", code=2)
    if not input_args:
        fail("give the model's inputs with --input NAME=FILE.npy", code=2)
    inputs = parse_input_args(input_args)
    cfg = client_listen(cfg)
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
                routes = StreamRoutes()
                peer.host.get_network().register_notifee(routes)
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
                outcome["route"] = job_route(peer, routes, outcome["result"])
                status.update("paying the executor (transfer certified by the witnesses)...")
                # A pipeline owes one receipt per stage.
                receipts = getattr(outcome["result"], "receipts", [outcome["result"].receipt])
                paid = [await _pay(peer, r) for r in receipts]
                outcome["payment"] = paid[0] if len(set(paid)) == 1 else "; ".join(paid)

    t0 = time.perf_counter()
    try:
        trio.run(main)
    except (IdentityError, StoreError, NetworkError) as exc:
        fail(str(exc))
    except AddressError as exc:
        fail(str(exc), code=2)
    except ListenError as exc:
        fail(str(exc))
    if "error" in outcome:
        fail(outcome["error"])
    _report(model, outcome["result"], outcome["payment"], out_dir, json_out, t0, outcome["route"])


def infer_through(
    api: LocalApi,
    model: str,
    input_args: list[str],
    out_dir: Path,
    json_out: bool,
    *,
    max_price: float | None,
    deadline: float | None,
) -> None:
    """One market job requested by the running peer of this data dir (its control API)."""
    from urllib.parse import quote

    from peer.cli.models_cmd import parse_input_args
    from peer.http import v2
    from peer.market import InferResult
    from protocols.errors import ProtocolError
    from protocols.receipt import Receipt

    if not input_args:
        fail("give the model's inputs with --input NAME=FILE.npy", code=2)
    inputs = parse_input_args(input_args)
    budget = deadline if deadline is not None else DEFAULT_DEADLINE
    params: dict[str, Any] = {"deadline": budget}
    if max_price is not None:
        params["max_price"] = max_price
    body, headers = v2.encode_request(inputs, binary=True, parameters=params)
    t0 = time.perf_counter()
    answer = api.call(
        "POST",
        f"/v2/models/{quote(model, safe='')}/infer",
        content=body,
        headers=headers,
        timeout=budget + 30,
    )
    try:
        header, outputs = v2.decode_response(answer.content, answer.headers.get(v2.HEADER_LENGTH))
        p = header["parameters"]
        # Signatures are checked here; a local run (self-award) has no receipt.
        receipt = None if p["local"] else Receipt.from_bytes(bytes.fromhex(p["receipt"]))
        result = InferResult(
            outputs=outputs,
            receipt=receipt,
            executor=str(p["executor"]) if receipt is None else receipt.executor,
            price=0 if receipt is None else receipt.price,
            latency_ms=float(p.get("latency_ms", 0.0)),
            model_cid=str(p["model_cid"]) if receipt is None else receipt.model_cid,
        )
    except (v2.V2Error, ProtocolError, KeyError, TypeError, ValueError) as exc:
        fail(f"the running peer sent a bad answer: {exc}")
    if receipt is None:
        _report(model, result, LOCAL_PAYMENT, out_dir, json_out, t0)
        return
    pay = api.call(
        "POST",
        "/control/pay",
        json={"receipt_id": receipt.receipt_id.hex(), "wait": PAY_WAIT_S},
        timeout=PAY_WAIT_S + 30,
    ).json()
    _report(model, result, str(pay.get("status")), out_dir, json_out, t0)


def _report(
    model: str,
    result: Any,
    payment: str,
    out_dir: Path,
    json_out: bool,
    t0: float,
    route: dict[str, Any] | None = None,
) -> None:
    """Print the outputs, payment and receipt (``route``: ``job_route``; None: unknown, e.g.
    the running peer requested the job)."""
    from peer.cli.models_cmd import write_outputs

    written = write_outputs(result.outputs, out_dir)
    files = {w["name"]: w["path"] for w in written}
    if json_out:
        out = result.to_dict()
        out["outputs"] = files
        out["output_specs"] = written
        out["wall_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        out["payment"] = payment
        out["route"] = route
        print_json(out)
        return
    r = result.receipt
    stages = getattr(result, "stages", None)
    if stages:  # a pipeline run split: one line per stage (receipts chained by digests)
        typer.echo(
            f"ran pipeline {model} in {len(stages)} stages for {result.price / 1e6:g} credits "
            f"in {result.latency_ms:.1f} ms ({result.placement})"
        )
        for i, s in enumerate(stages, start=1):
            rid = "none (own executor)" if s.receipt is None else s.receipt.receipt_id.hex()[:16]
            typer.echo(f"  stage {i} {s.model_cid[:12]} on {s.executor} receipt {rid}")
    else:
        typer.echo(
            f"ran {model} on {result.executor} for {result.price / 1e6:g} credits "
            f"({result.price} micro) in {result.latency_ms:.1f} ms"
        )
    for w in written:
        typer.echo(f"  {w['name']}  {w['dtype']}{tuple(w['shape'])}  -> {w['path']}")
    if route is not None and route["kind"] is not None:
        via = f" through relay {route['relay']}" if route["relay"] else ""
        typer.echo(f"route    {route['kind']}{via} ({route['connection']})")
        if "note" in route:
            typer.echo(f"  note: {route['note']}")
    typer.echo(f"payment  {payment}")
    if r is None:
        typer.echo("receipt none (a job run on this peer's own executor has no receipt)")
        return
    typer.echo(f"receipt {r.receipt_id.hex()}")
    typer.echo(f"  job {r.job_id.hex()}  count {r.count}  model {r.model_cid[:16]}")
    typer.echo(f"  requester {r.requester}")
    typer.echo(f"  executor  {r.executor}")
    typer.echo(f"  bytes {r.to_bytes().hex()}")
