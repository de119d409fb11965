"""The SQL event table sink: cmbagent's ``execution_events`` rows, live, batched, idempotent.

Rows are written when a span starts (``status=running``) and completed when it
ends, so a crashed or hung run is visible in the table. A background worker
writes batches in one transaction with executemany upserts (SQLAlchemy Core);
a failing database is retried with backoff, then the batch is spilled to a JSONL
file that ``replay()`` writes back idempotently.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from sqlalchemy.engine import Engine

from otel_cmbagent.live import add_message_listener, remove_message_listener
from otel_cmbagent.utils import log_internal_error

from .fit import TableFit, json_text
from .foreign_keys import ForeignKeyGuard
from .rows import LINK_COLUMNS, STATUS_RUNNING, message_row, snapshot, span_row
from .side_tables import SideTables
from .sqlite_file import BLOCKED, RECONNECTED, SQLiteFileGuard
from .worker import BackgroundWorker
from .writers import WRITER_KEY, Heartbeat, this_writer

_logger = logging.getLogger("otel_cmbagent.exporters")

DEFAULT_TABLE_NAME = "execution_events"
_START, _END, _ROW, _RETRY = "start", "end", "row", "retry"
# Rows waiting for their run/session row are tried again this often (and on every flush).
HELD_RECHECK_SECONDS = 1.0
_TIME_COLUMNS = ("timestamp", "started_at", "completed_at")


def execution_events_table(metadata: sa.MetaData | None = None, name: str = DEFAULT_TABLE_NAME) -> sa.Table:
    """cmbagent's ``execution_events`` columns (same names and types) plus ``trace_id``/``span_id``."""
    metadata = metadata if metadata is not None else sa.MetaData()
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("run_id", sa.String(36), index=True),
        sa.Column("node_id", sa.String(36), index=True),
        sa.Column("step_id", sa.String(36), index=True),
        sa.Column("session_id", sa.String(36), index=True),
        sa.Column("parent_event_id", sa.String(36)),
        sa.Column("event_type", sa.String(50), nullable=False, index=True),
        sa.Column("event_subtype", sa.String(50)),
        sa.Column("agent_name", sa.String(100), index=True),
        sa.Column("agent_role", sa.String(50)),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("duration_ms", sa.Integer),
        sa.Column("inputs", sa.JSON(none_as_null=True)),
        sa.Column("outputs", sa.JSON(none_as_null=True)),
        sa.Column("error_message", sa.Text),
        sa.Column("meta", sa.JSON(none_as_null=True)),
        sa.Column("execution_order", sa.Integer, nullable=False),
        sa.Column("depth", sa.Integer, nullable=False, default=0),
        sa.Column("status", sa.String(50), default="completed"),
        sa.Column("trace_id", sa.String(32), index=True),
        sa.Column("span_id", sa.String(16)),
    )
    sa.Index(f"ix_{name}_run_order", table.c.run_id, table.c.execution_order)
    return table


def make_engine(target: str | Engine) -> Engine:
    """An Engine for a URL (SQLite: WAL, busy timeout, safe for several writer processes)."""
    if isinstance(target, Engine):
        return target
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"sql_url must be a SQLAlchemy URL string or an Engine, not {target!r}")
    try:
        url = sa.engine.make_url(target)
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"invalid sql_url {target!r}: {exc}") from None
    try:
        if url.get_backend_name() == "sqlite":
            database = url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                      json_serializer=json_text)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(url, pool_pre_ping=True, json_serializer=json_text)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ValueError(f"cannot use sql_url {url.render_as_string(hide_password=True)}: {exc}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA mmap_size=0")  # the database file is read, not mapped: a file cut short cannot SIGBUS us
    cursor.close()


