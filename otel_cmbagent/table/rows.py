"""Spans -> cmbagent's rows: where span attributes meet cmbagent's row vocabulary.

Every sink (SQL, websocket, the compat callbacks) builds its rows here; which attribute goes where is the
table in :mod:`.fields`, which the way back (:mod:`.to_spans`, the CLI's export) reads too. Span
attributes stay OpenTelemetry GenAI semantic conventions (plus ``cmbagent.*`` keys); the rows
read the way cmbagent's own event capture writes them (fork UJ2202/MARS,
``cmbagent/execution/event_capture.py``), so its readers - ``DAGMetadataEnricher.enrich_node``,
the run ``/history`` endpoint, ``EventRepository`` - give the right answers on our rows:

============== ===================================== ============== ============================== ========== ===============================
span           event_type / event_subtype (ended)    agent_name     inputs                         outputs    meta (besides other attributes)
============== ===================================== ============== ============================== ========== ===============================
agent_call     agent_call / complete                 the agent      message, context               response   the capture's ``metadata``
tool_call      tool_call / execute                   the caller     tool_name, arguments           result
code_exec      code_exec / complete (error: failed)  the agent      code                           result     language, exit_code, code_length
file_gen       file_gen / create                     the agent      file_path, file_type                      size_bytes
handoff        handoff / transfer                    from_agent     from_agent, to_agent, context             reason
message event  agent_call / message                  the recipient  sender, recipient, content                tokens (when known)
error          error / <error type>                  the agent                                                (status failed, error_message)
llm_call       llm_call / complete                   the agent      messages                       messages   tokens, cost_usd (this call's)
run, step,     <same> / complete                                    (messages)                     (messages)
conversation,
human_input
============== ===================================== ============== ============================== ========== ===============================

A span still running is written with subtype ``start`` (cmbagent's readers skip those) and
becomes its final row when it ends; a failed span gets subtype ``error`` (tool_call, handoff
and file_gen keep theirs: cmbagent has no failed form of them) and status ``failed``.
Tokens and cost live on ONE level, each ``llm_call`` row's own ``meta.tokens``/``meta.cost_usd``
(plus whatever a capture call's ``metadata`` says), so the readers' sums never count a call
twice; conversation and run totals stay under their ``gen_ai.usage.*`` keys. ``meta.tokens`` and
``meta.cost_usd`` are numbers or absent, never None (``enrich_node`` adds them up).

The side tables cmbagent fills next to its events (``files``, ``messages``, ``cost_records``) get their
records from these rows (:mod:`.side_records`).

Ids are deterministic UUIDs from (trace_id, span_id), so a row's ``parent_event_id`` is its
parent span's row id and a re-written row is an idempotent upsert.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

from ..pipeline import semconv
from ..pipeline.processor import raw_attributes as _raw_attributes
from ..pipeline.sdk_fields import SDK_LIVE_SPAN, SDK_READABLE_SPAN
from .fields import AGENT_ATTRIBUTE, CONTEXT_DEFAULT, IDENTITY, JSON_META, fields_of, parsed
from .schema import (
    MESSAGE_EVENT_TYPE,
    MESSAGE_KIND,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    SUBTYPE_COMPLETE,
    SUBTYPE_ERROR,
    SUBTYPE_MESSAGE,
    SUBTYPE_START,
)

NAMESPACE = uuid.UUID("6f1d3a52-64a1-4cf4-9a3c-8a8c1b0e7c11")  # row ids are UUIDs derived in it
# event_subtype of an ended span (default "complete"); these keep theirs when failed too
_SUBTYPES = {semconv.EVENT_TOOL_CALL: "execute", semconv.EVENT_HANDOFF: "transfer", semconv.EVENT_FILE_GEN: "create"}
_NUMERIC_META = ("tokens", "cost_usd")
# never meta keys: the identity columns, and the OpenInference keys (for trace backends; rows have their own)
_NOT_META = IDENTITY | semconv.OPENINFERENCE_KEYS


@functools.lru_cache(maxsize=65_536)
def event_id(trace_id: int, span_id: int, suffix: str = "") -> str:
    """The row id of a span (or, with a suffix, of one of its events); cached: parents recur in every row."""
    return str(uuid.uuid5(NAMESPACE, f"{trace_id:032x}{span_id:016x}{suffix}"))


class SpanAtStart:
    """A live span frozen as it starts: what the row builders read of it (a start row, a message row).

    Taken on the agent's thread, so it is cheap: a copy of the attribute dict and a few references (~0.6 µs,
    measured here, against ~4 µs for a ``ReadableSpan`` copy, most of it the SDK's locked attribute iteration).
    Its ids are plain ints: the span's own ``SpanContext`` (and its ``TraceFlags``) would be two more objects for
    the garbage collector to walk while the record waits in a sink's queue.
    """

    __slots__ = ("name", "trace_id", "span_id", "parent", "resource", "attributes", "kind", "status", "start_time",
                 "instrumentation_scope")
    end_time = None
    events: tuple[Any, ...] = ()
    links: tuple[Any, ...] = ()

    def __init__(self, span: Any, context: Any = None) -> None:
        if type(span) is SDK_LIVE_SPAN:  # the SDK's live span: its fields read directly (see pipeline.sdk_fields)
            self._read_fields(span)
            self.attributes = dict(_raw_attributes(span) or {})
            self.status = span._status
            return
        if context is None:
            context = span.get_span_context()
        self.name = span.name
        self.trace_id = context.trace_id
        self.span_id = context.span_id
        self.parent = span.parent  # the parent's own context: shared by its children
        self.resource = span.resource
        self.attributes = dict(_raw_attributes(span) or {})  # its attributes change after a processor hook returns
        self.kind = span.kind
        self.status = span.status
        self.start_time = span.start_time
        self.instrumentation_scope = getattr(span, "instrumentation_scope", None)

    def _read_fields(self, span: Any) -> Any:
        """The fields every record keeps, read off one of the SDK's own spans; returns its context."""
        context = span._context
        self.name = span._name
        self.trace_id = context.trace_id
        self.span_id = context.span_id
        self.parent = span._parent
        self.resource = span._resource
        self.kind = span._kind
        self.start_time = span._start_time
        self.instrumentation_scope = span._instrumentation_scope
        return context


