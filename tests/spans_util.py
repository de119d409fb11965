"""Helpers to read finished spans as a tree (shared by the tests)."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan


def ordered(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return sorted(spans, key=lambda s: s.attributes.get("cmbagent.execution_order", 0))


def by_event_type(spans: list[ReadableSpan], event_type: str) -> list[ReadableSpan]:
    return [s for s in ordered(spans) if s.attributes.get("cmbagent.event_type") == event_type]


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan | None:
    if span.parent is None:
        return None
    for candidate in spans:
        if candidate.context.span_id == span.parent.span_id:
            return candidate
    return None


def all_orders(spans: list[ReadableSpan], run_id: str | None = None) -> list[int]:
    """Every execution_order of a run: spans and their (message) events."""
    orders: list[int] = []
    for span in spans:
        if run_id is not None and span.attributes.get("cmbagent.run_id") != run_id:
            continue
        orders.append(span.attributes["cmbagent.execution_order"])
        orders.extend(e.attributes["cmbagent.execution_order"] for e in span.events if e.name == "cmbagent.message")
    return sorted(orders)


def everything_recorded(spans: list[ReadableSpan]) -> str:
    """One string with every name, attribute, event, status and resource value of the spans."""
    parts: list[Any] = []
    for span in spans:
        parts.append(span.name)
        parts.append(dict(span.attributes or {}))
        parts.append(span.status.description)
        parts.append(dict(span.resource.attributes))
        for event in span.events:
            parts.append(event.name)
            parts.append(dict(event.attributes or {}))
        for link in span.links:
            parts.append(dict(link.attributes or {}))
    return json.dumps(parts, default=str)
