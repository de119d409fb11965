"""A run's rows as the waterfall draws them: a few columns, one indexed query, no JSON column decoded.

A 100,000-row run as every column (``store.run_events``) is ~48 MB of JSON that takes seconds to encode and
parse; what a waterfall row shows (ids, parent, order, depth, kind, agent, name, status, times, usage) is a
tenth of that and comes out of SQL directly: names and usage are read from the JSON columns by the database
(``json_extract`` / ``->>``), times as epoch milliseconds. A span's other fields (inputs, outputs, meta) are
read on demand, one event at a time (:func:`event_details`).

    {"run": run_key, "base": epoch ms of the first row, "count": n, "strings": ["run", "completed", ...],
     "id": [...], "parent": [index into id | parent id outside the run | null], "order": [...], "depth": [...],
     "kind": [string index], "status": [string index], "agent": [string index | null], "name": [string index],
     "start": [ms after base], "end": [ms after base | null], "duration": [duration_ms | null],
     "usage": [[row index, input tokens, output tokens, cost], ...] (finished llm_call rows only),
     "trace_id": the root row's trace id}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..pipeline import semconv
from .encoding import decode_row
from .liveness import mark_interrupted
from .reading import RunNotFoundError, StoreError, TableShape, describe, first_line, json_text, shape, where_run_indexed
from .schema import MESSAGE_EVENT_TYPE, MESSAGE_KIND, STATUS_COMPLETED, STATUS_RUNNING, SUBTYPE_MESSAGE

MAX_DETAIL_MESSAGES = 300  # messages sent during a span returned with its details (the page lists as many)
_USAGE_KEYS = (semconv.GEN_AI_USAGE_INPUT_TOKENS, semconv.GEN_AI_USAGE_OUTPUT_TOKENS, semconv.GEN_AI_USAGE_COST)


def _epoch_ms(engine: Engine, column: Any) -> Any:
    """A time column as whole epoch milliseconds, truncated as the page's ``Date.parse`` truncates, computed by
    the database: parsing 200,000 datetimes in Python costs more than the rest of a 100,000-row request."""
    if engine.dialect.name == "sqlite":  # SQLAlchemy's text, "YYYY-MM-DD HH:MM:SS.ffffff" (julianday() rounds)
        seconds = sa.cast(sa.func.strftime("%s", sa.func.substr(column, 1, 19)), sa.BigInteger)
        return seconds * 1000 + sa.cast(sa.func.substr(column, 21, 3), sa.Integer)
    return sa.cast(sa.func.floor(sa.extract("epoch", column) * 1000), sa.BigInteger)


def _statement(engine: Engine, table_shape: TableShape, run_key: str) -> Any:
    c, meta = table_shape.table.c, table_shape.meta
    inputs = c.inputs if "inputs" in c else None
    message = sa.and_(c.event_type == MESSAGE_EVENT_TYPE, c.event_subtype == SUBTYPE_MESSAGE)
    llm = c.event_type == semconv.EVENT_LLM_CALL
    columns = [
        c.id, c.parent_event_id, c.execution_order, c.depth, c.event_type, c.event_subtype,
        c.status if table_shape.has_status else sa.literal(STATUS_COMPLETED), c.agent_name,
        _epoch_ms(engine, sa.func.coalesce(c.started_at, c.timestamp)), _epoch_ms(engine, c.completed_at), c.duration_ms,
        json_text(engine, meta, "span_name", sa.not_(message)),
        json_text(engine, inputs, "sender", message), json_text(engine, inputs, "recipient", message),
        *(json_text(engine, meta, key, llm) for key in _USAGE_KEYS),
        c.trace_id if table_shape.has_links else json_text(engine, meta, "trace_id", c.execution_order <= 1),
    ]
    return table_shape.ordered(sa.select(*columns).where(where_run_indexed(engine, table_shape, run_key)))


def _number(text: Any) -> float | int:
    try:
        number = float(text)
    except (TypeError, ValueError):
        return 0
    return int(number) if number.is_integer() else number


def _interned(values: Iterable[Any], strings: dict[Any, int | None]) -> list[int | None]:
    """Each value as its index in ``strings`` (insertion-ordered; ``None`` stays ``None``)."""
    return [strings.setdefault(value, len(strings) - 1) for value in values]


def _offsets(values: Iterable[int | None], base: int) -> list[int | None]:
    return [None if value is None else value - base for value in values]


def _names(event_types: tuple, message: list[bool], span_names: tuple, senders: tuple, recipients: tuple,
           agents: tuple) -> list[str]:
    """What the page labels a row with: ``message sender → recipient``, else the span's name."""
    out = []
    for is_message, event_type, span_name, sender, recipient, agent in zip(
            message, event_types, span_names, senders, recipients, agents):
        if is_message:
            to = recipient or agent
            out.append(f"message {sender or '?'}" + (f" → {to}" if to else ""))
        else:
            out.append(str(span_name or event_type or "event"))
    return out


