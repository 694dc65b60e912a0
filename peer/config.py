"""Peer configuration: defaults < TOML file < ``EDGESWARM_*`` environment < CLI flags.

One frozen ``Config`` value is built once at start-up and passed down; nothing
reads the environment later. Unknown keys in the file or bad values anywhere
raise ``ConfigError`` with the offending key and source, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

ENV_PREFIX = "EDGESWARM_"
CONFIG_FILE_NAME = "config.toml"


class ConfigError(Exception):
    """Invalid configuration; the message names the key and where it came from."""


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("edgeswarm", appauthor=False))


@dataclass(frozen=True)
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    # Full multiaddrs to listen on; port 0 picks a free port.
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # Full multiaddrs (with /p2p/<id>) of bootstrap nodes.
    bootstrap: tuple[str, ...] = ()
    # Addresses others can dial us at that we cannot see ourselves (a port forward, a
    # public DNS name), advertised first; e.g. /ip4/203.0.113.7/tcp/4001.
    announce: tuple[str, ...] = ()
    # Reach: "auto" asks AutoNAT (bootstrap nodes, public peers) whether others can dial
    # us; "public" / "private" skip the question. A private peer holds reservations on
    # `relay_reservations` circuit relays and is reachable through them. `relay_hop`: a
    # public peer also relays for others, with limits (bootstrap nodes always do).
    reachability: str = "auto"
    relay_reservations: int = 2
    relay_hop: bool = False
    # Seconds a capability ad stays valid; it is re-published at half-life.
    ad_ttl: float = 120.0
    mdns: bool = False
    # Price per job in credits (mutual-credit units) for the models we serve.
    price: float = 1.0
    # Execution providers allowed, in preference order; empty = all available.
    providers: tuple[str, ...] = ()
    max_concurrent_jobs: int = 2
    # Market: the most a requester pays per job (credits) unless a call says
    # otherwise, and how long its auctions collect bids (seconds).
    max_price: float = 10.0
    bid_window: float = 0.2
    intra_op_threads: int = 0
    session_cache_bytes: int = 2 * 1024**3
    job_timeout: float = 30.0
    log_level: str = "INFO"
    # Settlement: peer ids of the ledger witnesses (the committee fallback); empty = the
    # peer ids in `bootstrap`. Every peer of one network must use the same witnesses,
    # beacon and f, or they will not accept each other's certificates.
    ledger_witnesses: tuple[str, ...] = ()
    ledger_beacon: str = "edgeswarm-genesis-v1"
    ledger_f: int = 1
    # Credits a new identity (with its proof of work) may owe before it has earned any.
    ledger_base_limit: float = 1.0
    # Seconds between anti-entropy rounds with a random neighbour (0 = off).
    ledger_sync_interval: float = 10.0
    # HTTP front door (KServe v2, /v1/embeddings, /metrics, /explorer, control API):
    # HOST:PORT to serve it on, e.g. 127.0.0.1:8080; empty = off (see peer/http).
    http: str = ""
    # Models (sha256 cids) to fetch from their providers at start if missing, then serve.
    serve: tuple[str, ...] = ()
    # Bid for models we do not hold but providers have (the bid's eta includes the fetch).
    fetch_on_demand: bool = False
    # Bytes the model store may use; least recently used models go first (0 = no limit).
    model_store_bytes: int = 0
    # The settlement network (docs/settlement.md, "Genesis"): a genesis file to use
    # (default: learned from the bootstrap nodes, or founded by a bootstrap node that
    # has none), the network id this peer must join (empty: whichever its bootstrap
    # nodes serve) and the name a founding bootstrap node gives its network.
    genesis: str = ""
    network: str = ""
    network_name: str = "edgeswarm"
    # Written into the genesis a bootstrap node founds (every peer of the network then
    # follows its genesis): seconds per epoch, identity cost (proof-of-work bits; 27 is
    # about a CPU-minute), credits earned from others and epochs of age to enter the
    # witness/referee pool.
    ledger_epoch: float = 600.0
    ledger_pow_bits: int = 27
    ledger_eligible_earned: float = 10.0
    ledger_eligible_age: int = 6
    # Share of this requester's jobs that are also run on a second executor and
    # compared (never announced to executors before they commit).
    spot_check: float = 0.05

    @property
    def key_path(self) -> Path:
        return self.data_dir / "identity.key"


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any, source: str) -> Any:
    default = _FIELDS[name].default
    if name == "data_dir":
        return Path(os.path.expanduser(str(value)))
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {name} must be a list of strings")
        return tuple(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    try:
        if isinstance(default, int):
            out: Any = int(value)
        elif isinstance(default, float):
            out = float(value)
        else:
            out = str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise ConfigError(f"{source}: {name} must be a {kind}, got {value!r}") from None
    if isinstance(out, int | float) and not isinstance(out, bool) and out < 0:
        raise ConfigError(f"{source}: {name} must not be negative, got {value!r}")
    return out


def _from_mapping(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"{source}: unknown setting {key!r} (known: {known})")
        out[name] = _coerce(name, value, source)
    return out


def load_config(
    *,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Build the effective config.

    ``cli`` holds only the flags the user actually gave (``None`` values are
    ignored). The data dir is resolved first, because the default config file
    lives in it (``<data_dir>/config.toml``).
    """
    env = os.environ if env is None else env
    cli_values = _from_mapping({k: v for k, v in (cli or {}).items() if v is not None}, "flag")
    env_values = _from_mapping(
        {
            k[len(ENV_PREFIX) :].lower(): v
            for k, v in env.items()
            # Other EDGESWARM_* names (a test's switch, a newer version's setting) are not ours.
            if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() in _FIELDS
        },
        "environment",
    )
    data_dir = cli_values.get("data_dir") or env_values.get("data_dir") or default_data_dir()
    path = config_file or (
        Path(env[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in env else None
    )
    file_values: dict[str, Any] = {}
    candidate = path or (Path(data_dir) / CONFIG_FILE_NAME)
    if candidate.exists():
        try:
            raw = tomllib.loads(candidate.read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{candidate}: cannot read config: {exc}") from exc
        file_values = _from_mapping(raw, str(candidate))
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    merged = {**file_values, **env_values, **cli_values}
    merged.setdefault("data_dir", data_dir)
    return Config(**merged)