def default_spill_path(engine: Engine) -> Path:
    """Next to a SQLite file; otherwise in the working directory."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().resolve().with_suffix(".spill.jsonl")
    return Path.cwd() / "otel_cmbagent.spill.jsonl"


class _TableWriter:
    """Maps rows onto a table's columns and upserts them in one transaction.

    On a user's table with foreign keys (cmbagent's) the rows pass a :class:`ForeignKeyGuard`
    first; cmbagent's side tables (files, messages, cost_records), when present, get their rows
    in the same transaction.
    """

    def __init__(self, engine: Engine, table: sa.Table) -> None:
        self.engine = engine
        self.table = table
        columns = set(table.c.keys())
        self.meta_column = "meta" if "meta" in columns else ("metadata" if "metadata" in columns else None)
        self.links_in_meta = not set(LINK_COLUMNS) <= columns
        self.columns = columns
        self.required = {c.name for c in table.c if not c.nullable and c.default is None and c.server_default is None}
        self.skipped = 0
        self.guard = ForeignKeyGuard(table, self.meta_column)
        self.side = SideTables(table)
        self.fit = TableFit(table, engine.dialect, self.meta_column)

    def to_table(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        meta = dict(row.get("meta") or {})
        if self.links_in_meta:
            for key in LINK_COLUMNS:
                meta[key] = row.get(key)
        for key, value in row.items():
            if key == "meta":
                continue
            if key in self.columns:
                out[key] = value
        if self.meta_column:
            out[self.meta_column] = meta
        self.fit.fit(out)
        missing = [name for name in self.required if out.get(name) is None]
        if missing:  # e.g. cmbagent's table needs a run_id: spans outside a run cannot go there
            self.skipped += 1
            return None
        return out

    def write(self, rows: Iterable[Mapping[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
        """Upsert rows in one transaction, one row per id, in first-seen order (parents before children).

        Returns ``(rows written, rows held)``: held rows wait for their run/session row.
        """
        latest: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for row in rows:
            mapped = self.to_table(row)
            if mapped is None:
                continue
            previous = latest.get(mapped["id"])
            if previous is None or row.get("status") != STATUS_RUNNING:
                latest[mapped["id"]] = (dict(row), mapped)  # a final row wins; the position stays the first one
        if not latest:
            return 0, []
        with self.engine.begin() as connection:
            self.side.reflect(connection)
            ready, held = self.guard.prepare(connection, list(latest.values()))
            if ready:
                records = self.side.records(ready)
                done = self.side.already_final(connection, {event for _, event, _ in records})
                self._upsert(connection, [mapped for _, mapped in ready])
                self.side.write(connection, [r for r in records if r[1] not in done])
        self.guard.confirm(ready)
        return len(ready), [row for row, _ in held]

    def _upsert(self, connection: sa.Connection, rows: list[dict[str, Any]]) -> None:
        # executemany needs one key set: fill the gaps with None
        keys = set().union(*(row.keys() for row in rows))
        rows = [{key: row.get(key) for key in keys} for row in rows]
        dialect = connection.dialect.name
        if dialect in ("sqlite", "postgresql"):
            module = sa.dialects.sqlite if dialect == "sqlite" else sa.dialects.postgresql
            statement = module.insert(self.table)
            # A final row replaces whatever is there; a running row never overwrites anything
            # (so a late or replayed start cannot undo a completed row).
            only_final = statement.excluded.status != STATUS_RUNNING if "status" in self.columns else None
            statement = statement.on_conflict_do_update(
                index_elements=[self.table.c.id],
                set_={key: statement.excluded[key] for key in keys if key != "id"},
                where=only_final,
            )
            connection.execute(statement, rows)
            return
        ids = [row["id"] for row in rows]
        existing = {r[0] for r in connection.execute(sa.select(self.table.c.id).where(self.table.c.id.in_(ids)))}
        for row in rows:  # other dialects: row by row, in order
            if row["id"] not in existing:
                connection.execute(sa.insert(self.table), [row])
            elif row.get("status") != STATUS_RUNNING:
                connection.execute(sa.update(self.table).where(self.table.c.id == row["id"]).values(**row))


def _dispose_after_fork(engine_ref: weakref.ref[Engine]) -> None:
    engine = engine_ref()
    if engine is not None:
        engine.dispose(close=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    for key in _TIME_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    return row


class SQLEventSink(SpanProcessor):
    """A SpanProcessor that writes cmbagent ``execution_events`` rows (add it after the sequencer).

    ``table``: None for our default table (created if missing), or an existing
    SQLAlchemy ``Table`` with cmbagent's columns (e.g. ``ExecutionEvent.__table__``),
    which is used as it is; without ``trace_id``/``span_id`` columns those go in ``meta``.
    On such a table with its foreign keys enforced, a row never fails on an optional
    reference (node/step/parent: NULL, the value kept in ``meta["<column>_ref"]``), and rows
    whose ``workflow_runs``/``sessions`` row does not exist yet are held (one warning naming
    the table) and written once it does; at shutdown rows still held are spilled.
    cmbagent's ``files``/``messages``/``cost_records`` tables, when present, get their rows too.
    ``heartbeat``: keep this process's row in ``otel_cmbagent_writers`` (see :mod:`.writers`); None = only
    when the sink creates its own table, or when that table already exists.
    """

    def __init__(
        self,
        target: str | Engine,
        *,
        table: sa.Table | None = None,
        capture_content: bool = True,
        write_on_start: bool = True,
        spill_path: str | os.PathLike[str] | None = None,
        max_queue: int = 100_000,
        max_batch: int = 512,
        max_retries: int = 5,
        retry_backoff: float = 0.1,
        heartbeat: bool | None = None,
    ) -> None:
        self.engine = make_engine(target)
        if hasattr(os, "register_at_fork"):  # a forked child never uses the parent's pooled connections (this runs
            # before the child's writer thread restarts: handlers run in the order they were registered)
            os.register_at_fork(after_in_child=functools.partial(_dispose_after_fork, weakref.ref(self.engine)))
        self.table = table if table is not None else execution_events_table()
        self._create_table = table is None
        self._table_ready = False
        self.capture_content = capture_content
        self.write_on_start = write_on_start
        self.spill_path = Path(spill_path) if spill_path else default_spill_path(self.engine)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._file = SQLiteFileGuard(self.engine, reconnect=not isinstance(target, Engine), spill_path=self.spill_path)
        self._writer = _TableWriter(self.engine, self.table)
        self._open_spans: set[int] = set()
        self._open_lock = threading.Lock()
        self._degraded = False
        self.rows_written = 0
        self.rows_spilled = 0
        self.rows_rejected = 0  # refused by the database on their own (spilled too)
        self.retries = 0
        self._held: list[dict[str, Any]] = []
        self._held_checked_at = 0.0
        self.max_held = max_queue
        self.rows_held_total = 0
        if self._file.check() != BLOCKED:
            self._ensure_table(log=True)
        create_heartbeat = self._create_table if heartbeat is None else heartbeat
        self._heartbeat = Heartbeat(self.engine, create=create_heartbeat, schema=self.table.schema) \
            if heartbeat is not False else None
        self._worker = BackgroundWorker(
            "otel-cmbagent-sql", self._handle, max_queue=max_queue, max_batch=max_batch, tick=self._beat,
            tick_interval=self._heartbeat.interval if self._heartbeat else float("inf"), quiesce_on_fork=True,
        )
        add_message_listener(self._on_message)
        self._shut_down = False

    # --- SpanProcessor --------------------------------------------------------
    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        try:
            with self._open_lock:
                self._open_spans.add(span.get_span_context().span_id)
            if self.write_on_start:
                # Only a frozen copy here: rows are built on the worker thread, off the agent's path.
                self._worker.put((_START, snapshot(span)))
        except Exception as exc:  # noqa: BLE001
            log_internal_error("SQLEventSink.on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            with self._open_lock:
                self._open_spans.discard(span.get_span_context().span_id)
            self._worker.put((_END, span))  # an ended span no longer changes
        except Exception as exc:  # noqa: BLE001
            log_internal_error("SQLEventSink.on_end", exc)

    def _on_message(self, span: Any, attributes: Mapping[str, Any], timestamp_ns: int) -> None:
        if span.get_span_context().span_id in self._open_spans:
            self._worker.put((_ROW, message_row(span, attributes, timestamp_ns, capture_content=self.capture_content)))

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Write everything queued (and retry held rows); False if some rows are still held or it timed out."""
        if self._held:
            self._worker.put((_RETRY, None))
        return self._worker.flush(timeout_millis / 1000) and not self._held

    def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        remove_message_listener(self._on_message)
        if self._held:
            self._worker.put((_RETRY, None))
        self._worker.shutdown()
        if self._held:
            held, self._held = self._held, []
            self._spill(held, LookupError(f"{len(held)} rows still wait for their run/session row at shutdown"))

    # --- writing ----------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return {
            **self._worker.stats.as_dict(),
            "rows_written": self.rows_written,
            "rows_spilled": self.rows_spilled,
            "rows_rejected": self.rows_rejected,
            "rows_skipped": self._writer.skipped,
            "retries": self.retries,
            "rows_held": len(self._held),
            "rows_held_total": self.rows_held_total,
            "fk_nulled": self._writer.guard.nulled,
            "fk_resolved": self._writer.guard.resolved,
            **{f"{name}_written": count for name, count in self._writer.side.written.items()},
            **{f"{name}_skipped": count for name, count in self._writer.side.skipped.items() if count},
        }

    def _ensure_table(self, log: bool = False) -> bool:
        if self._table_ready:
            return True
        try:
            if self._create_table:
                self.table.metadata.create_all(self.engine, tables=[self.table], checkfirst=True)
            else:
                with self.engine.connect() as connection:
                    if not sa.inspect(connection).has_table(self.table.name, schema=self.table.schema):
                        raise ValueError(f"table {self.table.name!r} does not exist in the target database")
            self._table_ready = True
            self._file.wrote()
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - database down at setup: rows retry/spill later
            # Several processes starting on one fresh database race to create the table; the losers get
            # "table ... already exists", which is success, not "not reachable".
            try:
                with self.engine.connect() as connection:
                    if self._create_table and sa.inspect(connection).has_table(
                        self.table.name, schema=self.table.schema
                    ):
                        self._table_ready = True
                        return True
            except Exception:  # noqa: BLE001 - really not reachable: report the first error below
                pass
            if log:
                _logger.warning(
                    "otel-cmbagent: database %s not reachable at setup (%s); rows will be retried or spilled",
                    self.engine.url.render_as_string(hide_password=True),
                    type(exc).__name__,
                )
            return False
        return True

    def _handle(self, items: list[tuple[str, Any]]) -> None:
        """Build the batch's rows on the worker thread.

        A span that starts and ends within one batch is written once, completed, at its
        start position (parents stay before children: foreign keys on parent_event_id hold).
        """
        ends = {item.get_span_context().span_id: item for kind, item in items if kind == _END}
        written: set[int] = set()
        rows: list[dict[str, Any]] = self._take_held(any(kind == _RETRY for kind, _ in items))
        for kind, item in items:
            if kind == _ROW:
                rows.append(item)
                continue
            if kind == _RETRY:
                continue
            span_id = item.get_span_context().span_id
            if span_id in written:
                continue
            ended = ends.get(span_id)
            if ended is not None:
                written.add(span_id)
                rows.append(span_row(ended, ended=True, capture_content=self.capture_content))
            else:
                row = span_row(item, ended=False, capture_content=self.capture_content)
                row["meta"][WRITER_KEY] = this_writer()  # readers tell a dead writer's rows from live ones
                rows.append(row)
        if rows:
            self._write_batch(rows)

    def _beat(self) -> None:
        """The heartbeat (worker thread, every few seconds), unless the database is unusable or not set up."""
        if self._heartbeat is None or not self._table_ready:
            return
        state = self._file.check()
        if state == RECONNECTED:
            self._table_ready = False
        elif state != BLOCKED:
            self._heartbeat.beat()

    def _take_held(self, retry: bool) -> list[dict[str, Any]]:
        """The held rows, when it is time to try them again (they keep their place: before newer rows)."""
        now = time.monotonic()
        if not self._held or not (retry or now - self._held_checked_at >= HELD_RECHECK_SECONDS):
            return []
        if retry:
            self._writer.guard.forget_absent()
        self._held_checked_at = now
        held, self._held = self._held, []
        return held

    def _hold(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self._held.extend(rows)
        self.rows_held_total += len(rows)
        if len(self._held) > self.max_held:
            overflow = self._held[: len(self._held) - self.max_held]
            del self._held[: len(overflow)]
            self._spill(overflow, OverflowError(f"more than {self.max_held} rows held for a missing run/session row"))

    def _write_batch(self, rows: list[dict[str, Any]]) -> None:
        """Write a batch; a database that fails is retried with backoff, then the batch is spilled; a batch the
        database refuses for its values is split until the refused rows are found (see :func:`write_isolating`)."""
        state = self._file.check()
        if state == BLOCKED:  # the file is gone or unusable (logged once by the guard)
            self._spill(rows, LookupError(f"{self._file.path} is gone or unusable"), log=False)
            return
        if state == RECONNECTED:
            self._table_ready = False
        attempts = 1 if self._degraded else self.max_retries
        delay = self.retry_backoff
        for attempt in range(attempts):
            try:
                self._table_or_raise()
                self._write(rows)
                self._degraded = False
                return
            except Exception as exc:  # noqa: BLE001
                error = exc
                if not database_failed(exc):
                    self._degraded = False
                    self._isolate(rows)
                    return
                if attempt + 1 < attempts:
                    self.retries += 1
                    time.sleep(delay)
                    delay *= 2
        self._degraded = True
        self._spill(rows, error)

    def _table_or_raise(self) -> None:
        """The table is there, or a database failure (retried, then spilled) - never a row's fault."""
        try:
            ready = self._ensure_table()
        except ValueError as exc:  # a host's table that is gone
            raise RuntimeError(str(exc)) from exc
        if not ready:
            raise RuntimeError("table not ready")

    def _write(self, rows: list[dict[str, Any]]) -> None:
        written, held = self._writer.write(rows)
        self._file.wrote()
        self.rows_written += written
        self._hold(held)

    def _isolate(self, rows: list[dict[str, Any]]) -> None:
        try:
            refused = write_isolating(self._write, rows)
        except DatabaseFailed as failed:
            self._degraded = True
            self._spill(failed.rows, failed.error)
            return
        for row, error in refused:
            self._reject(row, error)

    def _reject(self, row: dict[str, Any], error: BaseException) -> None:
        self.rows_rejected += 1
        if self.rows_rejected == 1:
            _logger.warning(
                "otel-cmbagent: the database refused a row of run %r (%s: %s); it alone is spilled to %s, the rest "
                "of its batch is written (refused rows are counted in stats['rows_rejected']; logged once)",
                row.get("run_id"), type(error).__name__, _first_line(error), self.spill_path,
            )
        self._spill([row], error, log=False)

    def _spill(self, rows: list[dict[str, Any]], error: BaseException, *, log: bool = True) -> None:
        try:
            append_rows(self.spill_path, rows)
            self.rows_spilled += len(rows)
            if log:
                _logger.warning(
                    "otel-cmbagent: database write failed (%s: %s); spilled %d rows to %s (replay with replay())",
                    type(error).__name__, _first_line(error), len(rows), self.spill_path,
                )
        except OSError as exc:
            self._worker.stats.dropped += len(rows)
            _logger.error("otel-cmbagent: could not spill %d rows to %s: %s", len(rows), self.spill_path, exc)


# --- failures: the database's, or a row's --------------------------------------------------------------
# What a database (or the way to it) that fails looks like; anything else a batch raises is about its values
# (DataError, IntegrityError, a StatementError wrapping an encoding or serialisation error, ...).
_DATABASE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError,
                    sa.exc.InternalError, sa.exc.NoSuchTableError, OSError, RuntimeError)


