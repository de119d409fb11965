"""The ``otel-cmbagent`` console script: every error a person can hit is one line and an exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click
import sqlalchemy as sa

from ...table.store import StoreError
from .commands import cli
from .export import ExportError
from .terminal import PROG, first_line, printable

DEBUG_ENV = "OTEL_CMBAGENT_DEBUG"


def _message(exc: BaseException) -> str:
    if isinstance(exc, sa.exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        return f"database error: {first_line(str(orig if orig is not None else exc)) or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        filename = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{filename}"
    text = first_line(str(exc))
    return text or type(exc).__name__


def _fail(message: str, code: int) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stderr.write(f"{PROG}: error: {printable(message)}\n")
    sys.stderr.flush()
    sys.exit(code)


def _quiet_broken_pipe() -> None:
    """``events --json | head``: stop quietly (later writes go nowhere)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``otel-cmbagent`` console script."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else f" (see '{PROG} --help')"
        _fail(first_line(exc.format_message()) + hint, 2)
    except click.ClickException as exc:
        _fail(first_line(exc.format_message()), exc.exit_code or 1)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except (StoreError, ExportError, ValueError, OSError, sa.exc.SQLAlchemyError) as exc:
        if debug:
            raise
        _fail(_message(exc), 1)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {_message(exc)} (set {DEBUG_ENV}=1 for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
