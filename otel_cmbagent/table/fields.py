"""Where each span attribute sits in a row, and how its value is converted each way.

One table (:data:`FIELDS`) drives both directions: :func:`otel_cmbagent.table.rows.span_row` (span -> row)
decodes attribute values into ``inputs``/``outputs``/``meta``; :func:`row_attributes` (row -> span, for the
CLI's export to OTLP) encodes them back. :data:`IDENTITY_COLUMNS` does the same for the identity columns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..pipeline import semconv
from .schema import DERIVED_META, MESSAGE_KIND, row_kind


# --- value codecs: attribute value <-> row value -----------------------------------------------
class Codec(NamedTuple):
    decode: Callable[[Any], Any]  # attribute value -> row value
    encode: Callable[[Any], Any]  # row value -> attribute value


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parsed(value: Any) -> Any:
    """JSON text as data (anything else as it is)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return plain(value)


def dumped(value: Any) -> Any:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _only_text(parts: Any) -> Any:
    """The text of ``[{"type": "text", "content": X}]``; None for anything richer."""
    if isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], dict):
        part = parts[0]
        if part.get("type") == "text" and isinstance(part.get("content"), str) and set(part) <= {"type", "content"}:
            return part["content"]
    return None


def _message_text(value: Any) -> Any:
    """One plain-text message (OTel ``[{"role", "parts"}]``) -> its text; anything else stays structured."""
    messages = parsed(value)
    if isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict):
        text = _only_text(messages[0].get("parts"))
        if text is not None:
            return text
    return messages


def _parts_text(value: Any) -> Any:
    parts = parsed(value)
    text = _only_text(parts)
    return text if text is not None else parts


def _code_text(value: Any) -> Any:
    blocks = parsed(value)
    if isinstance(blocks, list) and all(isinstance(b, dict) for b in blocks):
        return "\n".join(str(b.get("code", "")) for b in blocks)
    return blocks


def _as_messages(role: str) -> Callable[[Any], Any]:
    def encode(value: Any) -> Any:
        if isinstance(value, str):
            return json.dumps([{"role": role, "parts": [{"type": "text", "content": value}]}], ensure_ascii=False)
        return dumped(value)

    return encode


def _as_parts(value: Any) -> Any:
    return json.dumps([{"type": "text", "content": value}], ensure_ascii=False) if isinstance(value, str) else dumped(value)


def _as_blocks(value: Any) -> Any:
    return json.dumps([{"code": value}], ensure_ascii=False) if isinstance(value, str) else dumped(value)


RAW = Codec(plain, plain)
JSON = Codec(parsed, dumped)
TEXT_IN = Codec(_message_text, _as_messages("user"))
TEXT_OUT = Codec(_message_text, _as_messages("assistant"))
PARTS = Codec(_parts_text, _as_parts)
CODE = Codec(_code_text, _as_blocks)


class Field(NamedTuple):
    """Where one span attribute goes in a row: ``section`` (inputs/outputs/meta) and ``key``."""

    attribute: str
    section: str
    key: str
    codec: Codec = RAW