def span_ids(span: Any) -> tuple[int, int]:
    """(trace_id, span_id) of a span or of a record of one."""
    if isinstance(span, SpanAtStart):
        return span.trace_id, span.span_id
    context = span.get_span_context()
    return context.trace_id, context.span_id


snapshot = SpanAtStart  # the name the sinks call it by

_PLAIN_STATUS = {code: Status(code) for code in StatusCode}  # shared: a queued end holds no Status of its own


class SpanAtEnd(SpanAtStart):
    """An ended span as the sinks queue it until it is written: what :func:`span_row` and the OTLP encoder read.

    The SDK's ``ReadableSpan`` holds ~11 objects the garbage collector tracks (its bounded attributes, events and
    links with their locks and deques, its context and trace flags, its status...); thousands of them queued in a
    burst made the collector's passes on the agent's thread half of its cost per span. This record is one tracked
    object: ids and flags as ints, the attributes a plain dict of atomic values (which CPython's collector does not
    track), the status shared unless it has a description, events and links as the span's (usually none). Built
    once per span (:func:`span_at_end`) for both the SQL sink and the OTLP processor; rows built from it equal the
    span's own, and :meth:`readable` gives the exporter a ``ReadableSpan`` again, on its own thread.
    """

    __slots__ = ("end_time", "trace_flags", "trace_state", "events", "links", "dropped")

    def __init__(self, span: Any) -> None:
        if type(span) is SDK_READABLE_SPAN:  # what the SDK hands on_end: fields read directly, no property per field
            self._take(span)
            return
        context = span.get_span_context()
        super().__init__(span, context)
        status = self.status
        if not status.description:
            self.status = _PLAIN_STATUS.get(status.status_code, status)
        self.end_time = span.end_time
        self.trace_flags = int(context.trace_flags)
        self.trace_state = context.trace_state  # shared: the parent's, or the SDK's empty one
        self.events = _items(span, "_events", "events")
        self.links = _items(span, "_links", "links")
        # limits dropped something: the encoder reports it, and only the SDK's own span knows (rare: see readable)
        self.dropped = bool(span.dropped_attributes or span.dropped_events or span.dropped_links)

    def _take(self, span: ReadableSpan) -> None:
        """The fields of the SDK's own ``ReadableSpan`` (its ``_name``, ``_context``...: see
        :mod:`~otel_cmbagent.pipeline.sdk_fields`; the public path in ``__init__`` reads the same values through
        properties: 1.67 µs against 0.83, warm). The attribute dict is the span's own, not a copy: an ended span
        takes no more attributes."""
        context = self._read_fields(span)
        bounded, events, links = span._attributes, span._events, span._links
        raw = getattr(bounded, "_dict", bounded)
        status = span._status
        self.attributes = raw if type(raw) is dict else dict(raw or {})
        self.status = status if status.description else _PLAIN_STATUS.get(status.status_code, status)
        self.end_time = span._end_time
        self.trace_flags = int(context.trace_flags)
        self.trace_state = context.trace_state
        self.events = tuple(events) if events else ()
        self.links = tuple(links) if links else ()
        self.dropped = bool(getattr(bounded, "dropped", 0) or getattr(events, "dropped", 0)
                            or getattr(links, "dropped", 0))

    def readable(self) -> ReadableSpan:
        """The span as the SDK's exporters take it (their encoder reads a ``ReadableSpan``)."""
        context = SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=TraceFlags(self.trace_flags),
                              trace_state=self.trace_state)
        return ReadableSpan(
            name=self.name, context=context, parent=self.parent, resource=self.resource, attributes=self.attributes,
            events=self.events, links=self.links, kind=self.kind, status=self.status, start_time=self.start_time,
            end_time=self.end_time, instrumentation_scope=self.instrumentation_scope,
        )


