"""A replica of cmbagent's tables and readers, for tests (facts from the fork UJ2202/MARS at 1f77da3).

Tables (``cmbagent/database/models.py``): the columns, types, nullability and foreign keys of
``sessions``, ``projects``, ``workflow_runs``, ``workflow_steps``, ``dag_nodes``,
``execution_events``, ``files``, ``messages`` and ``cost_records``; cmbagent's SQLite engine
(``cmbagent/database/base.py``) turns on ``PRAGMA foreign_keys=ON`` and WAL.

Readers: what ``backend/routers/runs.py`` ``/history`` and ``DAGMetadataEnricher.enrich_node``
(``cmbagent/database/dag_metadata.py``) compute from those tables, re-stated here as queries.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, TIMESTAMP, BigInteger, Boolean, Column, ForeignKey, Integer, Numeric, String, Text

metadata = sa.MetaData()


def _now() -> datetime:
    return datetime.now(timezone.utc)


sessions = sa.Table(
    "sessions", metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), nullable=True, index=True),
    Column("name", String(255), nullable=False),
    Column("created_at", TIMESTAMP, nullable=False, default=_now),
    Column("last_active_at", TIMESTAMP, nullable=False, default=_now),
    Column("status", String(50), nullable=False, default="active", index=True),
    Column("meta", JSON, nullable=True),
    Column("resource_limits", JSON, nullable=True),
)
projects = sa.Table(
    "projects", metadata,
    Column("id", String(36), primary_key=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(255), nullable=False),
    Column("description", Text, nullable=True),
    Column("created_at", TIMESTAMP, nullable=False, default=_now),
    Column("meta", JSON, nullable=True),
)
workflow_runs = sa.Table(
    "workflow_runs", metadata,
    Column("id", String(36), primary_key=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("project_id", String(36), ForeignKey("projects.id", ondelete="SET NULL"), nullable=True),
    Column("mode", String(50), nullable=False, index=True),
    Column("agent", String(100), nullable=False, index=True),
    Column("model", String(100), nullable=False),
    Column("status", String(50), nullable=False, default="draft", index=True),
    Column("started_at", TIMESTAMP, nullable=True),
    Column("completed_at", TIMESTAMP, nullable=True),
    Column("last_heartbeat_at", TIMESTAMP, nullable=True),
    Column("checkpoint_frequency_minutes", Integer, nullable=False, default=10),
    Column("task_description", Text, nullable=True),
    Column("meta", JSON, nullable=True),
    Column("branch_parent_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), nullable=True),
    Column("is_branch", Boolean, nullable=False, default=False),
    Column("branch_depth", Integer, nullable=False, default=0),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), nullable=True),
    Column("stage_number", Integer, nullable=True),
    Column("stage_name", String(100), nullable=True),
)
workflow_steps = sa.Table(
    "workflow_steps", metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("step_number", Integer, nullable=False),
    Column("goal", Text, nullable=False),
    Column("summary", Text, nullable=True),
    Column("status", String(50), nullable=False, default="pending", index=True),
    Column("started_at", TIMESTAMP, nullable=True),
    Column("completed_at", TIMESTAMP, nullable=True),
    Column("progress_percentage", Integer, nullable=False, default=0),
    Column("inputs", JSON, nullable=True),
    Column("outputs", JSON, nullable=True),
    Column("error_message", Text, nullable=True),
    Column("meta", JSON, nullable=True),
)
dag_nodes = sa.Table(
    "dag_nodes", metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("parent_node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("node_type", String(50), nullable=False, index=True),
    Column("agent", String(100), nullable=True),
    Column("status", String(50), nullable=False, default="pending", index=True),
    Column("order_index", Integer, nullable=False),
    Column("depth", Integer, nullable=False, default=0),
    Column("meta", JSON, nullable=True),
)
execution_events = sa.Table(
    "execution_events", metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="SET NULL"), nullable=True, index=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("parent_event_id", String(36), ForeignKey("execution_events.id", ondelete="SET NULL"), nullable=True,
           index=True),
    Column("event_type", String(50), nullable=False, index=True),
    Column("event_subtype", String(50), nullable=True),
    Column("agent_name", String(100), nullable=True, index=True),
    Column("agent_role", String(50), nullable=True),
    Column("timestamp", TIMESTAMP, nullable=False, default=_now, index=True),
    Column("started_at", TIMESTAMP, nullable=True),
    Column("completed_at", TIMESTAMP, nullable=True),
    Column("duration_ms", Integer, nullable=True),
    Column("inputs", JSON, nullable=True),
    Column("outputs", JSON, nullable=True),
    Column("error_message", Text, nullable=True),
    Column("meta", JSON, nullable=True),
    Column("execution_order", Integer, nullable=False),
    Column("depth", Integer, nullable=False, default=0),
    Column("status", String(50), nullable=False, default="completed"),
)
files = sa.Table(
    "files", metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("event_id", String(36), ForeignKey("execution_events.id", ondelete="SET NULL"), nullable=True, index=True),
    Column("node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("file_path", String(1000), nullable=False),
    Column("file_type", String(50), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=True),
    Column("created_at", TIMESTAMP, nullable=False, default=_now),
    Column("workflow_phase", String(50), nullable=True, index=True),
    Column("is_final_output", Boolean, nullable=False, default=False),
    Column("content_hash", String(64), nullable=True),
    Column("generating_agent", String(100), nullable=True),
    Column("generating_code_hash", String(64), nullable=True),
    Column("priority", String(20), nullable=True),
    Column("meta", JSON, nullable=True),
)
messages = sa.Table(
    "messages", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("event_id", String(36), ForeignKey("execution_events.id", ondelete="SET NULL"), nullable=True, index=True),
    Column("node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("sender", String(100), nullable=False, index=True),
    Column("recipient", String(100), nullable=False, index=True),
    Column("content", Text, nullable=False),
    Column("timestamp", TIMESTAMP, nullable=False, default=_now),
    Column("tokens", Integer, nullable=True),
    Column("meta", JSON, nullable=True),
)
cost_records = sa.Table(
    "cost_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=True, index=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("model", String(100), nullable=False, index=True),
    Column("agent_name", String(200), nullable=True, index=True),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), nullable=True, index=True),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("total_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", Numeric(10, 6), nullable=False, default=0.0),
    Column("timestamp", TIMESTAMP, nullable=False, default=_now),
)


def cmbagent_engine(url: str) -> sa.Engine:
    """An engine as cmbagent's ``get_engine()`` makes it: on SQLite, foreign keys ON and WAL."""
    engine = sa.create_engine(url, connect_args={"check_same_thread": False} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    metadata.create_all(engine)
    return engine


def add_session(engine: sa.Engine, session_id: str) -> None:
    with engine.begin() as connection:
        connection.execute(sa.insert(sessions).values(id=session_id, name=f"session {session_id}"))


def add_run(engine: sa.Engine, run_id: str, session_id: str, *, with_session: bool = True) -> None:
    """A ``workflow_runs`` row (and its ``sessions`` row), as cmbagent creates them before a run."""
    if with_session:
        add_session(engine, session_id)
    with engine.begin() as connection:
        connection.execute(sa.insert(workflow_runs).values(
            id=run_id, session_id=session_id, mode="planning_control", agent="engineer", model="scripted-model",
            status="executing", started_at=_now(),
        ))


def add_dag_node(engine: sa.Engine, run_id: str, session_id: str, short_id: str, order: int = 0) -> str:
    """A DAG node as cmbagent stores it: a hashed id, the short id (``step_1``) in ``meta["id"]``."""
    node_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run_id}/{short_id}"))
    with engine.begin() as connection:
        connection.execute(sa.insert(dag_nodes).values(
            id=node_id, run_id=run_id, session_id=session_id, node_type="agent", status="running",
            order_index=order, meta={"id": short_id},
        ))
    return node_id


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _events(engine: sa.Engine, where: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(execution_events).where(where).order_by(execution_events.c.execution_order))
        out = [dict(row._mapping) for row in rows]
    for row in out:
        for key in ("inputs", "outputs", "meta"):
            row[key] = _json(row[key])
    return out


