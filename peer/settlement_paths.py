"""Where a data dir keeps its ledgers: one per settlement network (no libp2p here).

``<data dir>/networks/<network id>/`` holds one network's ledger and its
``genesis.json``; ``<data dir>/networks/current`` names the last one used. The CLI
reads ledgers through ``ledger_dir`` (kept light: no libp2p import).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from protocols.errors import ProtocolError
from protocols.genesis import Genesis

NETWORKS_DIR = "networks"
CURRENT_FILE = "current"
GENESIS_FILE = "genesis.json"


class NetworkError(Exception):
    """This peer cannot tell which network it is in, or it is not the one it must join."""


class NoNetwork(NetworkError):
    """No network to join was found (no bootstrap reachable, none configured)."""


# --- genesis files -------------------------------------------------------------------------


def genesis_to_json(genesis: Genesis) -> str:
    body = genesis.to_body()
    body["beacon_seed"] = genesis.beacon_seed.hex()
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def genesis_from_json(text: str, source: str) -> Genesis:
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        raw = dict(raw)
        if raw.pop("v", 1) != 1:
            raise ValueError("unsupported genesis version")
        missing = sorted(Genesis._FIELDS - set(raw))
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        raw["beacon_seed"] = bytes.fromhex(str(raw.get("beacon_seed", "")))
        raw["witnesses"] = tuple(raw.get("witnesses") or ())
        return Genesis(**raw)
    except (ValueError, TypeError, ProtocolError) as exc:
        raise NetworkError(f"{source} is not a valid genesis file: {exc}") from None


def read_genesis_file(path: Path) -> Genesis:
    try:
        text = path.read_text()
    except OSError as exc:
        raise NetworkError(f"cannot read the genesis file {path}: {exc.strerror or exc}") from None
    return genesis_from_json(text, str(path))


def write_genesis_file(path: Path, genesis: Genesis) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(genesis_to_json(genesis))
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, durably (file and directory fsync'd)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- where ledgers live --------------------------------------------------------------------


def network_dir(data_dir: Path, genesis: Genesis) -> Path:
    return Path(data_dir) / NETWORKS_DIR / genesis.network_id


def remember_network(data_dir: Path, genesis: Genesis) -> Path:
    """Create the network's dir (with its genesis.json) and mark it current; return it."""
    path = network_dir(data_dir, genesis)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / GENESIS_FILE).exists():
        write_genesis_file(path / GENESIS_FILE, genesis)
    current = Path(data_dir) / NETWORKS_DIR / CURRENT_FILE
    tmp = current.with_name(CURRENT_FILE + ".tmp")
    tmp.write_text(genesis.network_id + "\n")
    os.replace(tmp, current)
    return path


def known_networks(data_dir: Path) -> list[str]:
    root = Path(data_dir) / NETWORKS_DIR
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and len(p.name) == 64)
    except OSError:
        return []


def ledger_dir(data_dir: Path, network: str | None = None) -> Path:
    """The dir of the ledger the CLI reads: ``network`` (an id or prefix), else the current
    network, else the only one, else the data dir itself (a ledger from before networks)."""
    data_dir = Path(data_dir)
    ids = known_networks(data_dir)
    if network:
        match = [i for i in ids if i.startswith(network.lower())]
        if len(match) != 1:
            known = ", ".join(i[:16] for i in ids) or "none"
            what = "no" if not match else "more than one"
            raise NetworkError(f"{what} network in {data_dir} matches {network!r} (known: {known})")
        return data_dir / NETWORKS_DIR / match[0]
    try:
        current = (data_dir / NETWORKS_DIR / CURRENT_FILE).read_text().strip()
    except OSError:
        current = ""
    if current in ids:
        return data_dir / NETWORKS_DIR / current
    if len(ids) == 1:
        return data_dir / NETWORKS_DIR / ids[0]
    return data_dir