DEFAULT_FIELDS = (
    Field(semconv.GEN_AI_INPUT_MESSAGES, "inputs", "messages", JSON),
    Field(semconv.GEN_AI_OUTPUT_MESSAGES, "outputs", "messages", JSON),
    Field(semconv.CONTEXT, "inputs", "context", JSON),
)
FIELDS: dict[str, tuple[Field, ...]] = {
    semconv.EVENT_AGENT_CALL: (
        Field(semconv.GEN_AI_INPUT_MESSAGES, "inputs", "message", TEXT_IN),
        Field(semconv.CONTEXT, "inputs", "context", JSON),
        Field(semconv.GEN_AI_OUTPUT_MESSAGES, "outputs", "response", TEXT_OUT),
    ),
    semconv.EVENT_TOOL_CALL: (
        Field(semconv.GEN_AI_TOOL_NAME, "inputs", "tool_name"),
        Field(semconv.GEN_AI_TOOL_CALL_ARGUMENTS, "inputs", "arguments", JSON),
        Field(semconv.GEN_AI_TOOL_CALL_RESULT, "outputs", "result"),
    ),
    semconv.EVENT_CODE_EXEC: (
        Field(semconv.CODE_BLOCKS, "inputs", "code", CODE),
        Field(semconv.CODE_OUTPUT, "outputs", "result"),
        Field(semconv.CODE_LANGUAGE, "meta", "language"),
        Field(semconv.CODE_EXIT_CODE, "meta", "exit_code"),
    ),
    semconv.EVENT_FILE_GEN: (
        Field(semconv.FILE_PATH, "inputs", "file_path"),
        Field(semconv.FILE_TYPE, "inputs", "file_type"),
        Field(semconv.FILE_SIZE, "meta", "size_bytes"),
    ),
    semconv.EVENT_HANDOFF: (
        Field(semconv.HANDOFF_FROM, "inputs", "from_agent"),
        Field(semconv.HANDOFF_TO, "inputs", "to_agent"),
        Field(semconv.CONTEXT, "inputs", "context", JSON),
        Field(semconv.HANDOFF_REASON, "meta", "reason"),
    ),
    semconv.EVENT_LLM_CALL: DEFAULT_FIELDS[:2],
    semconv.EVENT_HUMAN_INPUT: (
        Field(semconv.HUMAN_INPUT_PROMPT, "inputs", "prompt"),
        Field(semconv.HUMAN_INPUT_RESPONSE, "outputs", "response"),
    ),
    MESSAGE_KIND: (
        Field(semconv.MESSAGE_SENDER, "inputs", "sender"),
        Field(semconv.MESSAGE_RECIPIENT, "inputs", "recipient"),
        Field(semconv.MESSAGE_CONTENT, "inputs", "content", PARTS),
        Field(semconv.MESSAGE_TOKENS, "meta", "tokens"),
    ),
}
# cmbagent writes an empty context with these inputs
CONTEXT_DEFAULT = frozenset({semconv.EVENT_AGENT_CALL, semconv.EVENT_HANDOFF})
# the column agent_name, when it is not gen_ai.agent.name
AGENT_ATTRIBUTE = {semconv.EVENT_HANDOFF: semconv.HANDOFF_FROM, MESSAGE_KIND: semconv.MESSAGE_RECIPIENT}
# attributes that hold JSON text but have no field in a row's type (kept decoded in meta)
JSON_META = frozenset({semconv.GEN_AI_INPUT_MESSAGES, semconv.GEN_AI_OUTPUT_MESSAGES, semconv.CODE_BLOCKS})
# column <- attribute, for the columns that carry a span's identity (both directions)
IDENTITY_COLUMNS = (
    ("run_id", semconv.RUN_ID),
    ("session_id", semconv.SESSION_ID),
    ("node_id", semconv.NODE_ID),
    ("step_id", semconv.STEP_ID),
    ("event_type", semconv.EVENT_TYPE),
    ("execution_order", semconv.EXECUTION_ORDER),
    ("depth", semconv.DEPTH),
    ("agent_name", semconv.GEN_AI_AGENT_NAME),
    ("agent_role", semconv.AGENT_ROLE),
)
# attributes that become columns, not meta keys
IDENTITY = frozenset({attribute for _column, attribute in IDENTITY_COLUMNS} - {semconv.GEN_AI_AGENT_NAME}
                     | {semconv.METADATA})


def fields_of(kind: str) -> tuple[Field, ...]:
    return FIELDS.get(kind, DEFAULT_FIELDS)


def row_attributes(row: Mapping[str, Any], allowed: Callable[[str], bool] = lambda attribute: True) -> dict[str, Any]:
    """The span attributes a row's inputs/outputs/meta came from (inverse of ``span_row``'s sections).

    Identity columns are not included; meta keys the mapping computed are left out.
    ``allowed(attribute)`` filters (the export's content policy).
    """
    kind = row_kind(row)
    sections = {name: row.get(name) if isinstance(row.get(name), dict) else {} for name in ("inputs", "outputs", "meta")}
    out: dict[str, Any] = {}
    used: set[tuple[str, str]] = set()
    for field in fields_of(kind):
        value = sections[field.section].get(field.key)
        used.add((field.section, field.key))
        if value is None or value == {} or not allowed(field.attribute):
            continue
        out[field.attribute] = field.codec.encode(value)
    for key, value in sections["meta"].items():
        if ("meta", key) in used or key in DERIVED_META or not allowed(key):
            continue
        out[key] = dumped(value) if key in JSON_META else value
    return out
