"""`edgeswarm id | run | bootstrap | peers`: identity, long-running peers, what the network offers.

``run`` and ``bootstrap`` print each listen address as one line on stdout,
``listening on /ip4/127.0.0.1/tcp/40123/p2p/12D3KooW...``, flushed at once,
so scripts and tests can read where to connect; logs go to stderr. Both run
until Ctrl-C or SIGTERM, then shut down cleanly and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import tomllib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any

import nacl.signing
import trio
import typer

from peer.cli import app
from peer.cli.common import DataDirOpt, JsonOpt, config_from_cli, fail, print_json
from peer.config import CONFIG_FILE_NAME, ENV_PREFIX, Config, ConfigError
from peer.host import AddressError, ListenError, parse_multiaddr
from peer.identity import IdentityError, load_or_create_identity, peer_id_of
from peer.logging_setup import setup_logging
from protocols.ad import CapabilityAd

log = logging.getLogger("edgeswarm")

ListenOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--listen",
        metavar="MULTIADDR",
        help="Address to listen on, e.g. /ip4/0.0.0.0/tcp/4101 (repeatable; port 0 = any free "
        "port).",
        show_default=False,
    ),
]
BootstrapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--bootstrap",
        metavar="MULTIADDR",
        help="Full address of a bootstrap node, ending in /p2p/<peer id> (repeatable; "
        "env EDGESWARM_BOOTSTRAP, comma-separated).",
        show_default=False,
    ),
]
HttpOpt = Annotated[
    str | None,
    typer.Option(
        "--http",
        metavar="HOST:PORT",
        help="Serve the HTTP front door (KServe v2, /v1/embeddings, /metrics, /explorer, "
        "control API) here, e.g. 127.0.0.1:8080 (env EDGESWARM_HTTP; off by default).",
        show_default=False,
    ),
]
AnnounceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--announce",
        metavar="MULTIADDR",
        help="An address others can dial this peer at that it cannot see itself (a port "
        "forward, a public DNS name), e.g. /ip4/203.0.113.7/tcp/4001; advertised first "
        "(repeatable; env EDGESWARM_ANNOUNCE, comma-separated).",
        show_default=False,
    ),
]


def _check_announce(values: tuple[str, ...]) -> None:
    from peer.reach.addresses import AnnounceError, check_announce

    try:
        check_announce(values)
    except AnnounceError as exc:
        fail(f"--announce: {exc}", code=2)


def _check_addrs(values: list[str] | None, option: str, *, need_peer_id: bool) -> None:
    for value in values or ():
        try:
            parse_multiaddr(value, need_peer_id=need_peer_id)
        except AddressError as exc:
            fail(f"{option}: {exc}", code=2)


def _config(data_dir: Path | None, **flags: Any) -> Config:
    config = config_from_cli(data_dir=data_dir, **{k: v or None for k, v in flags.items()})
    _check_addrs(list(config.listen), "--listen", need_peer_id=False)
    _check_addrs(list(config.bootstrap), "--bootstrap", need_peer_id=True)
    _check_announce(config.announce)
    if config.http:
        from peer.http import parse_bind

        try:
            parse_bind(config.http)
        except ConfigError as exc:
            fail(str(exc), code=2)
    return config


def _run_trio(main: Callable[[], Any]) -> None:
    """Run ``main`` under trio; expected failures become one line on stderr."""
    from peer.ledger_store import StoreError
    from peer.settlement_paths import NetworkError

    try:
        trio.run(main)
    except (StoreError, NetworkError) as exc:
        fail(str(exc))
    except IdentityError as exc:
        fail(str(exc))
    except (AddressError, ConfigError) as exc:
        fail(str(exc), code=2)
    except ListenError as exc:
        fail(str(exc))


async def _serve(open_cm: Callable[[], AbstractAsyncContextManager[Any]], what: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_cm() as peer:
            for addr in peer.listen_addrs:
                print(f"listening on {addr}", flush=True)
            log.info("advertising %s", ", ".join(peer.reach.advertised()) or "no address")
            log.info("%s %s is up; Ctrl-C or SIGTERM stops it", what, peer.peer_id)
            if peer.http is not None:
                print(f"http on {peer.http.url}", flush=True)
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s received, shutting down", signal.Signals(signum).name)
                        break
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signal)
                await peer.stop_requested.wait()
                log.info("shutdown requested over the control API")
                nursery.cancel_scope.cancel()
    log.info("%s stopped", what)


@app.command("id")
def id_command(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Print this peer's id (creating its identity key on first use)."""
    config = config_from_cli(data_dir=data_dir)
    try:
        key = load_or_create_identity(config.key_path)
    except IdentityError as exc:
        fail(str(exc))
    peer_id = peer_id_of(key)
    if json_out:
        print_json({"peer_id": peer_id, "key_path": str(config.key_path)})
    else:
        typer.echo(peer_id)