def _items(span: Any, private: str, public: str) -> tuple[Any, ...]:
    """A span's events or links as a tuple: ``()`` at once when it has none (most spans), without the SDK's locked
    copy (~0.45 µs each, measured here). Reads the SDK's ``span._events``/``span._links`` bounded lists
    (opentelemetry-sdk 1.45.x); without them, the public ``span.events``/``span.links``."""
    items = getattr(span, private, None)
    if items is None:
        return tuple(getattr(span, public))
    return tuple(items) if items else ()


_last_end: tuple[Any, Any] = (None, None)  # (span, its record): the sinks called with one span share one record


def span_at_end(span: ReadableSpan) -> SpanAtEnd:
    """The record of an ended span, built once for every sink ``on_end`` is called with the same span object
    (a race between threads only builds a second one)."""
    global _last_end  # noqa: PLW0603 - one slot, swapped atomically
    last, record = _last_end
    if last is span:
        return record
    record = SpanAtEnd(span)
    _last_end = (span, record)
    return record


def _time(ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc) if ns else None


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (what cmbagent's readers can add up)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_metadata(meta: dict[str, Any], raw: Any) -> None:
    """A capture call's ``metadata`` (one JSON attribute) merged into meta, as cmbagent does."""
    metadata = parsed(raw)
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            meta.setdefault(key, value)
    elif metadata is not None:
        meta.setdefault("metadata", metadata)


def _derive(kind: str, attributes: Mapping[str, Any], inputs: dict, meta: dict) -> None:
    if kind == semconv.EVENT_CODE_EXEC:
        meta.setdefault("exit_code", None)
        if isinstance(inputs.get("code"), str):
            meta["code_length"] = len(inputs["code"])
    elif kind == semconv.EVENT_LLM_CALL:
        tokens_in = attributes.get(semconv.GEN_AI_USAGE_INPUT_TOKENS)
        tokens_out = attributes.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)
        if is_number(tokens_in) or is_number(tokens_out):
            meta["tokens"] = int((tokens_in if is_number(tokens_in) else 0) + (tokens_out if is_number(tokens_out) else 0))
        cost = attributes.get(semconv.GEN_AI_USAGE_COST)
        if is_number(cost):
            meta["cost_usd"] = float(cost)
    if semconv.METADATA in attributes:
        _merge_metadata(meta, attributes[semconv.METADATA])
    for key in _NUMERIC_META:  # enrich_node adds these up: a number or nothing
        if key in meta and not is_number(meta[key]):
            del meta[key]


