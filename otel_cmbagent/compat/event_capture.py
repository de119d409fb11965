"""Drop-in for cmbagent's ``cmbagent.execution.event_capture`` and ``ag2_hooks``, built on the span pipeline.

    # before
    from cmbagent.execution.event_capture import EventCaptureManager, get_event_captor, set_event_captor
    from cmbagent.execution.ag2_hooks import install_ag2_hooks, uninstall_ag2_hooks, patch_code_executor
    # after
    from otel_cmbagent.compat import (EventCaptureManager, get_event_captor, set_event_captor,
                                      install_ag2_hooks, uninstall_ag2_hooks, patch_code_executor)

Every call cmbagent's shipped code makes (fork UJ2202/MARS: ``phases/execution_manager.py``,
``branching/branch_executor.py``, ``ag2_hooks``) and every call of its "Stage 3" plan works
unchanged. Every ``capture_*`` call emits a span (so every sink sees it) and returns the id of
its row; the rows read as cmbagent's own capture writes them (see
:mod:`otel_cmbagent.table.rows`). AG2 spans started while a captor is set carry its
run/session/node/step ids and share its run's gapless order. There is no second event path.
"""

from __future__ import annotations

import contextvars
import functools
import json
import threading
import time
from collections import Counter
from typing import Any, Callable, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Span, SpanProcessor

from ..pipeline import semconv
from .pipeline import router, sinks_for, tracer_provider
from ..pipeline.context import _IDENTITY_KEY, RunIdentity, sequence_for_run
from ..pipeline.errors import mark_failed
from ..instrumentation.instrumentor import AG2Instrumentor
from ..instrumentation.messages import messages_json
from ..instrumentation.spans import add_ordered_event
from ..pipeline.values import log_internal_error, safe_text, to_json
from ..version import __version__

_LIMIT = 16 * 1024  # per value, as the instrumentation's default
F = TypeVar("F", bound=Callable[..., Any])

_event_captor_var: contextvars.ContextVar[Any] = contextvars.ContextVar("event_captor", default=None)
_otel_token_var: contextvars.ContextVar[object | None] = contextvars.ContextVar("event_captor_otel_token", default=None)


def get_event_captor() -> Any:
    """The event captor of the current execution context (contextvars: per session, per branch)."""
    return _event_captor_var.get()


def set_event_captor(captor: Any) -> None:
    """Set the captor of the current context (any object, like cmbagent's); scope the OTel context to its run.

    AG2 spans started while an :class:`EventCaptureManager` is set carry its run/session ids and
    order and nest under its run. ``ThreadPoolExecutor`` work inherits it (threading
    instrumentation), as do ``contextvars.copy_context()`` runs.
    """
    token = _otel_token_var.get()
    if token is not None:
        try:
            otel_context.detach(token)
        except Exception as exc:  # noqa: BLE001 - set from another context: nothing to undo here
            log_internal_error("set_event_captor detach", exc)
        _otel_token_var.set(None)
    _event_captor_var.set(captor)
    if isinstance(captor, EventCaptureManager) and captor.enabled and not captor._closed:
        _otel_token_var.set(otel_context.attach(captor._scoped_context()))


# --- ag2_hooks ------------------------------------------------------------------------------
def install_ag2_hooks(**options: Any) -> bool:
    """Trace AG2 (cmbagent's ``ag2_hooks.install_ag2_hooks``); idempotent: True, also when already installed."""
    instrumentor = AG2Instrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider(), **options)
    return instrumentor.is_instrumented_by_opentelemetry


def uninstall_ag2_hooks() -> None:
    """Undo ``install_ag2_hooks`` (every patched attribute restored exactly; cmbagent's only logged)."""
    instrumentor = AG2Instrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def patch_conversable_agent() -> bool:
    """cmbagent's ``patch_conversable_agent()``: agent turns and messages (part of ``install_ag2_hooks``)."""
    return install_ag2_hooks()


def patch_group_chat() -> bool:
    """cmbagent's ``patch_group_chat()``: speaker selection as handoffs (part of ``install_ag2_hooks``)."""
    return install_ag2_hooks()


def patch_code_executor(executor_class: type | None = None) -> bool:
    """Trace an executor class's ``execute_code_blocks``; no argument: ``LocalCommandLineCodeExecutor`` (as cmbagent).

    True when that class is traced (now or already).
    """
    if not install_ag2_hooks():
        return False
    if executor_class is None:
        try:
            from autogen.coding import LocalCommandLineCodeExecutor as executor_class
        except ImportError as exc:
            log_internal_error("patch_code_executor", exc)
            return False
    instrumentor = AG2Instrumentor()
    if instrumentor.patch_code_executor(executor_class):
        return True
    return any(owner is executor_class and name == "execute_code_blocks" for owner, name, _ in instrumentor.patched_attributes)


