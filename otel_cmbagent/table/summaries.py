"""Run summaries: one record per run from a few grouped queries (never a scan of every row in Python)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..pipeline import semconv
from .encoding import decode_row, utc
from .liveness import duration_ms, gone_runs
from .reading import TableShape, execute, json_text
from .schema import STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING, STATUSES

_USAGE = (("input_tokens", semconv.GEN_AI_USAGE_INPUT_TOKENS), ("output_tokens", semconv.GEN_AI_USAGE_OUTPUT_TOKENS),
          ("cost", semconv.GEN_AI_USAGE_COST))


def groups_statement(shape: TableShape) -> Any:
    """``(run_key, events, first_seen, last_seen)`` per run."""
    c = shape.table.c
    return (
        sa.select(
            shape.key.label("run_key"),
            sa.func.count().label("events"),
            sa.func.min(c.timestamp).label("first_seen"),
            sa.func.max(sa.func.coalesce(c.completed_at, c.timestamp)).label("last_seen"),
        )
        .where(shape.key.is_not(None))
        .group_by(shape.key)
    )


def _roots(engine: Engine, shape: TableShape, keys: list[Any]) -> dict[str, dict[str, Any]]:
    """The root row of each run: depth 0, a "run" row preferred, then the first one."""
    c = shape.table.c
    meta = shape.meta if shape.meta is not None else sa.null()
    columns = [shape.key.label("run_key"), c.id, c.session_id, c.event_type, c.status, c.started_at, c.timestamp,
               c.completed_at, c.duration_ms, c.execution_order, meta.label("meta")]
    if shape.has_links:
        columns.append(c.trace_id)
    roots: dict[str, dict[str, Any]] = {}
    statement = sa.select(*columns).where(shape.where_runs(keys), c.depth == 0).order_by(c.execution_order)
    for row in execute(engine, statement):
        record = decode_row(row._mapping)
        current = roots.get(record["run_key"])
        if current is None or (current.get("event_type") != semconv.EVENT_RUN and record.get("event_type") == semconv.EVENT_RUN):
            roots[record["run_key"]] = record
    return roots


def _agents(engine: Engine, shape: TableShape, keys: list[Any]) -> dict[str, list[str]]:
    c = shape.table.c
    agents: dict[str, list[str]] = {}
    statement = (
        sa.select(shape.key.label("run_key"), c.agent_name, sa.func.min(c.execution_order).label("first_order"))
        .where(shape.where_runs(keys), c.agent_name.is_not(None))
        .group_by(shape.key, c.agent_name)
        .order_by("first_order")
    )
    for run_key, agent, _first in execute(engine, statement):
        agents.setdefault(run_key, []).append(agent)
    return agents


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value) if any(ch in value for ch in ".eE") else int(value)
        except ValueError:
            return None
    return None


def _usage(engine: Engine, shape: TableShape, keys: list[Any]) -> dict[str, dict[str, Any]]:
    """Tokens, cost and calls summed over each run's ``llm_call`` rows (per call, never cumulative)."""
    usage = {k: {"input_tokens": 0, "output_tokens": 0, "cost": 0.0, "llm_calls": 0} for k in keys}
    if shape.meta is None:
        return usage
    values = [json_text(engine, shape.meta, attribute) for _name, attribute in _USAGE]  # read by the database
    statement = sa.select(shape.key.label("run_key"), *values).where(
        shape.where_runs(keys), shape.table.c.event_type == semconv.EVENT_LLM_CALL)
    for run_key, *texts in execute(engine, statement):
        totals = usage[run_key]
        totals["llm_calls"] += 1
        for (name, _attribute), text in zip(_USAGE, texts):
            number = _number(text)
            if number is not None:
                totals[name] += number
    return usage


def _status_counts(engine: Engine, shape: TableShape, keys: list[Any]) -> dict[str, dict[str, int]]:
    """Rows per status of each run (a run whose root row is not in the table yet still gets a status)."""
    counts: dict[str, dict[str, int]] = {}
    c = shape.table.c
    statement = sa.select(shape.key.label("run_key"), c.status, sa.func.count()).where(
        shape.where_runs(keys)).group_by(shape.key, c.status)
    for run_key, status, count in execute(engine, statement):
        counts.setdefault(run_key, {})[status] = int(count)
    return counts


def _status(root: dict[str, Any], seen: dict[str, int]) -> str:
    status = root.get("status")
    if status in STATUSES:
        return status
    if STATUS_RUNNING in seen:
        return STATUS_RUNNING
    return STATUS_FAILED if STATUS_FAILED in seen else STATUS_COMPLETED


def _summary(group: Any, root: dict[str, Any], seen: dict[str, int], gone: dict[str, Any], now: datetime,
             extra: dict[str, Any]) -> dict[str, Any]:
    run_key, count, first, last = group
    meta = root.get("meta") if isinstance(root.get("meta"), dict) else {}
    status = _status(root, seen)
    started, last = utc(root.get("started_at") or root.get("timestamp") or first), utc(last)
    if status == STATUS_RUNNING and run_key in gone:  # its writer died (SIGKILL): no longer live
        status, last = STATUS_INTERRUPTED, max(filter(None, [last, gone[run_key]]), default=last)
    duration = root.get("duration_ms") if status != STATUS_RUNNING else None
    if duration is None and isinstance(started, datetime):
        end = now if status == STATUS_RUNNING else (last if isinstance(last, datetime) else started)
        duration = duration_ms(started, end)
    return {
        "run_id": run_key,
        "session_id": root.get("session_id"),
        "name": meta.get("span_name"),
        "started_at": started,
        "last_event_at": last,
        "duration_ms": duration,
        "status": status,
        "live": status == STATUS_RUNNING,
        "events": int(count),
        "failed_events": seen.get(STATUS_FAILED, 0),
        **extra,
        "trace_id": root.get("trace_id") or meta.get("trace_id"),
    }


def summaries(engine: Engine, shape: TableShape, groups: list[Any], *, figures: bool = True) -> list[dict[str, Any]]:
    """Run summaries for ``(key, count, first, last)`` groups, in the given order; without ``figures`` no
    ``agents`` and usage (two scans of a run's rows less: a terminal header needs neither)."""
    if not groups:
        return []
    keys = [group[0] for group in groups]
    roots = _roots(engine, shape, keys)
    agents = _agents(engine, shape, keys) if figures else {}
    usage = _usage(engine, shape, keys) if figures else {k: {} for k in keys}
    counts = _status_counts(engine, shape, keys)
    gone = gone_runs(engine, shape, [k for k in keys if STATUS_RUNNING in counts.get(k, {})])
    now = datetime.now(timezone.utc)
    out = []
    for group in groups:
        run_key = group[0]
        extra = {"agents": agents.get(run_key, []), **usage[run_key]}
        out.append(_summary(group, roots.get(run_key, {}), counts.get(run_key, {}), gone, now, extra))
    return out
