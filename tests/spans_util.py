"""Helpers to read finished spans as a tree (shared by the tests)."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags, TraceState

import otel_cmbagent as oc
from otel_cmbagent.pipeline import semconv


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


TOOL = {"cmbagent.event_type": "tool_call", "gen_ai.tool.name": "add", "gen_ai.agent.name": "engineer",
        "gen_ai.tool.call.arguments": '{"a": 1}', "gen_ai.tool.call.result": "2", "tags": ("x", "y")}
LLM = {"cmbagent.event_type": "llm_call", "gen_ai.agent.name": "engineer", "gen_ai.usage.input_tokens": 12,
       "gen_ai.usage.output_tokens": 3, "gen_ai.usage.cost": 0.25,
       "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "a"}]}, '
                                '{"role": "user", "parts": [{"type": "text", "content": "b"}]}]'}


def ended_spans(limits: SpanLimits | None = None) -> list:
    """Every kind of ended span a sink meets, as the SDK hands them to ``on_end``."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits)
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer, ag2x = provider.get_tracer("bench"), provider.get_tracer(semconv.AG2X_SCOPE)
    remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState([("vendor", "value")]))
    with tracer.start_as_current_span("run", attributes={"cmbagent.event_type": "run"},
                                      context=trace.set_span_in_context(trace.NonRecordingSpan(remote))):
        tracer.start_span("execute_tool add", attributes=TOOL).end()
        failed = tracer.start_span("execute_tool add", attributes=TOOL, links=[Link(remote, {"why": "retry"})])
        failed.record_exception(ValueError("boom"))
        failed.set_status(Status(StatusCode.ERROR, "ValueError: boom"))
        failed.end()
        interrupted = tracer.start_span("invoke_agent engineer", attributes={"cmbagent.event_type": "agent_call"})
        interrupted.add_event(semconv.MESSAGE_EVENT_NAME, {"cmbagent.message.content": "hello", "n": 1})
        interrupted.set_attribute(semconv.INTERRUPTED, "SIGTERM")
        interrupted.set_status(Status(StatusCode.ERROR, "interrupted by SIGTERM"))
        interrupted.end()
        with ag2x.start_as_current_span("chat gpt", attributes=LLM) as chat:
            chat.set_status(Status(StatusCode.OK))
    return list(memory.get_finished_spans())
