"""Drop-in for cmbagent's ``cmbagent.execution.event_capture``: ``EventCaptureManager`` on the span pipeline.

Every call cmbagent's shipped code makes (fork UJ2202/MARS: ``phases/execution_manager.py``,
``branching/branch_executor.py``) and every call of its "Stage 3" plan works unchanged. Every ``capture_*``
call emits a span (so every sink sees it) and returns the id of its row; the rows read as cmbagent's own
capture writes them (see :mod:`otel_cmbagent.table.rows`). There is no second event path.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor

from ..instrumentation.spans import add_ordered_event
from ..pipeline import semconv
from ..pipeline.values import log_internal_error
from ..version import __version__
from . import attributes as attrs
from .captor_spans import CaptorSpans, span_row_id
from .pipeline import router, sinks_for, tracer_provider

F = TypeVar("F", bound=Callable[..., Any])


def _timed(method: F) -> F:
    """A capture call: a no-op when disabled, never raises, its time added to ``total_capture_time_ms``."""

    @functools.wraps(method)
    def wrapper(self: EventCaptureManager, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - capture must never break the caller
            log_internal_error(f"EventCaptureManager.{method.__name__}", exc)
            return None
        finally:
            self.total_capture_time_ms += (time.perf_counter() - started) * 1000

    return wrapper  # type: ignore[return-value]


class EventCaptureManager(CaptorSpans):
    """cmbagent's event captor on OpenTelemetry: each capture is a span, each span a row.

    Same constructor as cmbagent's (``db_session, run_id, session_id, enabled=True,
    buffer_size=50, websocket=None, emit_event_callback=None``; the async callback is called as
    ``callback(websocket, event, run_id)``), plus the plan's ``ws_emit_callback(event_type, data)``.
    ``_next_order()`` is thread-safe without a lock to re-enter (cmbagent's deadlocks), and
    metadata is made JSON-safe, so one bad value never breaks later captures.
    """

    def __init__(
        self,
        db_session: Any,
        run_id: str,
        session_id: str,
        enabled: bool = True,
        buffer_size: int = 50,
        websocket: Any = None,
        emit_event_callback: Callable[..., Any] | None = None,
        *,
        ws_emit_callback: Callable[[str, dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(run_id, session_id, enabled)
        self.db = db_session
        self.buffer_size = buffer_size
        self.websocket = websocket
        self._emit_event_callback = emit_event_callback
        self.ws_emit_callback = ws_emit_callback
        self.total_capture_time_ms = 0.0
        self._sinks: tuple[SpanProcessor, ...] = ()
        if self.enabled:
            self._start_run()

    def _start_run(self) -> None:
        self._tracer = tracer_provider().get_tracer("otel_cmbagent.compat", __version__)
        try:
            self._sinks = sinks_for(self)
        except Exception as exc:  # noqa: BLE001 - no sinks: spans still go to the global pipeline
            log_internal_error("EventCaptureManager sinks", exc)
        router.add(self)
        self._start_root()

    # --- cmbagent's attributes ------------------------------------------------------------
    @property
    def db_session(self) -> Any:
        """The plan's name for ``db``."""
        return self.db

    @property
    def current_node_id(self) -> str | None:
        return self._node_id

    @current_node_id.setter
    def current_node_id(self, value: str | None) -> None:
        self._node_id = value
        self._rescope()

    @property
    def current_step_id(self) -> str | None:
        return self._step_id

    @current_step_id.setter
    def current_step_id(self, value: str | None) -> None:
        self._step_id = value
        self._rescope()

    @property
    def total_events(self) -> int:
        return sum(self._counts.values())

    def _next_order(self) -> int:
        """The run's next order, thread-safe: the sequence the span processor uses for this run. Private in
        name only: cmbagent's "Stage 3" plan verifies the captor with it (10 threads x 100 calls)."""
        return self._sequence.next()

    def set_context(self, node_id: str | None = None, step_id: str | None = None) -> None:
        """Set the current DAG node / workflow step; like cmbagent, only the values given change."""
        if node_id:
            self._node_id = str(node_id)
        if step_id:
            self._step_id = str(step_id)
        self._rescope()

    # --- cmbagent's capture calls ------------------------------------------------------------
    @_timed
    def capture_agent_call(self, agent_name: str, message: Any, context: Any = None, metadata: Any = None) -> str | None:
        attributes = attrs.agent_call(agent_name, message, context, metadata)
        return self._open_event(f"invoke_agent {agent_name}", semconv.EVENT_AGENT_CALL, attributes)

    @_timed
    def capture_agent_response(
        self, agent_name: str, response: Any, event_id: str | None = None, metadata: Any = None
    ) -> str | None:
        output = attrs.agent_response(response, metadata)
        if self._close_event(event_id, output):
            return event_id
        return self._emit(f"invoke_agent {agent_name}", semconv.EVENT_AGENT_CALL, {**attrs.agent(agent_name), **output})

    @_timed
    def capture_tool_call(
        self, agent_name: str, tool_name: str, arguments: Any, result: Any = None, metadata: Any = None
    ) -> str | None:
        attributes = attrs.tool_call(agent_name, tool_name, arguments, result, metadata)
        return self._emit(f"execute_tool {tool_name}", semconv.EVENT_TOOL_CALL, attributes)

    @_timed
    def capture_code_execution(
        self,
        agent_name: str,
        code: str,
        language: str = "python",
        result: Any = None,
        exit_code: int | None = None,
        duration_ms: float | None = None,
        metadata: Any = None,
    ) -> str | None:
        outcome, failure = attrs.code_outcome(result, exit_code)
        return self._emit(
            f"execute_code {agent_name}", semconv.EVENT_CODE_EXEC,
            {**attrs.code(agent_name, code, language, metadata), **outcome},
            duration_ms=duration_ms, error=failure, error_type="code_execution_error",
        )

    @_timed
    def capture_code_execution_start(
        self, agent_name: str, code: str, language: str = "python", metadata: Any = None
    ) -> str | None:
        """A code run that stays open until :meth:`capture_code_execution_end` (the plan's patch uses these)."""
        attributes = attrs.code(agent_name, code, language, metadata)
        return self._open_event(f"execute_code {agent_name}", semconv.EVENT_CODE_EXEC, attributes)

    @_timed
    def capture_code_execution_end(
        self,
        event_id: str | None = None,
        result: Any = None,
        exit_code: int | None = None,
        metadata: Any = None,
        *,
        agent_name: str | None = None,
        success: bool | None = None,
    ) -> str | None:
        """End one code run (``event_id``), or - the plan's ``(agent_name=, result=, success=)`` shape -
        every code run this thread has open (of ``agent_name``, when given); returns the last id ended."""
        attributes, failure = attrs.code_outcome(result, exit_code, success)
        attributes.update(attrs.metadata(metadata))
        ids = [event_id] if event_id else self._open_events_of(semconv.EVENT_CODE_EXEC, agent_name)
        ended = [i for i in ids if self._close_event(i, attributes, failure)]
        return ended[-1] if ended else None

    @_timed
    def capture_file_generation(
        self, agent_name: str, file_path: str, file_type: str, size_bytes: int | None = None, metadata: Any = None
    ) -> str | None:
        attributes = attrs.file_generation(agent_name, file_path, file_type, size_bytes, metadata)
        return self._emit(f"file {file_path}", semconv.EVENT_FILE_GEN, attributes)

    @_timed
    def capture_handoff(self, from_agent: str, to_agent: str, context: Any = None, reason: str | None = None) -> str | None:
        attributes = attrs.handoff(from_agent, to_agent, context, reason)
        return self._emit(f"handoff {from_agent} -> {to_agent}", semconv.EVENT_HANDOFF, attributes)

    @_timed
    def capture_message(
        self, sender: str, recipient: str, content: Any, tokens: int | None = None, metadata: Any = None
    ) -> str | None:
        """A message event on the current span (or the run), with its own order; its row is agent_call/message."""
        ctx = self._scoped_context()
        span = trace.get_current_span(ctx)
        attributes = attrs.message(sender, recipient, content, tokens, metadata, self._node_id, self._step_id)
        token = otel_context.attach(ctx)
        try:
            add_ordered_event(span, semconv.MESSAGE_EVENT_NAME, attributes)
        finally:
            otel_context.detach(token)
        self._counts[semconv.EVENT_MESSAGE] += 1
        return span_row_id(span, f"/message/{attributes[semconv.EXECUTION_ORDER]}")

    @_timed
    def capture_error(
        self, agent_name: str, error_message: str, error_type: str | None = None, metadata: Any = None
    ) -> str | None:
        """An ``error`` row whose subtype is ``error_type`` (cmbagent's default: ``runtime_error``)."""
        return self._emit(
            f"error {agent_name}", semconv.EVENT_ERROR,
            {semconv.GEN_AI_AGENT_NAME: agent_name, **attrs.metadata(metadata)},
            error=str(error_message), error_type=error_type or "runtime_error",
        )

    # --- lifecycle --------------------------------------------------------------------------
    def get_performance_stats(self) -> dict[str, Any]:
        """cmbagent's keys, plus events per type, open events and each sink's counters."""
        total = self.total_events
        stats: dict[str, Any] = {
            "total_events": total,
            "total_capture_time_ms": self.total_capture_time_ms,
            "avg_capture_time_ms": self.total_capture_time_ms / total if total else 0,
            "enabled": self.enabled,
            "current_node_id": self._node_id,
            "current_step_id": self._step_id,
            "execution_order": self._sequence.last,
            "run_id": self.run_id,
            "events_by_type": dict(self._counts),
            "last_order": self._sequence.last,
            "open_events": len(self._open),
        }
        for sink in self._sinks:
            stats[type(sink).__name__] = dict(getattr(sink, "stats", {}))
        return stats

    def flush(self, timeout_millis: int = 30_000) -> bool:
        """Write what was captured so far (cmbagent's ``flush()``); False if rows wait or it timed out."""
        return all(sink.force_flush(timeout_millis) for sink in self._sinks)

    def close(self) -> None:
        """End open events and the run, write everything, release the sinks; then disabled, as cmbagent. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.enabled = False
        self._end_all()
        deadline = time.monotonic() + 30
        for sink in self._sinks:
            sink.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))
        router.remove(self)
        for sink in self._sinks:
            sink.shutdown()
