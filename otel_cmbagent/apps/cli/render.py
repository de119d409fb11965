"""The human-readable views of runs: the run list, the event tree, the events table, the run header.

Every function takes rows/summaries already passed through :func:`.terminal.for_terminal`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ...pipeline import semconv
from ...table.schema import STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING, is_message, row_kind
from .terminal import (
    TYPE_STYLES,
    fmt_cost,
    fmt_duration,
    fmt_time,
    fmt_tokens,
    run_status_text,
    short_ids,
    shorten,
    status_text,
)


def meta_of(row: Mapping[str, Any]) -> dict[str, Any]:
    meta = row.get("meta")
    return meta if isinstance(meta, dict) else {}


def event_name(row: Mapping[str, Any]) -> str:
    """``sender → recipient`` for a message, else the span's name."""
    if is_message(row):
        inputs = row.get("inputs") if isinstance(row.get("inputs"), dict) else {}
        sender = inputs.get("sender") or "?"
        recipient = inputs.get("recipient") or row.get("agent_name") or "?"
        return f"{sender} → {recipient}"
    return meta_of(row).get("span_name") or str(row.get("event_type") or "?")


def message_text(content: Any) -> str:
    """A one-line view of a message's recorded content (text, tool calls, tool results)."""
    if not isinstance(content, list):
        return "" if content is None else str(content)
    pieces = []
    for part in content:
        if not isinstance(part, dict):
            pieces.append(str(part))
        elif part.get("type") == "tool_call":
            arguments = part.get("arguments")
            arguments = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, (dict, list)) else arguments
            pieces.append(f"call {part.get('name')}({shorten(arguments or '', 40)})")
        elif part.get("type") == "tool_call_response":
            pieces.append(f"result: {part.get('response')}")
        else:
            pieces.append(str(part.get("content") if part.get("content") is not None else ""))
    return " | ".join(piece for piece in pieces if piece)


def row_message_text(row: Mapping[str, Any]) -> str:
    inputs = row.get("inputs") if isinstance(row.get("inputs"), dict) else {}
    return message_text(inputs.get("content"))


def llm_tokens(row: Mapping[str, Any]) -> tuple[Any, Any]:
    meta = meta_of(row)
    return meta.get(semconv.GEN_AI_USAGE_INPUT_TOKENS), meta.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)


# --- runs ---------------------------------------------------------------------------------------------
_RUN_COLUMNS = (("run", "left"), ("name", "left"), ("started", "left"), ("duration", "right"), ("status", "left"),
                ("events", "right"), ("agents", "left"), ("tokens in / out", "right"), ("cost", "right"))


def runs_table(found: Sequence[Mapping[str, Any]], title: str) -> Table:
    shorts = short_ids([r["run_id"] for r in found])
    table = Table(title=Text(title), title_justify="left", box=None, pad_edge=False, header_style="bold")
    for column, justify in _RUN_COLUMNS:
        table.add_column(column, justify=justify, no_wrap=column in ("run", "started", "duration", "status"))
    for run in found:
        table.add_row(
            Text(shorts[run["run_id"]], style="cyan"),
            Text(shorten(run.get("name") or "", 40)),
            Text(fmt_time(run.get("started_at"))),
            Text(fmt_duration(run.get("duration_ms")) + ("+" if run.get("live") else "")),
            run_status_text(run),
            Text(str(run.get("events", 0))),
            Text(shorten(", ".join(run.get("agents") or []), 48)),
            Text(fmt_tokens(run.get("input_tokens"), run.get("output_tokens"))),
            Text(fmt_cost(run.get("cost"), run.get("llm_calls", 1))),
        )
    return table


def run_header(summary: Mapping[str, Any]) -> Text:
    """Two lines: which run (id, name, status), then its figures (duration, events, trace id)."""
    header = Text()
    header.append("run ", style="bold")
    header.append(str(summary["run_id"]), style="bold cyan")
    if summary.get("name"):
        header.append(f"  {summary['name']}")
    header.append("  ")
    header.append_text(run_status_text(summary))
    header.append(f"\n{fmt_duration(summary.get('duration_ms'))}  {summary.get('events', 0)} events", style="dim")
    if summary.get("trace_id"):
        header.append(f"  trace {summary['trace_id']}", style="dim")
    return header


