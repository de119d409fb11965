"""A run's rows as the waterfall draws them: a few columns, encoded as JSON by the database, no JSON column decoded.

A 100,000-row run as every column (``store.run_events``) is ~48 MB of JSON that takes seconds to encode and
parse. What a waterfall row shows (id, parent, order, depth, kind, status, agent, name, times, usage) comes out
of one indexed query, each column already a JSON array (``json_group_array`` / ``json_agg``): names and usage
are read from the JSON columns by the database, times as epoch milliseconds, and not one Python object is made
per row (that cost more than the query). A span's other fields (inputs, outputs, meta) are read on demand,
one event at a time (:func:`event_details`).

    {"run": run_key, "base": epoch ms of the first row, "count": n, "trace_id": the first row's trace id,
     "id": [...], "parent": [parent_event_id | null], "order": [...],
     "depth": [...], "kind": [...], "status": [...], "agent": [... | null], "name": ["message a → b", span name],
     "start": [ms after base], "end": [ms after base | null], "duration": [duration_ms | null],
     "usage": [[execution_order, input tokens, output tokens, cost], ...] (finished llm_call rows only)}

Usage names its row by ``execution_order`` (gapless and unique in a run); parents are ids, as the page's live
rows have them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..pipeline import semconv
from .encoding import decode_row
from .liveness import mark_interrupted
from .reading import RunNotFoundError, TableShape, as_jsonb, describe, execute, json_text, keyed_by_run_id, shape
from .schema import MESSAGE_KIND, STATUS_COMPLETED, STATUS_RUNNING, is_message_column

MAX_DETAIL_MESSAGES = 300  # messages sent during a span returned with its details (the page lists as many)
_USAGE_KEYS = (semconv.GEN_AI_USAGE_INPUT_TOKENS, semconv.GEN_AI_USAGE_OUTPUT_TOKENS, semconv.GEN_AI_USAGE_COST)
COLUMN_NAMES = ("id", "parent", "order", "depth", "kind", "status", "agent", "name", "start", "end", "duration")
_UNIX_EPOCH_JULIAN_DAY = 2440587.5


def _epoch_ms(engine: Engine, column: Any) -> Any:
    """A time column as whole epoch milliseconds, truncated as the page's ``Date.parse`` truncates, computed by
    the database: parsing 200,000 datetimes in Python costs more than the rest of a 100,000-row request."""
    if engine.dialect.name == "sqlite":  # SQLAlchemy's text, "YYYY-MM-DD HH:MM:SS.ffffff"
        # whole seconds from julianday() rounded (exact for whole seconds, and faster than strftime('%s')), then
        # the milliseconds as written (julianday() of the full value would round them)
        days = sa.func.julianday(sa.func.substr(column, 1, 19)) - _UNIX_EPOCH_JULIAN_DAY
        seconds = sa.cast(sa.func.round(days * 86400), sa.BigInteger)
        return seconds * 1000 + sa.cast(sa.func.substr(column, 21, 3), sa.Integer)
    return sa.cast(sa.func.floor(sa.extract("epoch", column) * 1000), sa.BigInteger)


def _start_ms(engine: Engine, c: Any) -> Any:
    return _epoch_ms(engine, sa.func.coalesce(c.started_at, c.timestamp))


def _text(value: Any) -> Any:
    """``value`` as SQL text ('' as NULL), so ``||`` and ``coalesce`` compose it."""
    return sa.func.nullif(sa.type_coerce(value, sa.String), "")


def _json_value(engine: Engine, column: Any, key: str) -> Any:
    """``column[key]`` as the JSON value it is (a number stays a number), for a JSON array built by the database."""
    if column is None:
        return sa.null()
    if engine.dialect.name == "postgresql":
        document = as_jsonb(column)
        return document.op("->", return_type=document.type)(sa.literal(key, sa.Text))
    return sa.func.json_extract(column, f'$."{key}"')


def _name(engine: Engine, table_shape: TableShape, c: Any, message: Any) -> Any:
    """What the page labels a row with, composed by the database: ``message sender → recipient`` (the agent
    when there is no recipient), else the span's name (else the event type, else "event")."""
    meta = c[table_shape.meta.name] if table_shape.meta is not None else None
    inputs = c.inputs if "inputs" in c else None
    sender = _text(json_text(engine, inputs, "sender"))
    recipient = _text(json_text(engine, inputs, "recipient"))
    to = sa.func.coalesce(sa.literal(" → ", sa.String) + sa.func.coalesce(recipient, _text(c.agent_name)), "")
    labelled = sa.literal("message ", sa.String) + sa.func.coalesce(sender, "?") + to
    named = sa.func.coalesce(_text(json_text(engine, meta, "span_name")), _text(c.event_type), "event")
    return sa.cast(sa.case((message, labelled), else_=named), sa.String)


