"""AG2/OpenAI messages in the GenAI semantic-convention shape (role + parts), serialised once."""

from __future__ import annotations

import json
from typing import Any

from ..pipeline.values import clean_text, jsonable, to_json


def _arguments(raw: Any, limit: int) -> Any:
    if isinstance(raw, str):
        try:
            return jsonable(json.loads(raw), limit)
        except (ValueError, TypeError):
            return jsonable(raw, limit)
    return jsonable(raw, limit)


def to_otel_message(message: Any, limit: int, default_role: str = "user") -> dict[str, Any]:
    """One message as ``{"role", "parts": [...]}`` (text, tool_call, tool_call_response)."""
    if message is None:
        return {"role": default_role, "parts": []}
    if not isinstance(message, dict):
        return {"role": default_role, "parts": [{"type": "text", "content": jsonable(message, limit)}]}
    role = message.get("role") or default_role
    parts: list[dict[str, Any]] = []
    for call in message.get("tool_calls") or ():
        function = (call or {}).get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": _arguments(function.get("arguments"), limit),
            }
        )
    function_call = message.get("function_call")
    if function_call:
        parts.append(
            {
                "type": "tool_call",
                "name": function_call.get("name"),
                "arguments": _arguments(function_call.get("arguments"), limit),
            }
        )
    for response in message.get("tool_responses") or ():
        parts.append(
            {
                "type": "tool_call_response",
                "id": (response or {}).get("tool_call_id"),
                "response": jsonable((response or {}).get("content"), limit),
            }
        )
    content = message.get("content")
    if content not in (None, "") and not message.get("tool_responses"):
        if role == "tool" and message.get("tool_call_id"):
            parts.append({"type": "tool_call_response", "id": message["tool_call_id"], "response": jsonable(content, limit)})
        else:
            parts.append({"type": "text", "content": jsonable(content, limit)})
    out: dict[str, Any] = {"role": role, "parts": parts}
    if message.get("name"):
        out["name"] = message["name"]
    return out


def messages_json(messages: list[Any], limit: int, default_role: str = "user") -> str:
    return to_json([to_otel_message(m, limit, default_role) for m in messages], limit)


def otel_text(otel_message: dict[str, Any]) -> str | None:
    """The text of a one-text-part GenAI message (already cleaned by :func:`to_otel_message`), else None."""
    parts = otel_message.get("parts")
    if isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], dict) and parts[0].get("type") == "text":
        content = parts[0].get("content")
        return content if isinstance(content, str) else None
    return None


def message_value(message: Any, limit: int, default_role: str = "user") -> str:
    """One message as an ``input.value``/``output.value``: its text when it is plain text, else its GenAI JSON."""
    if isinstance(message, str):
        return clean_text(message, limit)
    otel = to_otel_message(message, limit, default_role)
    text = otel_text(otel)
    return text if text is not None else to_json(otel, limit)
