"""`edgeswarm models fetch CID --bootstrap MA`: a model by cid from the peers that provide it.

The command joins the network as a short-lived DHT client with a throw-away
key (it never impersonates a peer that runs from the same data dir), finds
the providers of the cid, fetches and verifies the model with a progress bar
(MB/s, ETA) on stderr and adds it to the data dir's store. Each provider that
misbehaved is one warning line; a failure is one error line and exit code 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nacl.signing
import typer

from edge_models.errors import EdgeModelError
from peer.cli.common import config_from_cli, fail, print_json
from peer.cli.net_cmd import _check_addrs, _run_trio
from peer.logging_setup import setup_logging

_CID = re.compile(r"[0-9a-f]{64}")


def fetch_command(
    cid: str, bootstrap: list[str] | None, name: str | None, data_dir: Path | None, json_out: bool
) -> None:
    from peer.cli.models_cmd import open_registry

    cid = cid.lower().removeprefix("sha256:")
    if not _CID.fullmatch(cid):
        fail(f"CID must be a model's sha256: 64 hex digits, got {cid!r:.80}", code=2)
    config = config_from_cli(data_dir=data_dir, bootstrap=bootstrap or None)
    from peer.cli.local_api import running_peer

    api = running_peer(config)
    if api is not None:  # the running peer fetches it (its own network links) and serves it
        got = api.call(
            "POST", "/control/models/fetch", json={"cid": cid, "name": name}, timeout=600
        ).json()
        if json_out:
            print_json(got)
        else:
            typer.echo(f"fetched {got['name']} {got['cid']} (served by the running peer)")
        return
    if not config.bootstrap:
        fail("models fetch needs --bootstrap MULTIADDR (or EDGESWARM_BOOTSTRAP)", code=2)
    _check_addrs(list(config.bootstrap), "--bootstrap", need_peer_id=True)
    setup_logging("ERROR")  # the progress bar and our own lines say what happens
    registry = open_registry(config)
    if cid in registry:
        entry = registry.get(cid)
        if json_out:
            print_json({**entry.to_dict(), "already": True})
        else:
            typer.echo(f"already here: {entry.name} {entry.cid}")
        return

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from peer.model_transfer import FetchResult, ModelFetchError
    from peer.node import open_peer

    results: list[FetchResult] = []
    errors: list[str] = []
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=json_out,
        transient=True,
    )
    task = bar.add_task(f"fetching {cid[:12]}", total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    async def main() -> None:
        key = nacl.signing.SigningKey.generate()
        async with open_peer(
            config, role="client", key=key, registry=registry, settlement=False
        ) as peer:
            assert peer.models is not None
            try:
                results.append(
                    await peer.models.fetch(cid, name=name, progress=progress, serve=False)
                )
            except (ModelFetchError, EdgeModelError) as exc:
                errors.append(str(exc))

    with bar:
        _run_trio(main)
    if errors:
        fail(errors[0])
    result = results[0]
    for pid, why in result.banned.items():
        typer.echo(f"edgeswarm: warning: provider {pid} banned: {why}", err=True)
    entry = result.entry
    rate = entry.size / result.seconds / 1e6 if result.seconds > 0 else 0.0
    if json_out:
        out: dict[str, Any] = {
            **entry.to_dict(),
            "already": result.already,
            "seconds": round(result.seconds, 3),
            "bytes_from": result.bytes_from,
            "banned": result.banned,
        }
        print_json(out)
        return
    typer.echo(
        f"fetched {entry.name} {entry.cid} ({entry.size} bytes in {result.seconds:.2f} s, "
        f"{rate:.1f} MB/s, from {len([n for n in result.bytes_from.values() if n])} peer(s))"
    )
