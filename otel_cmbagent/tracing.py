"""``setup_tracing()``: one call from nothing to spans in SQL, OTLP and a live callback."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider

from .instrumentation import ag2x
from .instrumentation.instrumentor import AG2Instrumentor
from .pipeline.config import InstrumentationConfig
from .pipeline.open_spans import OpenSpans
from .pipeline.processor import SequencingSpanProcessor
from .pipeline.values import log_internal_error

_logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "cmbagent"
_DEFAULT: Any = object()


@dataclass(eq=False)
class Tracing:
    """What ``setup_tracing()`` built. ``shutdown()`` is idempotent and flushes every sink."""

    tracer_provider: TracerProvider
    sql: SpanProcessor | None = None
    otlp: SpanProcessor | None = None
    websocket: SpanProcessor | None = None
    instrumentor: AG2Instrumentor | None = None
    open_spans: OpenSpans | None = None
    metrics: SpanProcessor | None = None  # the MetricsSpanProcessor, recording into meter_provider
    meter_provider: Any = None
    logger_provider: Any = None
    log_handler: logging.Handler | None = None  # on the root logger, feeding logger_provider
    worker_setup: Any = field(default=None, repr=False)  # how worker processes rebuild these sinks
    _shut_down: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Spans first (their end records the metrics), then metrics and logs."""
        flushed = self.tracer_provider.force_flush(timeout_millis)
        for provider in (self.meter_provider, self.logger_provider):
            if provider is not None:
                flushed = bool(provider.force_flush(timeout_millis)) and flushed
        return flushed

    def interrupt(self, reason: str) -> int:
        """End every span still open as interrupted by ``reason`` (the process is being stopped)."""
        if self._shut_down or self.open_spans is None:
            return 0
        return self.open_spans.end_all(reason)

    def shutdown(self) -> None:
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        try:
            instrumentor = self.instrumentor
            # Only undo the patches if they still report to this provider (a later setup may own them).
            if (
                instrumentor is not None
                and instrumentor.is_instrumented_by_opentelemetry
                and instrumentor.tracer_provider is self.tracer_provider
            ):
                instrumentor.uninstrument()
        finally:
            try:
                self.tracer_provider.shutdown()
            finally:
                self._shutdown_metrics_and_logs()

    def _shutdown_metrics_and_logs(self) -> None:
        if self.log_handler is not None:
            from otel_cmbagent.exporters.otlp_signals import detach_log_handlers

            detach_log_handlers(only=self.log_handler)
        from otel_cmbagent.exporters.worker import shutdown_timeout

        shutdowns = []
        if self.meter_provider is not None:  # its last export waits at most the sinks' shutdown timeout
            shutdowns.append(functools.partial(self.meter_provider.shutdown, shutdown_timeout() * 1000))
        if self.logger_provider is not None:
            shutdowns.append(self.logger_provider.shutdown)
        for shutdown in shutdowns:
            try:
                shutdown()
            except Exception:  # noqa: BLE001
                _logger.exception("otel-cmbagent: shutting down metrics or logs failed")

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per sink: what was written, dropped, failed or spilled (nothing is lost silently)."""
        return {
            name: dict(getattr(sink, "stats", {}))
            for name, sink in (("sql", self.sql), ("otlp", self.otlp), ("websocket", self.websocket))
            if sink is not None
        }


def _resource(service_name: str | None) -> Resource:
    resource = Resource.create({SERVICE_NAME: service_name} if service_name else {})
    if not service_name and str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def setup_tracing(
    service_name: str | None = None,
    sql_url: Any = _DEFAULT,
    sql_table: Any = None,
    otlp: bool | None = None,
    ws_callback: Callable[[str, dict[str, Any]], Any] | None = None,
    capture_content: bool | None = None,
    *,
    ws_loop: Any = None,
    write_on_start: bool = True,
    spill_path: str | os.PathLike[str] | None = None,
    instrument: bool = True,
    set_global: bool = True,
    handle_sigterm: bool = True,
    metrics: bool | None = None,
    logs: bool | None = None,
) -> Tracing:
    """Build a TracerProvider with the sequencer first and one processor per sink, and instrument AG2.

    - ``sql_url``: a URL, an Engine, or None (off); default ``$OTEL_CMBAGENT_SQL_URL`` or a SQLite file.
    - ``otlp``: None = on when ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set; True/False forces.
    - ``capture_content``: None = content in the instrumentation (unless the GenAI content variable
      says false) and in SQL/websocket, stripped from OTLP unless that variable says true;
      True = content everywhere; False = nowhere.
    - ``metrics``: GenAI and ``cmbagent.*`` metrics from the spans; None = on when ``OTEL_METRICS_EXPORTER``
      names otlp/console or an OTLP (metrics) endpoint variable is set; True/False forces.
    - ``logs``: log records over OTLP; None = on when ``OTEL_LOGS_EXPORTER`` names otlp/console or
      ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` is set; True/False forces. Log records carry trace, span and
      run ids (``otel_cmbagent.pipeline.logs``) whatever this says.
    """
    from otel_cmbagent.exporters.otlp import otlp_configured, otlp_span_processor
    from otel_cmbagent.table.schema import DEFAULT_SQL_URL, SQL_URL_ENV

    if ws_callback is not None and not callable(ws_callback):
        raise TypeError(f"ws_callback must be callable(event_type, data), not {ws_callback!r}")
    content_in_spans = InstrumentationConfig.resolve(capture_content=capture_content).capture_content

    resource = _resource(service_name)
    provider = TracerProvider(resource=resource, span_limits=_span_limits())
    open_spans = OpenSpans()  # kept by the sequencer (not a processor of its own: two hook calls per span fewer)
    provider.add_span_processor(SequencingSpanProcessor(open_spans=open_spans))
    if ag2x.installed():  # AG2 1.x's spans get our event types before any sink sees them
        provider.add_span_processor(ag2x.AG2xSpanProcessor())
    tracing = Tracing(tracer_provider=provider, open_spans=open_spans)
    try:
        _add_metrics_and_logs(tracing, resource, metrics, logs)
        if sql_url is _DEFAULT:
            sql_url = os.environ.get(SQL_URL_ENV) or DEFAULT_SQL_URL
        if sql_url is not None:
            from otel_cmbagent.exporters.sql import SQLEventSink

            tracing.sql = SQLEventSink(
                sql_url, table=sql_table, capture_content=content_in_spans, write_on_start=write_on_start,
                spill_path=spill_path, open_spans=open_spans,
            )
            provider.add_span_processor(tracing.sql)
        if otlp if otlp is not None else otlp_configured():
            tracing.otlp = otlp_span_processor(capture_content=capture_content)
            provider.add_span_processor(tracing.otlp)
        if ws_callback is not None:
            from otel_cmbagent.exporters.websocket import WebsocketCallbackProcessor

            tracing.websocket = WebsocketCallbackProcessor(ws_callback, capture_content=content_in_spans, loop=ws_loop)
            provider.add_span_processor(tracing.websocket)
    except BaseException:
        provider.shutdown()
        tracing._shutdown_metrics_and_logs()
        raise
    from .instrumentation.processes import worker_setup

    tracing.worker_setup = worker_setup(
        tracing.sql, service_name=service_name, otlp=tracing.otlp is not None, capture_content=capture_content,
        write_on_start=write_on_start, spill_path=spill_path, instrument=instrument,
        metrics=tracing.meter_provider is not None, logs=tracing.logger_provider is not None,
    )

    if set_global:
        _set_global_provider(provider)
    if instrument:
        instrumentor = AG2Instrumentor()
        if instrumentor.is_instrumented_by_opentelemetry:  # re-setup: move the patches to the new provider
            instrumentor.uninstrument()
        instrumentor.instrument(tracer_provider=provider, capture_content=content_in_spans, add_sequencer=False)
        tracing.instrumentor = instrumentor
    _register_exit_hooks(tracing, handle_sigterm)
    return tracing


def _add_metrics_and_logs(tracing: Tracing, resource: Resource, metrics: bool | None, logs: bool | None) -> None:
    """Log correlation always; the metrics processor and its MeterProvider, and the OTLP log pipeline, when asked."""
    from otel_cmbagent.exporters import otlp_signals

    from .pipeline.logs import configure_plain_output_from_env, install_log_correlation
    from .pipeline.metrics import MetricsSpanProcessor

    install_log_correlation(str(resource.attributes.get(SERVICE_NAME, "")))
    configure_plain_output_from_env()
    if metrics if metrics is not None else otlp_signals.signal_configured("METRICS"):
        tracing.meter_provider = otlp_signals.meter_provider(resource)
        tracing.metrics = MetricsSpanProcessor(tracing.meter_provider)
        tracing.tracer_provider.add_span_processor(tracing.metrics)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=functools.partial(_own_meter_provider, weakref.ref(tracing), resource))
    if logs if logs is not None else otlp_signals.signal_configured("LOGS"):
        tracing.logger_provider = otlp_signals.logger_provider(resource)
        tracing.log_handler = otlp_signals.attach_log_handler(tracing.logger_provider)


def _own_meter_provider(tracing_ref: weakref.ref[Tracing], resource: Resource) -> None:
    """In a forked child: a MeterProvider of its own (the inherited copy holds the parent's points and no
    longer exports, see ``otlp_signals._ThisProcessOnly``), so the child exports only what it records."""
    tracing = tracing_ref()
    if tracing is None or tracing._shut_down or tracing.metrics is None:
        return
    try:
        from otel_cmbagent.exporters import otlp_signals

        tracing.meter_provider = otlp_signals.meter_provider(resource)
        tracing.metrics.rebind(tracing.meter_provider)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        log_internal_error("metrics in a forked process", exc)


# A conversation span carries one event per message; the SDK's default of 128 events
# per span would drop the oldest messages of a long chat (and leave gaps in the order
# that OTLP backends see). The SQL and websocket sinks get every message regardless.
DEFAULT_MAX_EVENTS_PER_SPAN = 100_000


def _span_limits() -> SpanLimits:
    if os.environ.get("OTEL_SPAN_EVENT_COUNT_LIMIT"):
        return SpanLimits()
    return SpanLimits(max_events=DEFAULT_MAX_EVENTS_PER_SPAN)


def _set_global_provider(provider: TracerProvider) -> None:
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    else:
        _logger.debug("otel-cmbagent: a global TracerProvider is already set; not replacing it")


_live_tracings: weakref.WeakSet[Tracing] = weakref.WeakSet()
_hooks_installed = False


# How long the SIGTERM handler waits for the sinks (e.g. Kubernetes sends SIGKILL 30 s after SIGTERM).
SIGTERM_GRACE_SECONDS = 20.0


def _shutdown_all(reason: str) -> None:
    """Every live setup: open spans ended as interrupted by ``reason``, then flushed and shut down."""
    for tracing in list(_live_tracings):
        try:
            tracing.interrupt(reason)
            tracing.shutdown()
        except Exception:  # noqa: BLE001
            _logger.exception("otel-cmbagent: shutdown at exit failed")


def _on_sigterm(signum: int, frame: Any) -> None:
    # In a thread: the signal may have interrupted the main thread inside a lock the shutdown needs.
    worker = threading.Thread(target=_shutdown_all, args=("SIGTERM",), name="otel-cmbagent-sigterm", daemon=True)
    worker.start()
    worker.join(SIGTERM_GRACE_SECONDS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _register_exit_hooks(tracing: Tracing, handle_sigterm: bool) -> None:
    global _hooks_installed
    _live_tracings.add(tracing)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_shutdown_all, "the process exiting")
    if handle_sigterm and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)