# --- tree ---------------------------------------------------------------------------------------------
def _message_label(row: Mapping[str, Any], label: Text) -> Text:
    label.append("message ", style=TYPE_STYLES["message"])
    label.append(event_name(row))
    snippet = row_message_text(row)
    if snippet:
        label.append(f"  {shorten(snippet, 70)}", style="dim italic")
    return label


def tree_label(row: Mapping[str, Any]) -> Text:
    event_type = row_kind(row)
    label = Text()
    label.append(f"#{row.get('execution_order')} ", style="dim")
    if event_type == "message":
        return _message_label(row, label)
    label.append(event_type, style=TYPE_STYLES.get(event_type, ""))
    name = event_name(row)
    first, _, rest = name.partition(" ")
    label.append(f" {rest if first == event_type and rest else name}", style="bold")  # "step fit": "fit"
    agent = row.get("agent_name")
    if agent and not name.endswith(str(agent)):
        label.append(f" · {agent}", style="cyan")
    tokens_in, tokens_out = llm_tokens(row)
    if event_type == semconv.EVENT_LLM_CALL and (tokens_in or tokens_out):
        label.append(f"  {tokens_in or 0}→{tokens_out or 0} tok", style="dim")
    status = row.get("status")
    if status == STATUS_RUNNING:
        label.append("  ")
        label.append_text(status_text(status))
    else:
        label.append(f"  {fmt_duration(row.get('duration_ms'))}", style="dim")
        if status in (STATUS_FAILED, STATUS_INTERRUPTED):
            label.append("  ")
            label.append_text(status_text(status, row.get("error_message")))
    return label


def _count(nodes: list[dict[str, Any]], messages: bool) -> int:
    return sum((messages or not is_message(n["event"])) + _count(n["children"], messages) for n in nodes)


def add_nodes(parent: Tree, nodes: list[dict[str, Any]], messages: bool, max_depth: int | None, level: int = 0) -> None:
    for node in nodes:
        row = node["event"]
        if not messages and is_message(row):
            continue
        branch = parent.add(tree_label(row))
        if max_depth is not None and level + 1 >= max_depth:
            hidden = _count(node["children"], messages)
            if hidden:
                branch.add(Text(f"… {hidden} more", style="dim"))
            continue
        add_nodes(branch, node["children"], messages, max_depth, level + 1)


def event_tree(summary: Mapping[str, Any], roots: list[dict[str, Any]], *, messages: bool = True,
               max_depth: int | None = None) -> Tree:
    tree = Tree(run_header(summary), guide_style="dim")
    add_nodes(tree, roots, messages, max_depth)
    return tree


# --- events -------------------------------------------------------------------------------------------
def events_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """One line per row; long cells are cut (``…``) so the name keeps its room and nothing wraps."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("depth", justify="right", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("agent", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("name", no_wrap=True, min_width=24, ratio=1, overflow="ellipsis")
    table.add_column("status", no_wrap=True, max_width=34, overflow="ellipsis")
    table.add_column("started", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    for row in rows:
        event_type = row_kind(row)
        tokens = fmt_tokens(*llm_tokens(row)) if event_type == semconv.EVENT_LLM_CALL else ""
        status = row.get("status")
        table.add_row(
            Text(str(row.get("execution_order"))),
            Text(str(row.get("depth"))),
            Text(event_type, style=TYPE_STYLES.get(event_type, "")),
            Text(str(row.get("agent_name") or "")),
            Text(shorten(event_name(row), 60)),
            status_text(status, row.get("error_message"), error_limit=22),
            Text(fmt_time(row.get("started_at") or row.get("timestamp"), millis=True)),
            Text(fmt_duration(row.get("duration_ms")) if status != STATUS_RUNNING else "live"),
            Text(tokens),
        )
    return table