def history(engine: sa.Engine, run_id: str) -> list[dict[str, Any]]:
    """``GET /api/runs/{run_id}/history``: the run's events by execution_order, without 'start' rows."""
    events = _events(engine, execution_events.c.run_id == run_id)
    return [e for e in events if e["event_subtype"] != "start" and e["event_type"] not in ("node_started", "node_completed")]


def enrich_node(engine: sa.Engine, node_id: str, run_id: str) -> dict[str, Any]:
    """``DAGMetadataEnricher.enrich_node(node_id, run_id)["execution_summary"]``'s figures."""
    c = execution_events.c
    events = [e for e in _events(engine, sa.and_(c.node_id == node_id, c.run_id == run_id))
              if e["event_subtype"] not in ("start",) and e["event_type"] not in ("node_started", "node_completed")]
    with engine.connect() as connection:
        file_types = [row[0] for row in connection.execute(sa.select(files.c.file_type).where(files.c.node_id == node_id))]
        message_count = connection.execute(
            sa.select(sa.func.count()).select_from(messages).where(messages.c.node_id == node_id)).scalar()
    event_types: dict[str, int] = {}
    agent_calls: dict[str, int] = {}
    total_tokens, total_cost = 0, 0.0
    for event in events:
        event_types[event["event_type"]] = event_types.get(event["event_type"], 0) + 1
        if event["agent_name"] and event["event_type"] == "agent_call":
            agent_calls[event["agent_name"]] = agent_calls.get(event["agent_name"], 0) + 1
        meta = event["meta"] or {}
        total_tokens += meta.get("tokens", 0)  # cmbagent: a None here raises TypeError
        total_cost += meta.get("cost_usd", 0.0)
    files_by_type: dict[str, int] = {}
    for file_type in file_types:
        files_by_type[file_type] = files_by_type.get(file_type, 0) + 1
    return {
        "total_events": len(events),
        "event_types": event_types,
        "agent_call_counts": agent_calls,
        "files_generated": len(file_types),
        "files_by_type": files_by_type,
        "messages_count": message_count,
        "total_tokens": total_tokens,
        "total_cost_usd": total_cost,
        "error_count": sum(1 for e in events if e["event_type"] == "error"),
        "failed_count": sum(1 for e in events if e["status"] == "failed"),
        "completed_count": sum(1 for e in events if e["status"] == "completed"),
    }


def table_count(engine: sa.Engine, table: sa.Table, **where: Any) -> int:
    with engine.connect() as connection:
        statement = sa.select(sa.func.count()).select_from(table)
        for key, value in where.items():
            statement = statement.where(table.c[key] == value)
        return connection.execute(statement).scalar()


def rows_of(engine: sa.Engine, table: sa.Table, **where: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        statement = sa.select(table)
        for key, value in where.items():
            statement = statement.where(table.c[key] == value)
        return [dict(row._mapping) for row in connection.execute(statement)]