def database_failed(error: BaseException) -> bool:
    """True when ``error`` says the database failed (down, locked, table gone), not one of the rows."""
    return isinstance(error, _DATABASE_ERRORS) and not isinstance(error, UnicodeError)


class DatabaseFailed(Exception):
    """The database itself failed while a refused batch was being split: ``rows`` are not written."""

    def __init__(self, rows: list[dict[str, Any]], error: BaseException) -> None:
        super().__init__(str(error))
        self.rows = rows
        self.error = error


def write_isolating(
    write: Callable[[list[dict[str, Any]]], None], rows: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], BaseException]]:
    """Write a batch the database refused in halves, then quarters..., in order, until every row that is
    refused on its own is found: returns those with their errors (one bad row in 512 costs ~18 writes).
    Raises :class:`DatabaseFailed` with the rows not yet written if the database itself fails meanwhile."""
    refused: list[tuple[dict[str, Any], BaseException]] = []
    pending = [rows]
    while pending:
        part = pending.pop()
        try:
            write(part)
        except Exception as exc:  # noqa: BLE001
            if database_failed(exc):
                raise DatabaseFailed([row for rest in [part, *reversed(pending)] for row in rest], exc) from exc
            if len(part) == 1:
                refused.append((part[0], exc))
            else:
                middle = len(part) // 2
                pending += [part[middle:], part[:middle]]  # the first half is written first
    return refused


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0][:200] if text else ""


