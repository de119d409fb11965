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


# --- one-line tables ----------------------------------------------------------------------------------
Column = tuple[str, str, "int | None"]  # header, justify, cap (longest cell shown; None: no cap)


def fitted_table(columns: Sequence[Column], cells: list[list[Text]], width: int, flexible: Sequence[str],
                 title: str | None = None) -> Table:
    """A table of one-line rows within ``width`` columns: every column keeps its natural width (up to its cap)
    and the ``flexible`` ones share what is left (at least 12 each), their long cells cut with ``…``."""
    headers = [header for header, _justify, _cap in columns]
    natural = [min(max([len(header)] + [row[i].cell_len for row in cells]), cap or 10**6)
               for i, (header, _justify, cap) in enumerate(columns)]
    shared = [headers.index(name) for name in flexible]
    fixed = sum(w for i, w in enumerate(natural) if i not in shared) + len(natural) - 1
    room = max(12 * len(shared), width - fixed)
    wanted = sum(natural[i] for i in shared) or 1
    if wanted > room:
        for i in shared:
            natural[i] = max(12, room * natural[i] // wanted)
        widest = max(shared, key=lambda i: natural[i])
        natural[widest] -= max(0, sum(natural[i] for i in shared) - room)
    table = Table(title=Text(title) if title else None, title_justify="left", box=None, pad_edge=False,
                  header_style="bold", padding=(0, 1, 0, 0))
    for (header, justify, _cap), column_width in zip(columns, natural):
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis", width=column_width)
    for row in cells:
        table.add_row(*row)
    return table


_RUN_COLUMNS: tuple[Column, ...] = (("run", "left", None), ("name", "left", None), ("started", "left", None),
                                    ("duration", "right", None), ("status", "left", None), ("events", "right", None),
                                    ("agents", "left", None), ("tokens in / out", "right", None),
                                    ("cost", "right", None))


def _run_cells(run: Mapping[str, Any], short: str) -> list[Text]:
    return [
        Text(short, style="cyan"),
        Text(shorten(run.get("name") or "", 60)),
        Text(fmt_time(run.get("started_at"))),
        Text(fmt_duration(run.get("duration_ms")) + ("+" if run.get("live") else "")),
        run_status_text(run),
        Text(str(run.get("events", 0))),
        Text(", ".join(run.get("agents") or [])),
        Text(fmt_tokens(run.get("input_tokens"), run.get("output_tokens"))),
        Text(fmt_cost(run.get("cost"), run.get("llm_calls", 1))),
    ]


def runs_table(found: Sequence[Mapping[str, Any]], title: str, width: int) -> Table:
    """One line per run; the name and the agents share what the other columns leave."""
    shorts = short_ids([r["run_id"] for r in found])
    cells = [_run_cells(run, shorts[run["run_id"]]) for run in found]
    return fitted_table(_RUN_COLUMNS, cells, width, ("name", "agents"), title)


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
_EVENT_COLUMNS: tuple[Column, ...] = (("#", "right", None), ("depth", "right", None), ("type", "left", None),
                                      ("agent", "left", 14), ("name", "left", None), ("status", "left", 22),
                                      ("started", "left", None), ("duration", "right", None),
                                      ("tokens", "right", None))


def _event_cells(row: Mapping[str, Any]) -> list[Text]:
    event_type = row_kind(row)
    status = row.get("status")
    return [
        Text(str(row.get("execution_order"))),
        Text(str(row.get("depth"))),
        Text(event_type, style=TYPE_STYLES.get(event_type, "")),
        Text(str(row.get("agent_name") or "")),
        Text(" ".join(event_name(row).split())),
        status_text(status, row.get("error_message"), error_limit=10),
        Text(fmt_time(row.get("started_at") or row.get("timestamp"), millis=True)),
        Text(fmt_duration(row.get("duration_ms")) if status != STATUS_RUNNING else "live"),
        Text(fmt_tokens(*llm_tokens(row)) if event_type == semconv.EVENT_LLM_CALL else ""),
    ]


def events_table(rows: Sequence[Mapping[str, Any]], width: int) -> Table:
    """One line per row within ``width`` columns: agent and status are capped (a long error is cut; its full
    text is in ``--json``) and the name gets the rest, cut with ``…``."""
    return fitted_table(_EVENT_COLUMNS, [_event_cells(row) for row in rows], width, ("name",))