def _run_filter(engine: Engine, table_shape: TableShape, run_key: str) -> Callable[[Any], Any]:
    """The condition for the run's rows, for any alias of the table (``run_id = ?`` where it applies: indexed)."""
    if keyed_by_run_id(engine, table_shape, run_key):
        return lambda alias: alias.c.run_id == run_key
    return lambda alias: TableShape(alias).where_run(run_key)


def _rows(engine: Engine, table_shape: TableShape, in_run: Callable[[Any], Any], base: Any) -> Any:
    """The run's rows in order, every value as the page shows it (a subquery the aggregates read; on PostgreSQL
    with its position, which ``json_agg`` orders by)."""
    e = table_shape.table.alias("e")
    message = is_message_column(e.c)
    status = sa.func.coalesce(_text(e.c.status), STATUS_COMPLETED) if table_shape.has_status \
        else sa.literal(STATUS_COMPLETED)
    meta = e.c[table_shape.meta.name] if table_shape.meta is not None else None
    usage = sa.case((sa.and_(e.c.event_type == semconv.EVENT_LLM_CALL, status != STATUS_RUNNING),
                     _json_array(engine, e.c.execution_order, *(_json_value(engine, meta, k) for k in _USAGE_KEYS))))
    order_by = (e.c.execution_order, e.c.timestamp, e.c.id)
    position = [sa.func.row_number().over(order_by=order_by).label("position")] \
        if engine.dialect.name == "postgresql" else []
    statement = sa.select(
        e.c.id.label("id"), e.c.parent_event_id.label("parent"),
        sa.func.coalesce(e.c.execution_order, 0).label("order"), sa.func.coalesce(e.c.depth, 0).label("depth"),
        sa.case((message, MESSAGE_KIND), else_=sa.func.coalesce(_text(e.c.event_type), "info")).label("kind"),
        status.label("status"), _text(e.c.agent_name).label("agent"), _name(engine, table_shape, e.c, message).label("name"),
        sa.func.coalesce(_start_ms(engine, e.c) - base, 0).label("start"),
        (_epoch_ms(engine, e.c.completed_at) - base).label("end"), e.c.duration_ms.label("duration"),
        usage.label("usage"), *position,
    ).where(in_run(e))
    return statement.order_by(*order_by).subquery("rows")


def _first_row(table_shape: TableShape, in_run: Any, name: str, value: Any, where: Any = None) -> Any:
    """``value(columns)`` of the run's first row (in order; with ``where``, of the first row matching it), as a
    scalar subquery the database evaluates once."""
    first = table_shape.table.alias(f"first_{name}")
    condition = in_run(first) if where is None else sa.and_(in_run(first), where(first.c))
    return TableShape(first).ordered(sa.select(value(first.c)).where(condition)).limit(1).scalar_subquery()


def _json_array(engine: Engine, *values: Any) -> Any:
    return sa.func.json_build_array(*values) if engine.dialect.name == "postgresql" else sa.func.json_array(*values)


