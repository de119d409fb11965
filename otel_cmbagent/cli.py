"""``otel-cmbagent``: look at traced cmbagent runs in the terminal, and ship stored runs to Jaeger/Tempo.

    otel-cmbagent runs                                   # newest runs: status, events, agents, tokens, cost
    otel-cmbagent tree last                              # the nested event tree of the newest run
    otel-cmbagent timeline 3f2a                          # a waterfall of a run (a unique id prefix works)
    otel-cmbagent events last --type tool_call --json    # rows as JSON Lines, for jq
    otel-cmbagent export last --otlp http://localhost:4318   # backfill with the ORIGINAL trace/span ids
    otel-cmbagent replay otel_cmbagent.spill.jsonl       # write spilled rows back
    otel-cmbagent serve --port 8765                      # a websocket broadcaster for live events
    otel-cmbagent demo                                   # a traced multi-agent run, no API key needed

The database is ``--db`` (a SQLite path or a SQLAlchemy URL), else ``$OTEL_CMBAGENT_SQL_URL``, else
``./otel_cmbagent.db``. Errors a person can hit are one line on stderr (``otel-cmbagent: error: ...``),
exit code 1 (2 for usage errors); ``-v`` shows library logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from otel_cmbagent import store
from otel_cmbagent.exporters.rows import is_message, row_attributes, row_kind
from otel_cmbagent.store import StoreError
from otel_cmbagent.version import __version__

PROG = "otel-cmbagent"
DEBUG_ENV = "OTEL_CMBAGENT_DEBUG"

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
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

def _console() -> Console:
    """stdout; piped output (not a terminal, no $COLUMNS) gets 160 columns instead of rich's 80, so rows are not cut."""
    try:
        interactive = sys.stdout.isatty()
    except (AttributeError, ValueError):
        interactive = False
    width = None if interactive or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, width=width)


console = _console()


class ExportError(Exception):
    """An OTLP export that did not go through (one line for a person)."""


# --- formatting -------------------------------------------------------------------------------
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


