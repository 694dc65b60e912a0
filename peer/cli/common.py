"""Options and helpers shared by every command module."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from peer.config import Config, ConfigError, load_config

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where this peer keeps its key, models and ledger "
        "(default: the platform's user data dir; env EDGESWARM_DATA_DIR).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: never a traceback for expected failures."""
    typer.echo(f"edgeswarm: error: {message}", err=True)
    raise typer.Exit(code)


def config_from_cli(**flags: Any) -> Config:
    try:
        return load_config(cli=flags)
    except ConfigError as exc:
        fail(str(exc), code=2)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