def _aggregate(engine: Engine, rows: Any, value: Any, where: Any = None) -> Any:
    """``value`` of every row (``where`` given: of those rows) as one JSON array, in the rows' order."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import aggregate_order_by

        aggregated = sa.func.json_agg(aggregate_order_by(value, rows.c.position))
        # as text: the driver would decode a 100,000-element array only for it to be encoded again
        return sa.cast(aggregated if where is None else aggregated.filter(where), sa.Text)
    aggregated = sa.func.json_group_array(value)  # SQLite aggregates in the order the (ordered) subquery yields
    return aggregated if where is None else aggregated.filter(where)


def _statement(engine: Engine, table_shape: TableShape, run_key: str) -> Any:
    """One row: the count, base, trace id, running ids, usage and every column as JSON text."""
    in_run = _run_filter(engine, table_shape, run_key)
    base = _first_row(table_shape, in_run, "base", lambda c: _start_ms(engine, c))
    rows = _rows(engine, table_shape, in_run, base)
    # SQLite: a subquery's value lost its JSON subtype, so the usage arrays are parsed again (else quoted)
    usage = rows.c.usage if engine.dialect.name == "postgresql" else sa.func.json(rows.c.usage)
    meta_name = None if table_shape.meta is None else table_shape.meta.name
    trace = (lambda c: c.trace_id) if table_shape.has_links else \
        (lambda c: json_text(engine, None if meta_name is None else c[meta_name], "trace_id"))
    trace_id = _first_row(table_shape, in_run, "trace", trace, lambda c: sa.func.coalesce(trace(c), "") != "")
    return sa.select(
        sa.func.count(), base, trace_id,
        _aggregate(engine, rows, rows.c.id, rows.c.status == STATUS_RUNNING),
        _aggregate(engine, rows, usage, rows.c.usage.is_not(None)),
        *(_aggregate(engine, rows, rows.c[name]) for name in COLUMN_NAMES),
    )


def _patch_interrupted(engine: Engine, table_shape: TableShape, arrays: dict[str, str], base: int,
                       running_ids: list[str]) -> None:
    """The running rows whose writer is gone, as :func:`mark_interrupted` shows them (decoded and encoded again:
    only when a run has such rows)."""
    c = table_shape.table.c
    rows = []
    for start in range(0, len(running_ids), 500):
        rows.extend(_decoded(engine, sa.select(table_shape.table).where(c.id.in_(running_ids[start:start + 500]))))
    changed = [row for row in mark_interrupted(engine, rows, table=table_shape.table)
               if row.get("status") != STATUS_RUNNING]
    if not changed:
        return
    columns = {name: json.loads(arrays[name]) for name in ("id", "status", "end", "duration")}
    where = {row_id: i for i, row_id in enumerate(columns["id"])}
    for row in changed:
        i = where[row["id"]]
        end = row.get("completed_at")
        columns["status"][i] = row["status"]
        columns["end"][i] = None if end is None else int(end.timestamp() * 1000) - base
        columns["duration"][i] = row.get("duration_ms")
    for name in ("status", "end", "duration"):
        arrays[name] = json.dumps(columns[name], separators=(",", ":"))


def run_columns_json(engine: Engine, run_key: str, *, table: str | sa.Table | None = None) -> str:
    """A resolved run's rows in ``execution_order`` as columns (the module docstring's JSON text); rows still
    ``running`` whose writer is gone come out ``interrupted``, as in ``store.run_events``."""
    table_shape = shape(engine, table)
    (count, base, trace_id, running, usage, *arrays), = execute(engine, _statement(engine, table_shape, run_key))
    columns = {name: _text_of(value) for name, value in zip(COLUMN_NAMES, arrays)}
    if running and running != "[]":
        _patch_interrupted(engine, table_shape, columns, base or 0, json.loads(_text_of(running)))
    head = json.dumps({"run": run_key, "base": base if count else None, "count": count, "trace_id": trace_id},
                      ensure_ascii=False)
    body = ",".join(f'"{name}":{text}' for name, text in (*columns.items(), ("usage", _text_of(usage))))
    return head[:-1] + "," + body + "}"


def _text_of(value: Any) -> str:
    """An aggregate's JSON as text (``[]`` for none: PostgreSQL's ``json_agg`` of no rows is NULL)."""
    if value is None:
        return "[]"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def run_columns(engine: Engine, run_key: str, *, table: str | sa.Table | None = None) -> dict[str, Any]:
    """:func:`run_columns_json` decoded (tests, and readers of the format)."""
    return json.loads(run_columns_json(engine, run_key, table=table))


def event_details(engine: Engine, event_id: str, *, table: str | sa.Table | None = None) -> dict[str, Any]:
    """One row with every column (as ``store.run_events`` returns it) plus the message rows sent during it
    (``messages``, in order, at most :data:`MAX_DETAIL_MESSAGES`; ``message_count`` all of them)."""
    table_shape = shape(engine, table)
    c = table_shape.table.c
    found = _decoded(engine, sa.select(table_shape.table).where(c.id == event_id))
    if not found:
        raise RunNotFoundError(f"no event {event_id!r} in {describe(engine)}", event_id)
    is_message = is_message_column(c)
    children = sa.select(table_shape.table).where(c.parent_event_id == event_id, is_message)
    messages = _decoded(engine, table_shape.ordered(children).limit(MAX_DETAIL_MESSAGES))
    mark_interrupted(engine, found, table=table_shape.table)
    count = len(messages)
    if count == MAX_DETAIL_MESSAGES:
        counting = sa.select(sa.func.count()).where(c.parent_event_id == event_id, is_message)
        count = int(execute(engine, counting)[0][0])
    return {"event": found[0], "messages": messages, "message_count": count}


def _decoded(engine: Engine, statement: Any) -> list[dict[str, Any]]:
    return [decode_row(row._mapping) for row in execute(engine, statement)]
