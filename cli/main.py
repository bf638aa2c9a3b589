"""The `msabank` console script: builds the typer app and holds the single error boundary."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from msabank.errors import MsabankError


class _ErrorBoundary(TyperGroup):
    """The one place that turns MsabankError into `error: …` / `hint: …` on stderr and exit code 1
    (MSABANK_DEBUG=1 re-raises for a traceback). Usage errors keep click's exit code 2."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except MsabankError as err:
            if os.environ.get("MSABANK_DEBUG"):
                raise
            _print_error(err)
            ctx.exit(1)
        except OSError as err:  # a file the user named, a full disk, permissions: say which file and why
            if os.environ.get("MSABANK_DEBUG"):
                raise
            where = f"{err.filename}: " if err.filename else ""
            _print_error(MsabankError(f"{where}{err.strerror or err}",
                                      hint="check the path, its permissions and the free disk space"))
            ctx.exit(1)
        except KeyboardInterrupt:
            if os.environ.get("MSABANK_DEBUG"):
                raise
            _print_error(MsabankError("interrupted", hint="what was committed before the interrupt is kept; run the same "
                                      "command again to resume (ingest skips committed documents)"))
            ctx.exit(130)


app = typer.Typer(
    cls=_ErrorBoundary,
    name="msabank",
    help="msabank: a memory-bank database for Memory Sparse Attention (MSA) language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_error(err: MsabankError) -> None:
    sys.stderr.write(f"error: {err}\n")
    if err.hint:
        sys.stderr.write(f"\nhint: {err.hint}\n")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `msabank` console script."""
    app(args=argv)


@app.callback()
def _root() -> None:
    """msabank: ingest a corpus through an MSA model into a persistent bank, update it, ask it."""


# Each command group lives in its own module with `register(app)`; the order sets the help order.
_COMMAND_MODULES = ("bank", "ask", "demo", "train", "bench", "serve")


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"msabank.cli.{name}")
        except ModuleNotFoundError as err:  # a group still being written; never hides a broken import
            if err.name != f"msabank.cli.{name}":
                raise
            continue
        module.register(app)


_register_commands()


if __name__ == "__main__":
    main()
