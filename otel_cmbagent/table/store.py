"""The read side of the ``execution_events`` table: runs, their events and the event tree.

Used by the ``otel-cmbagent`` command and usable by any viewer. SQLAlchemy Core only, on SQLite and
PostgreSQL, on our default table (``trace_id``/``span_id`` columns) and on cmbagent's own table (no
such columns: they are read from ``meta["trace_id"]``/``meta["span_id"]``)::

    from otel_cmbagent.table import store

    engine = store.open_store("otel_cmbagent.db")          # a path or a SQLAlchemy URL
    for run in store.list_runs(engine, limit=10):           # newest first
        print(run["run_id"], run["status"], run["input_tokens"])
    run_id = store.resolve_run(engine, "last")              # full id, unique prefix or "last"
    rows = store.run_events(engine, run_id)                 # ordered by execution_order, JSON decoded
    roots = store.event_tree(rows)                          # [{"event": row, "children": [...]}, ...]

A "run" is the set of rows sharing a ``run_id``; rows written outside any run (``run_id`` NULL, e.g.
a bare AG2 chat traced with ``opentelemetry-instrument``) are grouped by their ``trace_id`` instead,
when the table has that column. Every failure a person can cause (missing file, missing table,
unreachable server, unknown or ambiguous run) raises :class:`StoreError` with a one-line message.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .encoding import decode_row
from .fit import fit_text
from .liveness import mark_interrupted
from .reading import (
    TABLE_NAMES,
    AmbiguousRunError,
    RunNotFoundError,
    StoreError,
    TableShape,
    describe,
    events_table,
    execute,
    first_line,
    shape,
    where_run_indexed,
)
from .schema import DEFAULT_DB, DEFAULT_TABLE, SQL_URL_ENV, default_db, kind_column, kinds_condition
from .summaries import groups_statement, summaries

__all__ = [
    "AmbiguousRunError",
    "DEFAULT_DB",
    "DEFAULT_TABLE",
    "RunNotFoundError",
    "SQL_URL_ENV",
    "StoreError",
    "TableShape",
    "count_events",
    "db_url",
    "decode_row",
    "default_db",
    "event_tree",
    "iter_run_events",
    "events_table",
    "kinds_condition",
    "list_runs",
    "mark_interrupted",
    "open_store",
    "resolve_run",
    "run_events",
    "run_summary",
]


# --- opening -------------------------------------------------------------------------------
def _is_url(db: str) -> bool:
    return "://" in db


def db_url(db: str) -> str:
    """A SQLAlchemy URL for a path (``sqlite:///<absolute path>``) or a URL (returned as it is)."""
    if _is_url(db):
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _url(text: str) -> sa.engine.URL:
    if not text.strip():
        raise StoreError("no database given (a file path or a SQLAlchemy URL)")
    if not _is_url(text):
        return sa.engine.make_url(db_url(text))
    try:
        return sa.engine.make_url(text)
    except sa.exc.ArgumentError:
        raise StoreError(f"invalid database URL {text!r}") from None


def _check_sqlite_file(url: sa.engine.URL) -> None:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        path = Path(database).expanduser()
        if not path.exists():
            raise StoreError(f"no database at {path}")
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a database file")


def _engine(text: str) -> Engine:
    """A read engine for a path or URL (an existing SQLite file only: reading never creates one)."""
    url = _url(text)
    try:
        sqlite = url.get_backend_name() == "sqlite"
    except Exception:  # noqa: BLE001
        sqlite = False
    if sqlite:
        _check_sqlite_file(url)
    try:
        if sqlite:
            return sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        return sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"cannot use {url.render_as_string(hide_password=True)}: {exc}") from None
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"invalid database URL {text!r}: {exc}") from None


def open_store(db: str | os.PathLike[str] | Engine | None = None, *, table: str = DEFAULT_TABLE) -> Engine:
    """An Engine on an existing event table.

    ``db``: a file path (SQLite), a SQLAlchemy URL, an Engine, or None for :func:`default_db`.
    Raises :class:`StoreError` when the SQLite file or the table does not exist, the URL is
    malformed or its driver is missing, or the server cannot be reached.
    """
    engine = db if isinstance(db, Engine) else _engine(os.fspath(db if db is not None else default_db()))
    try:
        with engine.connect() as connection:
            exists = sa.inspect(connection).has_table(table)
    except sa.exc.DatabaseError as exc:
        if engine.url.get_backend_name() == "sqlite":
            raise StoreError(f"{describe(engine)} is not a readable SQLite database: {first_line(exc)}") from None
        raise StoreError(f"cannot connect to {describe(engine)}: {first_line(exc)}") from None
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None
    if not exists:
        raise StoreError(f"no table {table!r} in {describe(engine)} (nothing has been traced into it yet?)")
    TABLE_NAMES[engine] = table
    return engine


# Summaries of runs that are no longer live, per engine, by (table, run, rows, first seen, last seen): a finished
# run's summary changes only when its rows do, and the viewer lists runs every time one of them changes
# (a 100,000-row run costs ~0.4 s of CPU to summarise).
_FINISHED: weakref.WeakKeyDictionary[Engine, dict[tuple[Any, ...], dict[str, Any]]] = weakref.WeakKeyDictionary()
_CACHED_RUNS = 10_000


