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

from collections.abc import Iterable, Sequence
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
    if engine.dialect.name == "sqlite":  # SQLAlchemy's text, "YYYY-MM-DD HH:MM:SS.ffffff"
        # whole seconds from julianday() rounded (exact for whole seconds, and faster than strftime('%s')), then
        # the milliseconds as written (julianday() of the full value would round them)
        days = sa.func.julianday(sa.func.substr(column, 1, 19)) - _UNIX_EPOCH_JULIAN_DAY
        seconds = sa.cast(sa.func.round(days * 86400), sa.BigInteger)
        return seconds * 1000 + sa.cast(sa.func.substr(column, 21, 3), sa.Integer)
    return sa.cast(sa.func.floor(sa.extract("epoch", column) * 1000), sa.BigInteger)


_UNIX_EPOCH_JULIAN_DAY = 2440587.5


def _text(value: Any) -> Any:
    """``value`` as SQL text ('' as NULL), so ``||`` and ``coalesce`` compose it."""
    return sa.func.nullif(sa.type_coerce(value, sa.String), "")


def _name(engine: Engine, table_shape: TableShape, message: Any) -> Any:
    """What the page labels a row with, composed by the database: ``message sender → recipient`` (the agent
    when there is no recipient), else the span's name (else the event type, else "event")."""
    c, meta = table_shape.table.c, table_shape.meta
    inputs = c.inputs if "inputs" in c else None
    sender = _text(json_text(engine, inputs, "sender"))
    recipient = _text(json_text(engine, inputs, "recipient"))
    to = sa.func.coalesce(sa.literal(" → ", sa.String) + sa.func.coalesce(recipient, _text(c.agent_name)), "")
    labelled = sa.literal("message ", sa.String) + sa.func.coalesce(sender, "?") + to
    named = sa.func.coalesce(_text(json_text(engine, meta, "span_name")), _text(c.event_type), "event")
    return sa.cast(sa.case((message, labelled), else_=named), sa.String)


def _statement(engine: Engine, table_shape: TableShape, run_key: str) -> Any:
    """One row per event, every value ready to send: kind, status and name as the page shows them."""
    c, meta = table_shape.table.c, table_shape.meta
    message = sa.and_(c.event_type == MESSAGE_EVENT_TYPE, c.event_subtype == SUBTYPE_MESSAGE)
    llm = c.event_type == semconv.EVENT_LLM_CALL
    status = sa.func.coalesce(_text(c.status), STATUS_COMPLETED) if table_shape.has_status \
        else sa.literal(STATUS_COMPLETED)
    columns = [
        c.id, c.parent_event_id, sa.func.coalesce(c.execution_order, 0), sa.func.coalesce(c.depth, 0),
        sa.case((message, MESSAGE_KIND), else_=sa.func.coalesce(_text(c.event_type), "info")), status,
        _text(c.agent_name), _epoch_ms(engine, sa.func.coalesce(c.started_at, c.timestamp)),
        _epoch_ms(engine, c.completed_at), c.duration_ms, _name(engine, table_shape, message),
        *(json_text(engine, meta, key, llm) for key in _USAGE_KEYS),
    ]
    return table_shape.ordered(sa.select(*columns).where(where_run_indexed(engine, table_shape, run_key)))


def _trace_id(engine: Engine, table_shape: TableShape, run_key: str) -> Any:
    """The first row's trace id (one indexed row, not a column of them all)."""
    c = table_shape.table.c
    value = c.trace_id if table_shape.has_links else json_text(engine, table_shape.meta, "trace_id")
    where = sa.and_(where_run_indexed(engine, table_shape, run_key), value.is_not(None), value != "")
    return table_shape.ordered(sa.select(value).where(where)).limit(1)


def _number(value: Any) -> float | int:
    """A usage value as a number (SQLite hands back numbers, PostgreSQL text; anything else is 0)."""
    if type(value) is int:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if number.is_integer() else number


def _interned(values: Sequence[Any], strings: dict[Any, int | None]) -> list[int | None]:
    """Each value as its index in ``strings`` (insertion-ordered; ``None`` stays ``None``); looked up in C."""
    for value in dict.fromkeys(values):
        if value not in strings:
            strings[value] = len(strings) - 1
    return list(map(strings.__getitem__, values))


def _offsets(values: Iterable[int | None], base: int) -> list[int | None]:
    return [None if value is None else value - base for value in values]


def _build(run_key: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The response from the rows, column by column (transposed and mostly mapped in C; no object per row)."""
    strings: dict[Any, int | None] = {None: None}
    out: dict[str, Any] = {"run": run_key, "base": None, "count": len(rows), "strings": [], "trace_id": None}
    if not rows:
        return {**out, **{name: [] for name in _COLUMN_NAMES}}
    (ids, parents, orders, depths, kinds, statuses, agents, starts, ends, durations, names,
     tokens_in, tokens_out, costs) = zip(*rows)
    base = next((ms for ms in starts if ms is not None), 0)
    index = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))  # the first row of an id, as before
    llm = [i for i, (kind, status) in enumerate(zip(kinds, statuses))
           if kind == semconv.EVENT_LLM_CALL and status != STATUS_RUNNING]
    out.update(
        base=base, id=list(ids), parent=list(map(index.get, parents, parents)), order=list(orders),
        depth=list(depths), kind=_interned(kinds, strings), status=_interned(statuses, strings),
        agent=_interned(agents, strings), name=_interned(names, strings),
        start=[0 if start is None else start - base for start in starts], end=_offsets(ends, base),
        duration=list(durations),
        usage=[[i, _number(tokens_in[i]), _number(tokens_out[i]), _number(costs[i])] for i in llm],
    )
    out["strings"] = list(strings)[1:]
    return out


_COLUMN_NAMES = ("id", "parent", "order", "depth", "kind", "status", "agent", "name", "start", "end", "duration",
                 "usage")


def _all_rows(engine: Engine, statement: Any) -> list[tuple[Any, ...]]:
    try:
        with engine.connect() as connection:
            return connection.execute(statement).tuples().all()
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None


def run_columns(engine: Engine, run_key: str, *, table: str | sa.Table | None = None) -> dict[str, Any]:
    """A resolved run's rows in ``execution_order`` as columns (see the module docstring); rows still
    ``running`` whose writer is gone come out ``interrupted``, as in ``store.run_events``."""
    table_shape = shape(engine, table)
    out = _build(run_key, _all_rows(engine, _statement(engine, table_shape, run_key)))
    if out["count"]:
        out["trace_id"] = next(iter(_all_rows(engine, _trace_id(engine, table_shape, run_key))), (None,))[0]
    running_index = out["strings"].index(STATUS_RUNNING) if STATUS_RUNNING in out["strings"] else -1
    running = [i for i, status in enumerate(out["status"]) if status == running_index]
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
