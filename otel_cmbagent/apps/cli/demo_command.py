"""What ``otel-cmbagent demo`` adds around :func:`otel_cmbagent.apps.demo.run_demo`: checks before the run, the
summary after it, and next commands that work as printed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import sqlalchemy as sa
from rich.table import Table
from rich.text import Text

from ...table import store
from .render import event_tree
from .terminal import PROG, console, fmt_cost, fmt_tokens, for_terminal, run_status_text

CONNECT_TIMEOUT = 5.0


def sqlite_path(db: str) -> str:
    if "://" not in db:
        return db
    url = sa.engine.make_url(db)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise click.UsageError("the demo writes a SQLite file: give --db PATH (or a sqlite:/// URL)")
    return url.database


def check_llm_url(llm_url: str) -> None:
    """Fail in one line, naming the URL, when nothing answers there (the OpenAI client would retry for ~15 s
    and then say only "Connection error.")."""
    parts = urlsplit(llm_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.UsageError(f"--llm-url must be an http(s) URL such as http://localhost:8000/v1, not {llm_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise click.ClickException(f"cannot reach the LLM endpoint {llm_url}: {reason}") from None


def llm_failure(exc: BaseException, llm_url: str | None) -> click.ClickException | None:
    """The one line for an LLM endpoint that failed during the run (the openai SDK's errors name no URL)."""
    if llm_url and type(exc).__module__.split(".")[0] == "openai":
        return click.ClickException(f"the LLM endpoint {llm_url} failed: {type(exc).__name__}: {exc}")
    return None


def wait_for_interrupt() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def command_prefix() -> str:
    """How to run this command again from the same directory: ``otel-cmbagent`` when that name finds this very
    script on $PATH, else the script's path as it was started (``.venv/ag2/bin/otel-cmbagent`` after ``make
    demo``), quoted for a shell."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else PROG
    found = shutil.which(PROG)
    try:
        same = found is not None and os.path.samefile(found, script)
    except OSError:
        same = False
    return PROG if same or not os.path.exists(script) else shlex.quote(script)


def next_commands(db: str | None, target: str, db_path: str) -> list[str]:
    default = db is None and "://" not in target and Path(target) == Path(store.DEFAULT_DB)
    suffix = "" if default else f" --db {shlex.quote(db_path)}"
    prefix = command_prefix()
    return [f"{prefix} {command}{suffix}" for command in (
        "runs", "tree last", "timeline last", "events last --json", "serve",
        "export last --otlp http://localhost:4318")]


def _summary_table(summary: dict[str, Any], result: Any, db_path: str) -> Table:
    table = Table(title="summary", title_justify="left", box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    by_type = ", ".join(f"{event_type} {count}" for event_type, count in summary.get("by_type", {}).items())
    table.add_row("run", Text(f"{summary['run_id']}  ({summary.get('name') or ''})"))
    table.add_row("status", run_status_text(summary))
    table.add_row("events", Text(f"{summary['events']}: {by_type}"))
    table.add_row("agents", Text(", ".join(summary.get("agents") or [])))
    table.add_row("tokens in / out", Text(f"{fmt_tokens(summary.get('input_tokens'), summary.get('output_tokens'))}"
                                          f" over {summary.get('llm_calls', 0)} LLM calls"))
    table.add_row("cost", Text(fmt_cost(summary.get("cost"), summary.get("llm_calls", 0))))
    table.add_row("wall time", Text(f"{getattr(result, 'wall_time_s', 0.0):.2f} s"))
    if summary.get("trace_id"):
        table.add_row("trace id", Text(str(summary["trace_id"])))
    table.add_row("database", Text(os.path.abspath(db_path)))
    if getattr(result, "work_dir", None):
        table.add_row("files", Text(str(result.work_dir)))
    return table


def print_summary(result: Any, db: str | None, target: str, db_path: str) -> None:
    engine = store.open_store(db_path)
    summary = for_terminal(store.run_summary(engine, result.run_id))
    roots = store.event_tree(for_terminal(store.run_events(engine, result.run_id)))
    console.print()
    console.print(event_tree(summary, roots, messages=False))
    console.print()
    console.print(_summary_table(summary, result, db_path))
    console.print()
    console.print("next commands to try:", style="bold")
    for command in next_commands(db, target, db_path):
        console.print(Text(f"  {command}"), soft_wrap=True)
