"""ConversableAgent: replies (``invoke_agent``), tools (``execute_tool``), human input, messages."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry import trace

from ..pipeline import semconv
from ..pipeline.context import current_conversation_id
from ..pipeline import openinference as oi
from ..pipeline.errors import mark_failed
from ..pipeline.values import safe_text, to_json
from .messages import message_value, otel_text, to_otel_message
from .spans import Runtime, SpanStart, add_ordered_event, agent_name, argument


def _llm_identity(agent: Any) -> dict[str, Any]:
    """Provider and model from an agent's llm_config (first config), without copying the config."""
    config = getattr(agent, "llm_config", None)
    if not config:
        return {}
    config_list = config.get("config_list") if isinstance(config, dict) else getattr(config, "config_list", None)
    if not config_list:
        return {}
    first = config_list[0]
    get = first.get if isinstance(first, dict) else lambda key, default=None: getattr(first, key, default)
    out: dict[str, Any] = {}
    model = get("model")
    if isinstance(model, str):
        out[semconv.GEN_AI_REQUEST_MODEL] = model
    out[semconv.GEN_AI_PROVIDER_NAME] = provider_name(get("api_type"))
    return out


_PROVIDERS = {
    None: "openai",
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "mistral": "mistral_ai",
    "google": "gcp.gemini",
    "groq": "groq",
    "cohere": "cohere",
    "deepseek": "deepseek",
}


def _history_with(agent: Any, sender: Any) -> Any:
    """What ``generate_reply(sender=...)`` reads when given no messages (AG2: ``chat_messages[sender]``)."""
    try:
        return getattr(agent, "chat_messages", {}).get(sender)
    except Exception:  # noqa: BLE001 - an agent without the mapping: no input recorded
        return None


def provider_name(api_type: Any) -> str:
    return _PROVIDERS.get(api_type, str(api_type))


