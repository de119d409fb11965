"""cmbagent's ``execution_events`` table: its name, columns, statuses and kinds of row, in one place.

The sinks write this format (``otel_cmbagent.exporters``), the store, the CLI and the viewer read it; none
of them spells a column tuple, a status or a table name of its own. The way spans become rows and back is
in :mod:`.fields` / :mod:`.rows` / :mod:`.to_spans`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from ..pipeline import semconv

DEFAULT_TABLE = "execution_events"
SQL_URL_ENV = "OTEL_CMBAGENT_SQL_URL"  # where setup_tracing writes and the CLI/viewer read by default
DEFAULT_DB = "otel_cmbagent.db"  # the SQLite file in the working directory
DEFAULT_SQL_URL = f"sqlite:///{DEFAULT_DB}"

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
# Ours, to open the trace in Jaeger; on cmbagent's own table (no such columns) they live in ``meta``.
LINK_COLUMNS = ("trace_id", "span_id")
JSON_COLUMNS = ("inputs", "outputs", "meta")
TIME_COLUMNS = ("timestamp", "started_at", "completed_at")

# --- status -------------------------------------------------------------------------------------------
STATUS_RUNNING = "running"  # written when a span starts: the run is live
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"  # stopped while it ran: SIGTERM/exit, or its writer is gone (SIGKILL)
STATUSES = (STATUS_RUNNING, STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED)

# --- event_subtype --------------------------------------------------------------------------------------
SUBTYPE_START = "start"  # a running row (cmbagent's readers skip these)
SUBTYPE_COMPLETE = "complete"
SUBTYPE_ERROR = "error"
SUBTYPE_MESSAGE = "message"

# --- kinds of row: event_type, except cmbagent's message rows (agent_call / message) -----------------
MESSAGE_EVENT_TYPE = semconv.EVENT_AGENT_CALL
MESSAGE_KIND = semconv.EVENT_MESSAGE
KINDS = (
    semconv.EVENT_RUN,
    semconv.EVENT_STEP,
    semconv.EVENT_CONVERSATION,
    semconv.EVENT_AGENT_CALL,
    semconv.EVENT_LLM_CALL,
    semconv.EVENT_TOOL_CALL,
    semconv.EVENT_CODE_EXEC,
    semconv.EVENT_FILE_GEN,
    semconv.EVENT_HANDOFF,
    semconv.EVENT_HUMAN_INPUT,
    MESSAGE_KIND,
    semconv.EVENT_ERROR,
)
# meta keys the mapping computes (not span attributes): the way back to spans skips them
DERIVED_META = frozenset(
    {"span_name", "trace_id", "span_id", "tokens", "cost_usd", "code_length", semconv.WRITER}
)


def default_db() -> str:
    """``$OTEL_CMBAGENT_SQL_URL`` when set, else ``./otel_cmbagent.db``."""
    return os.environ.get(SQL_URL_ENV) or DEFAULT_DB


def execution_events_table(metadata: sa.MetaData | None = None, name: str = DEFAULT_TABLE) -> sa.Table:
    """cmbagent's ``execution_events`` columns (same names and types) plus ``trace_id``/``span_id``."""
    metadata = metadata if metadata is not None else sa.MetaData()
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("run_id", sa.String(36), index=True),
        sa.Column("node_id", sa.String(36), index=True),
        sa.Column("step_id", sa.String(36), index=True),
        sa.Column("session_id", sa.String(36), index=True),
        sa.Column("parent_event_id", sa.String(36)),
        sa.Column("event_type", sa.String(50), nullable=False, index=True),
        sa.Column("event_subtype", sa.String(50)),
        sa.Column("agent_name", sa.String(100), index=True),
        sa.Column("agent_role", sa.String(50)),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("duration_ms", sa.Integer),
        sa.Column("inputs", sa.JSON(none_as_null=True)),
        sa.Column("outputs", sa.JSON(none_as_null=True)),
        sa.Column("error_message", sa.Text),
        sa.Column("meta", sa.JSON(none_as_null=True)),
        sa.Column("execution_order", sa.Integer, nullable=False),
        sa.Column("depth", sa.Integer, nullable=False, default=0),
        sa.Column("status", sa.String(50), default=STATUS_COMPLETED),
        sa.Column("trace_id", sa.String(32), index=True),
        sa.Column("span_id", sa.String(16)),
    )
    sa.Index(f"ix_{name}_run_order", table.c.run_id, table.c.execution_order)
    return table


def row_kind(row: Mapping[str, Any]) -> str:
    """``"message"`` for cmbagent's message rows (agent_call/message), else the row's ``event_type``."""
    event_type = row.get("event_type")
    if event_type == MESSAGE_EVENT_TYPE and row.get("event_subtype") == SUBTYPE_MESSAGE:
        return MESSAGE_KIND
    return str(event_type) if event_type is not None else "info"


def is_message(row: Mapping[str, Any]) -> bool:
    return row_kind(row) == MESSAGE_KIND


def unknown_kinds(kinds: Iterable[str]) -> list[str]:
    """The given kinds that no row can have (a typo in ``--type``), in the order given."""
    return [kind for kind in kinds if kind not in KINDS]


# --- the same in SQL ----------------------------------------------------------------------------------
def is_message_column(columns: Any) -> Any:
    """:func:`is_message` in SQL: cmbagent's message rows."""
    return sa.and_(columns.event_type == MESSAGE_EVENT_TYPE, columns.event_subtype == SUBTYPE_MESSAGE)


def kind_column(columns: Any) -> Any:
    """:func:`row_kind` in SQL: ``message`` for cmbagent's message rows, else the row's event_type."""
    return sa.case((is_message_column(columns), sa.literal(MESSAGE_KIND)), else_=columns.event_type)


def kinds_condition(columns: Any, kinds: Iterable[str]) -> Any:
    """Rows of these kinds (``message`` = message rows; ``agent_call`` = agent calls that are not messages)."""
    wanted = set(kinds)
    conditions = [is_message_column(columns)] if MESSAGE_KIND in wanted else []
    types = sorted(wanted - {MESSAGE_KIND})
    if types:
        conditions.append(sa.and_(columns.event_type.in_(types), sa.not_(is_message_column(columns))))
    return sa.or_(*conditions) if conditions else sa.false()
