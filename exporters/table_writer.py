"""Rows onto a table in one transaction: mapped to its columns, foreign keys checked, side tables filled.

Shared by the SQL sink and ``replay``. A batch the database refuses for its values is written in halves
until the refused rows are found (:func:`write_isolating`); a database that fails is told apart from a row
that fails by :func:`database_failed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from otel_cmbagent.table.fit import TableFit
from otel_cmbagent.table.schema import LINK_COLUMNS, STATUS_RUNNING

from .foreign_keys import ForeignKeyGuard
from .prepared import PreparedUpsert
from .side_tables import SideTables

_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)


class TableWriter:
    """Maps rows onto a table's columns and upserts them in one transaction.

    On a user's table with foreign keys (cmbagent's) the rows pass a :class:`ForeignKeyGuard`
    first; cmbagent's side tables (files, messages, cost_records), when present, get their rows
    in the same transaction.
    """

    def __init__(self, engine: Engine, table: sa.Table) -> None:
        self.engine = engine
        self.table = table
        columns = set(table.c.keys())
        self.meta_column = "meta" if "meta" in columns else ("metadata" if "metadata" in columns else None)
        self.links_in_meta = not set(LINK_COLUMNS) <= columns
        self.columns = columns
        self._copied = frozenset(columns - {"meta"})  # the row's keys that go to their column as they are
        self.required = {c.name for c in table.c if not c.nullable and c.default is None and c.server_default is None}
        self.skipped = 0
        self.guard = ForeignKeyGuard(table, self.meta_column)
        self.side = SideTables(table)
        self.fit = TableFit(table, engine.dialect, self.meta_column)
        self._statements: dict[tuple[str, frozenset[str]], Any] = {}
        self._prepared: dict[tuple[str, frozenset[str]], PreparedUpsert | None] = {}

    def to_table(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        meta = dict(row.get("meta") or {})
        if self.links_in_meta:
            for key in LINK_COLUMNS:
                meta[key] = row.get(key)
        copied = self._copied
        out = {key: value for key, value in row.items() if key in copied}
        if self.meta_column:
            out[self.meta_column] = meta
        self.fit.fit(out)
        missing = [name for name in self.required if out.get(name) is None]
        if missing:  # e.g. cmbagent's table needs a run_id: spans outside a run cannot go there
            self.skipped += 1
            return None
        return out

    def write(self, rows: Iterable[Mapping[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
        """Upsert rows in one transaction, one row per id, in first-seen order (parents before children).

        Returns ``(rows written, rows held)``: held rows wait for their run/session row.
        """
        latest: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for row in rows:
            mapped = self.to_table(row)
            if mapped is None:
                continue
            previous = latest.get(mapped["id"])
            if previous is None or row.get("status") != STATUS_RUNNING:
                latest[mapped["id"]] = (dict(row), mapped)  # a final row wins; the position stays the first one
        if not latest:
            return 0, []
        with self.engine.begin() as connection:
            self.side.reflect(connection)
            ready, held = self.guard.prepare(connection, list(latest.values()))
            if ready:
                records = self.side.records(ready)
                done = self.side.already_final(connection, {event for _, event, _ in records})
                self._upsert(connection, [mapped for _, mapped in ready])
                self.side.write(connection, [r for r in records if r[1] not in done])
        self.guard.confirm(ready)
        return len(ready), [row for row, _ in held]

    def _upsert_statement(self, dialect: str, keys: frozenset[str]) -> Any:
        """The upsert of rows with ``keys``, built once: building one took ~0.4 ms and its first execution ~0.6 ms
        more (SQLAlchemy's cache key), against ~25 µs to execute one already built (measured here, SQLite)."""
        statement = self._statements.get((dialect, keys))
        if statement is None:
            module = sa.dialects.sqlite if dialect == "sqlite" else sa.dialects.postgresql
            statement = module.insert(self.table)
            # A final row replaces whatever is there; a running row never overwrites anything
            # (so a late or replayed start cannot undo a completed row).
            only_final = statement.excluded.status != STATUS_RUNNING if "status" in self.columns else None
            statement = statement.on_conflict_do_update(
                index_elements=[self.table.c.id],
                set_={key: statement.excluded[key] for key in sorted(keys) if key != "id"},
                where=only_final,
            )
            if len(self._statements) >= 64:  # key sets are few (a handful per table); never unbounded
                self._statements.clear()
            self._statements[dialect, keys] = statement
        return statement

    def _prepared_upsert(self, connection: sa.Connection, dialect: str, keys: frozenset[str]) -> PreparedUpsert | None:
        """The upsert of rows with ``keys`` compiled once (None: to be executed the ordinary way, see
        :mod:`.prepared`); a connection that translates schema names always goes the ordinary way."""
        if connection.get_execution_options().get("schema_translate_map"):
            return None
        if (dialect, keys) not in self._prepared:
            if len(self._prepared) >= 64:
                self._prepared.clear()
            statement = self._upsert_statement(dialect, keys)
            self._prepared[dialect, keys] = PreparedUpsert.build(statement, connection.dialect, keys)
        return self._prepared[dialect, keys]

    def _upsert(self, connection: sa.Connection, rows: list[dict[str, Any]]) -> None:
        # executemany needs one key set: fill the gaps with None (rows mapped by to_table rarely have any)
        keys = frozenset().union(*(row.keys() for row in rows))
        if any(len(row) != len(keys) for row in rows):
            rows = [{key: row.get(key) for key in keys} for row in rows]
        dialect = connection.dialect.name
        if dialect in ("sqlite", "postgresql"):
            prepared = self._prepared_upsert(connection, dialect, keys)
            if prepared is not None:
                prepared.execute(connection, rows)
            else:
                connection.execute(self._upsert_statement(dialect, keys), rows)
            return
        ids = [row["id"] for row in rows]
        existing = {r[0] for r in connection.execute(sa.select(self.table.c.id).where(self.table.c.id.in_(ids)))}
        for row in rows:  # other dialects: row by row, in order
            if row["id"] not in existing:
                connection.execute(sa.insert(self.table), [row])
            elif row.get("status") != STATUS_RUNNING:
                connection.execute(sa.update(self.table).where(self.table.c.id == row["id"]).values(**row))


# --- failures: the database's, or a row's --------------------------------------------------------------
# What a database (or the way to it) that fails looks like; anything else a batch raises is about its values
# (DataError, IntegrityError, a StatementError wrapping an encoding or serialisation error, ...).
_DATABASE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError,
                    sa.exc.InternalError, sa.exc.NoSuchTableError, OSError, RuntimeError)