def list_runs(engine: Engine, limit: int | None = 50, *, table: str | sa.Table | None = None) -> list[dict[str, Any]]:
    """Runs, newest first (by start): ``run_id``, ``session_id``, ``name`` (the run span's name),
    ``started_at``, ``last_event_at``, ``duration_ms`` (so far, for a live run), ``status``
    (``running`` = live, ``completed``, ``failed``, ``interrupted``: its process was stopped while it ran, or
    the process that wrote its running rows is gone - see :func:`mark_interrupted`), ``live``, ``events``
    (rows), ``agents`` (distinct names, first seen first), ``input_tokens``, ``output_tokens``, ``cost`` and
    ``llm_calls`` (summed over the run's ``llm_call`` rows: per call, never the cumulative totals), ``trace_id``.
    """
    table_shape = shape(engine, table)
    statement = groups_statement(table_shape).order_by(sa.desc("first_seen"), sa.desc("run_key"))
    if limit is not None:
        statement = statement.limit(max(0, int(limit)))
    groups = list(execute(engine, statement))
    cache = _FINISHED.setdefault(engine, {})
    keys = [(table_shape.table.name, *group) for group in groups]
    fresh = [group for group, key in zip(groups, keys) if key not in cache]
    computed = dict(zip((group[0] for group in fresh), summaries(engine, table_shape, fresh)))
    for key, group in zip(keys, groups):
        summary = computed.get(group[0])
        if summary is not None and not summary["live"]:
            cache[key] = summary
    while len(cache) > _CACHED_RUNS:
        del cache[next(iter(cache))]  # the oldest entry
    return [dict(computed.get(group[0]) or cache[key]) for key, group in zip(keys, groups)]


def run_summary(engine: Engine, run_id: str, *, table: str | sa.Table | None = None, by_type: bool = True,
                figures: bool = True) -> dict[str, Any]:
    """The :func:`list_runs` entry of one run plus ``by_type`` (rows per kind: event type, or ``message``).
    ``by_type=False``/``figures=False`` leave out ``by_type`` / ``agents`` and the usage sums (each a scan of the
    run's rows: the CLI's tree and timeline headers show none of them)."""
    table_shape = shape(engine, table)
    groups = list(execute(engine, groups_statement(table_shape).where(table_shape.where_run(run_id))))
    if not groups:
        raise RunNotFoundError(f"no run {run_id!r} in {describe(engine)}", run_id)
    (summary,) = summaries(engine, table_shape, groups[:1], figures=figures)
    if not by_type:
        return summary
    kind = kind_column(table_shape.table.c).label("kind")
    statement = (
        sa.select(kind, sa.func.count(), sa.func.min(table_shape.table.c.execution_order).label("first_order"))
        .where(table_shape.where_run(run_id))
        .group_by(kind)
        .order_by("first_order")
    )
    summary["by_type"] = {event_type: int(count) for event_type, count, _first in execute(engine, statement)}
    return summary


def resolve_run(engine: Engine, ref: str, *, table: str | sa.Table | None = None) -> str:
    """The run id for a full id, a unique prefix of one, a trace id (or its prefix), or ``last``.

    Raises :class:`RunNotFoundError` / :class:`AmbiguousRunError` (which lists the candidates).
    """
    table_shape = shape(engine, table)
    ref = (ref or "").strip()
    if not ref:
        raise RunNotFoundError("no run id given", ref)
    if ref.lower() in ("last", "latest"):
        statement = groups_statement(table_shape).order_by(sa.desc("first_seen"), sa.desc("run_key")).limit(1)
        rows = execute(engine, statement)
        if not rows:
            raise RunNotFoundError(f"no runs in {describe(engine)} yet", ref)
        return rows[0][0]

    c = table_shape.table.c
    key = table_shape.key.label("run_key")
    for candidate in dict.fromkeys([ref, _as_stored(table_shape, ref)]):
        if execute(engine, sa.select(key).where(table_shape.where_run(candidate)).limit(1)):
            return candidate

    pattern = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    conditions = [table_shape.key.like(pattern, escape="\\")]
    if table_shape.has_links:
        conditions.append(c.trace_id.like(pattern.lower(), escape="\\"))
    statement = (
        sa.select(key, sa.func.min(c.timestamp).label("first_seen"))
        .where(sa.or_(*conditions))
        .group_by(table_shape.key)
        .order_by(sa.desc("first_seen"))
        .limit(51)
    )
    matches = [run_key for run_key, _first in execute(engine, statement) if run_key is not None]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFoundError(f"no run matches {ref!r} in {describe(engine)}", ref)
    shown = ", ".join(matches[:10]) + (f", … ({len(matches) - 10} more)" if len(matches) > 10 else "")
    raise AmbiguousRunError(
        f"run id prefix {ref!r} is ambiguous: it matches {len(matches) if len(matches) <= 50 else 'over 50'} runs "
        f"({shown}); give more characters",
        ref,
        matches,
    )


