"""The span side of a captor: which captor is current (contextvars), its run's scope, and each capture as a
span that starts and ends now or stays open while later captures nest under it.

Nesting follows cmbagent's per-thread event stack; identity (run, session, node, step) and order ride the
OpenTelemetry context, so AG2 spans started while a captor is set join its run.
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Span

from ..pipeline import semconv
from ..pipeline.openinference import add_start_keys
from ..pipeline.context import _IDENTITY_KEY, RunIdentity, sequence_for_run
from ..pipeline.errors import mark_failed
from ..pipeline.values import log_internal_error
from ..table.rows import event_id as row_id
from .attributes import with_earlier_metadata

_event_captor_var: contextvars.ContextVar[Any] = contextvars.ContextVar("event_captor", default=None)
_otel_token_var: contextvars.ContextVar[object | None] = contextvars.ContextVar("event_captor_otel_token", default=None)


def get_event_captor() -> Any:
    """The event captor of the current execution context (contextvars: per session, per branch)."""
    return _event_captor_var.get()


def set_event_captor(captor: Any) -> None:
    """Set the captor of the current context (any object, like cmbagent's); scope the OTel context to its run.

    AG2 spans started while an ``EventCaptureManager`` is set carry its run/session ids and order and nest
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
    if isinstance(captor, CaptorSpans) and captor.enabled and not captor._closed:
        _otel_token_var.set(otel_context.attach(captor._scoped_context()))


def span_row_id(span: Span, suffix: str = "") -> str:
    """The id of the row a span (or, with a suffix, one of its events) becomes."""
    context = span.get_span_context()
    return row_id(context.trace_id, context.span_id, suffix)


class CaptorSpans:
    """A captor's spans: its run root, the events open on each thread's stack, its node/step scope."""

    def __init__(self, run_id: str, session_id: str, enabled: bool) -> None:
        self.run_id = str(run_id)
        self.session_id = str(session_id)
        self.enabled = bool(enabled)
        self._sequence = sequence_for_run(self.run_id)  # shared with the span processor
        self._stacks: dict[int, list[str]] = {}  # thread id -> that thread's open event ids
        self._node_id: str | None = None
        self._step_id: str | None = None
        self._open: dict[str, Span] = {}
        self._counts: Counter[str] = Counter()
        self._root: Span | None = None
        self._tracer: Any = None
        self._closed = False

    @property
    def event_stack(self) -> list[str]:
        """This thread's stack of open event ids (nesting), as cmbagent's thread-local stack."""
        return self._stacks.setdefault(threading.get_ident(), [])

    def _start_root(self) -> None:
        identity = RunIdentity(self.run_id, self.session_id, sequence=self._sequence)
        self._root = self._tracer.start_span(
            "invoke_workflow cmbagent",
            context=otel_context.set_value(_IDENTITY_KEY, identity, otel_context.Context()),
            attributes=add_start_keys({
                semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_WORKFLOW,
                semconv.EVENT_TYPE: semconv.EVENT_RUN,
                semconv.RUN_ID: self.run_id,
                semconv.SESSION_ID: self.session_id,
            }),
        )

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
        return self._tracer.start_span(name, context=self._scoped_context(), attributes=add_start_keys(attributes))

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
        return span_row_id(span)

    def _open_event(self, name: str, event_type: str, attributes: dict[str, Any]) -> str:
        """Start a span that stays open (agent call, code run): later captures nest under it."""
        span = self._start(name, event_type, attributes)
        event_id = span_row_id(span)
        self._open[event_id] = span
        self.event_stack.append(event_id)
        self._rescope()
        return event_id

    def _close_event(self, event_id: str | None, attributes: dict[str, Any], failure: str | None = None) -> bool:
        span = self._open.pop(event_id, None) if event_id else None
        if span is None:
            return False
        span.set_attributes(with_earlier_metadata(span, attributes))
        if failure:
            mark_failed(span, "code_execution_error", failure)
        span.end()
        for stack in list(self._stacks.values()):  # ended from any thread: off the stack it is on
            if event_id in stack:
                stack.remove(event_id)
        self._rescope()
        return True

    def _open_events_of(self, event_type: str, agent_name: str | None) -> list[str]:
        """This thread's open events of a type (of ``agent_name`` when given), innermost first."""
        out = []
        for event_id in reversed(self.event_stack):
            attributes = getattr(self._open.get(event_id), "attributes", None) or {}
            if attributes.get(semconv.EVENT_TYPE) == event_type and (
                agent_name is None or attributes.get(semconv.GEN_AI_AGENT_NAME) == agent_name
            ):
                out.append(event_id)
        return out

    def _end_all(self) -> None:
        """End every open event, then the run."""
        for span in list(self._open.values()):
            span.end()
        self._open.clear()
        if self._root is not None:
            self._root.end()
