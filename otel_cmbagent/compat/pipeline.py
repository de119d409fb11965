"""Where the spans of a compat captor go: its own sinks, chosen from what cmbagent hands it.

A captor's ``db_session`` becomes a SQL sink on the session's engine (into cmbagent's own
``execution_events`` table, and its side tables, when they exist); ``emit_event_callback`` and
the plan's ``ws_emit_callback`` become callback processors. One span processor on the tracer
provider routes each span to the sinks of the captor whose run it belongs to.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from ..instrumentation.instrumentor import ensure_sequencer
from ..instrumentation.processes import register_run_sinks
from ..pipeline import semconv
from ..pipeline.processor import SequencingSpanProcessor
from ..pipeline.values import log_internal_error
from ..table.schema import DEFAULT_TABLE

if TYPE_CHECKING:
    from ..compat import EventCaptureManager

_logger = logging.getLogger("otel_cmbagent.compat")



class CaptorRouter(SpanProcessor):
    """Hands each span to the sinks of the captor whose run it belongs to."""

    def __init__(self) -> None:
        self.captors: dict[str, EventCaptureManager] = {}
        self.lock = threading.Lock()

    def sinks_of_run(self, run_id: Any) -> tuple[SpanProcessor, ...]:
        """The sinks of the captor of ``run_id`` (none when no captor has that run)."""
        captor = self.captors.get(run_id) if isinstance(run_id, str) else None
        return captor._sinks if captor is not None else ()

    def _sinks(self, span: ReadableSpan) -> tuple[SpanProcessor, ...]:
        return self.sinks_of_run((span.attributes or {}).get(semconv.RUN_ID))

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for sink in self._sinks(span):
            sink.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for sink in self._sinks(span):
            sink.on_end(span)

    def add(self, captor: EventCaptureManager) -> None:
        with self.lock:
            self.captors[captor.run_id] = captor

    def remove(self, captor: EventCaptureManager) -> None:
        with self.lock:
            if self.captors.get(captor.run_id) is captor:
                del self.captors[captor.run_id]


router = CaptorRouter()
register_run_sinks(router.sinks_of_run)  # process-pool workers of a captor's run write where it writes
_provider_lock = threading.Lock()
_provider: TracerProvider | None = None


def tracer_provider() -> TracerProvider:
    """The global SDK provider (e.g. from ``setup_tracing``) with the captor router, else our own."""
    global _provider
    with _provider_lock:
        if _provider is None:
            current = trace.get_tracer_provider()
            if isinstance(current, TracerProvider):
                ensure_sequencer(current)
                _provider = current
            else:
                _provider = TracerProvider()
                _provider.add_span_processor(SequencingSpanProcessor())
            _provider.add_span_processor(router)
        return _provider


def sql_sink(db_session: Any, buffer_size: int) -> SpanProcessor | None:
    """A SQL sink on the session's engine: cmbagent's ``execution_events`` table when it exists, else ours."""
    import sqlalchemy as sa

    from otel_cmbagent.exporters.sql import SQLEventSink

    get_bind = getattr(db_session, "get_bind", None)
    if not callable(get_bind):
        _logger.warning("otel-cmbagent: db_session %r is not a SQLAlchemy session; no rows are written", db_session)
        return None
    engine = writer_engine(get_bind(), db_session)
    table = None
    if sa.inspect(engine).has_table(DEFAULT_TABLE):
        table = sa.Table(DEFAULT_TABLE, sa.MetaData(), autoload_with=engine)
    return SQLEventSink(engine, table=table, max_batch=max(1, int(buffer_size or 1)) * 10)


def writer_engine(engine: Any, db_session: Any = None) -> Any:
    """The engine the sink writes with: the session's own, or - for a SQLite file behind a one-connection
    pool (cmbagent's ``get_engine()`` uses ``StaticPool``) - a second engine on that file, so the sink's
    transactions (and the pool's rollback when a connection is returned) never touch the transaction of
    the caller's session; foreign keys as on the original."""
    import sqlalchemy as sa

    url = engine.url
    database = url.database or ""
    shared = isinstance(engine.pool, (sa.pool.StaticPool, sa.pool.SingletonThreadPool))
    if url.get_backend_name() != "sqlite" or not shared or database in ("", ":memory:") or database.startswith("file:"):
        return engine
    in_transaction = getattr(db_session, "in_transaction", None)
    if callable(in_transaction) and in_transaction():  # ask on the session's own connection: nothing is reset
        foreign_keys = bool(db_session.connection().exec_driver_sql("PRAGMA foreign_keys").scalar())
    else:
        with engine.connect() as connection:
            foreign_keys = bool(connection.exec_driver_sql("PRAGMA foreign_keys").scalar())
    # the file's journal mode is the owner's (switching it would wait for the caller's transaction)
    own = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
    sa.event.listen(own, "connect", functools.partial(_pragmas, foreign_keys=foreign_keys))
    return own


def _pragmas(dbapi_connection: Any, _record: Any, *, foreign_keys: bool) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    if foreign_keys:
        cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def last_order(sink: Any, run_id: str) -> int:
    """The highest ``execution_order`` of the run already in the table (a new captor of a run goes on from it)."""
    import sqlalchemy as sa

    table = getattr(sink, "table", None)
    if table is None or "run_id" not in table.c or "execution_order" not in table.c:
        return 0
    try:
        with sink.engine.connect() as connection:
            value = connection.execute(
                sa.select(sa.func.max(table.c.execution_order)).where(table.c.run_id == run_id)
            ).scalar()
    except Exception as exc:  # noqa: BLE001 - no table yet, database down: start at 1
        log_internal_error("compat last_order", exc)
        return 0
    return int(value or 0)


def sinks_for(captor: EventCaptureManager) -> tuple[SpanProcessor, ...]:
    """The sinks of a new captor, from its ``db``, ``emit_event_callback`` and ``ws_emit_callback``."""
    sinks: list[SpanProcessor] = []
    if captor.db is not None:
        sink = sql_sink(captor.db, captor.buffer_size)
        if sink is not None:
            captor._sequence.continue_after(last_order(sink, captor.run_id))
            sinks.append(sink)
    if captor._emit_event_callback is not None:
        from otel_cmbagent.exporters.event_objects import EventObjectCallbackProcessor

        sinks.append(EventObjectCallbackProcessor(captor._emit_event_callback, lambda: captor.websocket, captor.run_id))
    if captor.ws_emit_callback is not None:
        from otel_cmbagent.exporters.websocket import WebsocketCallbackProcessor

        sinks.append(WebsocketCallbackProcessor(captor.ws_emit_callback))
    return tuple(sinks)
