"""cmbagent's ``files``, ``messages`` and ``cost_records`` rows, written next to the events that made them.

When those tables exist in the target database (cmbagent's schema), every generated file,
message and LLM call also gets its row there - in the same transaction as its event, and only
when its event row becomes final for the first time, so retries and replays never add a
second one (``messages``/``cost_records`` have autoincrement ids: no upsert is possible).
The records themselves are built by :data:`otel_cmbagent.exporters.rows.SIDE_RECORDS`.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from .fit import TableFit
from .rows import SIDE_RECORDS, STATUS_RUNNING

_logger = logging.getLogger("otel_cmbagent.exporters")

Pair = tuple[dict[str, Any], dict[str, Any]]
_RESOLVED_COLUMNS = ("run_id", "session_id", "node_id", "step_id")


def _required(column: sa.Column) -> bool:
    """A NOT NULL column the database will not fill itself."""
    if column.nullable or column.default is not None or column.server_default is not None:
        return False
    return not (column.primary_key and column.autoincrement in (True, "auto") and isinstance(column.type, sa.Integer))


class SideTables:
    """The side tables present next to ``events`` (reflected once); ``written``/``skipped`` per table."""

    def __init__(self, events: sa.Table) -> None:
        self.events = events
        self.tables: dict[str, sa.Table] = {}
        self.fits: dict[str, TableFit] = {}  # values made storable for each side table's columns
        self._reflected = False
        self.written: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self._warned: set[str] = set()

    def reflect(self, connection: sa.Connection) -> None:
        if self._reflected:
            return
        inspector = sa.inspect(connection)
        metadata = self.events.metadata
        for name in SIDE_RECORDS:
            if not inspector.has_table(name, schema=self.events.schema):
                continue
            existing = metadata.tables.get(f"{self.events.schema}.{name}" if self.events.schema else name)
            self.tables[name] = existing if existing is not None else sa.Table(
                name, sa.MetaData(), autoload_with=connection, schema=self.events.schema
            )
            self.written[name] = 0
            self.skipped[name] = 0
            self.fits[name] = TableFit(self.tables[name], connection.dialect, "meta")
        self._reflected = True

    def records(self, pairs: list[Pair]) -> list[tuple[str, str, dict[str, Any]]]:
        """``(table, event id, record)`` for the final rows of ``pairs``, with the columns as written."""
        if not self.tables:
            return []
        out = []
        for row, mapped in pairs:
            if row.get("status") == STATUS_RUNNING:
                continue
            resolved = {**row, **{key: mapped[key] for key in _RESOLVED_COLUMNS if key in mapped}}
            for name, table in self.tables.items():
                record = SIDE_RECORDS[name](resolved)
                if record is not None:
                    out.append((name, row["id"], record))
        return out

    def already_final(self, connection: sa.Connection, event_ids: set[str]) -> set[str]:
        """Event ids whose row is already final in the table (their side rows were written then)."""
        if not event_ids:
            return set()
        c = self.events.c
        statement = sa.select(c.id).where(c.id.in_(sorted(event_ids)))
        if "status" in c:
            statement = statement.where(c.status != STATUS_RUNNING)
        return {row[0] for row in connection.execute(statement)}

    def write(self, connection: sa.Connection, records: list[tuple[str, str, dict[str, Any]]]) -> None:
        by_table: dict[str, list[dict[str, Any]]] = {}
        for name, _event, record in records:
            table = self.tables[name]
            values = self.fits[name].fit({key: value for key, value in record.items() if key in table.c})
            missing = [c.name for c in table.c if _required(c) and values.get(c.name) is None]
            if missing:
                self._skip(name, missing)
                continue
            by_table.setdefault(name, []).append(values)
        for name, values in by_table.items():
            keys = set().union(*(v.keys() for v in values))
            connection.execute(sa.insert(self.tables[name]), [{key: v.get(key) for key in keys} for v in values])
            self.written[name] += len(values)

    def _skip(self, name: str, missing: list[str]) -> None:
        self.skipped[name] += 1
        if name not in self._warned:
            self._warned.add(name)
            _logger.warning(
                "otel-cmbagent: %s rows cannot be written: required columns %s have no value (warned once)",
                name, ", ".join(missing),
            )