# --- spill files ------------------------------------------------------------------------------------------
def append_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows as JSON Lines; a last line cut short (a crash mid-write) is ended first, so the new lines
    stay whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(json.dumps(row, default=_json_default) + "\n" for row in rows).encode("utf-8"))


@dataclass
class ReplayReport:
    """What :func:`replay_report` did: rows written, rows still waiting for their run/session row, and the
    lines it could not use (``unreadable``: not a spilled row, e.g. cut short; ``refused``: the database
    refused the row), by line number, with the first error. Every line not written is left in ``path``."""

    path: Path
    written: int = 0
    held: int = 0
    incomplete: int = 0  # rows without a value the table requires (e.g. a run_id for cmbagent's table)
    unreadable: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    first_error: str | None = None  # the error of the lowest line number skipped
    left_in: Path | None = None
    _first_line: int = field(default=0, repr=False)

    def note(self, lines: list[int], line: int, error: str) -> None:
        lines.append(line)
        if self.first_error is None or line < self._first_line:
            self.first_error, self._first_line = f"line {line}: {error}", line


def _read_spill(path: Path, report: ReplayReport) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not row.get("id"):
                    raise ValueError("not a row object with an id")
                yield number, _from_json(row)
            except (ValueError, TypeError) as exc:
                report.note(report.unreadable, number, f"not a spilled row ({type(exc).__name__}: {exc})"[:300])


