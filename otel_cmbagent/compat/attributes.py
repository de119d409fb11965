"""The span attributes of each cmbagent capture call: its arguments as GenAI / ``cmbagent.*`` attributes.

Values go through the instrumentation's cleaning (JSON-safe, secrets scrubbed, cut at the per-value limit),
so one bad ``metadata`` value never breaks a later capture (it poisoned cmbagent's session).
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.trace import Span

from ..instrumentation.messages import messages_json
from ..pipeline import semconv
from ..pipeline.config import DEFAULT_MAX_VALUE_LENGTH
from ..pipeline.values import safe_text, to_json

LIMIT = DEFAULT_MAX_VALUE_LENGTH  # per value, as the instrumentation's default


def metadata(value: Any) -> dict[str, Any]:
    return {semconv.METADATA: to_json(value, LIMIT)} if value else {}


def with_earlier_metadata(span: Span, attributes: dict[str, Any]) -> dict[str, Any]:
    """An ending event keeps the metadata it started with (cmbagent replaces it; the response's wins per key)."""
    earlier = (getattr(span, "attributes", None) or {}).get(semconv.METADATA)
    later = attributes.get(semconv.METADATA)
    if not earlier or not later:
        return attributes
    try:
        merged = {**json.loads(earlier), **json.loads(later)}
    except (ValueError, TypeError):
        return attributes
    return {**attributes, semconv.METADATA: to_json(merged, LIMIT)}


def agent_call(agent_name: str, message: Any, context: Any, meta: Any) -> dict[str, Any]:
    attributes = {
        semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT,
        semconv.GEN_AI_AGENT_NAME: agent_name,
        semconv.GEN_AI_INPUT_MESSAGES: messages_json([message], LIMIT),
        **metadata(meta),
    }
    if context:
        attributes[semconv.CONTEXT] = to_json(context, LIMIT)
    return attributes


def agent_response(response: Any, meta: Any) -> dict[str, Any]:
    return {semconv.GEN_AI_OUTPUT_MESSAGES: messages_json([response], LIMIT, "assistant"), **metadata(meta)}


def agent(agent_name: str) -> dict[str, Any]:
    return {semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT, semconv.GEN_AI_AGENT_NAME: agent_name}


def tool_call(agent_name: str, tool_name: str, arguments: Any, result: Any, meta: Any) -> dict[str, Any]:
    attributes = {
        semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_TOOL,
        semconv.GEN_AI_AGENT_NAME: agent_name,
        semconv.GEN_AI_TOOL_NAME: tool_name,
        semconv.GEN_AI_TOOL_CALL_ARGUMENTS: to_json(arguments, LIMIT),
        **metadata(meta),
    }
    if result is not None:
        attributes[semconv.GEN_AI_TOOL_CALL_RESULT] = safe_text(result, LIMIT)
    return attributes


def code(agent_name: str, source: Any, language: Any, meta: Any) -> dict[str, Any]:
    return {
        semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_CODE,
        semconv.GEN_AI_AGENT_NAME: agent_name,
        semconv.CODE_LANGUAGE: str(language or "python"),
        semconv.CODE_BLOCKS: to_json([{"language": language, "code": source}], LIMIT),
        **metadata(meta),
    }


def code_outcome(result: Any, exit_code: Any, success: bool | None = None) -> tuple[dict[str, Any], str | None]:
    """A code run's result attributes, and why it failed (None when it did not)."""
    attributes: dict[str, Any] = {}
    if isinstance(exit_code, int) and not isinstance(exit_code, bool):
        attributes[semconv.CODE_EXIT_CODE] = exit_code
    if result is not None:
        attributes[semconv.CODE_OUTPUT] = safe_text(result, LIMIT)
    failure = f"exit code {exit_code}" if exit_code not in (None, 0) else None
    if success is False and failure is None:
        failure = "code execution failed"
    return attributes, failure


def file_generation(agent_name: str, file_path: str, file_type: str, size_bytes: Any, meta: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        semconv.GEN_AI_OPERATION_NAME: semconv.OP_FILE,
        semconv.GEN_AI_AGENT_NAME: agent_name,
        semconv.FILE_PATH: str(file_path),
        semconv.FILE_TYPE: str(file_type),
        **metadata(meta),
    }
    if isinstance(size_bytes, int) and not isinstance(size_bytes, bool):
        attributes[semconv.FILE_SIZE] = size_bytes
    return attributes


def handoff(from_agent: str, to_agent: str, context: Any, reason: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        semconv.GEN_AI_OPERATION_NAME: semconv.OP_HANDOFF,
        semconv.HANDOFF_FROM: from_agent,
        semconv.HANDOFF_TO: to_agent,
        semconv.GEN_AI_AGENT_NAME: from_agent,
    }
    if reason:
        attributes[semconv.HANDOFF_REASON] = str(reason)
    if context:
        attributes[semconv.CONTEXT] = to_json(context, LIMIT)
    return attributes


def message(sender: str, recipient: str, content: Any, tokens: Any, meta: Any,
            node_id: str | None, step_id: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        semconv.EVENT_TYPE: semconv.EVENT_MESSAGE,
        semconv.MESSAGE_SENDER: str(sender),
        semconv.MESSAGE_RECIPIENT: str(recipient),
        semconv.MESSAGE_CONTENT: to_json([{"type": "text", "content": content}], LIMIT),
        **metadata(meta),
    }
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        attributes[semconv.MESSAGE_TOKENS] = tokens
    for key, value in ((semconv.NODE_ID, node_id), (semconv.STEP_ID, step_id)):
        if value:  # the message belongs to the current step, whatever span it hangs on
            attributes[key] = value
    return attributes
