"""Runs whose writer is gone: rows still ``running`` that no process will finish (it was killed).

The rows stay as they were written; readers show them ``interrupted``, ending at the run's last sign of
life (its last row, or its writer's last heartbeat). Who wrote a row and whether it lives: :mod:`.writers`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import writers
from .encoding import decode_json, utc
from .reading import TableShape, execute, run_key_of, shape
from .schema import STATUS_INTERRUPTED, STATUS_RUNNING


def writer_of(meta: Any) -> str | None:
    """The process that wrote a running row (its ``meta`` as stored or decoded)."""
    meta = decode_json(meta)
    return meta.get(writers.WRITER_KEY) if isinstance(meta, dict) else None


def duration_ms(start: Any, end: Any) -> int | None:
    """Whole milliseconds from ``start`` to ``end`` (truncated, as the sink writes ``duration_ms``)."""
    if not isinstance(start, datetime) or not isinstance(end, datetime):
        return None
    return max(0, int((end - start).total_seconds() * 1000))


def gone_runs(engine: Engine, table_shape: TableShape, keys: list[Any]) -> dict[str, datetime | None]:
    """Runs (of ``keys``) whose every ``running`` row was written by a process that is gone, each with that
    process's last heartbeat (None when unknown)."""
    if not keys or table_shape.meta is None:
        return {}
    c = table_shape.table.c
    running: dict[str, set[str | None]] = {}
    statement = sa.select(table_shape.key.label("run_key"), table_shape.meta).where(
        table_shape.where_runs(keys), c.status == STATUS_RUNNING)
    for run_key, meta in execute(engine, statement):
        running.setdefault(run_key, set()).add(writer_of(meta))
    gone = writers.gone(engine, {writer for found in running.values() for writer in found if writer})
    return {
        run_key: max(filter(None, (gone[w] for w in found)), default=None)
        for run_key, found in running.items() if all(w in gone for w in found)
    }


def _last_times(engine: Engine, table_shape: TableShape, keys: Iterable[Any]) -> dict[str, Any]:
    c = table_shape.table.c
    statement = (
        sa.select(table_shape.key.label("run_key"), sa.func.max(sa.func.coalesce(c.completed_at, c.timestamp)))
        .where(table_shape.where_runs(sorted(keys)))
        .group_by(table_shape.key)
    )
    return {run_key: utc(last) for run_key, last in execute(engine, statement)}


def mark_interrupted(engine: Engine, rows: list[dict[str, Any]], *, table: str | sa.Table | None = None
                     ) -> list[dict[str, Any]]:
    """Decoded rows still ``running`` whose writer is gone (a process killed with SIGKILL), shown as
    ``interrupted``: ``completed_at`` is the run's last sign of life (its last row, or its writer's last
    heartbeat), ``duration_ms`` runs to it. The table keeps them as they were written. Changed in place."""
    running = [row for row in rows if row.get("status") == STATUS_RUNNING and writer_of(row.get("meta"))]
    gone = writers.gone(engine, {writer_of(row["meta"]) for row in running}) if running else {}
    dead = [row for row in running if writer_of(row["meta"]) in gone]
    if not dead:
        return rows
    ends = _last_times(engine, shape(engine, table), {run_key_of(row) for row in dead})
    for row in dead:
        end = max(filter(None, [ends.get(run_key_of(row)), gone[writer_of(row["meta"])]]))
        row["status"], row["completed_at"] = STATUS_INTERRUPTED, end
        duration = duration_ms(row.get("started_at") or row.get("timestamp"), end)
        if duration is not None:
            row["duration_ms"] = duration
    return rows
