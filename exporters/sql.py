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
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from sqlalchemy.engine import Engine

from otel_cmbagent.live import add_message_listener, remove_message_listener
from otel_cmbagent.utils import log_internal_error

from .foreign_keys import ForeignKeyGuard
from .rows import LINK_COLUMNS, STATUS_RUNNING, message_row, snapshot, span_row
from .side_tables import SideTables
from .worker import BackgroundWorker

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
            engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ValueError(f"cannot use sql_url {url.render_as_string(hide_password=True)}: {exc}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
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
    ) -> None:
        self.engine = make_engine(target)
        self.table = table if table is not None else execution_events_table()
        self._create_table = table is None
        self._table_ready = False
        self.capture_content = capture_content
        self.write_on_start = write_on_start
        self.spill_path = Path(spill_path) if spill_path else default_spill_path(self.engine)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._writer = _TableWriter(self.engine, self.table)
        self._open_spans: set[int] = set()
        self._open_lock = threading.Lock()
        self._degraded = False
        self.rows_written = 0
        self.rows_spilled = 0
        self.retries = 0
        self._held: list[dict[str, Any]] = []
        self._held_checked_at = 0.0
        self.max_held = max_queue
        self.rows_held_total = 0
        self._ensure_table(log=True)
        self._worker = BackgroundWorker("otel-cmbagent-sql", self._handle, max_queue=max_queue, max_batch=max_batch)
        add_message_listener(self._on_message)
        self._shut_down = False
        if hasattr(os, "register_at_fork"):  # a forked child must never use the parent's pooled connections
            os.register_at_fork(after_in_child=functools.partial(_dispose_after_fork, weakref.ref(self.engine)))

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
                rows.append(span_row(item, ended=False, capture_content=self.capture_content))
        if rows:
            self._write_batch(rows)

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
        attempts = 1 if self._degraded else self.max_retries
        delay = self.retry_backoff
        for attempt in range(attempts):
            try:
                if not self._ensure_table():
                    raise RuntimeError("table not ready")
                written, held = self._writer.write(rows)
                self.rows_written += written
                self._hold(held)
                self._degraded = False
                return
            except sa.exc.IntegrityError as exc:
                # Some rows break a constraint of the user's table (e.g. a foreign key to a run
                # that is not in workflow_runs): retrying cannot help, but the other rows must land.
                self._degraded = False
                self._write_one_by_one(rows, exc)
                return
            except Exception as exc:  # noqa: BLE001
                error = exc
                if attempt + 1 < attempts:
                    self.retries += 1
                    time.sleep(delay)
                    delay *= 2
        self._degraded = True
        self._spill(rows, error)

    def _write_one_by_one(self, rows: list[dict[str, Any]], error: BaseException) -> None:
        rejected: list[dict[str, Any]] = []
        for row in rows:
            try:
                written, held = self._writer.write([row])
                self.rows_written += written
                self._hold(held)
            except sa.exc.IntegrityError:
                rejected.append(row)
        if rejected:
            self._spill(rejected, error)

    def _spill(self, rows: list[dict[str, Any]], error: BaseException) -> None:
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill_path, "a", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, default=_json_default) + "\n")
            self.rows_spilled += len(rows)
            _logger.warning(
                "otel-cmbagent: database write failed (%s: %s); spilled %d rows to %s (replay with replay())",
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
                len(rows),
                self.spill_path,
            )
        except OSError as exc:
            self._worker.stats.dropped += len(rows)
            _logger.error("otel-cmbagent: could not spill %d rows to %s: %s", len(rows), self.spill_path, exc)


def replay(
    spill_path: str | os.PathLike[str],
    target: str | Engine,
    *,
    table: sa.Table | None = None,
    batch_size: int = 512,
    remove: bool = True,
) -> int:
    """Write a spill file back into the table (idempotent upserts); returns the rows written.

    With ``remove`` the file is renamed ``*.replayed`` once every row is in. Rows whose
    run/session row still does not exist stay in the file (it then holds only those).
    """
    path = Path(spill_path)
    engine = make_engine(target)
    if table is None:
        table = execution_events_table()
        table.metadata.create_all(engine, tables=[table], checkfirst=True)
    writer = _TableWriter(engine, table)
    written = 0
    held: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                batch.append(_from_json(json.loads(line)))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_number}: not a spilled row ({exc})") from None
            if len(batch) >= batch_size:
                written += _replay_batch(writer, batch, held)
                batch = []
    if batch:
        written += _replay_batch(writer, batch, held)
    if held:
        _logger.warning("otel-cmbagent: %d spilled rows still have no run/session row; left in %s", len(held), path)
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, default=_json_default) + "\n" for row in held)
    elif remove:
        path.rename(path.with_name(path.name + ".replayed"))
    return written


def _replay_batch(writer: _TableWriter, batch: list[dict[str, Any]], held: list[dict[str, Any]]) -> int:
    written, waiting = writer.write(held + batch)
    held[:] = waiting
    return written
