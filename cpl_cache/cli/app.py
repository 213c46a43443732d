"""The typer app and the `command` decorator that turns a UserError into one line, exit 2."""

from __future__ import annotations

import functools
import sys

import typer

from cpl_cache.errors import UserError

app = typer.Typer(
    help="Weak-to-strong generalization for CLIP from a feature cache (class prototype learning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def command(name: str | None = None):
    """Register a command whose UserError (or OSError on a path) ends as one line on stderr, exit 2."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                typer.echo(f"cpl-cache: error: {err}", err=True)
                raise typer.Exit(2) from None
            except OSError as err:  # an unwritable or vanished path the user gave: same one line
                where = f" ({err.filename})" if err.filename else ""
                typer.echo(
                    f"cpl-cache: error: {err.strerror or err}{where}; check that the path exists and is "
                    "writable, or pass another one",
                    err=True,
                )
                raise typer.Exit(2) from None

        app.command(name)(wrapped)
        return fn

    return deco


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as err:  # raised outside a command (should not happen, but never show a traceback)
        typer.echo(f"cpl-cache: error: {err}", err=True)
        sys.exit(2)