# --- the captor -----------------------------------------------------------------------------
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


def _event_id(span: Span, suffix: str = "") -> str:
    from otel_cmbagent.table.rows import event_id

    context = span.get_span_context()
    return event_id(context.trace_id, context.span_id, suffix)


def _metadata(metadata: Any) -> dict[str, Any]:
    return {semconv.METADATA: to_json(metadata, _LIMIT)} if metadata else {}


def _with_earlier_metadata(span: Span, attributes: dict[str, Any]) -> dict[str, Any]:
    """An ending event keeps the metadata it started with (cmbagent replaces it; the response's wins per key)."""
    earlier = (getattr(span, "attributes", None) or {}).get(semconv.METADATA)
    later = attributes.get(semconv.METADATA)
    if not earlier or not later:
        return attributes
    try:
        merged = {**json.loads(earlier), **json.loads(later)}
    except (ValueError, TypeError):
        return attributes
    return {**attributes, semconv.METADATA: to_json(merged, _LIMIT)}


class EventCaptureManager:
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
        self.db = db_session
        self.run_id = str(run_id)
        self.session_id = str(session_id)
        self.enabled = bool(enabled)
        self.buffer_size = buffer_size
        self.websocket = websocket
        self._emit_event_callback = emit_event_callback
        self.ws_emit_callback = ws_emit_callback
        self.total_capture_time_ms = 0.0
        self._sequence = sequence_for_run(self.run_id)  # shared with the span processor
        self._stacks: dict[int, list[str]] = {}  # thread id -> that thread's open event ids
        self._node_id: str | None = None
        self._step_id: str | None = None
        self._open: dict[str, Span] = {}
        self._counts: Counter[str] = Counter()
        self._sinks: tuple[SpanProcessor, ...] = ()
        self._root: Span | None = None
        self._closed = False
        if self.enabled:
            self._start_run()

    def _start_run(self) -> None:
        self._tracer = tracer_provider().get_tracer("otel_cmbagent.compat", __version__)
        try:
            self._sinks = sinks_for(self)
        except Exception as exc:  # noqa: BLE001 - no sinks: spans still go to the global pipeline
            log_internal_error("EventCaptureManager sinks", exc)
        router.add(self)
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

    @property
    def event_stack(self) -> list[str]:
        """This thread's stack of open event ids (nesting), as cmbagent's thread-local stack."""
        return self._stacks.setdefault(threading.get_ident(), [])

    def _next_order(self) -> int:
        """Thread-safe order counter: the same sequence the span processor uses for this run."""
        return self._sequence.next()

    def set_context(self, node_id: str | None = None, step_id: str | None = None) -> None:
        """Set the current DAG node / workflow step; like cmbagent, only the values given change."""
        if node_id:
            self._node_id = str(node_id)
        if step_id:
            self._step_id = str(step_id)
        self._rescope()

    # --- spans ----------------------------------------------------------------------------
    def _rescope(self) -> None:
        """Re-attach the captor's OTel context after its identity or nesting changed (if it is current)."""
        if self.enabled and get_event_captor() is self:
            set_event_captor(self)

    def _scoped_context(self) -> otel_context.Context:
        identity = RunIdentity(self.run_id, self.session_id, self._node_id, self._step_id, self._sequence)
        ctx = otel_context.set_value(_IDENTITY_KEY, identity)
        stack = self.event_stack
        parent = self._open.get(stack[-1]) if stack else None
        span = parent or self._root
        return trace.set_span_in_context(span, ctx) if span is not None else ctx

    def _start(self, name: str, event_type: str, attributes: dict[str, Any]) -> Span:
        attributes[semconv.EVENT_TYPE] = event_type
        self._counts[event_type] += 1
        return self._tracer.start_span(name, context=self._scoped_context(), attributes=attributes)

    def _emit(self, name: str, event_type: str, attributes: dict[str, Any], *, duration_ms: Any = None,
              error: str | None = None, error_type: str | None = None) -> str:
        """A span that starts and ends now (``duration_ms``: its length); returns its row id."""
        span = self._start(name, event_type, attributes)
        if error:
            mark_failed(span, error_type or "error", error)
        end = None
        if isinstance(duration_ms, (int, float)) and duration_ms > 0 and span.start_time:
            end = span.start_time + int(duration_ms * 1e6)
        span.end(end_time=end)
        return _event_id(span)

    def _open_event(self, name: str, event_type: str, attributes: dict[str, Any]) -> str:
        """Start a span that stays open (agent call, code run): later captures nest under it."""
        span = self._start(name, event_type, attributes)
        event_id = _event_id(span)
        self._open[event_id] = span
        self.event_stack.append(event_id)
        self._rescope()
        return event_id

    def _close_event(self, event_id: str | None, attributes: dict[str, Any], failure: str | None = None) -> bool:
        span = self._open.pop(event_id, None) if event_id else None
        if span is None:
            return False
        span.set_attributes(_with_earlier_metadata(span, attributes))
        if failure:
            mark_failed(span, "code_execution_error", failure)
        span.end()
        for stack in list(self._stacks.values()):  # ended from any thread: off the stack it is on
            if event_id in stack:
                stack.remove(event_id)
        self._rescope()
        return True

    # --- cmbagent's capture calls ------------------------------------------------------------
    @_timed
    def capture_agent_call(self, agent_name: str, message: Any, context: Any = None, metadata: Any = None) -> str | None:
        attributes = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT,
            semconv.GEN_AI_AGENT_NAME: agent_name,
            semconv.GEN_AI_INPUT_MESSAGES: messages_json([message], _LIMIT),
            **_metadata(metadata),
        }
        if context:
            attributes[semconv.CONTEXT] = to_json(context, _LIMIT)
        return self._open_event(f"invoke_agent {agent_name}", semconv.EVENT_AGENT_CALL, attributes)

    @_timed
    def capture_agent_response(
        self, agent_name: str, response: Any, event_id: str | None = None, metadata: Any = None
    ) -> str | None:
        output = {semconv.GEN_AI_OUTPUT_MESSAGES: messages_json([response], _LIMIT, "assistant"), **_metadata(metadata)}
        if self._close_event(event_id, output):
            return event_id
        attributes = {semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT, semconv.GEN_AI_AGENT_NAME: agent_name}
        return self._emit(f"invoke_agent {agent_name}", semconv.EVENT_AGENT_CALL, {**attributes, **output})

    @_timed
    def capture_tool_call(
        self, agent_name: str, tool_name: str, arguments: Any, result: Any = None, metadata: Any = None
    ) -> str | None:
        attributes = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_TOOL,
            semconv.GEN_AI_AGENT_NAME: agent_name,
            semconv.GEN_AI_TOOL_NAME: tool_name,
            semconv.GEN_AI_TOOL_CALL_ARGUMENTS: to_json(arguments, _LIMIT),
            **_metadata(metadata),
        }
        if result is not None:
            attributes[semconv.GEN_AI_TOOL_CALL_RESULT] = safe_text(result, _LIMIT)
        return self._emit(f"execute_tool {tool_name}", semconv.EVENT_TOOL_CALL, attributes)

    @staticmethod
    def _code_attributes(agent_name: str, code: Any, language: Any, metadata: Any) -> dict[str, Any]:
        return {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_CODE,
            semconv.GEN_AI_AGENT_NAME: agent_name,
            semconv.CODE_LANGUAGE: str(language or "python"),
            semconv.CODE_BLOCKS: to_json([{"language": language, "code": code}], _LIMIT),
            **_metadata(metadata),
        }

    @staticmethod
    def _code_outcome(result: Any, exit_code: Any, success: bool | None = None) -> tuple[dict[str, Any], str | None]:
        attributes: dict[str, Any] = {}
        if isinstance(exit_code, int) and not isinstance(exit_code, bool):
            attributes[semconv.CODE_EXIT_CODE] = exit_code
        if result is not None:
            attributes[semconv.CODE_OUTPUT] = safe_text(result, _LIMIT)
        failure = f"exit code {exit_code}" if exit_code not in (None, 0) else None
        if success is False and failure is None:
            failure = "code execution failed"
        return attributes, failure

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
        attributes = self._code_attributes(agent_name, code, language, metadata)
        outcome, failure = self._code_outcome(result, exit_code)
        return self._emit(
            f"execute_code {agent_name}", semconv.EVENT_CODE_EXEC, {**attributes, **outcome},
            duration_ms=duration_ms, error=failure, error_type="code_execution_error",
        )

    @_timed
    def capture_code_execution_start(
        self, agent_name: str, code: str, language: str = "python", metadata: Any = None
    ) -> str | None:
        """A code run that stays open until :meth:`capture_code_execution_end` (the plan's patch uses these)."""
        attributes = self._code_attributes(agent_name, code, language, metadata)
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
        attributes, failure = self._code_outcome(result, exit_code, success)
        attributes.update(_metadata(metadata))
        ids = [event_id] if event_id else self._open_code_runs(agent_name)
        ended = [i for i in ids if self._close_event(i, attributes, failure)]
        return ended[-1] if ended else None

    def _open_code_runs(self, agent_name: str | None) -> list[str]:
        out = []
        for event_id in reversed(self.event_stack):
            attributes = getattr(self._open.get(event_id), "attributes", None) or {}
            if attributes.get(semconv.EVENT_TYPE) == semconv.EVENT_CODE_EXEC and (
                agent_name is None or attributes.get(semconv.GEN_AI_AGENT_NAME) == agent_name
            ):
                out.append(event_id)
        return out

    @_timed
    def capture_file_generation(
        self, agent_name: str, file_path: str, file_type: str, size_bytes: int | None = None, metadata: Any = None
    ) -> str | None:
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_FILE,
            semconv.GEN_AI_AGENT_NAME: agent_name,
            semconv.FILE_PATH: str(file_path),
            semconv.FILE_TYPE: str(file_type),
            **_metadata(metadata),
        }
        if isinstance(size_bytes, int) and not isinstance(size_bytes, bool):
            attributes[semconv.FILE_SIZE] = size_bytes
        return self._emit(f"file {file_path}", semconv.EVENT_FILE_GEN, attributes)

    @_timed
    def capture_handoff(self, from_agent: str, to_agent: str, context: Any = None, reason: str | None = None) -> str | None:
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_HANDOFF,
            semconv.HANDOFF_FROM: from_agent,
            semconv.HANDOFF_TO: to_agent,
            semconv.GEN_AI_AGENT_NAME: from_agent,
        }
        if reason:
            attributes[semconv.HANDOFF_REASON] = str(reason)
        if context:
            attributes[semconv.CONTEXT] = to_json(context, _LIMIT)
        return self._emit(f"handoff {from_agent} -> {to_agent}", semconv.EVENT_HANDOFF, attributes)

    @_timed
    def capture_message(
        self, sender: str, recipient: str, content: Any, tokens: int | None = None, metadata: Any = None
    ) -> str | None:
        """A message event on the current span (or the run), with its own order; its row is agent_call/message."""
        ctx = self._scoped_context()
        span = trace.get_current_span(ctx)
        attributes: dict[str, Any] = {
            semconv.EVENT_TYPE: semconv.EVENT_MESSAGE,
            semconv.MESSAGE_SENDER: str(sender),
            semconv.MESSAGE_RECIPIENT: str(recipient),
            semconv.MESSAGE_CONTENT: to_json([{"type": "text", "content": content}], _LIMIT),
            **_metadata(metadata),
        }
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            attributes[semconv.MESSAGE_TOKENS] = tokens
        for key, value in ((semconv.NODE_ID, self._node_id), (semconv.STEP_ID, self._step_id)):
            if value:  # the message belongs to the current step, whatever span it hangs on
                attributes[key] = value
        token = otel_context.attach(ctx)
        try:
            add_ordered_event(span, semconv.MESSAGE_EVENT_NAME, attributes)
        finally:
            otel_context.detach(token)
        self._counts[semconv.EVENT_MESSAGE] += 1
        return _event_id(span, f"/message/{attributes[semconv.EXECUTION_ORDER]}")

    @_timed
    def capture_error(
        self, agent_name: str, error_message: str, error_type: str | None = None, metadata: Any = None
    ) -> str | None:
        """An ``error`` row whose subtype is ``error_type`` (cmbagent's default: ``runtime_error``)."""
        return self._emit(
            f"error {agent_name}",
            semconv.EVENT_ERROR,
            {semconv.GEN_AI_AGENT_NAME: agent_name, **_metadata(metadata)},
            error=str(error_message),
            error_type=error_type or "runtime_error",
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
        for span in list(self._open.values()):
            span.end()
        self._open.clear()
        if self._root is not None:
            self._root.end()
        deadline = time.monotonic() + 30
        for sink in self._sinks:
            sink.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))
        router.remove(self)
        for sink in self._sinks:
            sink.shutdown()

