"""``edgeswarm bootstrap``: a DHT server and gossip relay with a stable identity and address.

The identity is the data dir's key, so the peer id survives restarts. The
address does too: when the operator listens on port 0 ("any"), the port the
OS picked is remembered in ``<data dir>/bootstrap-ports.json`` and asked for
again on the next start, so the multiaddr peers were given keeps working.
If that port has been taken meanwhile, we warn and take a new one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from multiaddr import Multiaddr

from peer.config import Config
from peer.host import ListenError, check_port_free, parse_multiaddr
from peer.node import Peer, open_peer

log = logging.getLogger(__name__)

# Listen on every interface at a fixed port when the operator did not say where.
DEFAULT_BOOTSTRAP_LISTEN = ("/ip4/0.0.0.0/tcp/4101",)
PORTS_FILE = "bootstrap-ports.json"


def _ports_path(config: Config) -> Path:
    return config.data_dir / PORTS_FILE


def load_remembered_ports(config: Config) -> dict[str, int]:
    try:
        raw = json.loads(_ports_path(config).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, int) and 0 < v < 65536
    }


def _save_ports(config: Config, ports: dict[str, int]) -> None:
    path = _ports_path(config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ports, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _with_port(addr: Multiaddr, port: int) -> str:
    return str(addr).replace("/tcp/0", f"/tcp/{port}", 1)


def resolve_listen(config: Config, requested: Sequence[str]) -> tuple[str, ...]:
    """Swap port 0 for the port remembered from the last run, if it is still free."""
    remembered = load_remembered_ports(config)
    out = []
    for text in requested:
        addr = parse_multiaddr(text)
        port = remembered.get(text)
        if addr.value_for_protocol("tcp") == "0" and port:
            candidate = _with_port(addr, port)
            try:
                check_port_free(parse_multiaddr(candidate))
            except ListenError as exc:
                log.warning("%s; taking a new port, so this bootstrap's address changes", exc)
            else:
                out.append(candidate)
                continue
        out.append(text)
    return tuple(out)


def remember_ports(config: Config, requested: Sequence[str], peer: Peer) -> None:
    """Record the port the OS chose for each port-0 listen address."""
    ports = load_remembered_ports(config)
    actual = [Multiaddr(a) for a in peer.host.get_transport_addrs()]
    changed = False
    for text in requested:
        addr = parse_multiaddr(text)
        if addr.value_for_protocol("tcp") != "0":
            continue
        prefix = str(addr).split("/tcp/")[0]
        for a in actual:
            if str(a).split("/tcp/")[0] == prefix:
                port = int(a.value_for_protocol("tcp"))
                if ports.get(text) != port:
                    ports[text] = port
                    changed = True
                break
    if changed:
        _save_ports(config, ports)


@asynccontextmanager
async def open_bootstrap(config: Config, *, default_listen: bool = False) -> AsyncIterator[Peer]:
    """Run a bootstrap node (role ``bootstrap``: DHT server + gossip relay, no ad, no models).

    ``default_listen``: the operator set no listen address anywhere, so use
    ``DEFAULT_BOOTSTRAP_LISTEN`` instead of the peer default (loopback only).
    """
    requested = DEFAULT_BOOTSTRAP_LISTEN if default_listen else config.listen
    config = dataclasses.replace(config, listen=resolve_listen(config, requested))
    async with open_peer(config, role="bootstrap") as peer:
        remember_ports(config, requested, peer)
        yield peer
