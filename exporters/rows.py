"""Spans -> cmbagent's rows: the ONE place where span attributes meet cmbagent's row vocabulary.

Every sink (SQL, websocket, the CLI's export back to spans) goes through this module. Span
attributes stay OpenTelemetry GenAI semantic conventions (plus ``cmbagent.*`` keys); the rows
read the way cmbagent's own event capture writes them (fork UJ2202/MARS,
``cmbagent/execution/event_capture.py``), so its readers - ``DAGMetadataEnricher.enrich_node``,
the run ``/history`` endpoint, ``EventRepository`` - give the right answers on our rows:

============== ===================================== ============== ============================== ========== ===============================
span           event_type / event_subtype (ended)    agent_name     inputs                         outputs    meta (besides other attributes)
============== ===================================== ============== ============================== ========== ===============================
agent_call     agent_call / complete                 the agent      message, context               response   the capture's ``metadata``
tool_call      tool_call / execute                   the caller     tool_name, arguments           result
code_exec      code_exec / complete (error: failed)  the agent      code                           result     language, exit_code, code_length
file_gen       file_gen / create                     the agent      file_path, file_type                      size_bytes
handoff        handoff / transfer                    from_agent     from_agent, to_agent, context             reason
message event  agent_call / message                  the recipient  sender, recipient, content                tokens (when known)
error          error / <error type>                  the agent                                                (status failed, error_message)
llm_call       llm_call / complete                   the agent      messages                       messages   tokens, cost_usd (this call's)
run, step,     <same> / complete                                    (messages)                     (messages)
conversation,
human_input
============== ===================================== ============== ============================== ========== ===============================

A span still running is written with subtype ``start`` (cmbagent's readers skip those) and
becomes its final row when it ends; a failed span gets subtype ``error`` (tool_call, handoff
and file_gen keep theirs: cmbagent has no failed form of them) and status ``failed``.
Tokens and cost live on ONE level, each ``llm_call`` row's own ``meta.tokens``/``meta.cost_usd``
(plus whatever a capture call's ``metadata`` says), so the readers' sums never count a call
twice; conversation and run totals stay under their ``gen_ai.usage.*`` keys. ``meta.tokens`` and
``meta.cost_usd`` are numbers or absent, never None (``enrich_node`` adds them up).

The side tables cmbagent fills next to its events - a ``files`` row per generated file, a
``messages`` row per message, a ``cost_records`` row per LLM call - are built here too
(:data:`SIDE_RECORDS`); the SQL sink writes them when those tables exist.

Ids are deterministic UUIDs from (trace_id, span_id), so a row's ``parent_event_id`` is its
parent span's row id and a re-written row is an idempotent upsert.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from otel_cmbagent import semconv

_NAMESPACE = uuid.UUID("6f1d3a52-64a1-4cf4-9a3c-8a8c1b0e7c11")

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"  # ended because the process was stopped (SIGTERM, exit) while it ran

# cmbagent's name for a message row: an agent_call of subtype "message"
MESSAGE_EVENT_TYPE = semconv.EVENT_AGENT_CALL
MESSAGE_SUBTYPE = "message"
SUBTYPE_START = "start"

# Columns of cmbagent's ``execution_events`` (ExecutionEvent), in its order.
EXECUTION_EVENT_COLUMNS = (
    "id",
    "run_id",
    "node_id",
    "step_id",
    "session_id",
    "parent_event_id",
    "event_type",
    "event_subtype",
    "agent_name",
    "agent_role",
    "timestamp",
    "started_at",
    "completed_at",
    "duration_ms",
    "inputs",
    "outputs",
    "error_message",
    "meta",
    "execution_order",
    "depth",
    "status",
)
LINK_COLUMNS = ("trace_id", "span_id")


# --- value codecs: attribute value <-> row value -----------------------------------------------
class Codec(NamedTuple):
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]  # row value -> attribute value (the CLI's export)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _parsed(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return _plain(value)


def _dumped(value: Any) -> Any:
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
    messages = _parsed(value)
    if isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict):
        text = _only_text(messages[0].get("parts"))
        if text is not None:
            return text
    return messages


def _parts_text(value: Any) -> Any:
    parts = _parsed(value)
    text = _only_text(parts)
    return text if text is not None else parts


def _code_text(value: Any) -> Any:
    blocks = _parsed(value)
    if isinstance(blocks, list) and all(isinstance(b, dict) for b in blocks):
        return "\n".join(str(b.get("code", "")) for b in blocks)
    return blocks


def _as_messages(role: str) -> Callable[[Any], Any]:
    def encode(value: Any) -> Any:
        if isinstance(value, str):
            return json.dumps([{"role": role, "parts": [{"type": "text", "content": value}]}], ensure_ascii=False)
        return _dumped(value)

    return encode


def _as_parts(value: Any) -> Any:
    return json.dumps([{"type": "text", "content": value}], ensure_ascii=False) if isinstance(value, str) else _dumped(value)


def _as_blocks(value: Any) -> Any:
    return json.dumps([{"code": value}], ensure_ascii=False) if isinstance(value, str) else _dumped(value)


RAW = Codec(_plain, _plain)
JSON = Codec(_parsed, _dumped)
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


_MESSAGE_KIND = semconv.EVENT_MESSAGE  # the key of message rows in the tables below
_DEFAULT_FIELDS = (
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
    semconv.EVENT_LLM_CALL: _DEFAULT_FIELDS[:2],
    semconv.EVENT_HUMAN_INPUT: (
        Field(semconv.HUMAN_INPUT_PROMPT, "inputs", "prompt"),
        Field(semconv.HUMAN_INPUT_RESPONSE, "outputs", "response"),
    ),
    _MESSAGE_KIND: (
        Field(semconv.MESSAGE_SENDER, "inputs", "sender"),
        Field(semconv.MESSAGE_RECIPIENT, "inputs", "recipient"),
        Field(semconv.MESSAGE_CONTENT, "inputs", "content", PARTS),
        Field(semconv.MESSAGE_TOOL_CALLS, "inputs", "tool_calls", JSON),
        Field(semconv.MESSAGE_TOKENS, "meta", "tokens"),
    ),
}
# cmbagent writes an empty context with these inputs
_CONTEXT_DEFAULT = frozenset({semconv.EVENT_AGENT_CALL, semconv.EVENT_HANDOFF})
# the column agent_name, when it is not gen_ai.agent.name
_AGENT_ATTRIBUTE = {semconv.EVENT_HANDOFF: semconv.HANDOFF_FROM, _MESSAGE_KIND: semconv.MESSAGE_RECIPIENT}
# event_subtype of an ended span (default "complete"); these keep theirs when failed too
_SUBTYPES = {semconv.EVENT_TOOL_CALL: "execute", semconv.EVENT_HANDOFF: "transfer", semconv.EVENT_FILE_GEN: "create"}
# meta keys computed here (not attributes): the export back to spans skips them
# (``cmbagent.writer``: the process that wrote a running row, added by the SQL sink)
DERIVED_META = frozenset({"span_name", "trace_id", "span_id", "tokens", "cost_usd", "code_length", "cmbagent.writer"})
_NUMERIC_META = ("tokens", "cost_usd")
# attributes that hold JSON text but have no field in a row's type (kept decoded in meta)
_JSON_META = frozenset({semconv.GEN_AI_INPUT_MESSAGES, semconv.GEN_AI_OUTPUT_MESSAGES, semconv.CODE_BLOCKS})
_IDENTITY = frozenset(
    {
        semconv.RUN_ID,
        semconv.SESSION_ID,
        semconv.NODE_ID,
        semconv.STEP_ID,
        semconv.EVENT_TYPE,
        semconv.EXECUTION_ORDER,
        semconv.DEPTH,
        semconv.AGENT_ROLE,
        semconv.METADATA,
    }
)


@functools.lru_cache(maxsize=65_536)
def event_id(trace_id: int, span_id: int, suffix: str = "") -> str:
    """The row id of a span (or, with a suffix, of one of its events); cached: parents recur in every row."""
    return str(uuid.uuid5(_NAMESPACE, f"{trace_id:032x}{span_id:016x}{suffix}"))


def row_kind(row: Mapping[str, Any]) -> str:
    """``"message"`` for cmbagent's message rows (agent_call/message), else the row's ``event_type``."""
    event_type = row.get("event_type")
    if event_type == MESSAGE_EVENT_TYPE and row.get("event_subtype") == MESSAGE_SUBTYPE:
        return _MESSAGE_KIND
    return str(event_type) if event_type is not None else "info"


def is_message(row: Mapping[str, Any]) -> bool:
    return row_kind(row) == _MESSAGE_KIND


def snapshot(span: Any) -> ReadableSpan:
    """A frozen copy of a live span (its attributes change after a processor hook returns)."""
    return ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=span.resource,
        attributes=dict(span.attributes or {}),
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        instrumentation_scope=getattr(span, "instrumentation_scope", None),
    )


def _time(ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc) if ns else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_metadata(meta: dict[str, Any], raw: Any) -> None:
    """A capture call's ``metadata`` (one JSON attribute) merged into meta, as cmbagent does."""
    metadata = _parsed(raw)
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            meta.setdefault(key, value)
    elif metadata is not None:
        meta.setdefault("metadata", metadata)


