"""What the demo prints while it runs: one console line per event (fed by the websocket-callback sink), and
AG2's own console output kept quiet."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.trace import SpanProcessor

from ...table.schema import row_kind
from ..cli.render import message_text
from ..cli.terminal import shorten

# --------------------------------------------------------------------------------------------
# Quiet AG2 console
# --------------------------------------------------------------------------------------------


class _QuietIOStream:
    """An AG2 IOStream that prints nothing (the demo shows its own live view)."""

    def print(self, *objects: Any, sep: str = " ", end: str = "\n", flush: bool = False) -> None:
        pass

    def send(self, message: Any) -> None:
        pass

    def input(self, prompt: str = "", *, password: bool = False) -> str:
        return "exit"


@contextlib.contextmanager
def quiet_ag2() -> Iterator[None]:
    """Silence AG2's IOStream in this thread (a ContextVar: each worker thread enters it itself)."""
    from autogen.io import IOStream

    with IOStream.set_default(_QuietIOStream()):  # type: ignore[arg-type]
        yield


@contextlib.contextmanager
def quiet_process(console: Any) -> Iterator[None]:
    """For the whole demo: AG2's own prints (cmbagent's fork prints cost tables and code output with
    ``print``) go to a buffer, its warnings and log lines below ERROR are hidden; all restored after.

    ``sys.stdout`` is process-wide, so a rich console that writes to "whatever sys.stdout is" is pinned to
    the real stream first (and unpinned after): the live view keeps printing.
    """
    unpin = False
    if console is not None and getattr(console, "_file", ...) is None:
        console.file = console.file  # resolves to the real sys.stdout/sys.stderr now
        unpin = True
    loggers = [logging.getLogger(name) for name in ("autogen", "ag2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if unpin:
            console.file = None


@contextlib.contextmanager
def working_directory(path: str) -> Iterator[None]:
    """cmbagent's AG2 fork writes group chats to ``chats/*.json`` under the CWD."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


# --------------------------------------------------------------------------------------------
# Live view: fed by the websocket-callback sink
# --------------------------------------------------------------------------------------------


class SpanNames(SpanProcessor):
    """Remembers each span's name by span id (the websocket data carries ids and types, not names)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.names[format(span.get_span_context().span_id, "016x")] = span.name


_STATUS_STYLE = {"running": ("▶", "yellow"), "completed": ("✔", "green"), "failed": ("✘", "bold red")}


class LiveView:
    """``callback(event_type, data)`` for the websocket sink: one console line per event start/end/message."""

    def __init__(self, console: Any, names: SpanNames) -> None:
        self.console = console
        self.names = names
        self.counts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _label(self, data: dict[str, Any]) -> str:
        kind = row_kind(data)
        inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
        if kind == "message":
            return shorten(message_text(inputs.get("content")), 56)
        if kind == "handoff" and inputs.get("from_agent") and inputs.get("to_agent"):
            return f"handoff {inputs['from_agent']} -> {inputs['to_agent']}"
        return self.names.names.get(str(data.get("span_id")), kind)

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        from rich.markup import escape

        kind = row_kind(data)
        status = str(data.get("status") or "")
        is_message = kind == "message"
        with self._lock:
            if is_message or status == "running":
                self.counts[kind] += 1
            if status == "failed":
                self.failed[kind] += 1
        mark, style = ("✉", "cyan") if is_message else _STATUS_STYLE.get(status, ("•", "white"))
        order = data.get("execution_order")
        indent = "  " * min(int(data.get("depth") or 0), 8)
        duration = data.get("duration_ms")
        ended = status in ("completed", "failed") and not is_message
        tail = f" {duration} ms" if ended and duration is not None else ""
        if status == "failed" and data.get("error_message"):
            tail += " " + " ".join(str(data["error_message"]).split())[:70]
        agent = f"{str(data.get('agent_name') or '-')[:14]:<14}"
        line = (
            f"[dim]{order if order is not None else '?':>4}[/] [{style}]{mark}[/] [bold]{kind:<12}[/] "
            f"[magenta]{escape(agent)}[/] {indent}{escape(self._label(data))} "
            f"[{style}]{'sent' if is_message else status}{escape(tail)}[/]"
        )
        self.console.print(line, highlight=False, soft_wrap=True)
