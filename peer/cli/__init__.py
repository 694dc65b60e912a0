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
from peer.cli import pipeline_cmd as _pipeline_cmd  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a usage error is one line on stderr and exit code 2."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except typer.Abort:
        typer.echo("edgeswarm: aborted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        # Click's ClickException family (Typer vendors Click, so match by shape).
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if not (callable(show) and isinstance(code, int)):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            show()  # bare `edgeswarm` or a bare group: print its help
        else:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            typer.echo(f"edgeswarm: error: {message}{hint}", err=True)
        raise SystemExit(code) from None
    raise SystemExit(rv if isinstance(rv, int) else 0)