def _derive(kind: str, attributes: Mapping[str, Any], inputs: dict, meta: dict) -> None:
    if kind == semconv.EVENT_CODE_EXEC:
        meta.setdefault("exit_code", None)
        if isinstance(inputs.get("code"), str):
            meta["code_length"] = len(inputs["code"])
    elif kind == semconv.EVENT_LLM_CALL:
        tokens_in = attributes.get(semconv.GEN_AI_USAGE_INPUT_TOKENS)
        tokens_out = attributes.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)
        if _number(tokens_in) or _number(tokens_out):
            meta["tokens"] = int((tokens_in if _number(tokens_in) else 0) + (tokens_out if _number(tokens_out) else 0))
        cost = attributes.get(semconv.GEN_AI_USAGE_COST)
        if _number(cost):
            meta["cost_usd"] = float(cost)
    if semconv.METADATA in attributes:
        _merge_metadata(meta, attributes[semconv.METADATA])
    for key in _NUMERIC_META:  # enrich_node adds these up: a number or nothing
        if key in meta and not _number(meta[key]):
            del meta[key]


def _sections(kind: str, attributes: Mapping[str, Any], capture_content: bool) -> tuple[dict, dict, dict]:
    fields = FIELDS.get(kind, _DEFAULT_FIELDS)
    sections: dict[str, dict[str, Any]] = {"inputs": {}, "outputs": {}, "meta": {}}
    consumed = set(_IDENTITY)
    agent_attribute = _AGENT_ATTRIBUTE.get(kind, semconv.GEN_AI_AGENT_NAME)
    consumed.add(agent_attribute)
    for field in fields:
        consumed.add(field.attribute)
        if field.attribute not in attributes:
            continue
        if not capture_content and field.attribute in semconv.CONTENT_ATTRIBUTES:
            continue
        sections[field.section][field.key] = field.codec.decode(attributes[field.attribute])
    inputs, outputs, meta = sections["inputs"], sections["outputs"], sections["meta"]
    for key, value in attributes.items():
        if key in consumed or (not capture_content and key in semconv.CONTENT_ATTRIBUTES):
            continue
        meta[key] = _parsed(value) if key in _JSON_META else _plain(value)
    if inputs and kind in _CONTEXT_DEFAULT:
        inputs.setdefault("context", {})
    _derive(kind, attributes, inputs, meta)
    return inputs, outputs, meta


