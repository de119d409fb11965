"""Log correlation: every ``logging.LogRecord`` made during a run carries its trace id, span id and run id.

A LogRecord factory (as ``opentelemetry-instrumentation-logging`` does, with the same attribute names) reaches
every logger — AG2's, the user's, ours — and every handler, including handlers added later; a logger
``Filter`` would only see records logged on its own logger. ``LOG_FORMAT`` shows the ids in plain output.
Installed once however often ``setup_tracing()`` runs; ``uninstall_log_correlation()`` restores the factory.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from opentelemetry import trace

from . import semconv
from .context import current_identity
from .values import scrub

# The ids in plain output (a ``logging.Formatter`` format; the fields are "0" / "" outside a span / run).
LOG_FORMAT = (
    "%(asctime)s %(levelname)s [%(name)s] [trace_id=%(otelTraceID)s span_id=%(otelSpanID)s "
    "run_id=%(cmbagent.run_id)s] %(message)s"
)

_INVALID_TRACE_ID = "0"
_lock = threading.Lock()
_previous_factory: Callable[..., logging.LogRecord] | None = None


def _correlate(record: logging.LogRecord, service_name: str) -> None:
    span_context = trace.get_current_span().get_span_context()
    fields = record.__dict__
    if span_context.is_valid:
        fields[semconv.LOG_TRACE_ID] = format(span_context.trace_id, "032x")
        fields[semconv.LOG_SPAN_ID] = format(span_context.span_id, "016x")
        fields[semconv.LOG_TRACE_SAMPLED] = span_context.trace_flags.sampled
    else:
        fields[semconv.LOG_TRACE_ID] = fields[semconv.LOG_SPAN_ID] = _INVALID_TRACE_ID
        fields[semconv.LOG_TRACE_SAMPLED] = False
    fields[semconv.LOG_SERVICE_NAME] = service_name
    identity = current_identity()
    fields[semconv.LOG_RUN_ID] = (identity.run_id if identity is not None else None) or ""


class _CorrelatingFactory:
    """Wraps the LogRecord factory that was in place; marked so it is never wrapped twice."""

    def __init__(self, wrapped: Callable[..., logging.LogRecord], service_name: str) -> None:
        self.wrapped = wrapped
        self.service_name = service_name

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        try:
            _correlate(record, self.service_name)
        except Exception:  # noqa: BLE001 - a log call must never fail because of us
            pass
        return record


def install_log_correlation(service_name: str = "") -> None:
    """Put the correlating factory in place (once; a later call only updates the service name)."""
    global _previous_factory
    with _lock:
        current = logging.getLogRecordFactory()
        if isinstance(current, _CorrelatingFactory):
            current.service_name = service_name
            return
        _previous_factory = current
        logging.setLogRecordFactory(_CorrelatingFactory(current, service_name))


def uninstall_log_correlation() -> None:
    """Restore the factory found at install time (when ours is still the current one)."""
    global _previous_factory
    with _lock:
        if isinstance(logging.getLogRecordFactory(), _CorrelatingFactory) and _previous_factory is not None:
            logging.setLogRecordFactory(_previous_factory)
        _previous_factory = None


class ScrubbingFormatter(logging.Formatter):
    """The message (and traceback) with known secrets removed: what a log record may send out of the process."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def configure_plain_output_from_env() -> None:
    """``OTEL_PYTHON_LOG_CORRELATION=true``: ``logging.basicConfig`` with ``OTEL_PYTHON_LOG_FORMAT`` (default
    ``LOG_FORMAT``) and ``OTEL_PYTHON_LOG_LEVEL``, as ``opentelemetry-instrumentation-logging`` does (a no-op
    when the root logger already has handlers)."""
    if os.environ.get("OTEL_PYTHON_LOG_CORRELATION", "").strip().lower() != "true":
        return
    level = os.environ.get("OTEL_PYTHON_LOG_LEVEL", "info").strip().upper()
    logging.basicConfig(format=os.environ.get("OTEL_PYTHON_LOG_FORMAT") or LOG_FORMAT,
                        level=logging.getLevelName(level) if level in _LEVELS else logging.INFO)


_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