def replay_report(
    spill_path: str | os.PathLike[str],
    target: str | Engine,
    *,
    table: sa.Table | None = None,
    batch_size: int = 512,
    remove: bool = True,
) -> ReplayReport:
    """Write a spill file back into the table (idempotent upserts), skipping what cannot be written.

    Lines that are not rows (a last line cut short by a crash) and rows the database refuses are skipped and
    reported by line number; every valid row is written. What was not written (those lines, and rows whose
    run/session row still does not exist) is left in the file; with ``remove`` and nothing left, the file is
    renamed ``*.replayed``. A database that fails raises (nothing is removed).
    """
    path = Path(spill_path)
    engine = make_engine(target)
    if table is None:
        table = execution_events_table()
        table.metadata.create_all(engine, tables=[table], checkfirst=True)
    writer = _TableWriter(engine, table)
    report = ReplayReport(path)
    numbers: dict[int, int] = {}  # id(row) -> its line number, for the rows in hand
    held: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    for number, row in _read_spill(path, report):
        numbers[id(row)] = number
        batch.append(row)
        if len(batch) >= batch_size:
            _replay_batch(writer, batch, held, report, numbers)
            numbers = {id(row): numbers[id(row)] for row in held}
            batch = []
    if batch:
        _replay_batch(writer, batch, held, report, numbers)
    report.held = len(held)
    report.incomplete = writer.skipped
    _leave_unwritten(path, report, [json.dumps(row, default=_json_default) + "\n" for row in held], remove)
    return report