def _subtype(kind: str, status: str, attributes: Mapping[str, Any]) -> str:
    if status in (STATUS_RUNNING, STATUS_INTERRUPTED):
        return SUBTYPE_START if status == STATUS_RUNNING else STATUS_INTERRUPTED
    if kind == semconv.EVENT_ERROR:
        return str(attributes.get(semconv.ERROR_TYPE) or "runtime_error")
    if status == STATUS_FAILED and kind not in _SUBTYPES:
        return "error"
    return _SUBTYPES.get(kind, "complete")


def span_row(span: ReadableSpan, *, ended: bool, capture_content: bool = True) -> dict[str, Any]:
    """The ``execution_events`` row of a span: ``running``/``start`` at start, its final form at end."""
    attributes = span.attributes or {}
    context = span.get_span_context()
    kind = str(attributes.get(semconv.EVENT_TYPE) or "info")
    inputs, outputs, meta = _sections(kind, attributes, capture_content)
    interrupted = ended and semconv.INTERRUPTED in attributes
    failed = ended and not interrupted and span.status.status_code is StatusCode.ERROR
    status = STATUS_FAILED if failed else (STATUS_COMPLETED if ended else STATUS_RUNNING)
    error_message = None
    if interrupted:
        status, error_message = STATUS_INTERRUPTED, f"interrupted by {attributes[semconv.INTERRUPTED]}"
    elif failed:
        error_message = attributes.get(semconv.ERROR_MESSAGE) or span.status.description or attributes.get(
            semconv.ERROR_TYPE
        )
    meta["span_name"] = span.name
    started = _time(span.start_time)
    parent = span.parent
    return {
        "id": event_id(context.trace_id, context.span_id),
        "run_id": attributes.get(semconv.RUN_ID),
        "node_id": attributes.get(semconv.NODE_ID),
        "step_id": attributes.get(semconv.STEP_ID),
        "session_id": attributes.get(semconv.SESSION_ID),
        "parent_event_id": event_id(parent.trace_id, parent.span_id) if parent is not None and parent.is_valid else None,
        "event_type": kind,
        "event_subtype": _subtype(kind, status, attributes),
        "agent_name": attributes.get(_AGENT_ATTRIBUTE.get(kind, semconv.GEN_AI_AGENT_NAME)),
        "agent_role": attributes.get(semconv.AGENT_ROLE),
        "timestamp": started,
        "started_at": started,
        "completed_at": _time(span.end_time) if ended else None,
        "duration_ms": int((span.end_time - span.start_time) / 1e6) if ended and span.end_time else None,
        "inputs": inputs or None,
        "outputs": outputs or None,
        "error_message": error_message,
        "meta": meta,
        "execution_order": attributes.get(semconv.EXECUTION_ORDER),
        "depth": attributes.get(semconv.DEPTH, 0),
        "status": status,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


def message_row(span: Any, attributes: Mapping[str, Any], timestamp_ns: int, *, capture_content: bool = True) -> dict[str, Any]:
    """The row of one message event of ``span`` (a live or finished span; parent = the span's row).

    cmbagent's shape: ``agent_call``/``message``, ``agent_name`` = the recipient; node/step are the
    event's own when it has them (a capture made after the step changed), else its span's. The id
    comes from the message's own order, so the live write and any later re-write are one row.
    """
    context = span.get_span_context()
    span_attributes = getattr(span, "attributes", None) or {}
    inputs, outputs, meta = _sections(_MESSAGE_KIND, attributes, capture_content)
    order = attributes.get(semconv.EXECUTION_ORDER)
    at = _time(timestamp_ns)
    depth = attributes.get(semconv.DEPTH)
    return {
        "id": event_id(context.trace_id, context.span_id, f"/message/{order if order is not None else timestamp_ns}"),
        "run_id": span_attributes.get(semconv.RUN_ID),
        "node_id": attributes.get(semconv.NODE_ID) or span_attributes.get(semconv.NODE_ID),
        "step_id": attributes.get(semconv.STEP_ID) or span_attributes.get(semconv.STEP_ID),
        "session_id": span_attributes.get(semconv.SESSION_ID),
        "parent_event_id": event_id(context.trace_id, context.span_id),
        "event_type": MESSAGE_EVENT_TYPE,
        "event_subtype": MESSAGE_SUBTYPE,
        "agent_name": attributes.get(semconv.MESSAGE_RECIPIENT) or None,
        "agent_role": None,
        "timestamp": at,
        "started_at": at,
        "completed_at": at,
        "duration_ms": 0,
        "inputs": inputs or None,
        "outputs": outputs or None,
        "error_message": None,
        "meta": meta,
        "execution_order": order,
        "depth": depth if isinstance(depth, int) else span_attributes.get(semconv.DEPTH, 0) + 1,
        "status": STATUS_COMPLETED,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


def message_rows(span: ReadableSpan, *, capture_content: bool = True) -> Iterable[dict[str, Any]]:
    """Every message row of a finished span (for backfills and exports)."""
    for event in span.events:
        if event.name == semconv.MESSAGE_EVENT_NAME:
            yield message_row(span, event.attributes or {}, event.timestamp, capture_content=capture_content)


# --- the way back: a row's attributes (the CLI's export to OTLP) ------------------------------
def row_attributes(row: Mapping[str, Any], allowed: Callable[[str], bool] = lambda attribute: True) -> dict[str, Any]:
    """The span attributes a row's inputs/outputs/meta came from (inverse of :func:`span_row`).

    Identity columns are not included; meta keys this module computed are left out.
    ``allowed(attribute)`` filters (the export's content policy).
    """
    kind = row_kind(row)
    sections = {name: row.get(name) if isinstance(row.get(name), dict) else {} for name in ("inputs", "outputs", "meta")}
    out: dict[str, Any] = {}
    used: set[tuple[str, str]] = set()
    for field in FIELDS.get(kind, _DEFAULT_FIELDS):
        value = sections[field.section].get(field.key)
        used.add((field.section, field.key))
        if value is None or value == {} or not allowed(field.attribute):
            continue
        out[field.attribute] = field.codec.encode(value)
    for key, value in sections["meta"].items():
        if ("meta", key) in used or key in DERIVED_META or not allowed(key):
            continue
        out[key] = _dumped(value) if key in _JSON_META else value
    return out


# --- cmbagent's side tables -----------------------------------------------------------------------
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
        "id": str(uuid.uuid5(_NAMESPACE, f"file:{row['id']}")),
        "run_id": row.get("run_id"),
        "session_id": row.get("session_id"),
        "step_id": row.get("step_id"),
        "event_id": row.get("id"),
        "node_id": row.get("node_id"),
        "file_path": str(inputs["file_path"]),
        "file_type": str(inputs.get("file_type") or "other"),
        "size_bytes": size if _number(size) else None,
        "created_at": row.get("completed_at") or row.get("timestamp"),
        "generating_agent": row.get("agent_name"),
        "is_final_output": False,
    }


def message_record(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """cmbagent's ``messages`` row for a message (``Message``: full content, tokens, linked by ``event_id``)."""
    if not _is_final(row, _MESSAGE_KIND):
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
        "tokens": int(tokens) if _number(tokens) else None,
    }


def cost_record(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """cmbagent's ``cost_records`` row for an LLM call that reported usage (per call, never cumulative)."""
    if not _is_final(row, semconv.EVENT_LLM_CALL):
        return None
    meta = _meta_of(row)
    prompt = meta.get(semconv.GEN_AI_USAGE_INPUT_TOKENS)
    completion = meta.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)
    if not (_number(prompt) or _number(completion)):
        return None
    prompt = int(prompt) if _number(prompt) else 0
    completion = int(completion) if _number(completion) else 0
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