def _build(run_key: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The response from the rows, column by column (transposed in C; no object per row)."""
    strings: dict[Any, int | None] = {None: None}
    out: dict[str, Any] = {"run": run_key, "base": None, "count": len(rows), "strings": [], "trace_id": None}
    if not rows:
        return {**out, **{name: [] for name in _COLUMN_NAMES}}
    (ids, parents, orders, depths, event_types, subtypes, statuses, agents, starts, ends, durations, span_names,
     senders, recipients, tokens_in, tokens_out, costs, trace_ids) = zip(*rows)
    message = [t == MESSAGE_EVENT_TYPE and s == SUBTYPE_MESSAGE for t, s in zip(event_types, subtypes)]
    kinds = [MESSAGE_KIND if m else (t or "info") for m, t in zip(message, event_types)]
    base = next((ms for ms in starts if ms is not None), 0)
    index = {row_id: i for i, row_id in reversed(list(enumerate(ids)))}
    status_texts = [status or STATUS_COMPLETED for status in statuses]
    out.update(
        base=base, id=list(ids), parent=[index.get(parent, parent) for parent in parents],
        order=[order or 0 for order in orders], depth=[depth or 0 for depth in depths],
        kind=_interned(kinds, strings), status=_interned(status_texts, strings),
        agent=_interned((agent or None for agent in agents), strings),
        name=_interned(_names(event_types, message, span_names, senders, recipients, agents), strings),
        start=[0 if start is None else start - base for start in starts], end=_offsets(ends, base),
        duration=list(durations),
        usage=[[i, _number(tokens_in[i]), _number(tokens_out[i]), _number(costs[i])]
               for i, kind in enumerate(kinds) if kind == semconv.EVENT_LLM_CALL and status_texts[i] != STATUS_RUNNING],
        trace_id=next((trace_id for trace_id in trace_ids if trace_id), None),
    )
    out["strings"] = list(strings)[1:]
    return out


_COLUMN_NAMES = ("id", "parent", "order", "depth", "kind", "status", "agent", "name", "start", "end", "duration",
                 "usage")


def _all_rows(engine: Engine, statement: Any) -> list[tuple[Any, ...]]:
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(statement)]
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None


def run_columns(engine: Engine, run_key: str, *, table: str | sa.Table | None = None) -> dict[str, Any]:
    """A resolved run's rows in ``execution_order`` as columns (see the module docstring); rows still
    ``running`` whose writer is gone come out ``interrupted``, as in ``store.run_events``."""
    table_shape = shape(engine, table)
    out = _build(run_key, _all_rows(engine, _statement(engine, table_shape, run_key)))
    running = [i for i, status in enumerate(out["status"]) if out["strings"][status] == STATUS_RUNNING]
    if running:
        _mark_interrupted(engine, table_shape, out, running)
    return out


def _mark_interrupted(engine: Engine, table_shape: TableShape, out: dict[str, Any], running: list[int]) -> None:
    """The running rows whose writer is gone, as :func:`mark_interrupted` shows them."""
    ids = [out["id"][i] for i in running]
    c = table_shape.table.c
    rows = []
    for start in range(0, len(ids), 500):
        rows.extend(_decoded(engine, sa.select(table_shape.table).where(c.id.in_(ids[start:start + 500]))))
    strings: dict[Any, int | None] = {None: None, **{text: i for i, text in enumerate(out["strings"])}}
    where = {row_id: i for i, row_id in zip(running, ids)}
    for row in mark_interrupted(engine, rows, table=table_shape.table):
        if row.get("status") == STATUS_RUNNING:
            continue
        i = where[row["id"]]
        (out["status"][i],) = _interned([row["status"]], strings)
        end = row.get("completed_at")
        out["end"][i] = None if end is None else int(end.timestamp() * 1000) - (out["base"] or 0)
        out["duration"][i] = row.get("duration_ms")
    out["strings"] = list(strings)[1:]


def event_details(engine: Engine, event_id: str, *, table: str | sa.Table | None = None) -> dict[str, Any]:
    """One row with every column (as ``store.run_events`` returns it) plus the message rows sent during it
    (``messages``, in order, at most :data:`MAX_DETAIL_MESSAGES`; ``message_count`` all of them)."""
    table_shape = shape(engine, table)
    c = table_shape.table.c
    found = _decoded(engine, sa.select(table_shape.table).where(c.id == event_id))
    if not found:
        raise RunNotFoundError(f"no event {event_id!r} in {describe(engine)}", event_id)
    is_message = sa.and_(c.event_type == MESSAGE_EVENT_TYPE, c.event_subtype == SUBTYPE_MESSAGE)
    children = sa.select(table_shape.table).where(c.parent_event_id == event_id, is_message)
    messages = _decoded(engine, table_shape.ordered(children).limit(MAX_DETAIL_MESSAGES))
    mark_interrupted(engine, found, table=table_shape.table)
    count = len(messages)
    if count == MAX_DETAIL_MESSAGES:
        counting = sa.select(sa.func.count()).where(c.parent_event_id == event_id, is_message)
        count = int(_scalar(engine, counting))
    return {"event": found[0], "messages": messages, "message_count": count}


def _decoded(engine: Engine, statement: Any) -> list[dict[str, Any]]:
    try:
        with engine.connect() as connection:
            rows = [decode_row(row._mapping) for row in connection.execute(statement)]
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None
    return rows


def _scalar(engine: Engine, statement: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(statement).scalar()


def strings_of(columns: dict[str, Any], name: str) -> Iterable[Any]:
    """A string column's values (tests, and readers of the format)."""
    strings = columns["strings"]
    return [None if index is None else strings[index] for index in columns[name]]
