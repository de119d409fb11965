"""``otel-cmbagent timeline``: a terminal waterfall, one line per span, bars on the run's time axis."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from rich.console import Console
from rich.text import Text

from ...table.schema import MESSAGE_KIND, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING, is_message, row_kind
from .render import event_name
from .terminal import STATUS_STYLES, TYPE_STYLES, fmt_duration

_DURATION_WIDTH = 10
_MAX_LABEL = 48


def _start(row: Mapping[str, Any]) -> datetime:
    return row.get("started_at") or row["timestamp"]


def _depth_first(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in tree order: parallel branches stay together under their parent."""
    out: list[dict[str, Any]] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        out.append(node["event"])
        stack.extend(reversed(node["children"]))
    return out


@dataclass
class _Axis:
    """The run's time axis mapped onto ``width`` columns."""

    t0: datetime
    total: float  # seconds
    width: int
    now: datetime

    def end(self, row: Mapping[str, Any]) -> datetime:
        if row.get("completed_at") is not None:
            return row["completed_at"]
        if row.get("status") == STATUS_RUNNING:
            return self.now
        if row.get("duration_ms") is not None:
            return _start(row) + timedelta(milliseconds=row["duration_ms"])
        return _start(row)

    def columns(self, row: Mapping[str, Any]) -> tuple[int, int, bool]:
        """First column, number of cells, and whether the bar is shorter than half a cell."""
        start = (_start(row) - self.t0).total_seconds() / self.total * self.width
        end = (self.end(row) - self.t0).total_seconds() / self.total * self.width
        col0 = min(max(int(start), 0), self.width - 1)
        col1 = min(max(int(round(end)), col0 + 1), self.width)
        return col0, col1 - col0, (end - start) < 0.5 and col1 - col0 == 1


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    min_depth = min((r.get("depth") or 0) for r in rows)
    labels = []
    for row in rows:
        indent = "  " * max(0, (row.get("depth") or 0) - min_depth)
        text = event_name(row) if not is_message(row) else f"✉ {event_name(row)}"
        labels.append(indent + " ".join(text.split()))
    return labels


def _axis_lines(label_width: int, axis: _Axis) -> Iterator[Text]:
    top = Text(" " * (label_width + 1))
    right = fmt_duration(int(axis.total * 1000))
    top.append("0" + " " * max(1, axis.width - 1 - len(right)) + right, style="dim")
    yield top
    line = Text(" " * (label_width + 1))
    line.append("├" + "─" * max(0, axis.width - 2) + "┤", style="dim")
    yield line


def _bar_line(row: Mapping[str, Any], label: str, label_width: int, axis: _Axis) -> Text:
    kind = row_kind(row)
    style = TYPE_STYLES.get(kind, "white")
    col0, cells, tiny = axis.columns(row)
    line = Text((label if len(label) <= label_width else label[: label_width - 1] + "…").ljust(label_width) + " ")
    if kind == MESSAGE_KIND:
        line.append(" " * col0 + "◆" + " " * (axis.width - col0 - 1), style=style)
        return line
    live = row.get("status") == STATUS_RUNNING
    body = ("▏" if tiny else "█" * cells) if not live else "█" * max(0, cells - 1) + "▸"
    line.append(" " * col0)
    line.append(body, style=style)
    line.append(" " * (axis.width - col0 - cells))
    duration_ms = row.get("duration_ms")
    if duration_ms is None:
        duration_ms = (axis.end(row) - _start(row)).total_seconds() * 1000
    duration = "live" if live else fmt_duration(duration_ms)
    line.append(f" {duration:>{_DURATION_WIDTH - 1}}", style=STATUS_STYLES["running"] if live else "dim")
    if row.get("status") in (STATUS_FAILED, STATUS_INTERRUPTED):
        line.append(" ✗" if row["status"] == STATUS_FAILED else " ⏹", style=STATUS_STYLES[row["status"]])
    return line


def _legend(rows: list[dict[str, Any]], label_width: int) -> Text:
    legend = Text(" " * (label_width + 1))
    for kind in dict.fromkeys(row_kind(row) for row in rows if not is_message(row)):
        legend.append("█ ", style=TYPE_STYLES.get(kind, "white"))
        legend.append(f"{kind}  ", style="dim")
    return legend


def timeline_lines(roots: list[dict[str, Any]], console: Console, width: int | None) -> Iterator[Text]:
    """The waterfall of an event tree (rows without a start time are left out)."""
    rows = [row for row in _depth_first(roots) if isinstance(row.get("started_at") or row.get("timestamp"), datetime)]
    if not rows:
        yield Text("no timed events in this run")
        return
    now = datetime.now(timezone.utc)
    t0 = min(_start(r) for r in rows)
    probe = _Axis(t0, 1.0, 1, now)
    total = max((max(probe.end(r) for r in rows) - t0).total_seconds(), 1e-6)
    labels = _labels(rows)
    label_width = min(max(len(label) for label in labels), _MAX_LABEL)
    axis = _Axis(t0, total, width or max(20, console.width - label_width - _DURATION_WIDTH - 6), now)
    yield from _axis_lines(label_width, axis)
    for row, label in zip(rows, labels):
        yield _bar_line(row, label, label_width, axis)
    yield _legend(rows, label_width)
