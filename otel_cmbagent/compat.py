"""Drop-in for cmbagent's ``cmbagent.execution.event_capture`` and ``ag2_hooks``, built on the span pipeline.

    # before
    from cmbagent.execution.event_capture import EventCaptureManager, get_event_captor, set_event_captor
    from cmbagent.execution.ag2_hooks import install_ag2_hooks, uninstall_ag2_hooks, patch_code_executor
    # after
    from otel_cmbagent.compat import (EventCaptureManager, get_event_captor, set_event_captor,
                                      install_ag2_hooks, uninstall_ag2_hooks, patch_code_executor)

Every ``capture_*`` call emits a span (so every sink sees it) and returns the id of its
row; AG2 spans started while a captor is set carry its run/session ids and share its
run's gapless order. There is no second event path.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from . import semconv
from .context import _IDENTITY_KEY, RunIdentity, sequence_for_run
from .errors import mark_failed
from .instrumentor import AG2Instrumentor, ensure_sequencer
from .processor import SequencingSpanProcessor
from .spans import add_ordered_event
from .utils import log_internal_error, safe_text, to_json
from .version import __version__

_LIMIT = 16 * 1024  # per value, as the instrumentation's default

_event_captor_var: contextvars.ContextVar[EventCaptureManager | None] = contextvars.ContextVar(
    "event_captor", default=None
)
_otel_token_var: contextvars.ContextVar[object | None] = contextvars.ContextVar("event_captor_otel_token", default=None)


def get_event_captor() -> EventCaptureManager | None:
    """The event captor of the current execution context (contextvars: per session, per branch)."""
    return _event_captor_var.get()


def set_event_captor(captor: EventCaptureManager | None) -> None:
    """Set the captor of the current context, and scope the OTel context to its run.

    AG2 spans started while it is set carry the captor's run/session ids and order and nest
    under its run. ``ThreadPoolExecutor`` work inherits it (threading instrumentation), as do
    ``contextvars.copy_context()`` runs.
    """
    token = _otel_token_var.get()
    if token is not None:
        try:
            otel_context.detach(token)
        except Exception as exc:  # noqa: BLE001 - set from another context: nothing to undo here
            log_internal_error("set_event_captor detach", exc)
        _otel_token_var.set(None)
    _event_captor_var.set(captor)
    if captor is not None and captor.enabled:
        _otel_token_var.set(otel_context.attach(captor._scoped_context()))


class _CaptorRouter(SpanProcessor):
    """Hands each span to the sinks of the captor whose run it belongs to."""

    def __init__(self) -> None:
        self.captors: dict[str, EventCaptureManager] = {}
        self.lock = threading.Lock()

    def _sinks(self, span: ReadableSpan) -> tuple[SpanProcessor, ...]:
        run_id = (span.attributes or {}).get(semconv.RUN_ID)
        captor = self.captors.get(run_id) if isinstance(run_id, str) else None
        return captor._sinks if captor is not None else ()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for sink in self._sinks(span):
            sink.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for sink in self._sinks(span):
            sink.on_end(span)


_router = _CaptorRouter()
_provider_lock = threading.Lock()
_provider: TracerProvider | None = None


def _tracer_provider() -> TracerProvider:
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
            _provider.add_span_processor(_router)
        return _provider


def install_ag2_hooks(**options: Any) -> bool:
    """Trace AG2 (the old ``ag2_hooks.install_ag2_hooks``); idempotent."""
    instrumentor = AG2Instrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return False
    instrumentor.instrument(tracer_provider=_tracer_provider(), **options)
    return True


def uninstall_ag2_hooks() -> None:
    """Undo ``install_ag2_hooks`` (every patched attribute restored exactly)."""
    instrumentor = AG2Instrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def patch_code_executor(executor_class: type) -> bool:
    """Trace a custom executor's ``execute_code_blocks`` (the old stub, now complete)."""
    install_ag2_hooks()
    return AG2Instrumentor().patch_code_executor(executor_class)


