"""cmbagent's side tables, from the event rows: a ``files`` row per generated file, a ``messages`` row per
message, a ``cost_records`` row per LLM call that reported usage (cmbagent's ``File``, ``Message`` and
``CostRecord``). The SQL sink writes them, in the event's transaction, when those tables exist.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ..pipeline import semconv
from .rows import NAMESPACE, is_number
from .schema import MESSAGE_KIND, STATUS_RUNNING, row_kind


def _is_final(row: Mapping[str, Any], kind: str) -> bool:
    return row.get("status") != STATUS_RUNNING and row_kind(row) == kind


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _meta_of(row: Mapping[str, Any]) -> dict[str, Any]:
    meta = row.get("meta")
    return meta if isinstance(meta, dict) else {}


def file_record(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """cmbagent's ``files`` row for a generated file (``File``: linked by ``event_id``, with run/step/node)."""
    if not _is_final(row, semconv.EVENT_FILE_GEN):
        return None
    inputs = row.get("inputs") or {}
    if not inputs.get("file_path"):
        return None
    size = _meta_of(row).get("size_bytes")
    return {
        "id": str(uuid.uuid5(NAMESPACE, f"file:{row['id']}")),
        "run_id": row.get("run_id"),
        "session_id": row.get("session_id"),
        "step_id": row.get("step_id"),
        "event_id": row.get("id"),
        "node_id": row.get("node_id"),
        "file_path": str(inputs["file_path"]),
        "file_type": str(inputs.get("file_type") or "other"),
        "size_bytes": size if is_number(size) else None,
        "created_at": row.get("completed_at") or row.get("timestamp"),
        "generating_agent": row.get("agent_name"),
        "is_final_output": False,
    }


def message_record(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """cmbagent's ``messages`` row for a message (``Message``: full content, tokens, linked by ``event_id``)."""
    if not _is_final(row, MESSAGE_KIND):
        return None
    inputs = row.get("inputs") or {}
    tokens = _meta_of(row).get("tokens")
    return {
        "run_id": row.get("run_id"),
        "step_id": row.get("step_id"),
        "event_id": row.get("id"),
        "node_id": row.get("node_id"),
        "sender": str(inputs.get("sender") or ""),
        "recipient": str(inputs.get("recipient") or ""),
        "content": _text(inputs.get("content")),
        "timestamp": row.get("timestamp"),
        "tokens": int(tokens) if is_number(tokens) else None,
    }


def cost_record(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """cmbagent's ``cost_records`` row for an LLM call that reported usage (per call, never cumulative)."""
    if not _is_final(row, semconv.EVENT_LLM_CALL):
        return None
    meta = _meta_of(row)
    prompt = meta.get(semconv.GEN_AI_USAGE_INPUT_TOKENS)
    completion = meta.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)
    if not (is_number(prompt) or is_number(completion)):
        return None
    prompt = int(prompt) if is_number(prompt) else 0
    completion = int(completion) if is_number(completion) else 0
    model = meta.get(semconv.GEN_AI_RESPONSE_MODEL) or meta.get(semconv.GEN_AI_REQUEST_MODEL) or "unknown"
    return {
        "run_id": row.get("run_id"),
        "step_id": row.get("step_id"),
        "session_id": row.get("session_id"),
        "model": str(model),
        "agent_name": row.get("agent_name"),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": float(meta.get("cost_usd") or 0.0),
        "timestamp": row.get("completed_at") or row.get("timestamp"),
    }


# table name -> builder; each returns None for rows that have no record there
SIDE_RECORDS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any] | None]] = {
    "files": file_record,
    "messages": message_record,
    "cost_records": cost_record,
}
