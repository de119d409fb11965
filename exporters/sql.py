"""The SQL event table sink: cmbagent's ``execution_events`` rows, live, batched, idempotent.

A span still open when the writer takes a batch gets a ``status=running`` row, completed when it
ends, so a crashed or hung run is visible in the table. A background worker
writes batches in one transaction with executemany upserts (SQLAlchemy Core);
a failing database is retried with backoff, then the batch is spilled to a JSONL
file that ``replay()`` writes back idempotently. A burst the queue cannot hold goes to
the overflow file (:mod:`.overflow`), which the writer reads back once it has caught up:
nothing is dropped.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from sqlalchemy.engine import Engine

from otel_cmbagent.pipeline.listeners import add_message_listener, remove_message_listener
from otel_cmbagent.pipeline.open_spans import OpenSpans
from otel_cmbagent.pipeline.values import log_internal_error
from otel_cmbagent.table.encoding import row_from_json
from otel_cmbagent.table.fit import json_text
from otel_cmbagent.table.rows import SpanAtEnd, message_row, snapshot, span_at_end, span_row
from otel_cmbagent.table.schema import execution_events_table
from otel_cmbagent.table.writers import WRITER_KEY, Heartbeat, this_writer

from .overflow import OverflowFile
from .spill import ReplayReport, append_rows, replay, replay_report
from .sqlite_file import BLOCKED, RECONNECTED, SQLiteFileGuard
from .table_writer import DatabaseFailed, TableWriter, database_failed, first_line, in_start_order, write_isolating
from .worker import BackgroundWorker

__all__ = ["ReplayReport", "SQLEventSink", "execution_events_table", "make_engine", "replay", "replay_report"]

_logger = logging.getLogger("otel_cmbagent.exporters")

# Queue items, told apart by type (no tuple per span: fewer objects for the garbage collector while a burst is
# queued): a SpanAtEnd (its final row), a tuple (a message: its span's snapshot, attributes, time), a dict (a row),
# _RETRY, or _STARTED. A span's start puts nothing of its own: the writer reads the open spans itself.
_RETRY = "retry"
_STARTED = object()  # "a span started": wakes the writer (never written to the overflow file, see nudge)
# Rows waiting for their run/session row are tried again this often (and on every flush).
HELD_RECHECK_SECONDS = 1.0


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


def _drained_row(row: dict[str, Any]) -> dict[str, Any] | str:
    """A row read back from the overflow file, queued as a row (or the retry marker it was)."""
    return row_from_json(row) if "id" in row else _RETRY


def _dispose_after_fork(engine_ref: weakref.ref[Engine]) -> None:
    engine = engine_ref()
    if engine is not None:
        engine.dispose(close=False)


def _forget_open_after_fork(sink_ref: weakref.ref[SQLEventSink]) -> None:
    """A forked child writes no running rows for its parent's open spans: they are the parent's to write (and
    its copies of them never end)."""
    sink = sink_ref()
    if sink is not None:
        sink._open.clear()  # not a new dict: a registry shared with the sequencer stays one
        sink._shown = set()
        sink._start_pending = False


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
    A burst that fills the queue (``max_queue`` items) goes on, in order, into the overflow file
    (``<spill stem>.overflow-<pid>.jsonl``), written to the table once the queue has drained; ``stats``
    counts it (``overflowed``, ``drained``) apart from the failure spill (``rows_spilled``).
    ``heartbeat``: keep this process's row in ``otel_cmbagent_writers`` (see :mod:`.writers`); None = only
    when the sink creates its own table, or when that table already exists.
    Rows are written in the agent's quiet: once no span has started or ended for ``delay`` seconds (the agent
    waits on an LLM, a tool, a person), and at the latest ``max_delay`` seconds after the first of them
    (a busy stretch), or at once when ``max_batch`` are waiting or on a flush. A span still open then gets its
    ``running`` row (once); a start copies nothing on the agent's thread. ``open_spans``: an
    :class:`~otel_cmbagent.pipeline.open_spans.OpenSpans` a processor ahead of this one keeps (``setup_tracing``
    passes the sequencer's), read instead of a registry of this sink's own.
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
        delay: float = 0.1,
        max_delay: float = 2.0,
        open_spans: OpenSpans | None = None,
    ) -> None:
        if not 0 < delay <= max_delay:
            raise ValueError(f"need 0 < delay <= max_delay, not delay={delay!r}, max_delay={max_delay!r}")
        self.engine = make_engine(target)
        if hasattr(os, "register_at_fork"):  # a forked child never uses the parent's pooled connections (this runs
            # before the child's writer thread restarts: handlers run in the order they were registered)
            os.register_at_fork(after_in_child=functools.partial(_dispose_after_fork, weakref.ref(self.engine)))
            os.register_at_fork(after_in_child=functools.partial(_forget_open_after_fork, weakref.ref(self)))
        self.table = table if table is not None else execution_events_table()
        self._create_table = table is None
        self._table_ready = False
        self.capture_content = capture_content
        self.write_on_start = write_on_start
        self.spill_path = Path(spill_path) if spill_path else default_spill_path(self.engine)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._file = SQLiteFileGuard(self.engine, reconnect=not isinstance(target, Engine), spill_path=self.spill_path)
        self._writer = TableWriter(self.engine, self.table)
        # span id -> the open span: its running row and message rows (a dict store/pop is atomic: no lock per span);
        # with ``open_spans`` the registry a processor ahead of this one keeps (setup_tracing: the sequencer)
        self._own_open = open_spans is None
        self._open: dict[int, Any] = {} if open_spans is None else open_spans.spans
        self._shown: set[int] = set()  # open spans whose running row is written (the writer's own)
        self._start_pending = False  # a _STARTED is queued and not yet taken
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
            "otel-cmbagent-sql", self._handle, max_queue=max_queue, max_batch=max_batch, delay=delay,
            max_delay=max_delay, tick=self._beat,
            tick_interval=self._heartbeat.interval if self._heartbeat else float("inf"), quiesce_on_fork=True,
            overflow=OverflowFile(self.spill_path, self._row_of, _drained_row),
        )
        add_message_listener(self._on_message)
        self._shut_down = False

    # --- SpanProcessor --------------------------------------------------------
    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        # No copy here: the writer snapshots the spans still open when it takes a batch (a span that ends before
        # then gets its final row only), so the agent's thread pays a dict store, not a record and a queued item.
        try:
            if self._own_open:
                self._open[span.get_span_context().span_id] = span
            if self.write_on_start and not self._start_pending:
                self._start_pending = True
                self._worker.nudge(_STARTED)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("SQLEventSink.on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            record = span_at_end(span)  # plain values: a queued ReadableSpan keeps the collector busy
            if self._own_open:  # before the put: a batch holding the end never sees it open
                self._open.pop(record.span_id, None)
            self._worker.put(record)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("SQLEventSink.on_end", exc)

    def _on_message(self, span: Any, attributes: Mapping[str, Any], timestamp_ns: int) -> None:
        if span.get_span_context().span_id in self._open:  # the row is built on the worker, from copies
            self._worker.put((snapshot(span), dict(attributes), timestamp_ns))

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Write everything queued and the running rows of open spans (and retry held rows); False if some rows
        are still held or it timed out."""
        if self._held:
            self._worker.put(_RETRY)
        if self.write_on_start and self._open:
            self._worker.nudge(_STARTED)
        return self._worker.flush(timeout_millis / 1000) and not self._held

    def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        remove_message_listener(self._on_message)
        if self._held:
            self._worker.put(_RETRY)
        self._worker.shutdown()
        if self._held:
            held, self._held = self._held, []
            self._spill(held, LookupError(f"{len(held)} rows still wait for their run/session row at shutdown"))

    # --- writing ----------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return {
            **self._worker.stats.with_overflow(),
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

    def _handle(self, items: list[Any]) -> None:
        """Build the batch's rows on the worker thread: the running rows of spans open now and not shown yet,
        then the items' rows, in start order (parents before children: foreign keys on parent_event_id hold;
        ends arrive children first). A span that started and ended since the last batch is written once,
        completed."""
        self._start_pending = False  # before reading the open spans: a span starting after this nudges again
        rows: list[dict[str, Any]] = self._take_held(_RETRY in items)
        fresh = self._running_rows()
        for item in items:
            if item is not _STARTED and item is not _RETRY:
                fresh.append(self._row_of(item))
        rows.extend(in_start_order(fresh))  # before a refused batch is split: its halves keep the order
        if rows:
            self._write_batch(rows)

    def _running_rows(self) -> list[dict[str, Any]]:
        """The running rows of the spans open now whose row is not written yet (each once while it is open)."""
        if not self.write_on_start or not self._open:
            self._shown = set()
            return []
        shown, still_shown = self._shown, set()
        rows = []
        for span_id, span in list(self._open.items()):  # a copy: the agents' threads store and pop meanwhile
            if span_id in shown:
                still_shown.add(span_id)
            elif span.is_recording():  # not ended meanwhile (its end is queued after it left _open)
                rows.append(self._row_of(snapshot(span)))
                still_shown.add(span_id)
        self._shown = still_shown  # the spans that ended drop out
        return rows

    def _row_of(self, item: Any) -> dict[str, Any]:
        """The row of a queued item (on the worker; on the agent's thread for an item that overflows)."""
        if isinstance(item, dict):
            return item
        if type(item) is tuple:
            return message_row(*item, capture_content=self.capture_content)
        if item is _RETRY:
            return {_RETRY: True}  # not a row: read back as the marker it is
        if type(item) is SpanAtEnd:
            return span_row(item, ended=True, capture_content=self.capture_content)
        row = span_row(item, ended=False, capture_content=self.capture_content)
        row["meta"][WRITER_KEY] = this_writer()  # readers tell a dead writer's rows from live ones
        return row

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
                row.get("run_id"), type(error).__name__, first_line(error), self.spill_path,
            )
        self._spill([row], error, log=False)

    def _spill(self, rows: list[dict[str, Any]], error: BaseException, *, log: bool = True) -> None:
        try:
            append_rows(self.spill_path, rows)
            self.rows_spilled += len(rows)
            if log:
                _logger.warning(
                    "otel-cmbagent: database write failed (%s: %s); spilled %d rows to %s (replay with replay())",
                    type(error).__name__, first_line(error), len(rows), self.spill_path,
                )
        except OSError as exc:
            self._worker.stats.dropped += len(rows)
            _logger.error("otel-cmbagent: could not spill %d rows to %s: %s", len(rows), self.spill_path, exc)
