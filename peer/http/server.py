"""The front door in the peer's own trio loop: hypercorn's trio worker serving Starlette.

``open_http(peer, "127.0.0.1:8080")`` starts it (port 0 picks a free port),
creates ``<data dir>/http.token`` on first start, writes ``<data dir>/http.json``
(``{"url", "pid"}``, so the CLI finds the running peer) and yields the
``HttpServer``; on exit the server stops (graceful for up to a second) and the
file is removed. Nothing keeps running afterwards.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from peer.config import ConfigError
from peer.host import ListenError
from peer.http.app import DEADLINE_GRACE_S, MAX_DEADLINE_S, FrontDoor, build_app
from peer.http.auth import load_or_create_token

log = logging.getLogger(__name__)

ENDPOINT_FILE = "http.json"
GRACEFUL_S = 1.0
# hypercorn applies it to every socket read, also while a request is being answered: it
# must outlast the longest job a request may ask for (app.MAX_DEADLINE_S + grace).
READ_TIMEOUT_S = int(MAX_DEADLINE_S + DEADLINE_GRACE_S + 60)


class HttpConfigError(ConfigError):
    """A bad ``--http`` value (a usage error: exit code 2 in the CLI)."""


@dataclass(frozen=True)
class HttpServer:
    url: str
    token: str
    app: Any


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to (host, port); HttpConfigError when malformed."""
    host, sep, port_s = value.strip().rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise HttpConfigError(f"--http must be HOST:PORT, e.g. 127.0.0.1:8080, got {value!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if bare != "localhost":
            raise HttpConfigError(
                f"--http host must be an IP address (or localhost), got {host!r}"
            ) from None
    return host, int(port_s)


def _loopback(host: str) -> bool:
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    return ipaddress.ip_address(bare).is_loopback


def endpoint_path(data_dir: Path) -> Path:
    return Path(data_dir) / ENDPOINT_FILE


def _hypercorn_config(host: str, port: int) -> Any:
    from hypercorn.config import Config as HyperConfig

    cfg = HyperConfig()
    cfg.bind = [f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("peer.http.hypercorn")
    cfg.graceful_timeout = GRACEFUL_S
    cfg.keep_alive_timeout = 30.0
    cfg.h11_max_incomplete_size = 64 * 1024  # request line + headers
    cfg.read_timeout = READ_TIMEOUT_S  # a silent client is dropped, eventually
    cfg.include_server_header = False
    return cfg


@asynccontextmanager
async def open_http(peer: Any, bind: str) -> AsyncIterator[HttpServer]:
    """Serve the front door for ``peer`` on ``bind`` until the block exits."""
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    host, port = parse_bind(bind)
    data_dir = Path(peer.config.data_dir)
    token = load_or_create_token(data_dir)
    app = build_app(FrontDoor(peer, token))
    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()

    cfg = _hypercorn_config(host, port)
    try:  # bound here, so "in use" is one clear error before anything runs
        sockets = cfg.create_sockets()
    except OSError as exc:
        raise ListenError(f"cannot serve HTTP on {bind}: {exc.strerror or exc}") from None
    for sock in sockets.insecure_sockets:
        sock.listen(cfg.backlog)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: worker_serve(
                wrap_app(app, cfg.wsgi_max_body_size, None),  # type: ignore[arg-type]
                cfg,
                sockets=sockets,
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )
        )
        url = binds[0]
        marker = endpoint_path(data_dir)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        tmp.replace(marker)
        log.info("HTTP front door on %s (explorer: %s/explorer)", url, url)
        if not _loopback(host):
            log.warning(
                "the HTTP front door listens on %s, beyond this machine: its control routes "
                "need the token, but health, metrics and the explorer are open to the network",
                host,
            )
        try:
            yield HttpServer(url=url, token=token, app=app)
        finally:
            marker.unlink(missing_ok=True)
            stop.set()
            nursery.cancel_scope.deadline = trio.current_time() + GRACEFUL_S + 1
