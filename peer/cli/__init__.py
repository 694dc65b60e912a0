"""The ``edgeswarm`` command line.

One Typer app; each group of commands lives in its own module and registers
itself on ``app`` when imported below. Usage errors exit with code 2 (Click's
convention); runtime failures print one line on stderr and exit 1.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="edgeswarm",
    help="edgeswarm: a peer-to-peer edge inference network (libp2p + ONNX Runtime).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules register themselves on `app` (import for side effects).
from peer.cli import demo_cmd as _demo_cmd  # noqa: E402,F401
from peer.cli import ledger_cmd as _ledger_cmd  # noqa: E402,F401
from peer.cli import models_cmd as _models_cmd  # noqa: E402,F401
from peer.cli import net_cmd as _net_cmd  # noqa: E402,F401


def main() -> None:
    app()