def fmt_duration(ms: float | int | None) -> str:
    if ms is None:
        return "-"
    ms = max(0, float(ms))
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    seconds = int(ms // 1000)
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


def _shorten(text: Any, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def _meta(row: Mapping[str, Any]) -> dict[str, Any]:
    meta = row.get("meta")
    return meta if isinstance(meta, dict) else {}


def _name(row: Mapping[str, Any]) -> str:
    if is_message(row):
        inputs = row.get("inputs") if isinstance(row.get("inputs"), dict) else {}
        sender = inputs.get("sender") or "?"
        recipient = inputs.get("recipient") or row.get("agent_name") or "?"
        return f"{sender} → {recipient}"
    return _meta(row).get("span_name") or str(row.get("event_type") or "?")


def _message_text(row: Mapping[str, Any]) -> str:
    content = (row.get("inputs") or {}).get("content") if isinstance(row.get("inputs"), dict) else None
    if content is None:
        return ""
    if isinstance(content, list):  # OTel message parts
        pieces = []
        for part in content:
            if isinstance(part, dict):
                pieces.append(str(part.get("content") or part.get("name") or part.get("type") or ""))
            else:
                pieces.append(str(part))
        content = " ".join(p for p in pieces if p)
    return str(content)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> None:
    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")
    out.flush()


def _status_text(status: Any, error: Any = None) -> Text:
    if status == "running":
        return Text("● live", style=STATUS_STYLES["running"])
    if status == "failed":
        return Text("✗ failed" + (f": {_shorten(error, 60)}" if error else ""), style=STATUS_STYLES["failed"])
    if status == "interrupted":  # its process was stopped (SIGTERM) or is gone (SIGKILL) while it ran
        return Text("⏹ interrupted", style=STATUS_STYLES["interrupted"])
    return Text(str(status or "-"), style=STATUS_STYLES.get(str(status), ""))


# --- shared options ---------------------------------------------------------------------------
def db_option(func: Any) -> Any:
    return click.option(
        "--db",
        "db",
        metavar="PATH|URL",
        default=None,
        help=f"SQLite file or SQLAlchemy URL [default: ${store.SQL_URL_ENV} or ./{store.DEFAULT_DB}]",
    )(func)


def _db(db: str | None) -> str:
    return db or store.default_db()


def _open(db: str | None) -> tuple[Any, str]:
    target = _db(db)
    return store.open_store(target), target


def _resolve(engine: Any, ref: str) -> str:
    try:
        return store.resolve_run(engine, ref)
    except store.RunNotFoundError as exc:
        if ref.strip().lower() in ("last", "latest"):
            raise
        raise StoreError(f"{exc} (list them with: {PROG} runs)") from None


# --- the command group ------------------------------------------------------------------------
@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.option("-v", "--verbose", is_flag=True, help="Show library logs (OTLP exporter, SQLAlchemy, ...) on stderr.")
def cli(verbose: bool) -> None:
    """Look at traced cmbagent/AG2 runs stored in the execution_events table, and export them over OTLP.

    RUN_ID arguments take a full run id, a unique prefix of one, a trace id, or `last`.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:  # library warnings would add lines (and tracebacks) to our one-line errors
        logging.getLogger().addHandler(logging.NullHandler())
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


# --- runs ---------------------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@db_option
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(min=1), help="How many runs.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one run per line, every field.")
def runs(db: str | None, limit: int, as_json: bool) -> None:
    """The newest runs: id, start, duration, status, events, agents, tokens (in / out), cost."""
    engine, target = _open(db)
    found = store.list_runs(engine, limit=limit)
    if as_json:
        _jsonl(found)
        return
    if not found:
        console.print(Text(f"no runs in {printable(target)} yet"))
        return
    found = for_terminal(found)
    shorts = short_ids([r["run_id"] for r in found])
    table = Table(title=Text(f"runs in {printable(target)}"), title_justify="left", box=None, pad_edge=False, header_style="bold")
    for column, justify in (("run", "left"), ("name", "left"), ("started", "left"), ("duration", "right"),
                            ("status", "left"), ("events", "right"), ("agents", "left"), ("tokens in / out", "right"),
                            ("cost", "right")):
        table.add_column(column, justify=justify, no_wrap=column in ("run", "started", "duration", "status"))
    for run in found:
        table.add_row(
            Text(shorts[run["run_id"]], style="cyan"),
            Text(_shorten(run.get("name") or "", 40)),
            Text(fmt_time(run.get("started_at"))),
            Text(fmt_duration(run.get("duration_ms")) + ("+" if run.get("live") else "")),
            _status_text(run.get("status")),
            Text(str(run.get("events", 0))),
            Text(_shorten(", ".join(run.get("agents") or []), 48)),
            Text(fmt_tokens(run.get("input_tokens"), run.get("output_tokens"))),
            Text(fmt_cost(run.get("cost"), run.get("llm_calls", 1))),
        )
    console.print(table)


# --- tree ---------------------------------------------------------------------------------------
def _tree_label(row: Mapping[str, Any]) -> Text:
    event_type = row_kind(row)
    label = Text()
    label.append(f"#{row.get('execution_order')} ", style="dim")
    if event_type == "message":
        label.append("message ", style=TYPE_STYLES["message"])
        label.append(_name(row))
        snippet = _message_text(row)
        if snippet:
            label.append(f"  {_shorten(snippet, 70)}", style="dim italic")
        return label
    label.append(event_type, style=TYPE_STYLES.get(event_type, ""))
    name = _name(row)
    first, _, rest = name.partition(" ")
    shown = rest if first == event_type and rest else name  # "step fit" under type "step": "fit"
    label.append(f" {shown}", style="bold")
    agent = row.get("agent_name")
    if agent and not name.endswith(str(agent)):
        label.append(f" · {agent}", style="cyan")
    meta = _meta(row)
    if event_type == "llm_call" and (meta.get("gen_ai.usage.input_tokens") or meta.get("gen_ai.usage.output_tokens")):
        label.append(
            f"  {meta.get('gen_ai.usage.input_tokens') or 0}→{meta.get('gen_ai.usage.output_tokens') or 0} tok",
            style="dim",
        )
    status = row.get("status")
    if status == "running":
        label.append("  ")
        label.append_text(_status_text(status))
    else:
        label.append(f"  {fmt_duration(row.get('duration_ms'))}", style="dim")
        if status in ("failed", "interrupted"):
            label.append("  ")
            label.append_text(_status_text(status, row.get("error_message")))
    return label


def _add_nodes(parent: Tree, nodes: list[dict[str, Any]], messages: bool, max_depth: int | None, level: int) -> None:
    for node in nodes:
        row = node["event"]
        if not messages and is_message(row):
            continue
        branch = parent.add(_tree_label(row))
        if max_depth is not None and level + 1 >= max_depth:
            hidden = _count(node["children"], messages)
            if hidden:
                branch.add(Text(f"… {hidden} more", style="dim"))
            continue
        _add_nodes(branch, node["children"], messages, max_depth, level + 1)


def _count(nodes: list[dict[str, Any]], messages: bool) -> int:
    return sum(
        (messages or not is_message(n["event"])) + _count(n["children"], messages) for n in nodes
    )


def _run_header(summary: Mapping[str, Any]) -> Text:
    header = Text()
    header.append("run ", style="bold")
    header.append(str(summary["run_id"]), style="bold cyan")
    if summary.get("name"):
        header.append(f"  {summary['name']}")
    header.append("  ")
    header.append_text(_status_text(summary.get("status")))
    header.append(f"  {fmt_duration(summary.get('duration_ms'))}", style="dim")
    header.append(f"  {summary.get('events', 0)} events", style="dim")
    if summary.get("trace_id"):
        header.append(f"  trace {summary['trace_id']}", style="dim")
    return header


def render_tree(engine: Any, run_id: str, *, messages: bool = True, max_depth: int | None = None) -> Tree:
    summary = for_terminal(store.run_summary(engine, run_id))
    roots = store.event_tree(for_terminal(store.run_events(engine, run_id)))
    tree = Tree(_run_header(summary), guide_style="dim")
    _add_nodes(tree, roots, messages, max_depth, 0)
    return tree


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@db_option
@click.option("--messages/--no-messages", default=True, show_default=True, help="Show message events.")
@click.option("--max-depth", type=click.IntRange(min=1), default=None, help="Cut the tree below this depth.")
def tree(run_id: str, db: str | None, messages: bool, max_depth: int | None) -> None:
    """The nested event tree of a run: order, type, name, agent, duration, status.

    Failed events are red, running ones are marked live. RUN_ID: an id, a unique prefix, or `last`.
    """
    engine, _target = _open(db)
    console.print(render_tree(engine, _resolve(engine, run_id), messages=messages, max_depth=max_depth),
                  soft_wrap=True)


# --- timeline -----------------------------------------------------------------------------------
def _seconds(delta: Any) -> float:
    return delta.total_seconds()


def _depth_first(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        out.append(node["event"])
        stack.extend(reversed(node["children"]))
    return out


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@db_option
@click.option("--width", "-w", type=click.IntRange(min=10), default=None,
              help="Width of the bar area in characters [default: fit the terminal].")
@click.option("--messages", is_flag=True, help="Also show messages, as ticks.")
def timeline(run_id: str, db: str | None, width: int | None, messages: bool) -> None:
    """A waterfall of a run: one line per span, indented by depth, bars on the run's time axis.

    Bars show each span's start offset and duration, coloured by event type; failed spans end in ✗,
    interrupted ones (their process was stopped or is gone) in ⏹, live (still running) spans in ▸. RUN_ID: an id, a unique prefix, or `last`.
    """
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    summary = for_terminal(store.run_summary(engine, resolved))
    rows = [r for r in for_terminal(store.run_events(engine, resolved))
            if isinstance(r.get("started_at") or r.get("timestamp"), datetime)]
    if not messages:
        rows = [r for r in rows if not is_message(r)]
    rows = _depth_first(store.event_tree(rows))  # parallel branches stay together under their parent
    console.print(_run_header(summary), soft_wrap=True)
    if not rows:
        console.print("no timed events in this run")
        return
    now = datetime.now(timezone.utc)

    def start_of(row: Mapping[str, Any]) -> datetime:
        return row.get("started_at") or row["timestamp"]

    def end_of(row: Mapping[str, Any]) -> datetime:
        if row.get("completed_at") is not None:
            return row["completed_at"]
        if row.get("status") == "running":
            return now
        if row.get("duration_ms") is not None:
            return start_of(row) + timedelta(milliseconds=row["duration_ms"])
        return start_of(row)

    t0 = min(start_of(r) for r in rows)
    t1 = max(end_of(r) for r in rows)
    total = max(_seconds(t1 - t0), 1e-6)
    min_depth = min((r.get("depth") or 0) for r in rows)

    labels = []
    for row in rows:
        indent = "  " * max(0, (row.get("depth") or 0) - min_depth)
        text = _name(row) if not is_message(row) else f"✉ {_name(row)}"
        labels.append(indent + " ".join(text.split()))
    label_width = min(max(len(label) for label in labels), 48)
    duration_width = 10
    bar_width = width or max(20, console.width - label_width - duration_width - 6)

    axis = Text(" " * (label_width + 1))
    right = fmt_duration(int(total * 1000))
    axis.append("0" + " " * max(1, bar_width - 1 - len(right)) + right, style="dim")
    console.print(axis, soft_wrap=True)
    axis_line = Text(" " * (label_width + 1))
    axis_line.append("├" + "─" * max(0, bar_width - 2) + "┤", style="dim")
    console.print(axis_line, soft_wrap=True)

    seen_types: list[str] = []
    for row, label in zip(rows, labels):
        event_type = row_kind(row)
        style = TYPE_STYLES.get(event_type, "white")
        if event_type not in seen_types and event_type != "message":
            seen_types.append(event_type)
        start = _seconds(start_of(row) - t0) / total * bar_width
        end = _seconds(end_of(row) - t0) / total * bar_width
        col0 = min(max(int(start), 0), bar_width - 1)
        col1 = min(max(int(round(end)), col0 + 1), bar_width)
        line = Text((label if len(label) <= label_width else label[: label_width - 1] + "…").ljust(label_width) + " ")
        if event_type == "message":
            bar = Text(" " * col0 + "◆" + " " * (bar_width - col0 - 1), style=style)
            line.append_text(bar)
            console.print(line, soft_wrap=True)
            continue
        cells = col1 - col0
        live = row.get("status") == "running"
        tiny = (end - start) < 0.5 and cells == 1
        body = ("▏" if tiny else "█" * cells) if not live else "█" * max(0, cells - 1) + "▸"
        line.append(" " * col0)
        line.append(body, style=style)
        line.append(" " * (bar_width - col0 - cells))
        duration = "live" if live else fmt_duration(row.get("duration_ms")
                                                    if row.get("duration_ms") is not None
                                                    else _seconds(end_of(row) - start_of(row)) * 1000)
        line.append(f" {duration:>{duration_width - 1}}", style=STATUS_STYLES["running"] if live else "dim")
        if row.get("status") in ("failed", "interrupted"):
            line.append(" ✗" if row["status"] == "failed" else " ⏹", style=STATUS_STYLES[row["status"]])
        console.print(line, soft_wrap=True)

    legend = Text(" " * (label_width + 1))
    for event_type in seen_types:
        legend.append("█ ", style=TYPE_STYLES.get(event_type, "white"))
        legend.append(f"{event_type}  ", style="dim")
    console.print(legend, soft_wrap=True)


# --- events -------------------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@db_option
@click.option("--type", "-t", "event_types", multiple=True, metavar="TYPE",
              help="Only these event types (repeat, or comma-separate): run, step, conversation, agent_call, "
                   "llm_call, tool_call, code_exec, file_gen, handoff, human_input, message.")
@click.option("--agent", "-a", "agents", multiple=True, metavar="NAME", help="Only events of these agents.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one row per line, every column, ISO times.")
def events(run_id: str, db: str | None, event_types: tuple[str, ...], agents: tuple[str, ...], as_json: bool) -> None:
    """The rows of a run in execution order (a table, or JSON Lines for piping).

    RUN_ID: an id, a unique prefix, or `last`.
    """
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    rows = store.run_events(engine, resolved, event_type=event_types or None, agent=agents or None)
    if as_json:
        _jsonl(rows)
        return
    rows = for_terminal(rows)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("#", "right"), ("depth", "right"), ("type", "left"), ("agent", "left"),
                            ("name", "left"), ("status", "left"), ("started", "left"), ("duration", "right"),
                            ("tokens", "right")):
        table.add_column(column, justify=justify, no_wrap=column not in ("name",))
    for row in rows:
        event_type = row_kind(row)
        meta = _meta(row)
        tokens = fmt_tokens(meta.get("gen_ai.usage.input_tokens"), meta.get("gen_ai.usage.output_tokens")) \
            if event_type == "llm_call" else ""
        table.add_row(
            Text(str(row.get("execution_order"))),
            Text(str(row.get("depth"))),
            Text(event_type, style=TYPE_STYLES.get(event_type, "")),
            Text(str(row.get("agent_name") or "")),
            Text(_shorten(_name(row), 60)),
            _status_text(row.get("status"), row.get("error_message")) if row.get("status") != "completed"
            else Text("completed", style="green"),
            Text(fmt_time(row.get("started_at") or row.get("timestamp"), millis=True)),
            Text(fmt_duration(row.get("duration_ms")) if row.get("status") != "running" else "live"),
            Text(tokens),
        )
    console.print(table)
    console.print(Text(f"{len(rows)} events", style="dim"))


# --- export -------------------------------------------------------------------------------------
_SAMPLED = 1
_INT64 = (-(2**63), 2**63 - 1)
_IDENTITY_COLUMNS = (
    ("run_id", "cmbagent.run_id"),
    ("session_id", "cmbagent.session_id"),
    ("node_id", "cmbagent.node_id"),
    ("step_id", "cmbagent.step_id"),
    ("event_type", "cmbagent.event_type"),
    ("execution_order", "cmbagent.execution_order"),
    ("depth", "cmbagent.depth"),
    ("agent_name", "gen_ai.agent.name"),
    ("agent_role", "cmbagent.agent.role"),
)
def _attribute(value: Any, *, as_json: bool = False) -> Any:
    """An OTLP-safe attribute value (None when there is nothing to send)."""
    if value is None:
        return None
    if as_json and not isinstance(value, str):
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    if isinstance(value, bool) or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            return None
        kinds = {type(item) for item in items}
        if len(kinds) == 1 and kinds <= {str, bool, int, float} and all(
            not isinstance(i, int) or isinstance(i, bool) or _INT64[0] <= i <= _INT64[1] for i in items
        ):
            return items
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _ns(value: Any) -> int | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    delta = value - epoch
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _hex_id(value: Any, digits: int) -> int | None:
    if not isinstance(value, str) or len(value) != digits:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number or None


def _derived_id(seed: str, digits: int) -> int:
    return int(hashlib.sha256(seed.encode("utf-8")).hexdigest()[:digits], 16) or 1


def spans_from_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    service_name: str = "cmbagent",
    content: bool = False,
    now_ns: int | None = None,
) -> tuple[list[Any], int]:
    """Rebuild a run's spans from its rows, with the original trace/span ids, parents and times.

    Message rows become ``cmbagent.message`` events on their parent span. Rows still ``running``
    end now and carry ``cmbagent.incomplete=true``. ``content``: also send message text, tool
    arguments/results, code and output (the OTLP content policy: off unless asked for).
    Returns ``(spans, message_events)``.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    from otel_cmbagent.semconv import CONTENT_ATTRIBUTES

    now_ns = now_ns if now_ns is not None else time.time_ns()
    resource = Resource.create({SERVICE_NAME: service_name})
    scope = InstrumentationScope("otel_cmbagent", __version__)
    flags = TraceFlags(TraceFlags.SAMPLED)

    by_id = {row.get("id"): row for row in rows}
    contexts: dict[Any, Any] = {}

    def context_of(row: Mapping[str, Any]) -> Any:
        key = row.get("id")
        if key not in contexts:
            run_key = str(row.get("run_id") or row.get("trace_id") or "run")
            trace_id = _hex_id(row.get("trace_id"), 32) or _derived_id(f"trace:{run_key}", 32)
            span_id = _hex_id(row.get("span_id"), 16) or _derived_id(f"span:{key}", 16)
            contexts[key] = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=False, trace_flags=flags)
        return contexts[key]

    def allowed(attribute: str) -> bool:
        return content or attribute not in CONTENT_ATTRIBUTES

    def sections(row: Mapping[str, Any], attributes: dict[str, Any]) -> None:
        """Attributes from inputs/outputs/meta, through the row mapping's own inverse."""
        for attribute, value in row_attributes(row, allowed).items():
            converted = _attribute(value)
            if converted is not None:
                attributes[attribute] = converted

    span_rows = [row for row in rows if not is_message(row)]
    events_by_parent: dict[Any, list[Any]] = {}
    message_events = 0
    for row in rows:
        if not is_message(row):
            continue
        parent = by_id.get(row.get("parent_event_id"))
        if parent is None or is_message(parent):
            continue
        attributes: dict[str, Any] = {"cmbagent.event_type": "message"}
        for key in ("execution_order", "depth"):
            if row.get(key) is not None:
                attributes[f"cmbagent.{key}"] = row[key]
        sections(row, attributes)
        stamp = _ns(row.get("timestamp") or row.get("started_at")) or now_ns
        events_by_parent.setdefault(parent.get("id"), []).append(Event("cmbagent.message", attributes, stamp))
        message_events += 1

    spans = []
    for row in span_rows:
        context = context_of(row)
        parent_row = by_id.get(row.get("parent_event_id"))
        parent = context_of(parent_row) if parent_row is not None and not is_message(parent_row) else None
        attributes = {}
        for column, attribute in _IDENTITY_COLUMNS:
            converted = _attribute(row.get(column))
            if converted is not None:
                attributes[attribute] = converted
        sections(row, attributes)
        start = _ns(row.get("started_at") or row.get("timestamp")) or now_ns
        end = _ns(row.get("completed_at"))
        if row.get("status") == "running" or end is None:
            if row.get("status") == "running":
                attributes["cmbagent.incomplete"] = True
                end = max(now_ns, start)
            else:
                end = start + int(row.get("duration_ms") or 0) * 1_000_000
        if row.get("status") == "failed":
            message = row.get("error_message")
            status = Status(StatusCode.ERROR, str(message) if message else None)
            if message and "cmbagent.error.message" not in attributes:
                attributes["cmbagent.error.message"] = str(message)
        else:
            status = Status(StatusCode.UNSET)
        events = sorted(events_by_parent.get(row.get("id"), []), key=lambda e: e.timestamp)
        spans.append(ReadableSpan(
            name=_meta(row).get("span_name") or str(row.get("event_type") or "span"),
            context=context,
            parent=parent,
            resource=resource,
            attributes=attributes,
            events=events,
            kind=SpanKind.CLIENT if row.get("event_type") == "llm_call" else SpanKind.INTERNAL,
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=scope,
        ))
    return spans, message_events


def otlp_endpoint(endpoint: str, protocol: str) -> str:
    """Check an OTLP endpoint URL; for http/protobuf append ``/v1/traces`` when it is missing."""
    text = (endpoint or "").strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: it must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: no host")
    del port
    if protocol != "http/protobuf":
        return text
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def export_run(
    engine: Any,
    run_id: str,
    endpoint: str,
    *,
    protocol: str | None = None,
    timeout: float = 10.0,
    content: bool = False,
    service_name: str = "cmbagent",
    batch_size: int = 512,
) -> dict[str, Any]:
    """Export a stored run over OTLP; returns ``{"spans", "message_events", "trace_ids", "endpoint", "protocol"}``.

    Raises :class:`ExportError` (or ValueError for a bad endpoint/protocol) when it does not go through.
    """
    from opentelemetry.sdk.trace.export import SpanExportResult

    from otel_cmbagent.exporters.otlp import make_otlp_exporter, otlp_protocol

    chosen = otlp_protocol(protocol)
    url = otlp_endpoint(endpoint, chosen)
    rows = store.run_events(engine, run_id)
    spans, message_events = spans_from_rows(rows, service_name=service_name, content=content)
    if not spans:
        raise ExportError(f"run {run_id} has no spans to export")
    exporter = make_otlp_exporter(chosen, url, timeout=timeout)
    try:
        for offset in range(0, len(spans), batch_size):
            try:
                result = exporter.export(spans[offset:offset + batch_size])
            except Exception as exc:  # noqa: BLE001 - reported as one line
                raise ExportError(f"OTLP export to {url} ({chosen}) failed: {type(exc).__name__}: "
                                  f"{_first_line(str(exc))}") from None
            if result is not SpanExportResult.SUCCESS:
                hint = ""
                port = urlsplit(url).port
                if chosen == "http/protobuf" and port == 4317:
                    hint = " (port 4317 is usually OTLP/gRPC: try --protocol grpc)"
                elif chosen == "grpc" and port == 4318:
                    hint = " (port 4318 is usually OTLP/HTTP: try --protocol http/protobuf)"
                raise ExportError(
                    f"OTLP export to {url} ({chosen}) failed: the endpoint is unreachable or refused the spans"
                    f"{hint}" + (f"; {offset} of {len(spans)} spans were sent" if offset else "")
                )
    finally:
        try:
            exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass
    trace_ids = sorted({f"{span.context.trace_id:032x}" for span in spans})
    return {"spans": len(spans), "message_events": message_events, "trace_ids": trace_ids, "endpoint": url,
            "protocol": chosen}


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@click.option("--otlp", "endpoint", metavar="ENDPOINT", default=None,
              help="OTLP endpoint, e.g. http://localhost:4318 (HTTP: /v1/traces is appended when missing) or "
                   "http://localhost:4317 with --protocol grpc [default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                   "$OTEL_EXPORTER_OTLP_ENDPOINT].")
@click.option("--protocol", type=click.Choice(["grpc", "http/protobuf", "http"]), default=None,
              help="OTLP protocol [default: $OTEL_EXPORTER_OTLP_PROTOCOL or http/protobuf].")
@db_option
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to keep trying an export.")
@click.option("--content/--no-content", default=None,
              help="Also send message text, tool arguments/results, code and output [default: only when "
                   "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true].")
@click.option("--service-name", default=None, help="Resource service.name [default: $OTEL_SERVICE_NAME or cmbagent].")
def export(run_id: str, endpoint: str | None, protocol: str | None, db: str | None, timeout: float,
           content: bool | None, service_name: str | None) -> None:
    """Backfill a stored run to an OTLP endpoint (Jaeger, Tempo, a Collector) as the original trace.

    Spans keep their trace ids, span ids, parent links and timestamps, so the trace is the same one
    that live OTLP export would have produced; messages become `cmbagent.message` span events; spans
    of a run that never ended get end = now and `cmbagent.incomplete=true`. RUN_ID: an id, a unique
    prefix, or `last`.
    """
    from otel_cmbagent.config import CAPTURE_CONTENT_ENV, parse_bool_env

    if endpoint is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if not endpoint:
            raise click.UsageError("missing --otlp ENDPOINT (e.g. --otlp http://localhost:4318)")
    if content is None:
        content = parse_bool_env(CAPTURE_CONTENT_ENV, False)
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    result = export_run(
        engine, resolved, endpoint, protocol=protocol, timeout=timeout, content=content,
        service_name=service_name or os.environ.get("OTEL_SERVICE_NAME") or "cmbagent",
    )
    console.print(
        Text(f"exported {result['spans']} spans ({result['message_events']} message events) of run "
             f"{printable(resolved)} to {printable(result['endpoint'])} ({result['protocol']})"),
        soft_wrap=True,
    )
    for trace_id in result["trace_ids"]:
        console.print(f"trace id: {trace_id}", soft_wrap=True)
        console.print(f"Jaeger: /trace/{trace_id}  (e.g. http://localhost:16686/trace/{trace_id})", soft_wrap=True)


# --- replay -------------------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@click.argument("spill_file", metavar="SPILL_FILE")
@db_option
@click.option("--keep", is_flag=True, help="Leave the spill file as it is (default: rename it *.replayed).")
def replay(spill_file: str, db: str | None, keep: bool) -> None:
    """Write rows spilled while the database was down back into it (idempotent upserts).

    Lines that are not rows (a last line cut short by a crash) and rows the database refuses are skipped and
    reported by line number; every valid row is written; what was not written stays in the file (exit code 1
    when lines were skipped).
    """
    from otel_cmbagent.exporters.sql import replay_report

    path = Path(spill_file).expanduser()
    if not path.exists():
        raise StoreError(f"no spill file at {path}")
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a spill file")
    target = _db(db)
    report = replay_report(path, store.db_url(target), remove=not keep)
    console.print(Text(f"replayed {report.written} rows from {printable(str(path))} into {printable(target)}"),
                  soft_wrap=True)
    for lines, what in ((report.unreadable, "not a spilled row"), (report.refused, "refused by the database")):
        if lines:
            console.print(Text(f"skipped {len(lines)} {'line' if len(lines) == 1 else 'lines'} ({what}): "
                               f"{_line_numbers(lines)}"), soft_wrap=True)
    if report.first_error:
        console.print(Text(f"first error: {printable(report.first_error)}"), soft_wrap=True)
    if report.held:
        console.print(f"{report.held} rows wait for their run/session row", soft_wrap=True)
    if report.incomplete:
        console.print(f"{report.incomplete} rows lack a value the table requires (e.g. a run id): not written",
                      soft_wrap=True)
    if report.left_in is not None:
        console.print(Text(f"what was not written is left in {printable(str(report.left_in))}"), soft_wrap=True)
    elif not keep:
        console.print(f"(the spill file is now {path.name}.replayed)", style="dim", soft_wrap=True)
    if report.unreadable or report.refused:
        sys.exit(1)


def _line_numbers(numbers: Sequence[int], shown: int = 20) -> str:
    text = ", ".join(map(str, numbers[:shown]))
    more = f", … ({len(numbers) - shown} more)" if len(numbers) > shown else ""
    return f"line {text}" if len(numbers) == 1 else f"lines {text}{more}"


# --- serve --------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    import ipaddress

    host = (host or "").strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@cli.command(context_settings=_CONTEXT)
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option("--token", default=None, envvar="OTEL_CMBAGENT_WS_TOKEN",
              help="Every request must send ?token=..., 'Authorization: Bearer ...' or X-Token (required off "
                   "loopback) [env: OTEL_CMBAGENT_WS_TOKEN].")
@click.option("--jaeger-url", default=None, metavar="URL",
              help="Base URL of a Jaeger UI: the viewer links each run to {URL}/trace/{trace_id}.")
def serve(db: str | None, host: str, port: int, token: str | None, jaeger_url: str | None) -> None:
    """Serve the live run viewer (web page, JSON API, websocket /ws) until Ctrl-C.

    The page lists runs and shows a live waterfall of a run's events; runs written by other processes
    into the same database appear and update live. /ws streams cmbagent's `event_captured` envelopes.
    """
    from otel_cmbagent.viewer.app import check_bind, serve_viewer

    if not token and not _is_loopback(host):
        raise click.UsageError(
            f"refusing to bind {host} without a token: anyone who can reach it would see the run's messages "
            "(bind 127.0.0.1, or pass --token)"
        )
    try:
        check_bind(host, token or None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        serve_viewer(_db(db), host=host, port=port, token=token or None, jaeger_url=jaeger_url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console.print("stopped")


# --- demo ---------------------------------------------------------------------------------------
def _sqlite_path(db: str) -> str:
    if "://" not in db:
        return db
    url = sa.engine.make_url(db)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise click.UsageError("the demo writes a SQLite file: give --db PATH (or a sqlite:/// URL)")
    return url.database


@cli.command(context_settings=_CONTEXT)
@db_option
@click.option("--llm-url", default=None, metavar="URL",
              help="An OpenAI-compatible endpoint to use instead of the embedded scripted LLM (key from "
                   "$OPENAI_API_KEY).")
@click.option("--model", default=None, metavar="NAME", help="Model name for --llm-url.")
@click.option("--otlp/--no-otlp", default=None,
              help="Also export over OTLP [default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set].")
@click.option("--live/--no-live", default=True, show_default=True, help="Print events as they happen.")
@click.option("--serve", "serve_port", default=None, is_flag=False, flag_value=8765, type=click.IntRange(0, 65535),
              metavar="[PORT]", help="Also start the web viewer (on 127.0.0.1, port 8765 or PORT) before the run, "
                                    "print its URL, and keep serving after the run until Ctrl-C.")
def demo(
    db: str | None, llm_url: str | None, model: str | None, otlp: bool | None, live: bool, serve_port: int | None
) -> None:
    """Run a traced multi-agent cmbagent-style workflow (group chat, code, tools, parallel steps).

    No API key needed: an embedded scripted LLM answers unless --llm-url is given.
    """
    if model and not llm_url:
        raise click.UsageError("--model needs --llm-url (the embedded scripted LLM has its own model)")
    from otel_cmbagent.package import classic_api_problem

    problem = classic_api_problem()  # e.g. ag2 1.x installed: say what to install, in one line
    if problem is not None:
        raise click.ClickException(problem)
    target = _db(db)
    db_path = _sqlite_path(target)
    try:
        from otel_cmbagent import demo as demo_module
    except ImportError as exc:
        raise StoreError(f"the demo is not available in this installation ({exc})") from None
    viewer = None
    if serve_port is not None:
        from otel_cmbagent.viewer.app import ViewerServer

        viewer = ViewerServer(db_path, port=serve_port).start()
        console.print(f"viewer: {viewer.url}  (the run appears there live)", soft_wrap=True)
    try:
        result = demo_module.run_demo(db_path, llm_url=llm_url, model=model, otlp=otlp, live=live, console=console)
        _print_demo_summary(result, db, target, db_path)
        if viewer is not None:
            console.print(f"\nviewer still serving on {viewer.url} - Ctrl-C to stop", soft_wrap=True)
            sys.stdout.flush()
            _wait_for_interrupt()
    finally:
        if viewer is not None:
            viewer.stop()


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_demo_summary(result: Any, db: str | None, target: str, db_path: str) -> None:
    engine = store.open_store(db_path)
    summary = for_terminal(store.run_summary(engine, result.run_id))
    console.print()
    console.print(render_tree(engine, result.run_id, messages=False), soft_wrap=True)
    console.print()
    table = Table(title="summary", title_justify="left", box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    by_type = ", ".join(f"{event_type} {count}" for event_type, count in summary.get("by_type", {}).items())
    table.add_row("run", Text(f"{summary['run_id']}  ({summary.get('name') or ''})"))
    table.add_row("status", _status_text(summary.get("status")))
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
    console.print(table)
    console.print()
    suffix = "" if db is None and "://" not in target and Path(target) == Path(store.DEFAULT_DB) else f" --db {db_path}"
    console.print("next commands to try:", style="bold")
    for command in (f"{PROG} runs{suffix}", f"{PROG} tree last{suffix}", f"{PROG} timeline last{suffix}",
                    f"{PROG} events last --json{suffix}", f"{PROG} export last --otlp http://localhost:4318{suffix}"):
        console.print(f"  {command}", soft_wrap=True)


# --- entry point --------------------------------------------------------------------------------
def _message(exc: BaseException) -> str:
    if isinstance(exc, sa.exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        return f"database error: {_first_line(str(orig if orig is not None else exc)) or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        filename = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{filename}"
    text = _first_line(str(exc))
    return text or type(exc).__name__


def _fail(message: str, code: int) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stderr.write(f"{PROG}: error: {printable(message)}\n")
    sys.stderr.flush()
    sys.exit(code)


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
        _fail(_first_line(exc.format_message()) + hint, 2)
    except click.ClickException as exc:
        _fail(_first_line(exc.format_message()), exc.exit_code or 1)
    except BrokenPipeError:  # e.g. `events --json | head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        sys.exit(1)
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
