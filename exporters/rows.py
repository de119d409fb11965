"""Spans -> ``execution_events`` rows: the one mapping every sink (SQL, websocket, CLI) shares.

Ids are deterministic UUIDs from (trace_id, span_id), so a row's ``parent_event_id``
is its parent span's row id and a re-written row is an idempotent upsert.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from otel_cmbagent import semconv

_NAMESPACE = uuid.UUID("6f1d3a52-64a1-4cf4-9a3c-8a8c1b0e7c11")

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"

# Columns of cmbagent's ``execution_events`` (ExecutionEvent), in its order.
EXECUTION_EVENT_COLUMNS = (
    "id",
    "run_id",
    "node_id",
    "step_id",
    "session_id",
    "parent_event_id",
    "event_type",
    "event_subtype",
    "agent_name",
    "agent_role",
    "timestamp",
    "started_at",
    "completed_at",
    "duration_ms",
    "inputs",
    "outputs",
    "error_message",
    "meta",
    "execution_order",
    "depth",
    "status",
)
LINK_COLUMNS = ("trace_id", "span_id")

# Attribute -> (section, key) for the inputs/outputs JSON of a row.
_INPUTS = {
    semconv.GEN_AI_INPUT_MESSAGES: "messages",
    semconv.GEN_AI_TOOL_CALL_ARGUMENTS: "arguments",
    semconv.CODE_BLOCKS: "code_blocks",
    semconv.HUMAN_INPUT_PROMPT: "prompt",
    semconv.HANDOFF_FROM: "from",
    semconv.MESSAGE_CONTENT: "content",
    semconv.MESSAGE_TOOL_CALLS: "tool_calls",
}
_OUTPUTS = {
    semconv.GEN_AI_OUTPUT_MESSAGES: "messages",
    semconv.GEN_AI_TOOL_CALL_RESULT: "result",
    semconv.CODE_OUTPUT: "output",
    semconv.CODE_EXIT_CODE: "exit_code",
    semconv.HUMAN_INPUT_RESPONSE: "response",
    semconv.HANDOFF_TO: "to",
    semconv.FILE_PATH: "path",
    semconv.FILE_SIZE: "size_bytes",
    semconv.FILE_TYPE: "file_type",
}
_IDENTITY = {
    semconv.RUN_ID,
    semconv.SESSION_ID,
    semconv.NODE_ID,
    semconv.STEP_ID,
    semconv.EVENT_TYPE,
    semconv.EXECUTION_ORDER,
    semconv.DEPTH,
    semconv.GEN_AI_AGENT_NAME,
    semconv.AGENT_ROLE,
}
_JSON_ATTRIBUTES = {
    semconv.GEN_AI_INPUT_MESSAGES,
    semconv.GEN_AI_OUTPUT_MESSAGES,
    semconv.GEN_AI_TOOL_CALL_ARGUMENTS,
    semconv.CODE_BLOCKS,
    semconv.MESSAGE_CONTENT,
    semconv.MESSAGE_TOOL_CALLS,
}


@functools.lru_cache(maxsize=65_536)
def event_id(trace_id: int, span_id: int, suffix: str = "") -> str:
    """The row id of a span (or, with a suffix, of one of its events); cached: parents recur in every row."""
    return str(uuid.uuid5(_NAMESPACE, f"{trace_id:032x}{span_id:016x}{suffix}"))


def snapshot(span: Any) -> ReadableSpan:
    """A frozen copy of a live span (its attributes change after a processor hook returns)."""
    return ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=span.resource,
        attributes=dict(span.attributes or {}),
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        instrumentation_scope=getattr(span, "instrumentation_scope", None),
    )


def _time(ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc) if ns else None


def _value(key: str, value: Any) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    if key in _JSON_ATTRIBUTES and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _split(attributes: Mapping[str, Any], capture_content: bool) -> tuple[dict, dict, dict]:
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, value in attributes.items():
        if not capture_content and key in semconv.CONTENT_ATTRIBUTES:
            continue
        if key in _INPUTS:
            inputs[_INPUTS[key]] = _value(key, value)
        elif key in _OUTPUTS:
            outputs[_OUTPUTS[key]] = _value(key, value)
        elif key not in _IDENTITY:
            meta[key] = _value(key, value)
    return inputs, outputs, meta


def span_row(span: ReadableSpan, *, ended: bool, capture_content: bool = True) -> dict[str, Any]:
    """The ``execution_events`` row of a span: ``running`` at start, ``completed``/``failed`` at end."""
    attributes = span.attributes or {}
    context = span.get_span_context()
    inputs, outputs, meta = _split(attributes, capture_content)
    failed = ended and span.status.status_code is StatusCode.ERROR
    status = STATUS_FAILED if failed else (STATUS_COMPLETED if ended else STATUS_RUNNING)
    error_message = None
    if failed:
        error_message = attributes.get(semconv.ERROR_MESSAGE) or span.status.description or attributes.get(
            semconv.ERROR_TYPE
        )
    meta["span_name"] = span.name
    started = _time(span.start_time)
    completed = _time(span.end_time) if ended else None
    parent = span.parent
    return {
        "id": event_id(context.trace_id, context.span_id),
        "run_id": attributes.get(semconv.RUN_ID),
        "node_id": attributes.get(semconv.NODE_ID),
        "step_id": attributes.get(semconv.STEP_ID),
        "session_id": attributes.get(semconv.SESSION_ID),
        "parent_event_id": event_id(parent.trace_id, parent.span_id) if parent is not None and parent.is_valid else None,
        "event_type": attributes.get(semconv.EVENT_TYPE) or "info",
        "event_subtype": {STATUS_RUNNING: "start", STATUS_COMPLETED: "complete", STATUS_FAILED: "error"}[status],
        "agent_name": attributes.get(semconv.GEN_AI_AGENT_NAME),
        "agent_role": attributes.get(semconv.AGENT_ROLE),
        "timestamp": started,
        "started_at": started,
        "completed_at": completed,
        "duration_ms": int((span.end_time - span.start_time) / 1e6) if ended and span.end_time else None,
        "inputs": inputs or None,
        "outputs": outputs or None,
        "error_message": error_message,
        "meta": meta,
        "execution_order": attributes.get(semconv.EXECUTION_ORDER),
        "depth": attributes.get(semconv.DEPTH, 0),
        "status": status,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


def message_row(span: Any, attributes: Mapping[str, Any], timestamp_ns: int, *, capture_content: bool = True) -> dict[str, Any]:
    """The ``message`` row of one message event of ``span`` (a live or finished span; parent = the span's row).

    The id comes from the message's own order, so the live write and any later
    re-write of the same message are one row.
    """
    context = span.get_span_context()
    span_attributes = getattr(span, "attributes", None) or {}
    inputs, outputs, meta = _split(attributes, capture_content)
    order = attributes.get(semconv.EXECUTION_ORDER)
    for key in (semconv.MESSAGE_SENDER, semconv.MESSAGE_RECIPIENT):
        meta.setdefault(key, attributes.get(key))
    at = _time(timestamp_ns)
    depth = attributes.get(semconv.DEPTH)
    return {
        "id": event_id(context.trace_id, context.span_id, f"/message/{order if order is not None else timestamp_ns}"),
        "run_id": span_attributes.get(semconv.RUN_ID),
        "node_id": span_attributes.get(semconv.NODE_ID),
        "step_id": span_attributes.get(semconv.STEP_ID),
        "session_id": span_attributes.get(semconv.SESSION_ID),
        "parent_event_id": event_id(context.trace_id, context.span_id),
        "event_type": semconv.EVENT_MESSAGE,
        "event_subtype": "sent",
        "agent_name": attributes.get(semconv.MESSAGE_SENDER),
        "agent_role": None,
        "timestamp": at,
        "started_at": at,
        "completed_at": at,
        "duration_ms": 0,
        "inputs": inputs or None,
        "outputs": outputs or None,
        "error_message": None,
        "meta": meta,
        "execution_order": order,
        "depth": depth if isinstance(depth, int) else span_attributes.get(semconv.DEPTH, 0) + 1,
        "status": STATUS_COMPLETED,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


def message_rows(span: ReadableSpan, *, capture_content: bool = True) -> Iterable[dict[str, Any]]:
    """Every message row of a finished span (for backfills and exports)."""
    for event in span.events:
        if event.name == semconv.MESSAGE_EVENT_NAME:
            yield message_row(span, event.attributes or {}, event.timestamp, capture_content=capture_content)