def _replay_batch(writer: _TableWriter, batch: list[dict[str, Any]], held: list[dict[str, Any]],
                  report: ReplayReport, numbers: dict[int, int]) -> None:
    def write(rows: list[dict[str, Any]]) -> None:
        written, waiting = writer.write(rows)
        report.written += written
        held.extend(waiting)

    rows, held[:] = held + batch, []
    try:
        write(rows)
        return
    except Exception as exc:  # noqa: BLE001
        if database_failed(exc):
            raise
    try:
        refused = write_isolating(write, rows)
    except DatabaseFailed as failed:
        raise failed.error from None
    for row, error in refused:
        report.note(report.refused, numbers[id(row)], f"{type(error).__name__}: {_first_line(error)}")


def _leave_unwritten(path: Path, report: ReplayReport, held: list[str], remove: bool) -> None:
    """Rewrite ``path`` with what was not written (held rows, then the skipped lines as they were)."""
    skipped = set(report.unreadable) | set(report.refused)
    kept: list[str] = []
    if skipped:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            kept = [line if line.endswith("\n") else line + "\n"
                    for number, line in enumerate(handle, 1) if number in skipped]
    if held or kept:
        path.write_text("".join(held + kept), encoding="utf-8", errors="surrogateescape")
        report.left_in = path
        if report.held:
            _logger.warning("otel-cmbagent: %d spilled rows still have no run/session row; left in %s",
                            report.held, path)
        if kept:
            _logger.warning("otel-cmbagent: %d lines of %s could not be written (%s); left in the file",
                            len(kept), path, report.first_error)
    elif remove:
        path.rename(path.with_name(path.name + ".replayed"))


def replay(spill_path: str | os.PathLike[str], target: str | Engine, **options: Any) -> int:
    """:func:`replay_report` (same options), returning the number of rows written."""
    return replay_report(spill_path, target, **options).written
