"""Conversations: ``initiate_chat``/``initiate_chats``/group chat ``run_chat``/``resume`` -> ``conversation {agent}``."""

from __future__ import annotations

import uuid
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from ..pipeline import openinference as oi
from ..pipeline import semconv
from ..pipeline.context import UsageTotals, conversation_values, top_level_scopes, usage_chain, with_new_usage
from ..pipeline.values import register_secrets_from_config, to_json
from .messages import message_value
from .spans import Runtime, SpanStart, agent_name, argument

# The run/step spans a top-level conversation gives its opening and final messages to (Phoenix's Traces table).
_SCOPES_KEY = otel_context.create_key("cmbagent.conversation_scopes")


def _agent_llm_config(agent: Any) -> Any:
    return getattr(agent, "llm_config", None)


class ConversationWrappers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _start(self, agent: Any, kind: str, extra: dict[str, Any], opening: Any = None) -> SpanStart:
        name = agent_name(agent)
        conversation_id = str(uuid.uuid4())
        _, values = with_new_usage(conversation_values(conversation_id))
        if self.runtime.config.capture_content:
            scopes = top_level_scopes()
            values += ((_SCOPES_KEY, scopes),)
            extra.update(self._opening(name, extra.get(semconv.CONVERSATION_RECIPIENT), opening, scopes))
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_CONVERSATION,
            semconv.EVENT_TYPE: semconv.EVENT_CONVERSATION,
            semconv.AG2_SPAN_TYPE: "conversation",
            semconv.GEN_AI_AGENT_NAME: name,
            semconv.GEN_AI_CONVERSATION_ID: conversation_id,
            semconv.CONVERSATION_KIND: kind,
            **extra,
        }
        return SpanStart(f"conversation {name}", attributes, context_values=values)

    def _opening(self, sender: str, recipient: Any, opening: Any, scopes: tuple) -> dict[str, Any]:
        """The conversation's ``input.value`` (sender, recipient, opening message); the run's input too."""
        limit = self.runtime.config.max_value_length
        text = message_value(opening, limit) if isinstance(opening, (str, dict)) else None
        for scope in scopes:
            if text is not None and not oi.has_input(scope):
                oi.set_input(scope, text)
        return oi.input_attributes(to_json({"sender": sender, "recipient": recipient, "message": text}, limit))

    def start_initiate_chat(self, agent: Any, args: tuple, kwargs: dict) -> SpanStart:
        recipient = argument(args, kwargs, 0, "recipient")
        register_secrets_from_config(_agent_llm_config(agent))
        register_secrets_from_config(_agent_llm_config(recipient))
        extra: dict[str, Any] = {}
        if recipient is not None:
            extra[semconv.CONVERSATION_RECIPIENT] = agent_name(recipient)
        max_turns = kwargs.get("max_turns")
        if isinstance(max_turns, int) and not isinstance(max_turns, bool):
            extra[semconv.GEN_AI_CONVERSATION_MAX_TURNS] = max_turns
        return self._start(agent, "initiate_chat", extra, kwargs.get("message"))

    def start_initiate_chats(self, agent: Any, args: tuple, kwargs: dict) -> SpanStart:
        queue = argument(args, kwargs, 0, "chat_queue")
        extra = {semconv.CONVERSATION_CHATS: len(queue)} if isinstance(queue, list) else {}
        first = queue[0] if isinstance(queue, list) and queue and isinstance(queue[0], dict) else {}
        if first.get("recipient") is not None:
            extra[semconv.CONVERSATION_RECIPIENT] = agent_name(first["recipient"])
        return self._start(agent, "initiate_chats", extra, first.get("message"))

    def start_run_chat(self, manager: Any, args: tuple, kwargs: dict) -> SpanStart:
        groupchat = argument(args, kwargs, 2, "config") or getattr(manager, "_groupchat", None)
        messages = argument(args, kwargs, 0, "messages")
        opening = messages[-1] if isinstance(messages, list) and messages else None
        return self._start(manager, "group_chat", _group_attributes(groupchat), opening)

    def start_resume(self, manager: Any, args: tuple, kwargs: dict) -> SpanStart:
        extra = _group_attributes(getattr(manager, "_groupchat", None))
        extra[semconv.GEN_AI_CONVERSATION_RESUMED] = True
        return self._start(manager, "group_chat", extra)

    def finish(self, span: trace.Span, agent: Any, args: tuple, kwargs: dict, result: Any) -> None:
        history = getattr(result, "chat_history", None)
        if isinstance(history, list):
            span.set_attribute(semconv.GEN_AI_CONVERSATION_TURNS, len(history))
        elif isinstance(result, list):  # initiate_chats
            span.set_attribute(semconv.CONVERSATION_CHATS, len(result))
            history = getattr(result[-1], "chat_history", None) if result else None
        else:
            history = getattr(getattr(agent, "_groupchat", None), "messages", None)
            if isinstance(history, list):
                span.set_attribute(semconv.GEN_AI_CONVERSATION_TURNS, len(history))
        totals = usage_of_current_span()
        if totals is not None:
            span.set_attributes(totals.as_attributes())
        if self.runtime.config.capture_content and isinstance(history, list) and history:
            final = message_value(history[-1], self.runtime.config.max_value_length, "assistant")
            for target in (span, *(otel_context.get_value(_SCOPES_KEY) or ())):  # type: ignore[misc]
                oi.set_output(target, final)


def usage_of_current_span() -> UsageTotals | None:
    """The totals this conversation pushed (the innermost in the current context; finish runs before detach)."""
    chain = usage_chain()
    return chain[0] if chain else None


def _group_attributes(groupchat: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    agents = getattr(groupchat, "agents", None)
    if isinstance(agents, list):
        out[semconv.GROUP_AGENTS] = [agent_name(a) for a in agents]
    method = getattr(groupchat, "speaker_selection_method", None)
    if method is not None:
        out[semconv.HANDOFF_METHOD] = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    max_round = getattr(groupchat, "max_round", None)
    if isinstance(max_round, int):
        out[semconv.GEN_AI_CONVERSATION_MAX_TURNS] = max_round
    return out
