"""AG2 1.x (module ``ag2``): its own ``TelemetryMiddleware`` makes the spans; this gives them our row vocabulary.

AG2 1.x sets no attribute before its spans start, so the start rows (and websocket start messages) would be
``info`` rows without an agent. :class:`AG2xSpanProcessor` classifies each span at start by its
instrumentation scope and name prefix (``invoke_agent``/``chat``/``execute_tool``/``await_human_input``) and
writes ``cmbagent.event_type`` and ``gen_ai.agent.name`` (the agent's from its ``invoke_agent`` name, the
children's from their parent). ``record_usage`` spans repeat their chat span's tokens: they stay ``info``
rows (ordered, so the order stays gapless) and are never counted (only ``llm_call`` rows carry
``meta.tokens``). An agent span gets the newest message of its turn and its reply from its chat spans.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from ..pipeline import semconv
from ..pipeline.context import _TracerSource
from ..pipeline.values import log_internal_error, to_json
from .messages import to_otel_message

SCOPE = semconv.AG2X_SCOPE
CODE_TOOLS = frozenset({"run_code", "run_shell_command"})  # AG2 1.x's sandbox tools: code runs
_PREFIXES = (
    ("invoke_agent ", semconv.EVENT_AGENT_CALL),
    ("chat", semconv.EVENT_LLM_CALL),
    ("execute_tool ", semconv.EVENT_TOOL_CALL),
    ("await_human_input ", semconv.EVENT_HUMAN_INPUT),
    ("network.channel ", semconv.EVENT_CONVERSATION),
)
USING_TELEMETRY_MIDDLEWARE = (
    "AG2 1.x is installed (module `ag2`, no `autogen`): the classic AG2 patches are not applied; AG2 1.x's own "
    "TelemetryMiddleware makes the spans (give each agent oc.ag2x.telemetry_middleware(agent_name)), and runs, "
    "order, threads and sinks work on them"
)
_MAX_OPEN_AGENTS = 10_000  # agent spans kept for their chat spans (never more, whatever AG2 leaves open)


def installed() -> bool:
    """AG2 1.x is installed (its module ``ag2``; the classic lines only have ``autogen``)."""
    try:
        return importlib.util.find_spec("ag2") is not None
    except (ImportError, ValueError):
        return False


def classify(name: str) -> str | None:
    for prefix, event_type in _PREFIXES:
        if name.startswith(prefix):
            if event_type == semconv.EVENT_TOOL_CALL and name[len(prefix):] in CODE_TOOLS:
                return semconv.EVENT_CODE_EXEC
            return event_type
    return None


def _parent_agent(parent_context: otel_context.Context | None) -> str | None:
    parent = trace.get_current_span(parent_context)
    attributes = getattr(parent, "attributes", None) or {}
    agent = attributes.get(semconv.GEN_AI_AGENT_NAME)
    return agent if isinstance(agent, str) else None


def _text_message(raw: Any, pick: int) -> str | None:
    """One message (``pick``: its index) of an OpenAI-format message list as GenAI JSON, or None."""
    try:
        messages = json.loads(raw) if isinstance(raw, str) else None
        if isinstance(messages, list) and messages and isinstance(messages[pick], dict):
            limit = 32_768
            return to_json([to_otel_message(messages[pick], limit, "user")], limit)
    except (ValueError, IndexError):
        pass
    return None


class AG2xSpanProcessor(SpanProcessor):
    """Give AG2 1.x's spans ``cmbagent.event_type`` and the agent's name at start (add it before the sinks)."""

    def __init__(self) -> None:
        self._agents: dict[int, Span] = {}  # span id -> open invoke_agent span

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        try:
            scope = span.instrumentation_scope
            if scope is None or scope.name != SCOPE:
                return
            event_type = classify(span.name)
            if event_type is None:
                return
            attributes: dict[str, Any] = {semconv.EVENT_TYPE: event_type}
            if event_type == semconv.EVENT_AGENT_CALL:
                attributes[semconv.GEN_AI_AGENT_NAME] = span.name.split(" ", 1)[1]
                if len(self._agents) < _MAX_OPEN_AGENTS:
                    self._agents[span.get_span_context().span_id] = span
            else:
                agent = _parent_agent(parent_context)
                if agent is not None:
                    attributes[semconv.GEN_AI_AGENT_NAME] = agent
            span.set_attributes(attributes)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("AG2xSpanProcessor.on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            attributes = span.attributes or {}
            event_type = attributes.get(semconv.EVENT_TYPE)
            if event_type == semconv.EVENT_AGENT_CALL:
                self._agents.pop(span.get_span_context().span_id, None)
            elif event_type == semconv.EVENT_LLM_CALL and span.parent is not None:
                agent = self._agents.get(span.parent.span_id)
                if agent is not None:
                    _fill_agent(agent, attributes)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("AG2xSpanProcessor.on_end", exc)

    def shutdown(self) -> None:
        self._agents.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _fill_agent(agent: Span, chat: Any) -> None:
    """The agent span's input (the newest message before its first chat) and output (its latest reply)."""
    if semconv.GEN_AI_INPUT_MESSAGES not in (agent.attributes or {}):
        newest = _text_message(chat.get(semconv.GEN_AI_INPUT_MESSAGES), -1)
        if newest is not None:
            agent.set_attribute(semconv.GEN_AI_INPUT_MESSAGES, newest)
    reply = _text_message(chat.get(semconv.GEN_AI_OUTPUT_MESSAGES), -1)
    if reply is not None:
        agent.set_attribute(semconv.GEN_AI_OUTPUT_MESSAGES, reply)


def telemetry_middleware(agent_name: str, *, tracer_provider: Any = None, capture_content: bool | None = None,
                         **options: Any) -> Any:
    """AG2 1.x's ``TelemetryMiddleware`` for one agent, on otel-cmbagent's provider, named after the agent.

    ``Agent("calc", ..., middleware=[oc.ag2x.telemetry_middleware("calc")])``. AG2 names every span's agent
    ``"unknown"`` unless told; content follows otel-cmbagent's setting. Needs ``ag2[tracing]``.
    """
    from ag2.middleware.builtin import TelemetryMiddleware

    from ..pipeline.config import InstrumentationConfig

    provider = tracer_provider or _TracerSource.provider or trace.get_tracer_provider()
    content = InstrumentationConfig.resolve(capture_content=capture_content).capture_content
    return TelemetryMiddleware(tracer_provider=provider, agent_name=agent_name, capture_content=content, **options)
