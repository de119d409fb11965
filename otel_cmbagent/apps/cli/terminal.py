"""What the command prints: a console, values made safe for a terminal, and the formats every command shares."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.text import Text

from ...table.encoding import dumps
from ...table.schema import STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING

PROG = "otel-cmbagent"

TYPE_STYLES = {
    "run": "bold white",
    "step": "magenta",
    "conversation": "blue",
    "agent_call": "cyan",
    "llm_call": "green",
    "tool_call": "yellow",
    "code_exec": "bright_magenta",
    "file_gen": "bright_blue",
    "handoff": "bright_cyan",
    "human_input": "bright_yellow",
    "message": "dim",
    "error": "red",
}
STATUS_STYLES = {"completed": "green", "failed": "bold red", "running": "bold yellow", "interrupted": "bold magenta"}


def _console() -> Console:
    """stdout; piped output (not a terminal, no $COLUMNS) gets 160 columns instead of rich's 80, so rows are not cut."""
    try:
        interactive = sys.stdout.isatty()
    except (AttributeError, ValueError):
        interactive = False
    width = None if interactive or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, width=width)


console = _console()

# C0 and C1 control characters (ESC starts CSI/OSC sequences: clear screen, window title, hyperlinks; BEL,
# BS and CR overwrite what was printed) and the bidi overrides that reorder a line. Newlines and tabs too:
# every cell here is one line, and a newline in an agent name could fake a row.
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """``text`` safe to show in a terminal: control characters as visible escapes (``\\x1b``, ``\\n``, ``\\u202e``)."""
    return _TERMINAL_UNSAFE.sub(_escape_control, text)


def for_terminal(value: Any) -> Any:
    """``value`` (a row, a summary, a list of them) with every string passed through :func:`printable`.

    Applied to what the human-readable commands render; ``--json`` output keeps the exact values.
    """
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, Mapping):
        return {for_terminal(key): for_terminal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [for_terminal(item) for item in value]
    return value


def jsonl(rows: Iterable[Mapping[str, Any]]) -> None:
    """JSON Lines on stdout: one row per line, every value exact (the one JSON-safe conversion)."""
    out = sys.stdout
    for row in rows:
        out.write(dumps(row) + "\n")
    out.flush()


# --- formats --------------------------------------------------------------------------------------
def fmt_duration(ms: float | int | None) -> str:
    """A duration, truncated - never rounded up - as the sink truncates ``duration_ms``: ``41 ms``, ``1.23 s``,
    ``2m 05s``, ``1h 02m``. The viewer's ``fmtDur`` is the same rule, so both show the same text."""
    if ms is None:
        return "-"
    whole = max(0, int(ms))
    if whole < 1000:
        return f"{whole} ms"
    if whole < 60_000:
        return f"{whole // 10 / 100:.2f} s"
    seconds = whole // 1000
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def fmt_time(value: Any, *, millis: bool = False) -> str:
    if not isinstance(value, datetime):
        return "-" if value is None else str(value)
    local = value.astimezone()
    return local.strftime("%H:%M:%S.%f")[:-3] if millis else local.strftime("%Y-%m-%d %H:%M:%S")


def fmt_cost(cost: float | None, calls: int = 1) -> str:
    if cost is None or not calls:
        return "-"
    return f"${cost:.4f}"


def fmt_tokens(tokens_in: Any, tokens_out: Any) -> str:
    if not tokens_in and not tokens_out:
        return "-"
    return f"{tokens_in or 0:,} / {tokens_out or 0:,}"


def short_ids(ids: Sequence[str], minimum: int = 8) -> dict[str, str]:
    """The shortest prefixes (at least ``minimum`` characters) that tell the given ids apart."""
    length = minimum
    longest = max((len(i) for i in ids), default=0)
    while length < longest and len({i[:length] for i in ids}) < len(set(ids)):
        length += 1
    return {i: i[:length] for i in ids}


def shorten(text: Any, limit: int) -> str:
    """One line of at most ``limit`` characters (whitespace collapsed, ``…`` when cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def status_text(status: Any, error: Any = None, *, error_limit: int = 60) -> Text:
    if status == STATUS_RUNNING:
        return Text("● live", style=STATUS_STYLES["running"])
    if status == STATUS_FAILED:
        return Text("✗ failed" + (f": {shorten(error, error_limit)}" if error else ""), style=STATUS_STYLES["failed"])
    if status == STATUS_INTERRUPTED:  # its process was stopped (SIGTERM) or is gone (SIGKILL) while it ran
        return Text("⏹ interrupted", style=STATUS_STYLES["interrupted"])
    return Text(str(status or "-"), style=STATUS_STYLES.get(str(status), ""))


def run_status_text(summary: Mapping[str, Any]) -> Text:
    """A run's status, with how many of its events failed when it completed anyway (a failed tool retried)."""
    text = status_text(summary.get("status"))
    failed = summary.get("failed_events") or 0
    if failed and summary.get("status") != STATUS_FAILED:
        text.append(f" ({failed} failed)", style=STATUS_STYLES["failed"])
    return text


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""
