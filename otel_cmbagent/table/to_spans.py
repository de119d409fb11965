"""Rows -> spans: a stored run rebuilt as the trace live export would have sent (the CLI's ``export``).

The inverse of :mod:`.rows`, through the same field table (:mod:`.fields`): original trace/span ids,
parents and timestamps; message rows become ``cmbagent.message`` events on their parent span; rows still
``running`` end now and carry ``cmbagent.incomplete``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..pipeline import semconv
from ..pipeline.openinference import add_start_keys
from ..version import __version__
from .encoding import json_default
from .fields import IDENTITY_COLUMNS, row_attributes
from .schema import STATUS_COMPLETED, STATUS_FAILED, STATUS_RUNNING, is_message

_INT64 = (-(2**63), 2**63 - 1)
_FLAGS = TraceFlags(TraceFlags.SAMPLED)


def otlp_value(value: Any) -> Any:
    """An attribute value OTLP can carry (None when there is nothing to send): big ints and mixed lists as text."""
    if value is None:
        return None
    if isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            return None
        kinds = {type(item) for item in items}
        if len(kinds) == 1 and kinds <= {str, bool, int, float} and all(
            not isinstance(i, int) or isinstance(i, bool) or _INT64[0] <= i <= _INT64[1] for i in items
        ):
            return items
    return json.dumps(value, default=json_default, ensure_ascii=False)


def _ns(value: Any) -> int | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _hex_id(value: Any, digits: int) -> int | None:
    if not isinstance(value, str) or len(value) != digits:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number or None


def _derived_id(seed: str, digits: int) -> int:
    return int(hashlib.sha256(seed.encode("utf-8")).hexdigest()[:digits], 16) or 1


class _Rebuild:
    """One run's rows on their way back to spans."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], content: bool, now_ns: int, service_name: str) -> None:
        self.by_id = {row.get("id"): row for row in rows}
        self.allowed: Callable[[str], bool] = lambda attribute: content or attribute not in semconv.CONTENT_ATTRIBUTES
        self.now_ns = now_ns
        self.resource = Resource.create({SERVICE_NAME: service_name})
        self.scope = InstrumentationScope("otel_cmbagent", __version__)
        self._contexts: dict[Any, SpanContext] = {}

    def context_of(self, row: Mapping[str, Any]) -> SpanContext:
        key = row.get("id")
        if key not in self._contexts:
            run_key = str(row.get("run_id") or row.get("trace_id") or "run")
            trace_id = _hex_id(row.get("trace_id"), 32) or _derived_id(f"trace:{run_key}", 32)
            span_id = _hex_id(row.get("span_id"), 16) or _derived_id(f"span:{key}", 16)
            self._contexts[key] = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=False, trace_flags=_FLAGS)
        return self._contexts[key]

    def parent_of(self, row: Mapping[str, Any]) -> Mapping[str, Any] | None:
        parent = self.by_id.get(row.get("parent_event_id"))
        return parent if parent is not None and not is_message(parent) else None

    def add_sections(self, row: Mapping[str, Any], attributes: dict[str, Any]) -> None:
        """Attributes from inputs/outputs/meta, through the field table's inverse."""
        for attribute, value in row_attributes(row, self.allowed).items():
            converted = otlp_value(value)
            if converted is not None:
                attributes[attribute] = converted

    def message_event(self, row: Mapping[str, Any]) -> Event:
        attributes: dict[str, Any] = {semconv.EVENT_TYPE: semconv.EVENT_MESSAGE}
        for column, attribute in ((c, a) for c, a in IDENTITY_COLUMNS if c in ("execution_order", "depth")):
            if row.get(column) is not None:
                attributes[attribute] = row[column]
        self.add_sections(row, attributes)
        stamp = _ns(row.get("timestamp") or row.get("started_at")) or self.now_ns
        return Event(semconv.MESSAGE_EVENT_NAME, attributes, stamp)

    def span(self, row: Mapping[str, Any], events: list[Event]) -> ReadableSpan:
        attributes: dict[str, Any] = {}
        for column, attribute in IDENTITY_COLUMNS:
            converted = otlp_value(row.get(column))
            if converted is not None:
                attributes[attribute] = converted
        self.add_sections(row, attributes)
        add_start_keys(attributes)  # the OpenInference kind and agent name (rows do not store them)
        if semconv.SESSION_ID in attributes:
            attributes[semconv.OI_SESSION_ID] = attributes[semconv.SESSION_ID]
        start, end = self._times(row, attributes)
        parent = self.parent_of(row)
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        return ReadableSpan(
            name=meta.get("span_name") or str(row.get("event_type") or "span"),
            context=self.context_of(row),
            parent=self.context_of(parent) if parent is not None else None,
            resource=self.resource,
            attributes=attributes,
            events=sorted(events, key=lambda e: e.timestamp),
            kind=SpanKind.CLIENT if row.get("event_type") == semconv.EVENT_LLM_CALL else SpanKind.INTERNAL,
            status=_status(row, attributes),
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )

    def _times(self, row: Mapping[str, Any], attributes: dict[str, Any]) -> tuple[int, int]:
        start = _ns(row.get("started_at") or row.get("timestamp")) or self.now_ns
        end = _ns(row.get("completed_at"))
        if row.get("status") == STATUS_RUNNING:
            attributes[semconv.INCOMPLETE] = True
            end = max(self.now_ns, start)
        elif end is None:
            end = start + int(row.get("duration_ms") or 0) * 1_000_000
        return start, end


def _status(row: Mapping[str, Any], attributes: dict[str, Any]) -> Status:
    if row.get("status") != STATUS_FAILED:
        return Status(StatusCode.OK if row.get("status") == STATUS_COMPLETED else StatusCode.UNSET)
    message = row.get("error_message")
    if message and semconv.ERROR_MESSAGE not in attributes:
        attributes[semconv.ERROR_MESSAGE] = str(message)
    return Status(StatusCode.ERROR, str(message) if message else None)


def spans_from_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    service_name: str = "cmbagent",
    content: bool = False,
    now_ns: int | None = None,
) -> tuple[list[ReadableSpan], int]:
    """Rebuild a run's spans from its rows; returns ``(spans, message_events)``.

    ``content``: also send message text, tool arguments/results, code and output (the OTLP content policy:
    off unless asked for).
    """
    rebuild = _Rebuild(rows, content, now_ns if now_ns is not None else time.time_ns(), service_name)
    events: dict[Any, list[Event]] = {}
    message_events = 0
    for row in rows:
        parent = rebuild.parent_of(row) if is_message(row) else None
        if parent is not None:
            events.setdefault(parent.get("id"), []).append(rebuild.message_event(row))
            message_events += 1
    spans = [rebuild.span(row, events.get(row.get("id"), [])) for row in rows if not is_message(row)]
    return spans, message_events