def in_start_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` sorted, in place, by start time, then run order (a child can start in its parent's clock tick):
    parents before children, as foreign keys on parent_event_id need (ends arrive children first, and so does a
    file of them). Stable: one span's rows keep their order. Rows whose times cannot be compared (another kind
    read back) are left in the order they came."""
    try:
        rows.sort(key=_start_position)
    except TypeError:
        pass
    return rows


def _start_position(row: Mapping[str, Any]) -> tuple[Any, int]:
    order = row.get("execution_order")
    return row.get("timestamp") or _EARLIEST, order if type(order) is int else 0

def database_failed(error: BaseException) -> bool:
    """True when ``error`` says the database failed (down, locked, table gone), not one of the rows."""
    return isinstance(error, _DATABASE_ERRORS) and not isinstance(error, UnicodeError)


class DatabaseFailed(Exception):
    """The database itself failed while a refused batch was being split: ``rows`` are not written."""

    def __init__(self, rows: list[dict[str, Any]], error: BaseException) -> None:
        super().__init__(str(error))
        self.rows = rows
        self.error = error


def write_isolating(
    write: Callable[[list[dict[str, Any]]], None], rows: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], BaseException]]:
    """Write a batch the database refused in halves, then quarters..., in order, until every row that is
    refused on its own is found: returns those with their errors (one bad row in 512 costs ~18 writes).
    Raises :class:`DatabaseFailed` with the rows not yet written if the database itself fails meanwhile."""
    refused: list[tuple[dict[str, Any], BaseException]] = []
    pending = [rows]
    while pending:
        part = pending.pop()
        try:
            write(part)
        except Exception as exc:  # noqa: BLE001
            if database_failed(exc):
                raise DatabaseFailed([row for rest in [part, *reversed(pending)] for row in rest], exc) from exc
            if len(part) == 1:
                refused.append((part[0], exc))
            else:
                middle = len(part) // 2
                pending += [part[middle:], part[:middle]]  # the first half is written first
    return refused


def first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0][:200] if text else ""