class EventCaptureManager:
    """cmbagent's event captor on OpenTelemetry: each capture is a span, each span a row."""

    def __init__(
        self,
        db_session: Any,
        run_id: str,
        session_id: str,
        enabled: bool = True,
        buffer_size: int = 50,
        ws_emit_callback: Any = None,
    ) -> None:
        self.db_session = db_session
        self.run_id = str(run_id)
        self.session_id = str(session_id)
        self.enabled = enabled
        self.buffer_size = buffer_size
        self.ws_emit_callback = ws_emit_callback
        self._lock = threading.Lock()
        self._sequence = sequence_for_run(self.run_id)  # shared with the processor
        self._event_stack_local = threading.local()
        self._node_id: str | None = None
        self._step_id: str | None = None
        self._open: dict[str, Span] = {}
        self._counts: Counter[str] = Counter()
        self._sinks: tuple[SpanProcessor, ...] = ()
        self._root: Span | None = None
        self._closed = False
        if not enabled:
            return
        self._tracer = _tracer_provider().get_tracer("otel_cmbagent.compat", __version__)
        sinks: list[SpanProcessor] = []
        if db_session is not None:
            sinks.append(self._sql_sink(db_session, buffer_size))
        if ws_emit_callback is not None:
            from otel_cmbagent.exporters.websocket import WebsocketCallbackProcessor

            sinks.append(WebsocketCallbackProcessor(ws_emit_callback))
        self._sinks = tuple(sinks)
        with _router.lock:
            _router.captors[self.run_id] = self
        identity = RunIdentity(self.run_id, self.session_id, sequence=self._sequence)
        self._root = self._tracer.start_span(
            "invoke_workflow cmbagent",
            context=otel_context.set_value(_IDENTITY_KEY, identity, otel_context.Context()),
            attributes={
                semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_WORKFLOW,
                semconv.EVENT_TYPE: semconv.EVENT_RUN,
                semconv.RUN_ID: self.run_id,
                semconv.SESSION_ID: self.session_id,
            },
        )

    @staticmethod
    def _sql_sink(db_session: Any, buffer_size: int) -> SpanProcessor:
        import sqlalchemy as sa

        from otel_cmbagent.exporters.sql import SQLEventSink

        engine = db_session.get_bind()
        if sa.inspect(engine).has_table("execution_events"):
            table = sa.Table("execution_events", sa.MetaData(), autoload_with=engine)
        else:
            table = None
        return SQLEventSink(engine, table=table, max_batch=max(1, buffer_size) * 10)

    # --- Stage 3 API -----------------------------------------------------------------
    @property
    def event_stack(self) -> list[str]:
        """Thread-local stack of open event ids (nesting)."""
        if not hasattr(self._event_stack_local, "stack"):
            self._event_stack_local.stack = []
        return self._event_stack_local.stack

    def _next_order(self) -> int:
        """Thread-safe order counter: the same sequence the span processor uses for this run."""
        return self._sequence.next()

    def set_context(self, node_id: str | None = None, step_id: str | None = None) -> None:
        self._node_id = node_id
        self._step_id = step_id
        self._rescope()

    def _rescope(self) -> None:
        """Re-attach the captor's OTel context after its identity or nesting changed (if it is current)."""
        if self.enabled and get_event_captor() is self:
            set_event_captor(self)

    def _identity(self) -> RunIdentity:
        return RunIdentity(self.run_id, self.session_id, self._node_id, self._step_id, self._sequence)

    def _scoped_context(self) -> otel_context.Context:
        ctx = otel_context.set_value(_IDENTITY_KEY, self._identity())
        parent = self._open.get(self.event_stack[-1]) if self.event_stack else None
        span = parent or self._root
        return trace.set_span_in_context(span, ctx) if span is not None else ctx

    def _start(self, name: str, event_type: str, attributes: dict[str, Any]) -> Span:
        attributes[semconv.EVENT_TYPE] = event_type
        self._counts[event_type] += 1
        return self._tracer.start_span(name, context=self._scoped_context(), attributes=attributes)

    def _finish(self, span: Span, duration_ms: float | None = None) -> None:
        end = span.start_time + int(duration_ms * 1e6) if duration_ms and span.start_time else None
        span.end(end_time=end)

    @staticmethod
    def _id(span: Span) -> str:
        from otel_cmbagent.exporters.rows import event_id

        context = span.get_span_context()
        return event_id(context.trace_id, context.span_id)

    def _emit(self, name: str, event_type: str, attributes: dict[str, Any], **finish: Any) -> str | None:
        if not self.enabled:
            return None
        try:
            span = self._start(name, event_type, attributes)
            if finish.get("error"):
                mark_failed(span, finish.get("error_type") or "error", finish["error"])
            self._finish(span, finish.get("duration_ms"))
            return self._id(span)
        except Exception as exc:  # noqa: BLE001 - capture must never break the caller
            log_internal_error(f"capture {event_type}", exc)
            return None

    def _open_event(self, name: str, event_type: str, attributes: dict[str, Any]) -> str | None:
        """Start a span that stays open (agent call, code run): later captures nest under it."""
        if not self.enabled:
            return None
        try:
            span = self._start(name, event_type, attributes)
            event_id = self._id(span)
            self._open[event_id] = span
            self.event_stack.append(event_id)
            self._rescope()
            return event_id
        except Exception as exc:  # noqa: BLE001
            log_internal_error(f"capture {event_type} start", exc)
            return None

    def _close_event(self, event_id: str | None, attributes: dict[str, Any], failure: str | None = None) -> bool:
        span = self._open.pop(event_id, None) if event_id else None
        if span is None:
            return False
        try:
            span.set_attributes(attributes)
            if failure:
                mark_failed(span, "code_execution_error", failure)
            span.end()
            if event_id in self.event_stack:
                self.event_stack.remove(event_id)
            self._rescope()
        except Exception as exc:  # noqa: BLE001
            log_internal_error("capture end", exc)
        return True

    def _meta(self, metadata: dict[str, Any] | None) -> dict[str, Any]:
        return {"cmbagent.metadata": to_json(metadata, _LIMIT)} if metadata else {}

    # --- legacy capture methods -------------------------------------------------------
    def capture_agent_call(self, agent_name: str, message: Any, context: Any = None, metadata: Any = None) -> str | None:
        return self._open_event(
            f"invoke_agent {agent_name}",
            semconv.EVENT_AGENT_CALL,
            {
                semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT,
                semconv.GEN_AI_AGENT_NAME: agent_name,
                semconv.GEN_AI_INPUT_MESSAGES: to_json([{"role": "user", "content": message}], _LIMIT),
                **({"cmbagent.context": to_json(context, _LIMIT)} if context else {}),
                **self._meta(metadata),
            },
        )

    def capture_agent_response(
        self, agent_name: str, response: Any, event_id: str | None = None, metadata: Any = None
    ) -> str | None:
        if not self.enabled:
            return None
        output = {semconv.GEN_AI_OUTPUT_MESSAGES: to_json([{"role": "assistant", "content": response}], _LIMIT)}
        if self._close_event(event_id, output):
            return event_id
        return self._emit(
            f"invoke_agent {agent_name}",
            semconv.EVENT_AGENT_CALL,
            {semconv.GEN_AI_AGENT_NAME: agent_name, **output, **self._meta(metadata)},
        )

    def capture_tool_call(
        self, agent_name: str, tool_name: str, arguments: Any, result: Any = None, metadata: Any = None
    ) -> str | None:
        return self._emit(
            f"execute_tool {tool_name}",
            semconv.EVENT_TOOL_CALL,
            {
                semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_TOOL,
                semconv.GEN_AI_AGENT_NAME: agent_name,
                semconv.GEN_AI_TOOL_NAME: tool_name,
                semconv.GEN_AI_TOOL_CALL_ARGUMENTS: to_json(arguments, _LIMIT),
                **({semconv.GEN_AI_TOOL_CALL_RESULT: safe_text(result, _LIMIT)} if result is not None else {}),
                **self._meta(metadata),
            },
        )

    def _code_attributes(self, agent_name: str, code: str, language: str, metadata: Any) -> dict[str, Any]:
        return {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_CODE,
            semconv.GEN_AI_AGENT_NAME: agent_name,
            semconv.CODE_LANGUAGE: language,
            semconv.CODE_BLOCKS: to_json([{"language": language, "code": code}], _LIMIT),
            **self._meta(metadata),
        }

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
        attributes = self._code_attributes(agent_name, code, language, metadata)
        if exit_code is not None:
            attributes[semconv.CODE_EXIT_CODE] = int(exit_code)
        if result is not None:
            attributes[semconv.CODE_OUTPUT] = safe_text(result, _LIMIT)
        failed = exit_code not in (None, 0)
        return self._emit(
            f"execute_code {agent_name}",
            semconv.EVENT_CODE_EXEC,
            attributes,
            duration_ms=duration_ms,
            error=f"exit code {exit_code}" if failed else None,
            error_type="code_execution_error",
        )

    def capture_code_execution_start(
        self, agent_name: str, code: str, language: str = "python", metadata: Any = None
    ) -> str | None:
        return self._open_event(
            f"execute_code {agent_name}", semconv.EVENT_CODE_EXEC, self._code_attributes(agent_name, code, language, metadata)
        )

    def capture_code_execution_end(
        self, event_id: str | None, result: Any = None, exit_code: int | None = None, metadata: Any = None
    ) -> str | None:
        attributes: dict[str, Any] = {}
        if exit_code is not None:
            attributes[semconv.CODE_EXIT_CODE] = int(exit_code)
        if result is not None:
            attributes[semconv.CODE_OUTPUT] = safe_text(result, _LIMIT)
        failure = f"exit code {exit_code}" if exit_code not in (None, 0) else None
        return event_id if self._close_event(event_id, attributes, failure) else None

    def capture_file_generation(
        self, agent_name: str, file_path: str, file_type: str, size_bytes: int | None = None, metadata: Any = None
    ) -> str | None:
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_FILE,
            semconv.GEN_AI_AGENT_NAME: agent_name,
            semconv.FILE_PATH: str(file_path),
            semconv.FILE_TYPE: file_type,
            **self._meta(metadata),
        }
        if size_bytes is not None:
            attributes[semconv.FILE_SIZE] = int(size_bytes)
        return self._emit(f"file {file_path}", semconv.EVENT_FILE_GEN, attributes)

    def capture_handoff(self, from_agent: str, to_agent: str, context: Any = None, reason: str | None = None) -> str | None:
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_HANDOFF,
            semconv.HANDOFF_FROM: from_agent,
            semconv.HANDOFF_TO: to_agent,
            semconv.GEN_AI_AGENT_NAME: from_agent,
        }
        if reason:
            attributes["cmbagent.handoff.reason"] = reason
        if context:
            attributes["cmbagent.context"] = to_json(context, _LIMIT)
        return self._emit(f"handoff {from_agent} -> {to_agent}", semconv.EVENT_HANDOFF, attributes)

    def capture_message(
        self, sender: str, recipient: str, content: Any, tokens: int | None = None, metadata: Any = None
    ) -> str | None:
        """A message event on the current span (or the run), with its own order."""
        if not self.enabled:
            return None
        try:
            ctx = self._scoped_context()
            span = trace.get_current_span(ctx)
            attributes: dict[str, Any] = {
                semconv.EVENT_TYPE: semconv.EVENT_MESSAGE,
                semconv.MESSAGE_SENDER: sender,
                semconv.MESSAGE_RECIPIENT: recipient,
                semconv.MESSAGE_CONTENT: to_json([{"type": "text", "content": content}], _LIMIT),
                **self._meta(metadata),
            }
            if tokens is not None:
                attributes["cmbagent.message.tokens"] = int(tokens)
            token = otel_context.attach(ctx)
            try:
                add_ordered_event(span, semconv.MESSAGE_EVENT_NAME, attributes)
            finally:
                otel_context.detach(token)
            self._counts[semconv.EVENT_MESSAGE] += 1
            from otel_cmbagent.exporters.rows import event_id

            context = span.get_span_context()
            return event_id(context.trace_id, context.span_id, f"/message/{attributes[semconv.EXECUTION_ORDER]}")
        except Exception as exc:  # noqa: BLE001
            log_internal_error("capture_message", exc)
            return None

    def capture_error(
        self, agent_name: str, error_message: str, error_type: str | None = None, metadata: Any = None
    ) -> str | None:
        return self._emit(
            f"error {agent_name}",
            "error",
            {semconv.GEN_AI_AGENT_NAME: agent_name, **self._meta(metadata)},
            error=error_message,
            error_type=error_type or "error",
        )

    def get_performance_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "run_id": self.run_id,
            "enabled": self.enabled,
            "events_by_type": dict(self._counts),
            "total_events": sum(self._counts.values()),
            "last_order": self._sequence.last,
            "open_events": len(self._open),
        }
        for sink in self._sinks:
            stats[type(sink).__name__] = dict(getattr(sink, "stats", {}))
        return stats

    def flush(self, timeout_millis: int = 30_000) -> bool:
        return all(sink.force_flush(timeout_millis) for sink in self._sinks)

    def close(self) -> None:
        """End open events and the run, write everything, release the sinks. Idempotent."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        for span in list(self._open.values()):
            span.end()
        self._open.clear()
        if self._root is not None:
            self._root.end()
        deadline = time.monotonic() + 30
        for sink in self._sinks:
            sink.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))
        with _router.lock:
            if _router.captors.get(self.run_id) is self:
                del _router.captors[self.run_id]
        for sink in self._sinks:
            sink.shutdown()