@functools.lru_cache(maxsize=1024)
def _plan(kind: str) -> tuple[tuple[Any, ...], frozenset[str]]:
    """A kind's fields, and the attributes that never go to meta as they are (built once per kind, not per row)."""
    fields = fields_of(kind)
    consumed = _NOT_META | {AGENT_ATTRIBUTE.get(kind, semconv.GEN_AI_AGENT_NAME)} | {f.attribute for f in fields}
    return fields, frozenset(consumed)


def _sections(kind: str, attributes: Mapping[str, Any], capture_content: bool) -> tuple[dict, dict, dict]:
    fields, consumed = _plan(kind)
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    sections = {"inputs": inputs, "outputs": outputs, "meta": meta}
    content = semconv.CONTENT_ATTRIBUTES
    for field in fields:
        if field.attribute not in attributes:
            continue
        if not capture_content and field.attribute in content:
            continue
        sections[field.section][field.key] = field.codec.decode(attributes[field.attribute])
    for key, value in attributes.items():
        if key in consumed or (not capture_content and key in content):
            continue
        if key in JSON_META:
            meta[key] = parsed(value)
        else:  # plain(value), inline: most rows have several of these
            meta[key] = list(value) if isinstance(value, tuple) else value
    if inputs and kind in CONTEXT_DEFAULT:
        inputs.setdefault("context", {})
    _derive(kind, attributes, inputs, meta)
    return inputs, outputs, meta


def _scope_name(span: Any) -> str | None:
    return getattr(getattr(span, "instrumentation_scope", None), "name", None)


def _newest_only(inputs: dict, meta: dict) -> None:
    """AG2 1.x puts the whole history in every chat span (quadratic): its row keeps the newest message,
    as ours do (the earlier ones are in the earlier rows), and says how many it left out."""
    messages = inputs.get("messages")
    if isinstance(messages, list) and len(messages) > 1:
        inputs["messages"] = messages[-1:]
        meta[semconv.LLM_HISTORY_OMITTED] = len(messages) - 1


def _subtype(kind: str, status: str, attributes: Mapping[str, Any]) -> str:
    if status in (STATUS_RUNNING, STATUS_INTERRUPTED):
        return SUBTYPE_START if status == STATUS_RUNNING else STATUS_INTERRUPTED
    if kind == semconv.EVENT_ERROR:
        return str(attributes.get(semconv.ERROR_TYPE) or "runtime_error")
    if status == STATUS_FAILED and kind not in _SUBTYPES:
        return SUBTYPE_ERROR
    return _SUBTYPES.get(kind, SUBTYPE_COMPLETE)