def _as_stored(table_shape: TableShape, run_id: str) -> str:
    """A run id longer than the column as the SQL sink fitted it (the full id is in ``meta["run_id_full"]``)."""
    length = getattr(table_shape.run_id.type, "length", None)
    return fit_text(run_id, length) if length else run_id


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = {part.strip() for item in items for part in str(item).split(",") if part.strip()}
    return out or None


def _events_statement(engine: Engine, table_shape: TableShape, run_id: str, event_type: Any = None,
                      agent: Any = None, exclude: Any = None) -> Any:
    c = table_shape.table.c
    statement = sa.select(table_shape.table).where(where_run_indexed(engine, table_shape, run_id))
    types = _as_set(event_type)
    if types:
        statement = statement.where(kinds_condition(c, types))
    excluded = _as_set(exclude)
    if excluded:
        statement = statement.where(sa.not_(kinds_condition(c, excluded)))
    agents = _as_set(agent)
    if agents:
        statement = statement.where(c.agent_name.in_(sorted(agents)))
    return statement


def _paged(statement: Any, limit: int | None, offset: int) -> Any:
    if limit is not None:
        statement = statement.limit(max(0, int(limit)))
    return statement.offset(max(0, int(offset))) if offset else statement


def run_events(
    engine: Engine,
    run_id: str,
    event_type: str | Iterable[str] | None = None,
    agent: str | Iterable[str] | None = None,
    *,
    table: str | sa.Table | None = None,
    exclude: str | Iterable[str] | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The rows of a run ordered by ``execution_order``, as dicts with every column.

    JSON columns are decoded, times are timezone-aware UTC datetimes, ``meta`` is always under
    ``meta`` (also for a table whose column is ``metadata``), and ``trace_id``/``span_id`` are
    filled from ``meta`` when the table has no such columns. ``event_type``/``agent``: one value,
    several, or a comma-separated string; ``exclude``: kinds left out. ``limit``/``offset``: one page of
    them (a parent's order is below its children's, so the first page is a complete tree).
    """
    table_shape = shape(engine, table)
    statement = _paged(table_shape.ordered(_events_statement(engine, table_shape, run_id, event_type, agent, exclude)),
                       limit, offset)
    return mark_interrupted(engine, [decode_row(row._mapping) for row in execute(engine, statement)], table=table)


def count_events(engine: Engine, run_id: str, *, table: str | sa.Table | None = None, **filters: Any) -> int:
    """How many rows :func:`run_events` returns without a limit (for "rows 1-500 of 100,000"); ``filters``:
    its ``event_type``, ``agent``, ``exclude``."""
    table_shape = shape(engine, table)
    inner = _events_statement(engine, table_shape, run_id, **filters).with_only_columns(
        table_shape.table.c.id).subquery()
    return int(execute(engine, sa.select(sa.func.count()).select_from(inner))[0][0])


def iter_run_events(engine: Engine, run_id: str, *, table: str | sa.Table | None = None, limit: int | None = None,
                    offset: int = 0, batch: int = 1_000, **filters: Any) -> Iterator[dict[str, Any]]:
    """:func:`run_events` as a stream: ``batch`` rows at a time from a server-side cursor (bounded memory for
    a 100,000-row run; ``otel-cmbagent events --json``); ``filters``: its ``event_type``, ``agent``, ``exclude``."""
    table_shape = shape(engine, table)
    statement = _paged(table_shape.ordered(_events_statement(engine, table_shape, run_id, **filters)), limit, offset)
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=batch).execute(statement)
            for rows in result.partitions():
                yield from mark_interrupted(engine, [decode_row(row._mapping) for row in rows], table=table)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None


def event_tree(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Nest rows by ``parent_event_id``: ``[{"event": row, "children": [...]}, ...]``.

    Rows whose parent is not among ``rows`` (a filtered list, or a run nested in another span)
    are roots. Siblings keep the order of ``rows`` (sorted by ``execution_order``).
    """
    ordered = sorted(rows, key=lambda r: (r.get("execution_order") is None, r.get("execution_order") or 0))
    nodes: dict[Any, dict[str, Any]] = {}
    for row in ordered:
        nodes.setdefault(row.get("id"), {"event": row, "children": []})
    roots: list[dict[str, Any]] = []
    for row in ordered:
        node = nodes[row.get("id")]
        if node["event"] is not row:
            continue  # a duplicate id: keep the first
        parent = nodes.get(row.get("parent_event_id"))
        if parent is None or parent is node or _is_descendant(parent, node, nodes):
            roots.append(node)
        else:
            parent["children"].append(node)
    return roots


def _is_descendant(candidate: dict[str, Any], node: dict[str, Any], nodes: Mapping[Any, dict[str, Any]]) -> bool:
    """True when ``candidate`` already hangs below ``node`` (a cycle in bad data)."""
    seen = set()
    current = candidate
    while current is not None and id(current) not in seen:
        if current is node:
            return True
        seen.add(id(current))
        current = nodes.get(current["event"].get("parent_event_id"))
    return False
