"""cmbagent's websocket message for a captured event (``event_captured``), built from a row.

The websocket sink sends it for every span start/end and message, the live server broadcasts it, and the
viewer's ``/ws`` sends it for every new or changed row of the table: one shape everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .encoding import jsonable

EVENT_CAPTURED = "event_captured"

# Keys of ``data`` (in this order): the event's identity, then its content-policy fields.
# ``event_id`` is the row's ``id``; everything else has the row's own name.
DATA_FIELDS = (
    "event_id",
    "run_id",
    "session_id",
    "node_id",
    "event_type",
    "event_subtype",
    "agent_name",
    "timestamp",
    "execution_order",
    "depth",
    "status",
    "inputs",
    "outputs",
    "error_message",
    "duration_ms",
    "parent_event_id",
    "trace_id",
    "span_id",
)


def event_data(row: Mapping[str, Any], *, every_column: bool = False, run_key: str | None = None) -> dict[str, Any]:
    """The ``data`` of a row's envelope, JSON-safe: :data:`DATA_FIELDS`, then (``every_column``) the row's other
    columns (``meta``, ``started_at``, ...) and ``run_key`` (the run id, or the trace id of a row outside a run)."""
    data = {field: row.get("id" if field == "event_id" else field) for field in DATA_FIELDS}
    if every_column:
        for key, value in row.items():
            if key not in data:
                data[key] = value
        data["run_key"] = run_key if run_key is not None else (row.get("run_id") or row.get("trace_id"))
    return jsonable(data)


def envelope(data: Mapping[str, Any], event_type: str = EVENT_CAPTURED) -> dict[str, Any]:
    """The message cmbagent's UI receives for one event.

    ``{"event_type": "event_captured", "timestamp": <now, ISO 8601>, "run_id", "session_id", "data": data}``
    """
    return {
        "event_type": event_type,
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "run_id": data.get("run_id"),
        "session_id": data.get("session_id"),
        "data": data,
    }
