"""OpenAIWrapper.create: one ``chat {model}`` CLIENT span per LLM call, with per-call usage and cost."""

from __future__ import annotations

import weakref
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from ..pipeline import openinference as oi
from ..pipeline import semconv
from ..pipeline.context import usage_chain
from ..pipeline.values import register_secrets_from_config, to_json
from .agent_patch import provider_name
from .messages import messages_json, otel_text, to_otel_message
from .spans import Runtime, SpanStart, agent_name

_NOT_CONFIG = frozenset({"messages", "agent", "context", "tools", "functions", "cache", "response_format"})

_REQUEST_PARAMS = (
    ("temperature", semconv.GEN_AI_REQUEST_TEMPERATURE, (int, float)),
    ("max_tokens", semconv.GEN_AI_REQUEST_MAX_TOKENS, int),
    ("top_p", semconv.GEN_AI_REQUEST_TOP_P, (int, float)),
    ("seed", semconv.GEN_AI_REQUEST_SEED, int),
)


class LLMWrappers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limit = runtime.config.max_value_length
        self._seen_clients: weakref.WeakSet[Any] = weakref.WeakSet()

    def _remember_secrets(self, client: Any) -> None:
        try:
            if client in self._seen_clients:
                return
            self._seen_clients.add(client)
        except TypeError:  # not weak-referenceable: register every time
            pass
        register_secrets_from_config(getattr(client, "_config_list", None))

    def start_create(self, client: Any, args: tuple, kwargs: dict) -> SpanStart:
        self._remember_secrets(client)
        # Per-call overrides may carry an api_key; the message history is content, not config
        # (walking it on every call would cost O(history) per call).
        register_secrets_from_config({k: v for k, v in kwargs.items() if k not in _NOT_CONFIG})
        config_list = getattr(client, "_config_list", None) or [{}]
        first = config_list[0] if isinstance(config_list[0], dict) else {}
        model = kwargs.get("model") or first.get("model")
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_CHAT,
            semconv.EVENT_TYPE: semconv.EVENT_LLM_CALL,
            semconv.AG2_SPAN_TYPE: "llm",
            semconv.GEN_AI_PROVIDER_NAME: provider_name(kwargs.get("api_type") or first.get("api_type")),
        }
        if isinstance(model, str):
            attributes[semconv.GEN_AI_REQUEST_MODEL] = model
        for key, attribute, kinds in _REQUEST_PARAMS:
            value = kwargs.get(key, first.get(key))
            if isinstance(value, kinds) and not isinstance(value, bool):
                attributes[attribute] = value
        agent = kwargs.get("agent")
        if agent is not None:
            attributes[semconv.GEN_AI_AGENT_NAME] = agent_name(agent)
        else:
            parent = getattr(trace.get_current_span(), "attributes", None) or {}
            if parent.get(semconv.GEN_AI_AGENT_NAME):
                attributes[semconv.GEN_AI_AGENT_NAME] = parent[semconv.GEN_AI_AGENT_NAME]
        messages = kwargs.get("messages")
        if isinstance(messages, list):
            attributes[semconv.LLM_MESSAGE_COUNT] = len(messages)
            if self.runtime.config.capture_content and messages:
                # Only the newest message: the history was recorded once, as message
                # events, when it was sent. Re-serialising it here is what makes
                # other tracers grow quadratically with conversation length.
                newest = attributes[semconv.GEN_AI_INPUT_MESSAGES] = messages_json(messages[-1:], self.limit)
                attributes.update(oi.input_attributes(newest, semconv.MIME_JSON))  # the same text, not re-built
                attributes[semconv.LLM_HISTORY_OMITTED] = len(messages) - 1
        return SpanStart(f"chat {model}" if model else "chat", attributes, SpanKind.CLIENT)

    def finish_create(self, span: trace.Span, client: Any, args: tuple, kwargs: dict, response: Any) -> None:
        model = getattr(response, "model", None)
        if isinstance(model, str):
            span.set_attribute(semconv.GEN_AI_RESPONSE_MODEL, model)
        response_id = getattr(response, "id", None)
        if isinstance(response_id, str):
            span.set_attribute(semconv.GEN_AI_RESPONSE_ID, response_id)
        usage = getattr(response, "usage", None)
        input_tokens = _int(getattr(usage, "prompt_tokens", None))
        output_tokens = _int(getattr(usage, "completion_tokens", None))
        if usage is not None:
            span.set_attribute(semconv.GEN_AI_USAGE_INPUT_TOKENS, input_tokens)
            span.set_attribute(semconv.GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)
        cost = getattr(response, "cost", None)
        cost = float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else 0.0
        span.set_attribute(semconv.GEN_AI_USAGE_COST, cost)
        for totals in usage_chain():
            totals.add(input_tokens, output_tokens, cost)
        choices = getattr(response, "choices", None) or []
        reasons = [c.finish_reason for c in choices if isinstance(getattr(c, "finish_reason", None), str)]
        if reasons:
            span.set_attribute(semconv.GEN_AI_RESPONSE_FINISH_REASONS, reasons)
        if self.runtime.config.capture_content and choices:
            self._record_outputs(span, choices)

    def _record_outputs(self, span: trace.Span, choices: list[Any]) -> None:
        """The reply as ``gen_ai.output.messages`` (every item with a finish_reason) and as ``output.value``."""
        outputs = []
        for choice in choices:
            otel = to_otel_message(_message_dict(getattr(choice, "message", None)), self.limit, "assistant")
            reason = getattr(choice, "finish_reason", None)
            otel["finish_reason"] = reason if isinstance(reason, str) and reason else "stop"
            outputs.append(otel)
        output = to_json(outputs, self.limit)
        span.set_attribute(semconv.GEN_AI_OUTPUT_MESSAGES, output)
        text = otel_text(outputs[0]) if len(outputs) == 1 else None
        oi.set_output(span, text if text is not None else output)  # the reply, not Phoenix's {"id", "model"}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _message_dict(message: Any) -> dict[str, Any]:
    if message is None:
        return {}
    if isinstance(message, dict):
        return message
    dump = getattr(message, "model_dump", None)
    if callable(dump):
        try:
            return dump(exclude_none=True)
        except Exception:  # noqa: BLE001
            pass
    return {"content": getattr(message, "content", None)}