def span_row(span: ReadableSpan, *, ended: bool, capture_content: bool = True) -> dict[str, Any]:
    """The ``execution_events`` row of a span: ``running``/``start`` at start, its final form at end."""
    attributes = span.attributes or {}
    trace_id, span_id = span_ids(span)
    kind = str(attributes.get(semconv.EVENT_TYPE) or "info")
    inputs, outputs, meta = _sections(kind, attributes, capture_content)
    if kind == semconv.EVENT_LLM_CALL and _scope_name(span) == semconv.AG2X_SCOPE:
        _newest_only(inputs, meta)
    interrupted = ended and semconv.INTERRUPTED in attributes
    failed = ended and not interrupted and span.status.status_code is StatusCode.ERROR
    status = STATUS_FAILED if failed else (STATUS_COMPLETED if ended else STATUS_RUNNING)
    error_message = None
    if interrupted:
        status, error_message = STATUS_INTERRUPTED, f"interrupted by {attributes[semconv.INTERRUPTED]}"
    elif failed:
        error_message = attributes.get(semconv.ERROR_MESSAGE) or span.status.description or attributes.get(
            semconv.ERROR_TYPE
        )
    meta["span_name"] = span.name
    started = _time(span.start_time)
    parent = span.parent
    return {
        "id": event_id(trace_id, span_id),
        "run_id": attributes.get(semconv.RUN_ID),
        "node_id": attributes.get(semconv.NODE_ID),
        "step_id": attributes.get(semconv.STEP_ID),
        "session_id": attributes.get(semconv.SESSION_ID),
        "parent_event_id": event_id(parent.trace_id, parent.span_id) if parent is not None and parent.is_valid else None,
        "event_type": kind,
        "event_subtype": _subtype(kind, status, attributes),
        "agent_name": attributes.get(AGENT_ATTRIBUTE.get(kind, semconv.GEN_AI_AGENT_NAME)),
        "agent_role": attributes.get(semconv.AGENT_ROLE),
        "timestamp": started,
        "started_at": started,
        "completed_at": _time(span.end_time) if ended else None,
        "duration_ms": int((span.end_time - span.start_time) / 1e6) if ended and span.end_time else None,
        "inputs": inputs or None,
        "outputs": outputs or None,
        "error_message": error_message,
        "meta": meta,
        "execution_order": attributes.get(semconv.EXECUTION_ORDER),
        "depth": attributes.get(semconv.DEPTH, 0),
        "status": status,
        "trace_id": f"{trace_id:032x}",
        "span_id": f"{span_id:016x}",
    }


def message_row(span: Any, attributes: Mapping[str, Any], timestamp_ns: int, *, capture_content: bool = True) -> dict[str, Any]:
    """The row of one message event of ``span`` (a live or finished span; parent = the span's row).

    cmbagent's shape: ``agent_call``/``message``, ``agent_name`` = the recipient; node/step are the
    event's own when it has them (a capture made after the step changed), else its span's. The id
    comes from the message's own order, so the live write and any later re-write are one row.
    """
    trace_id, span_id = span_ids(span)
    span_attributes = getattr(span, "attributes", None) or {}
    inputs, outputs, meta = _sections(MESSAGE_KIND, attributes, capture_content)
    order = attributes.get(semconv.EXECUTION_ORDER)
    at = _time(timestamp_ns)
    depth = attributes.get(semconv.DEPTH)
    return {
        "id": event_id(trace_id, span_id, f"/message/{order if order is not None else timestamp_ns}"),
        "run_id": span_attributes.get(semconv.RUN_ID),
        "node_id": attributes.get(semconv.NODE_ID) or span_attributes.get(semconv.NODE_ID),
        "step_id": attributes.get(semconv.STEP_ID) or span_attributes.get(semconv.STEP_ID),
        "session_id": span_attributes.get(semconv.SESSION_ID),
        "parent_event_id": event_id(trace_id, span_id),
        "event_type": MESSAGE_EVENT_TYPE,
        "event_subtype": SUBTYPE_MESSAGE,
        "agent_name": attributes.get(semconv.MESSAGE_RECIPIENT) or None,
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
        "trace_id": f"{trace_id:032x}",
        "span_id": f"{span_id:016x}",
    }


def message_rows(span: ReadableSpan, *, capture_content: bool = True) -> Iterable[dict[str, Any]]:
    """Every message row of a finished span (for backfills and exports)."""
    for event in span.events:
        if event.name == semconv.MESSAGE_EVENT_NAME:
            yield message_row(span, event.attributes or {}, event.timestamp, capture_content=capture_content)
