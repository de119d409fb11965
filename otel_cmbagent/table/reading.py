"""What every reader of the event table shares: its errors, the reflected table and its shape, a query.

A "run" is the set of rows sharing a ``run_id``; rows written outside any run (``run_id`` NULL, e.g. a bare
AG2 chat traced with ``opentelemetry-instrument``) are grouped by their ``trace_id`` instead, when the table
has that column (cmbagent's own table keeps trace ids in ``meta``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .schema import DEFAULT_TABLE, LINK_COLUMNS


class StoreError(Exception):
    """A problem with the database or a run reference, with a message meant for a person (one line)."""


class RunNotFoundError(StoreError):
    """No run matches the reference."""

    def __init__(self, message: str, ref: str) -> None:
        super().__init__(message)
        self.ref = ref


class AmbiguousRunError(StoreError):
    """A prefix matches several runs; ``candidates`` lists their ids (newest first)."""

    def __init__(self, message: str, ref: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.ref = ref
        self.candidates = candidates


def describe(engine: Engine) -> str:
    """The database for a person: a SQLite file's path, else the URL without its password."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# engine -> the table name given to open_store; engine -> {table name: reflected Table}
TABLE_NAMES: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_TABLES: weakref.WeakKeyDictionary[Engine, dict[str, sa.Table]] = weakref.WeakKeyDictionary()


def events_table(engine: Engine, table: str | sa.Table | None = None) -> sa.Table:
    """The event table, reflected from the database (cached per engine)."""
    if isinstance(table, sa.Table):
        return table
    name = table or TABLE_NAMES.get(engine, DEFAULT_TABLE)
    cache = _TABLES.setdefault(engine, {})
    found = cache.get(name)
    if found is None:
        try:
            found = sa.Table(name, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise StoreError(f"no table {name!r} in {describe(engine)}") from None
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None
        cache[name] = found
    return found


class TableShape:
    """What a table looks like: where meta and the trace ids live, and how a run is keyed."""

    def __init__(self, table: sa.Table) -> None:
        columns = table.c
        self.table = table
        self.meta = columns["meta"] if "meta" in columns else (columns["metadata"] if "metadata" in columns else None)
        self.has_links = all(name in columns for name in LINK_COLUMNS)
        self.has_status = "status" in columns
        self.run_id = columns["run_id"]
        # rows outside a run (run_id NULL) are grouped by trace when the trace id is a column
        self.key = sa.func.coalesce(columns.run_id, columns.trace_id) if self.has_links else columns.run_id
        self.order = columns["execution_order"]
        self.time = columns["timestamp"]

    def where_run(self, run_id: str) -> Any:
        c = self.table.c
        if self.has_links:
            return sa.or_(c.run_id == run_id, sa.and_(c.run_id.is_(None), c.trace_id == run_id))
        return c.run_id == run_id

    def where_runs(self, run_ids: Sequence[str]) -> Any:
        c = self.table.c
        if self.has_links:
            return sa.or_(c.run_id.in_(run_ids), sa.and_(c.run_id.is_(None), c.trace_id.in_(run_ids)))
        return c.run_id.in_(run_ids)

    def ordered(self, statement: Any) -> Any:
        """``statement`` in the table's order: execution_order, then time and id for ties."""
        c = self.table.c
        return statement.order_by(c.execution_order, c.timestamp, c.id)


def shape(engine: Engine, table: str | sa.Table | None = None) -> TableShape:
    return TableShape(events_table(engine, table))


def execute(engine: Engine, statement: Any) -> list[Any]:
    """The rows of a query; a database error becomes a one-line :class:`StoreError`."""
    try:
        with engine.connect() as connection:
            return list(connection.execute(statement))
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read {describe(engine)}: {first_line(exc)}") from None


def as_jsonb(column: Any) -> Any:
    """``column`` cast to PostgreSQL's ``jsonb``."""
    from sqlalchemy.dialects.postgresql import JSONB  # imported here: the CLI starts 0.2 s faster

    return sa.cast(column, JSONB)


def json_text(engine: Engine, column: Any, key: str, when: Any = None) -> Any:
    """``column[key]`` as text, extracted by the database (``json_extract`` / ``->>``; only for rows matching
    ``when``; ``NULL`` without the column): decoding a 100,000-row run's JSON in Python takes seconds."""
    if column is None:
        return sa.null()
    if engine.dialect.name == "postgresql" and not isinstance(column.type, sa.JSON):  # e.g. text: as jsonb
        column = as_jsonb(column)
    value = sa.type_coerce(column, sa.JSON)[key].as_string()
    return value if when is None else sa.case((when, value), else_=sa.null())


def keyed_by_run_id(engine: Engine, table_shape: TableShape, run_id: str) -> bool:
    """Whether the run's rows are the rows with ``run_id = run_id`` (else it is a trace outside any run)."""
    c = table_shape.table.c
    return not table_shape.has_links or bool(execute(engine, sa.select(c.id).where(c.run_id == run_id).limit(1)))


def where_run_indexed(engine: Engine, table_shape: TableShape, run_id: str) -> Any:
    """:meth:`TableShape.where_run` as ``run_id = ?`` when the run has such rows: the (run_id, execution_order)
    index then yields them in order, where the OR with the trace id makes the database sort them all first."""
    if keyed_by_run_id(engine, table_shape, run_id):
        return table_shape.table.c.run_id == run_id
    return table_shape.where_run(run_id)


def run_key_of(row: Any) -> Any:
    """The run a decoded row belongs to: its run id, or its trace id outside a run."""
    return row.get("run_id") or row.get("trace_id")