@app.command("run")
def run_command(
    data_dir: DataDirOpt = None,
    listen: ListenOpt = None,
    bootstrap: BootstrapOpt = None,
    http: HttpOpt = None,
    announce: AnnounceOpt = None,
    serve: Annotated[
        list[str] | None,
        typer.Option(
            "--serve",
            metavar="CID",
            help="Also serve this model (sha256 cid), fetched from its providers if missing "
            "(repeatable; config `serve`).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a peer: join via the bootstrap nodes, publish its ad, serve its models until stopped."""
    config = _config(
        data_dir, listen=listen, bootstrap=bootstrap, http=http, announce=announce, serve=serve
    )
    from peer.model_transfer import serve_cids

    try:
        serve_cids(config)
    except ConfigError as exc:
        fail(str(exc), code=2)
    setup_logging(config.log_level)
    if not config.bootstrap:
        log.warning("no --bootstrap given: this peer is alone until others dial it")
    from peer.cli.models_cmd import make_runtime, open_registry
    from peer.node import open_peer

    # Every model in the registry is served: loaded, measured (p50 in the ad), bid on.
    with make_runtime(config, open_registry(config)) as runtime:
        _run_trio(lambda: _serve(lambda: open_peer(config, runtime=runtime), "peer"))


@app.command("bootstrap")
def bootstrap_command(
    data_dir: DataDirOpt = None,
    listen: ListenOpt = None,
    http: HttpOpt = None,
    announce: AnnounceOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run a bootstrap node: a DHT server and gossip relay with a stable id and address.

    With no --bootstrap it founds a settlement network (or keeps the one it founded);
    with --bootstrap it joins the network those nodes are in."""
    config = _config(data_dir, listen=listen, http=http, announce=announce, bootstrap=bootstrap)
    setup_logging(config.log_level)
    from bootstrap.node import open_bootstrap

    default = not _listen_configured(listen, config)
    _run_trio(
        lambda: _serve(lambda: open_bootstrap(config, default_listen=default), "bootstrap node")
    )


def _listen_configured(flag: list[str] | None, config: Config) -> bool:
    """Did the operator choose listen addresses (flag, env or config file)?"""
    if flag or ENV_PREFIX + "LISTEN" in os.environ:
        return True
    path = Path(os.environ.get(ENV_PREFIX + "CONFIG") or config.data_dir / CONFIG_FILE_NAME)
    try:
        return "listen" in tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _age(ad: CapabilityAd, ttl: float, now: float) -> float:
    """Seconds since the ad was signed, assuming it was signed with our TTL."""
    return max(0.0, now - (ad.expires_at - ttl))


@app.command("peers")
def peers_command(
    bootstrap: BootstrapOpt = None,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    wait: Annotated[
        float, typer.Option("--wait", min=0.0, help="Seconds to keep looking for ads.")
    ] = 10.0,
    expect: Annotated[
        int,
        typer.Option("--expect", min=1, help="Stop looking once this many ads were found."),
    ] = 1,
) -> None:
    """List the capability ads found in the DHT through the bootstrap nodes."""
    config = _config(data_dir, bootstrap=bootstrap)
    if not config.bootstrap:
        fail("peers needs at least one --bootstrap MULTIADDR (or EDGESWARM_BOOTSTRAP)", code=2)
    setup_logging("WARNING" if json_out else config.log_level)
    from peer.node import open_peer

    found: list[CapabilityAd] = []

    async def main() -> None:
        # A throw-away key: never impersonate a peer that runs from the same data dir.
        key = nacl.signing.SigningKey.generate()
        async with open_peer(config, role="client", key=key) as peer:
            with trio.move_on_after(wait):
                while True:  # bounded by --wait: each pass is a real DHT query
                    found[:] = await peer.find_ads()
                    if len(found) >= expect:
                        break
                    await trio.sleep(0.5)

    _run_trio(main)
    now = time.time()
    if json_out:
        print_json([ad.to_dict() for ad in found])
        return
    if not found:
        typer.echo("no capability ads found", err=True)
        return
    _print_table(found, config.ad_ttl, now)


def _print_table(ads: list[CapabilityAd], ttl: float, now: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(ads)} peer(s)")
    for column in ("peer id", "addrs", "devices", "providers", "models", "price", "load", "age"):
        table.add_column(column)
    for ad in ads:
        table.add_row(
            ad.peer_id,
            "\n".join(ad.addrs),
            "\n".join(f"{d.kind}: {d.name}" for d in ad.devices),
            "\n".join(p.removesuffix("ExecutionProvider") for p in ad.providers),
            "\n".join(f"{m.name or '?'} {m.cid[:12]} ({m.p50_ms:.0f} ms)" for m in ad.models)
            or "-",
            f"{ad.price:g}",
            f"{ad.load:.2f} (queue {ad.queue})",
            f"{_age(ad, ttl, now):.0f}s",
        )
    Console().print(table)