class AgentWrappers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limit = runtime.config.max_value_length

    # --- invoke_agent -------------------------------------------------------
    def start_generate_reply(self, agent: Any, args: tuple, kwargs: dict) -> SpanStart:
        name = agent_name(agent)
        messages = argument(args, kwargs, 0, "messages")
        sender = argument(args, kwargs, 1, "sender")
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT,
            semconv.EVENT_TYPE: semconv.EVENT_AGENT_CALL,
            semconv.AG2_SPAN_TYPE: "agent",
            semconv.GEN_AI_AGENT_NAME: name,
            semconv.AGENT_ROLE: type(agent).__name__,
            **_llm_identity(agent),
        }
        if sender is not None:
            attributes[semconv.MESSAGE_SENDER] = agent_name(sender)
        if messages is None and sender is not None:  # a group chat's turn: the agent reads its own history
            messages = _history_with(agent, sender)
        if isinstance(messages, list):
            attributes[semconv.LLM_MESSAGE_COUNT] = len(messages)
            if messages and self.runtime.config.capture_content:  # the newest only: linear in the chat's length
                attributes.update(oi.input_attributes(message_value(messages[-1], self.limit)))
        conversation_id = current_conversation_id()
        if conversation_id:
            attributes[semconv.GEN_AI_CONVERSATION_ID] = conversation_id
        return SpanStart(f"invoke_agent {name}", attributes)

    def finish_generate_reply(self, span: trace.Span, agent: Any, args: tuple, kwargs: dict, reply: Any) -> None:
        if reply is not None and self.runtime.config.capture_content:
            message = to_otel_message(reply, self.limit, "assistant")
            message["finish_reason"] = "stop"  # Phoenix drops output messages without one
            output = to_json([message], self.limit)
            span.set_attribute(semconv.GEN_AI_OUTPUT_MESSAGES, output)
            text = otel_text(message)
            oi.set_output(span, text if text is not None else output)

    # --- execute_tool -------------------------------------------------------
    def start_execute_function(self, agent: Any, args: tuple, kwargs: dict) -> SpanStart:
        func_call = argument(args, kwargs, 0, "func_call") or {}
        call_id = argument(args, kwargs, 1, "call_id")
        tool = func_call.get("name") if isinstance(func_call, dict) else None
        tool = tool if isinstance(tool, str) and tool else "unknown"
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_TOOL,
            semconv.EVENT_TYPE: semconv.EVENT_TOOL_CALL,
            semconv.AG2_SPAN_TYPE: "tool",
            semconv.GEN_AI_TOOL_NAME: tool,
            semconv.GEN_AI_TOOL_TYPE: "function",
            semconv.GEN_AI_AGENT_NAME: agent_name(agent),
        }
        if isinstance(call_id, str) and call_id:
            attributes[semconv.GEN_AI_TOOL_CALL_ID] = call_id
        if self.runtime.config.capture_content and isinstance(func_call, dict):
            raw = func_call.get("arguments")
            try:
                parsed = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                parsed = raw
            arguments = attributes[semconv.GEN_AI_TOOL_CALL_ARGUMENTS] = to_json(parsed, self.limit)
            attributes.update(oi.input_attributes(arguments, semconv.MIME_JSON))
        return SpanStart(f"execute_tool {tool}", attributes)

    def finish_execute_function(self, span: trace.Span, agent: Any, args: tuple, kwargs: dict, result: Any) -> None:
        if not (isinstance(result, tuple) and len(result) == 2):
            return
        success, payload = result
        content = payload.get("content") if isinstance(payload, dict) else payload
        span.set_attribute(semconv.TOOL_SUCCESS, bool(success))
        if self.runtime.config.capture_content:
            text = safe_text(content, self.limit)
            span.set_attribute(semconv.GEN_AI_TOOL_CALL_RESULT, text)
            oi.set_output(span, text)
        if not success:
            mark_failed(span, "tool_error", str(content) if self.runtime.config.capture_content else "tool call failed")

    # --- human input --------------------------------------------------------
    def start_human_input(self, agent: Any, args: tuple, kwargs: dict) -> SpanStart:
        name = agent_name(agent)
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_HUMAN_INPUT,
            semconv.EVENT_TYPE: semconv.EVENT_HUMAN_INPUT,
            semconv.AG2_SPAN_TYPE: "human_input",
            semconv.GEN_AI_AGENT_NAME: name,
        }
        if self.runtime.config.capture_content:
            prompt = attributes[semconv.HUMAN_INPUT_PROMPT] = safe_text(argument(args, kwargs, 0, "prompt", ""), self.limit)
            attributes.update(oi.input_attributes(prompt, semconv.MIME_TEXT))
        return SpanStart(f"human_input {name}", attributes)

    def finish_human_input(self, span: trace.Span, agent: Any, args: tuple, kwargs: dict, reply: Any) -> None:
        if self.runtime.config.capture_content:
            response = safe_text(reply, self.limit)
            span.set_attribute(semconv.HUMAN_INPUT_RESPONSE, response)
            oi.set_output(span, response, semconv.MIME_TEXT)

    # --- messages (span events, not spans) ----------------------------------
    def record_send(self, agent: Any, args: tuple, kwargs: dict) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        message = argument(args, kwargs, 0, "message")
        recipient = argument(args, kwargs, 1, "recipient")
        request_reply = argument(args, kwargs, 2, "request_reply")
        attributes: dict[str, Any] = {
            semconv.EVENT_TYPE: semconv.EVENT_MESSAGE,
            semconv.MESSAGE_SENDER: agent_name(agent),
            semconv.MESSAGE_RECIPIENT: agent_name(recipient) if recipient is not None else "",
        }
        if isinstance(request_reply, bool):
            attributes[semconv.MESSAGE_REQUEST_REPLY] = request_reply
        if isinstance(message, dict):
            role = message.get("role")
            if isinstance(role, str):
                attributes[semconv.MESSAGE_ROLE] = role
        if self.runtime.config.capture_content:
            otel_message = to_otel_message(message, self.limit, "assistant")
            attributes[semconv.MESSAGE_CONTENT] = to_json(otel_message["parts"], self.limit)
        add_ordered_event(span, semconv.MESSAGE_EVENT_NAME, attributes)
