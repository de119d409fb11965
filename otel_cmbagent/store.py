"""The read side of the ``execution_events`` table: runs, their events and the event tree.

Used by the ``otel-cmbagent`` command and usable by any viewer. SQLAlchemy Core only, on SQLite and
PostgreSQL, on our default table (``trace_id``/``span_id`` columns) and on cmbagent's own table (no
such columns: they are read from ``meta["trace_id"]``/``meta["span_id"]``)::

    from otel_cmbagent import store

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

import json
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from otel_cmbagent.exporters import writers
from otel_cmbagent.exporters.fit import fit_text
from otel_cmbagent.exporters.rows import MESSAGE_EVENT_TYPE, MESSAGE_SUBTYPE

__all__ = [
    "AmbiguousRunError",
    "DEFAULT_DB",
    "DEFAULT_TABLE",
    "RunNotFoundError",
    "StoreError",
    "db_url",
    "default_db",
    "event_tree",
    "events_table",
    "list_runs",
    "mark_interrupted",
    "open_store",
    "resolve_run",
    "run_events",
    "run_summary",
]

DEFAULT_DB = "otel_cmbagent.db"
DEFAULT_TABLE = "execution_events"
SQL_URL_ENV = "OTEL_CMBAGENT_SQL_URL"

_LLM_CALL = "llm_call"
_MESSAGE = "message"  # the kind of cmbagent's message rows (agent_call / message)
_RUNNING = "running"
_FAILED = "failed"
_COMPLETED = "completed"
_INTERRUPTED = "interrupted"  # stopped while it ran: ended by SIGTERM/exit, or its writer is gone (SIGKILL)
_STATUSES = (_RUNNING, _COMPLETED, _FAILED, _INTERRUPTED)
_INPUT_TOKENS = "gen_ai.usage.input_tokens"
_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
_COST = "gen_ai.usage.cost"
_TIME_COLUMNS = ("timestamp", "started_at", "completed_at")
_JSON_COLUMNS = ("inputs", "outputs", "meta")
_LINK_COLUMNS = ("trace_id", "span_id")


class StoreError(Exception):
    """A problem with the database or a run reference, with a message meant for a person (one line)."""


class RunNotFoundError(StoreError):
    """No run matches the reference."""

    def __init__(self, message: str, ref: str) -> None:
        super().__init__(message)
        self.ref = ref


class AmbiguousRunError(StoreError):
    """A prefix matches several runs; ``candidates`` lists their ids (newest first)."""

    def __init__(self, message: str, ref: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.ref = ref
        self.candidates = candidates


# --- opening -------------------------------------------------------------------------------
def default_db() -> str:
    """``$OTEL_CMBAGENT_SQL_URL`` when set, else ``./otel_cmbagent.db``."""
    return os.environ.get(SQL_URL_ENV) or DEFAULT_DB


def _is_url(db: str) -> bool:
    return "://" in db


def db_url(db: str) -> str:
    """A SQLAlchemy URL for a path (``sqlite:///<absolute path>``) or a URL (returned as it is)."""
    if _is_url(db):
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _describe(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# engine -> the table name given to open_store; engine -> {table name: reflected Table}
_TABLE_NAMES: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_TABLES: weakref.WeakKeyDictionary[Engine, dict[str, sa.Table]] = weakref.WeakKeyDictionary()


def open_store(db: str | os.PathLike[str] | Engine | None = None, *, table: str = DEFAULT_TABLE) -> Engine:
    """An Engine on an existing event table.

    ``db``: a file path (SQLite), a SQLAlchemy URL, an Engine, or None for :func:`default_db`.
    Raises :class:`StoreError` when the SQLite file or the table does not exist, the URL is
    malformed or its driver is missing, or the server cannot be reached.
    """
    if db is None:
        db = default_db()
    if isinstance(db, Engine):
        engine = db
    else:
        text = os.fspath(db)
        if not text.strip():
            raise StoreError("no database given (a file path or a SQLAlchemy URL)")
        if _is_url(text):
            try:
                url = sa.engine.make_url(text)
            except sa.exc.ArgumentError:
                raise StoreError(f"invalid database URL {text!r}") from None
        else:
            url = sa.engine.make_url(db_url(text))
        try:
            backend = url.get_backend_name()
        except Exception:  # noqa: BLE001
            backend = ""
        if backend == "sqlite":
            database = url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                path = Path(database).expanduser()
                if not path.exists():
                    raise StoreError(f"no database at {path}")
                if path.is_dir():
                    raise StoreError(f"{path} is a directory, not a database file")
        try:
            if backend == "sqlite":
                engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            else:
                engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.NoSuchModuleError, ImportError) as exc:
            raise StoreError(f"cannot use {url.render_as_string(hide_password=True)}: {exc}") from None
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"invalid database URL {text!r}: {exc}") from None
    try:
        with engine.connect() as connection:
            exists = sa.inspect(connection).has_table(table)
    except sa.exc.DatabaseError as exc:
        if engine.url.get_backend_name() == "sqlite":
            raise StoreError(f"{_describe(engine)} is not a readable SQLite database: {_first_line(exc)}") from None
        raise StoreError(f"cannot connect to {_describe(engine)}: {_first_line(exc)}") from None
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {_describe(engine)}: {_first_line(exc)}") from None
    if not exists:
        raise StoreError(f"no table {table!r} in {_describe(engine)} (nothing has been traced into it yet?)")
    _TABLE_NAMES[engine] = table
    return engine


