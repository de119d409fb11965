"""OpenInference keys next to the GenAI ones, so Phoenix (and other OpenInference-aware backends) read our spans.

Phoenix maps only ``chat``/``execute_tool``/``invoke_agent`` to a span kind (the rest show as "unknown"),
fills its input/output columns from ``input.value``/``output.value`` only, and files a trace under the first
``session.id`` it sees; keys a span sends explicitly win over its own conversion. The kind and ``agent.name``
cost two dict entries at start; input/output values are content (``semconv.CONTENT_ATTRIBUTES``), set by the
span builders only when content is captured, from text they already built.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from . import semconv
from .values import log_internal_error

CHAIN, AGENT, LLM, TOOL = "CHAIN", "AGENT", "LLM", "TOOL"

# gen_ai.operation.name -> openinference.span.kind (anything not listed: CHAIN)
SPAN_KINDS: dict[str, str] = {
    semconv.OP_INVOKE_WORKFLOW: CHAIN,
    semconv.OP_STEP: CHAIN,
    semconv.OP_CONVERSATION: AGENT,
    semconv.OP_INVOKE_AGENT: AGENT,
    semconv.OP_CHAT: LLM,
    semconv.OP_EXECUTE_TOOL: TOOL,
    semconv.OP_EXECUTE_CODE: TOOL,
    semconv.OP_HANDOFF: CHAIN,
    semconv.OP_FILE: CHAIN,
    semconv.OP_HUMAN_INPUT: CHAIN,
}


def add_start_keys(attributes: dict[str, Any]) -> dict[str, Any]:
    """Add the span kind (from ``gen_ai.operation.name``) and ``agent.name`` to a span's start attributes."""
    operation = attributes.get(semconv.GEN_AI_OPERATION_NAME)
    attributes[semconv.OPENINFERENCE_SPAN_KIND] = SPAN_KINDS.get(operation, CHAIN) if operation else CHAIN
    agent = attributes.get(semconv.GEN_AI_AGENT_NAME)
    if isinstance(agent, str) and agent:
        attributes[semconv.OI_AGENT_NAME] = agent
    return attributes


def _mime(value: str, mime: str | None) -> str:
    if mime is not None:
        return mime
    return semconv.MIME_JSON if value[:1] in ("{", "[") else semconv.MIME_TEXT


def input_attributes(value: str, mime: str | None = None) -> dict[str, str]:
    """``input.value`` and its mime type (JSON when the text is a JSON object/array and no type is given)."""
    return {semconv.INPUT_VALUE: value, semconv.INPUT_MIME_TYPE: _mime(value, mime)}


def output_attributes(value: str, mime: str | None = None) -> dict[str, str]:
    return {semconv.OUTPUT_VALUE: value, semconv.OUTPUT_MIME_TYPE: _mime(value, mime)}


def set_input(span: trace.Span, value: str, mime: str | None = None) -> None:
    span.set_attributes(input_attributes(value, mime))


def set_output(span: trace.Span, value: str, mime: str | None = None) -> None:
    span.set_attributes(output_attributes(value, mime))


def has_input(span: Any) -> bool:
    attributes = getattr(span, "attributes", None)
    return attributes is not None and semconv.INPUT_VALUE in attributes


def mark_ok(span: trace.Span) -> None:
    """Status OK on a span that ended normally and was not marked failed (AG2's convention leaves it UNSET)."""
    try:
        status = getattr(span, "status", None)
        if status is None or status.status_code is StatusCode.UNSET:
            span.set_status(Status(StatusCode.OK))
    except Exception as exc:  # noqa: BLE001
        log_internal_error("mark_ok", exc)
