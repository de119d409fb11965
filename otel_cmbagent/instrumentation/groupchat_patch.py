"""GroupChat speaker selection -> ``handoff {from} -> {to}`` (covers group patterns too)."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from ..pipeline import openinference as oi
from ..pipeline import semconv
from ..pipeline.values import to_json
from .spans import Runtime, SpanStart, agent_name, argument


class GroupChatWrappers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def start_select_speaker(self, groupchat: Any, args: tuple, kwargs: dict) -> SpanStart:
        last_speaker = argument(args, kwargs, 0, "last_speaker")
        selector = argument(args, kwargs, 1, "selector")
        source = agent_name(last_speaker) if last_speaker is not None else "start"
        method = getattr(groupchat, "speaker_selection_method", None)
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_HANDOFF,
            semconv.EVENT_TYPE: semconv.EVENT_HANDOFF,
            semconv.AG2_SPAN_TYPE: "speaker_selection",
            semconv.HANDOFF_FROM: source,
            semconv.HANDOFF_METHOD: method if isinstance(method, str) else getattr(method, "__name__", "custom"),
        }
        if selector is not None:
            attributes[semconv.GEN_AI_AGENT_NAME] = agent_name(selector)
        if self.runtime.config.capture_content:
            candidates = [agent_name(a) for a in getattr(groupchat, "agents", None) or ()]
            choice = {"from": source, "method": attributes[semconv.HANDOFF_METHOD], "candidates": candidates}
            attributes.update(oi.input_attributes(to_json(choice, self.runtime.config.max_value_length)))
        return SpanStart(f"handoff {source}", attributes)

    def finish_select_speaker(self, span: trace.Span, groupchat: Any, args: tuple, kwargs: dict, speaker: Any) -> None:
        if speaker is None:
            return
        target = agent_name(speaker)
        source = (getattr(span, "attributes", None) or {}).get(semconv.HANDOFF_FROM, "start")
        span.set_attribute(semconv.HANDOFF_TO, target)
        span.set_attribute(semconv.SPEAKER_SELECTED, target)
        span.update_name(f"handoff {source} -> {target}")
        if self.runtime.config.capture_content:
            oi.set_output(span, target, semconv.MIME_TEXT)