def events_table(engine: Engine, table: str | sa.Table | None = None) -> sa.Table:
    """The event table, reflected from the database (cached per engine)."""
    if isinstance(table, sa.Table):
        return table
    name = table or _TABLE_NAMES.get(engine, DEFAULT_TABLE)
    cache = _TABLES.setdefault(engine, {})
    found = cache.get(name)
    if found is None:
        try:
            found = sa.Table(name, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise StoreError(f"no table {name!r} in {_describe(engine)}") from None
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot read {_describe(engine)}: {_first_line(exc)}") from None
        cache[name] = found
    return found


class _Shape:
    """What a table looks like: where meta and the trace ids live, and how a run is keyed."""

    def __init__(self, table: sa.Table) -> None:
        columns = table.c
        self.table = table
        self.meta = columns["meta"] if "meta" in columns else (columns["metadata"] if "metadata" in columns else None)
        self.has_links = all(name in columns for name in _LINK_COLUMNS)
        self.run_id = columns["run_id"]
        # rows outside a run (run_id NULL) are grouped by trace when the trace id is a column
        self.key = sa.func.coalesce(columns.run_id, columns.trace_id) if self.has_links else columns.run_id
        self.order = columns["execution_order"]
        self.time = columns["timestamp"]

    def where_run(self, run_id: str) -> Any:
        c = self.table.c
        if self.has_links:
            return sa.or_(c.run_id == run_id, sa.and_(c.run_id.is_(None), c.trace_id == run_id))
        return c.run_id == run_id

    def where_runs(self, run_ids: Sequence[str]) -> Any:
        c = self.table.c
        if self.has_links:
            return sa.or_(c.run_id.in_(run_ids), sa.and_(c.run_id.is_(None), c.trace_id.in_(run_ids)))
        return c.run_id.in_(run_ids)


def _is_message(columns: Any) -> Any:
    return sa.and_(columns.event_type == MESSAGE_EVENT_TYPE, columns.event_subtype == MESSAGE_SUBTYPE)


def kind_column(columns: Any) -> Any:
    """A row's kind in SQL: ``message`` for cmbagent's message rows (agent_call/message), else its event_type."""
    return sa.case((_is_message(columns), sa.literal(_MESSAGE)), else_=columns.event_type)


def kinds_condition(columns: Any, kinds: Iterable[str]) -> Any:
    """Rows of these kinds (``message`` = message rows; ``agent_call`` = agent calls that are not messages)."""
    wanted = set(kinds)
    conditions = [_is_message(columns)] if _MESSAGE in wanted else []
    types = sorted(wanted - {_MESSAGE})
    if types:
        conditions.append(sa.and_(columns.event_type.in_(types), sa.not_(_is_message(columns))))
    return sa.or_(*conditions) if conditions else sa.false()


def _shape(engine: Engine, table: str | sa.Table | None) -> _Shape:
    return _Shape(events_table(engine, table))


def _execute(engine: Engine, statement: Any) -> list[Any]:
    try:
        with engine.connect() as connection:
            return list(connection.execute(statement))
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {_describe(engine)}: {_first_line(exc)}") from None


# --- decoding ------------------------------------------------------------------------------
def _json(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _utc(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A raw table row as the store returns it: JSON decoded, UTC times, ``metadata`` as ``meta``, link ids filled from meta."""
    out = dict(row)
    if "meta" not in out and "metadata" in out:
        out["meta"] = out.pop("metadata")
    for key in _JSON_COLUMNS:
        if key in out:
            out[key] = _json(out[key])
    for key in _TIME_COLUMNS:
        if key in out:
            out[key] = _utc(out[key])
    meta = out.get("meta") if isinstance(out.get("meta"), dict) else {}
    for key in _LINK_COLUMNS:
        if out.get(key) is None:
            out[key] = meta.get(key)
    return out


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


# --- runs ----------------------------------------------------------------------------------
def _roots(engine: Engine, shape: _Shape, keys: list[Any]) -> dict[str, dict[str, Any]]:
    """The root row of each run: depth 0, a "run" row preferred, then the first one."""
    c = shape.table.c
    meta = shape.meta if shape.meta is not None else sa.null()
    columns = [shape.key.label("run_key"), c.id, c.session_id, c.event_type, c.status, c.started_at, c.timestamp,
               c.completed_at, c.duration_ms, c.execution_order, meta.label("meta")]
    if shape.has_links:
        columns.append(c.trace_id)
    roots: dict[str, dict[str, Any]] = {}
    statement = sa.select(*columns).where(shape.where_runs(keys), c.depth == 0).order_by(c.execution_order)
    for row in _execute(engine, statement):
        record = decode_row(row._mapping)
        current = roots.get(record["run_key"])
        if current is None or (current.get("event_type") != "run" and record.get("event_type") == "run"):
            roots[record["run_key"]] = record
    return roots


def _agents(engine: Engine, shape: _Shape, keys: list[Any]) -> dict[str, list[str]]:
    c = shape.table.c
    agents: dict[str, list[str]] = {}
    statement = (
        sa.select(shape.key.label("run_key"), c.agent_name, sa.func.min(c.execution_order).label("first_order"))
        .where(shape.where_runs(keys), c.agent_name.is_not(None))
        .group_by(shape.key, c.agent_name)
        .order_by("first_order")
    )
    for run_key, agent, _first in _execute(engine, statement):
        agents.setdefault(run_key, []).append(agent)
    return agents


def _usage(engine: Engine, shape: _Shape, keys: list[Any]) -> dict[str, dict[str, Any]]:
    """Tokens, cost and calls summed over each run's ``llm_call`` rows (per call, never cumulative)."""
    usage = {k: {"input_tokens": 0, "output_tokens": 0, "cost": 0.0, "llm_calls": 0} for k in keys}
    if shape.meta is None:
        return usage
    c = shape.table.c
    statement = sa.select(shape.key.label("run_key"), shape.meta.label("meta")).where(
        shape.where_runs(keys), c.event_type == _LLM_CALL)
    for run_key, raw in _execute(engine, statement):
        values = _json(raw)
        totals = usage[run_key]
        totals["llm_calls"] += 1
        if not isinstance(values, dict):
            continue
        for name, attribute in (("input_tokens", _INPUT_TOKENS), ("output_tokens", _OUTPUT_TOKENS), ("cost", _COST)):
            number = _number(values.get(attribute))
            if number is not None:
                totals[name] += number
    return usage


def _summaries(engine: Engine, shape: _Shape, groups: list[Any]) -> list[dict[str, Any]]:
    """Run summaries for ``(key, count, first, last)`` groups, in the given order."""
    if not groups:
        return []
    keys = [group[0] for group in groups]
    roots, agents, usage = _roots(engine, shape, keys), _agents(engine, shape, keys), _usage(engine, shape, keys)
    # any running / failed row, for runs whose root row is not (yet) in the table
    statuses: dict[str, set[str]] = {}
    statement = sa.select(shape.key.label("run_key"), shape.table.c.status).where(shape.where_runs(keys)).distinct()
    for run_key, status in _execute(engine, statement):
        statuses.setdefault(run_key, set()).add(status)
    gone = _gone_runs(engine, shape, [k for k in keys if _RUNNING in statuses.get(k, ())])

    now = datetime.now(timezone.utc)
    out = []
    for run_key, count, first, last in groups:
        root = roots.get(run_key, {})
        meta_values = root.get("meta") if isinstance(root.get("meta"), dict) else {}
        seen = statuses.get(run_key, set())
        status = root.get("status")
        if status not in _STATUSES:
            status = _RUNNING if _RUNNING in seen else (_FAILED if _FAILED in seen else _COMPLETED)
        started = _utc(root.get("started_at") or root.get("timestamp") or first)
        last = _utc(last)
        if status == _RUNNING and run_key in gone:  # its writer died (SIGKILL): no longer live
            status, last = _INTERRUPTED, max(filter(None, [last, gone[run_key]]), default=last)
        duration = root.get("duration_ms") if status != _RUNNING else None
        if duration is None and isinstance(started, datetime):
            end = now if status == _RUNNING else (last if isinstance(last, datetime) else started)
            duration = max(0, int((end - started).total_seconds() * 1000))
        out.append({
            "run_id": run_key,
            "session_id": root.get("session_id"),
            "name": meta_values.get("span_name"),
            "started_at": started,
            "last_event_at": last,
            "duration_ms": duration,
            "status": status,
            "live": status == _RUNNING,
            "events": int(count),
            "agents": agents.get(run_key, []),
            **usage[run_key],
            "trace_id": root.get("trace_id") or meta_values.get("trace_id"),
        })
    return out


# --- runs whose writer is gone ------------------------------------------------------------------
def _writer(meta: Any) -> str | None:
    meta = _json(meta)
    return meta.get(writers.WRITER_KEY) if isinstance(meta, dict) else None


def _gone_runs(engine: Engine, shape: _Shape, keys: list[Any]) -> dict[str, datetime | None]:
    """Runs (of ``keys``) whose every ``running`` row was written by a process that is gone, each with that
    process's last heartbeat (None when unknown)."""
    if not keys or shape.meta is None:
        return {}
    c = shape.table.c
    running: dict[str, set[str | None]] = {}
    statement = sa.select(shape.key.label("run_key"), shape.meta).where(shape.where_runs(keys), c.status == _RUNNING)
    for run_key, meta in _execute(engine, statement):
        running.setdefault(run_key, set()).add(_writer(meta))
    gone = writers.gone(engine, {writer for found in running.values() for writer in found if writer})
    return {
        run_key: max(filter(None, (gone[w] for w in found)), default=None)
        for run_key, found in running.items() if all(w in gone for w in found)
    }


def _last_times(engine: Engine, shape: _Shape, keys: Iterable[Any]) -> dict[str, Any]:
    c = shape.table.c
    statement = (
        sa.select(shape.key.label("run_key"), sa.func.max(sa.func.coalesce(c.completed_at, c.timestamp)))
        .where(shape.where_runs(sorted(keys)))
        .group_by(shape.key)
    )
    return {run_key: _utc(last) for run_key, last in _execute(engine, statement)}


def mark_interrupted(engine: Engine, rows: list[dict[str, Any]], *, table: str | sa.Table | None = None
                     ) -> list[dict[str, Any]]:
    """Decoded rows still ``running`` whose writer is gone (a process killed with SIGKILL), shown as
    ``interrupted``: ``completed_at`` is the run's last sign of life (its last row, or its writer's last
    heartbeat), ``duration_ms`` runs to it. The table keeps them as they were written. Changed in place."""
    running = [row for row in rows if row.get("status") == _RUNNING and _writer(row.get("meta"))]
    gone = writers.gone(engine, {_writer(row["meta"]) for row in running}) if running else {}
    dead = [row for row in running if _writer(row["meta"]) in gone]
    if not dead:
        return rows
    ends = _last_times(engine, _shape(engine, table), {row.get("run_id") or row.get("trace_id") for row in dead})
    for row in dead:
        end = max(filter(None, [ends.get(row.get("run_id") or row.get("trace_id")), gone[_writer(row["meta"])]]))
        start = row.get("started_at") or row.get("timestamp")
        row["status"], row["completed_at"] = _INTERRUPTED, end
        if isinstance(start, datetime):
            row["duration_ms"] = max(0, int((end - start).total_seconds() * 1000))
    return rows


def _groups_statement(shape: _Shape) -> Any:
    c = shape.table.c
    first = sa.func.min(c.timestamp)
    return (
        sa.select(
            shape.key.label("run_key"),
            sa.func.count().label("events"),
            first.label("first_seen"),
            sa.func.max(sa.func.coalesce(c.completed_at, c.timestamp)).label("last_seen"),
        )
        .where(shape.key.is_not(None))
        .group_by(shape.key)
    )


def list_runs(engine: Engine, limit: int | None = 50, *, table: str | sa.Table | None = None) -> list[dict[str, Any]]:
    """Runs, newest first (by start): ``run_id``, ``session_id``, ``name`` (the run span's name),
    ``started_at``, ``last_event_at``, ``duration_ms`` (so far, for a live run), ``status``
    (``running`` = live, ``completed``, ``failed``, ``interrupted``: its process was stopped while it ran, or
    the process that wrote its running rows is gone - see :func:`mark_interrupted`), ``live``, ``events``
    (rows), ``agents`` (distinct names, first seen first), ``input_tokens``, ``output_tokens``, ``cost`` and
    ``llm_calls`` (summed over the run's ``llm_call`` rows: per call, never the cumulative totals), ``trace_id``.
    """
    shape = _shape(engine, table)
    statement = _groups_statement(shape).order_by(sa.desc("first_seen"), sa.desc("run_key"))
    if limit is not None:
        statement = statement.limit(max(0, int(limit)))
    return _summaries(engine, shape, list(_execute(engine, statement)))


def run_summary(engine: Engine, run_id: str, *, table: str | sa.Table | None = None) -> dict[str, Any]:
    """The :func:`list_runs` entry of one run plus ``by_type`` (rows per kind: event type, or ``message``)."""
    shape = _shape(engine, table)
    groups = list(_execute(engine, _groups_statement(shape).where(shape.where_run(run_id))))
    if not groups:
        raise RunNotFoundError(f"no run {run_id!r} in {_describe(engine)}", run_id)
    (summary,) = _summaries(engine, shape, groups[:1])
    kind = kind_column(shape.table.c).label("kind")
    statement = (
        sa.select(kind, sa.func.count(), sa.func.min(shape.table.c.execution_order).label("first_order"))
        .where(shape.where_run(run_id))
        .group_by(kind)
        .order_by("first_order")
    )
    summary["by_type"] = {event_type: int(count) for event_type, count, _first in _execute(engine, statement)}
    return summary


def resolve_run(engine: Engine, ref: str, *, table: str | sa.Table | None = None) -> str:
    """The run id for a full id, a unique prefix of one, a trace id (or its prefix), or ``last``.

    Raises :class:`RunNotFoundError` / :class:`AmbiguousRunError` (which lists the candidates).
    """
    shape = _shape(engine, table)
    ref = (ref or "").strip()
    if not ref:
        raise RunNotFoundError("no run id given", ref)
    if ref.lower() in ("last", "latest"):
        statement = _groups_statement(shape).order_by(sa.desc("first_seen"), sa.desc("run_key")).limit(1)
        rows = _execute(engine, statement)
        if not rows:
            raise RunNotFoundError(f"no runs in {_describe(engine)} yet", ref)
        return rows[0][0]

    c = shape.table.c
    key = shape.key.label("run_key")
    for candidate in dict.fromkeys([ref, _as_stored(shape, ref)]):
        if _execute(engine, sa.select(key).where(shape.where_run(candidate)).limit(1)):
            return candidate

    pattern = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    conditions = [shape.key.like(pattern, escape="\\")]
    if shape.has_links:
        conditions.append(c.trace_id.like(pattern.lower(), escape="\\"))
    statement = (
        sa.select(key, sa.func.min(c.timestamp).label("first_seen"))
        .where(sa.or_(*conditions))
        .group_by(shape.key)
        .order_by(sa.desc("first_seen"))
        .limit(51)
    )
    matches = [run_key for run_key, _first in _execute(engine, statement) if run_key is not None]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFoundError(f"no run matches {ref!r} in {_describe(engine)}", ref)
    shown = ", ".join(matches[:10]) + (f", … ({len(matches) - 10} more)" if len(matches) > 10 else "")
    raise AmbiguousRunError(
        f"run id prefix {ref!r} is ambiguous: it matches {len(matches) if len(matches) <= 50 else 'over 50'} runs "
        f"({shown}); give more characters",
        ref,
        matches,
    )


def _as_stored(shape: _Shape, run_id: str) -> str:
    """A run id longer than the column as the SQL sink fitted it (the full id is in ``meta["run_id_full"]``)."""
    length = getattr(shape.run_id.type, "length", None)
    return fit_text(run_id, length) if length else run_id


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = {part.strip() for item in items for part in str(item).split(",") if part.strip()}
    return out or None


def run_events(
    engine: Engine,
    run_id: str,
    event_type: str | Iterable[str] | None = None,
    agent: str | Iterable[str] | None = None,
    *,
    table: str | sa.Table | None = None,
) -> list[dict[str, Any]]:
    """The rows of a run ordered by ``execution_order``, as dicts with every column.

    JSON columns are decoded, times are timezone-aware UTC datetimes, ``meta`` is always under
    ``meta`` (also for a table whose column is ``metadata``), and ``trace_id``/``span_id`` are
    filled from ``meta`` when the table has no such columns. ``event_type``/``agent``: one value,
    several, or a comma-separated string.
    """
    shape = _shape(engine, table)
    c = shape.table.c
    statement = sa.select(shape.table).where(shape.where_run(run_id))
    types = _as_set(event_type)
    if types:
        statement = statement.where(kinds_condition(c, types))
    agents = _as_set(agent)
    if agents:
        statement = statement.where(c.agent_name.in_(sorted(agents)))
    statement = statement.order_by(c.execution_order, c.timestamp, c.id)
    return mark_interrupted(engine, [decode_row(row._mapping) for row in _execute(engine, statement)], table=table)


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
