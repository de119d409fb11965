"""An upsert compiled once and executed as its SQL text, each row's values bound here.

``connection.execute(statement, rows)`` spends most of a batch's write on SQLAlchemy's per-row work:
building each row's parameter dict (``construct_params``) and running the bind processors through it
(~40 µs a row of ``execution_events`` on SQLite, against ~15 µs for the driver's own executemany; measured
here). :class:`PreparedUpsert` compiles the statement once per key set and dialect, and binds a row with the
very processors SQLAlchemy would use (each column type's ``dialect_impl(dialect).bind_processor(dialect)``:
the engine's ``json_serializer``, SQLite's DateTime text, psycopg's ``Json`` wrapper), in the compiled
parameter order, then runs ``connection.exec_driver_sql`` - the same SQL, the same values, one loop.

Only public SQLAlchemy API is used; a statement it cannot reproduce exactly (Python-side column defaults,
escaped or expanding parameters, a schema translate map, a dialect that rewrites executemany batches) is
not prepared: :meth:`PreparedUpsert.build` returns None and the caller executes it the ordinary way.

On SQLite a batch goes as multi-row ``INSERT ... VALUES (...), (...) ON CONFLICT ...`` statements (up to 64 rows
each, in chunks of power-of-two sizes, so a handful of statements stay in the driver's cache), not as
``executemany``: Python's ``sqlite3`` releases the GIL around every row's step and must win it back from the
agent's thread each time (on a busy interpreter, up to the 5 ms switch interval per row). Measured on a scripted
50-turn chat (cProfile, wall clock): the writer's ``executemany`` took 1.0 s over 28 batches for ~75 ms of CPU.
SQLite applies a multi-row upsert row by row, in order, as ``executemany`` does; the statement is the compiled
one with its placeholder tuple repeated, taken only when that tuple is plain placeholders for the row's values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import sqlalchemy as sa

Processor = Callable[[Any], Any]
MAX_ROWS_PER_STATEMENT = 64


def _processor(bind: Any, dialect: sa.Dialect) -> Processor | None:
    """The bind processor SQLAlchemy applies to ``bind`` on ``dialect`` (None: the value goes as it is)."""
    return bind.type.dialect_impl(dialect).bind_processor(dialect)


def _same_processing(bind: Any) -> Any:
    """What makes two parameters' processing equal: SQLAlchemy's own types of one class and arguments (a
    user's type gets a key of its own). Consecutive equal values of equal processing are processed once:
    a row's ``timestamp`` is its ``started_at`` (and a message's ``completed_at``): ~2 µs each on SQLite."""
    kind = bind.type
    if type(kind).__module__.startswith("sqlalchemy."):
        return type(kind), repr(kind)
    return object()


def _plain(bind: Any) -> bool:
    """A bound parameter whose value is a plain value known at compile time or a row's (no callable, no
    expansion, no render-time literal)."""
    return bind.callable is None and not bind.expanding and not bind.literal_execute


class PreparedUpsert:
    """The compiled SQL of one upsert and how to bind a row to it (see the module docstring)."""

    __slots__ = ("sql", "positional", "names", "_get", "_processors", "_fixed", "_multi_row", "_multi_sql",
                 "max_rows")

    def __init__(self, sql: str, positional: bool, names: tuple[str, ...], keys: tuple[str, ...],
                 processors: tuple[tuple[int, Processor, int], ...], fixed: tuple[tuple[int, Any], ...],
                 multi_row: tuple[str, str, str] | None = None, max_rows: int = 1) -> None:
        self.sql = sql
        self.positional = positional
        self.names = names  # every parameter, in the compiled order
        self._get = itemgetter(*keys) if len(keys) > 1 else (lambda row, key=keys[0]: (row[key],))
        # (position among the row's values, processor, number of its kind of processing) for those that have one
        self._processors = processors
        self._fixed = fixed  # (position among all parameters, processed value) of the statement's own literals
        # (text before the VALUES tuple, the tuple, text after it) when rows can share one statement (SQLite)
        self._multi_row = multi_row
        self._multi_sql: dict[int, str] = {}
        self.max_rows = max_rows if multi_row else 1

    @classmethod
    def build(cls, statement: Any, dialect: sa.Dialect, keys: frozenset[str]) -> PreparedUpsert | None:
        """The prepared form of ``statement`` executed with rows of ``keys``, or None when SQLAlchemy's own
        execution would do more than bind those values (then it must be executed the ordinary way)."""
        if dialect.use_insertmanyvalues_wo_returning:  # e.g. psycopg2: SQLAlchemy batches rows into one INSERT
            return None
        compiled = statement.compile(dialect=dialect, column_keys=sorted(keys))
        if compiled.insert_prefetch or compiled.update_prefetch or compiled.escaped_bind_names:
            return None  # Python-side defaults to compute per row, or parameter names rewritten
        names = tuple(compiled.positiontup) if dialect.positional else tuple(compiled.binds)
        if set(keys) - set(names):
            return None
        processors, fixed, row_keys = [], [], []
        groups: dict[Any, int] = {}  # parameters processed alike share a number
        for position, name in enumerate(names):
            bind = compiled.binds.get(name)
            if bind is None or not _plain(bind):
                return None
            processor = _processor(bind, dialect)
            if name in keys:
                if processor is not None:
                    group = groups.setdefault(_same_processing(bind), len(groups))
                    processors.append((len(row_keys), processor, group))
                row_keys.append(name)
            else:  # a literal of the statement (its WHERE): bound the same for every row
                value = bind.effective_value
                fixed.append((position, processor(value) if processor is not None else value))
        multi_row = _multi_row_parts(compiled, dialect, names, row_keys, fixed)
        max_rows = min(MAX_ROWS_PER_STATEMENT, _variable_limit(dialect) // max(len(names), 1))
        return cls(compiled.string, dialect.positional, names, tuple(row_keys), tuple(processors), tuple(fixed),
                   multi_row, max_rows)

    def row_values(self, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """Each row's values as bound, in the compiled order, without the statement's own literals. Every row must
        carry every key."""
        get, processors = self._get, self._processors
        out: list[list[Any]] = []
        for row in rows:
            values = list(get(row))
            last_group = last_value = last_done = None
            for position, processor, group in processors:
                value = values[position]
                if value is last_value and group == last_group and value is not None:
                    values[position] = last_done  # the same object, processed the same way: the same result
                    continue
                last_group, last_value = group, value
                values[position] = last_done = processor(value)
            out.append(values)
        return out

    def parameters(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The rows as the driver takes them: tuples in the compiled order (positional), else dicts by name."""
        out: list[Any] = []
        for values in self.row_values(rows):
            for position, value in self._fixed:
                values.insert(position, value)
            out.append(tuple(values) if self.positional else dict(zip(self.names, values)))
        return out

    def multi_row_sql(self, count: int) -> str:
        """The statement inserting ``count`` rows (SQLite; see the module docstring)."""
        sql = self._multi_sql.get(count)
        if sql is None:
            head, values, tail = self._multi_row  # type: ignore[misc]
            sql = self._multi_sql[count] = f"{head}{', '.join([values] * count)}{tail}"
        return sql

    def execute(self, connection: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        multi_row = self._multi_row is not None and len(rows) > 1
        try:
            parameters = self.row_values(rows) if multi_row else self.parameters(rows)
        except Exception as exc:  # a value a bind processor refuses: reported as SQLAlchemy reports it
            raise sa.exc.DBAPIError.instance(self.sql, None, exc, connection.dialect.loaded_dbapi.Error,
                                             dialect=connection.dialect) from exc
        if not multi_row:
            connection.exec_driver_sql(self.sql, parameters)
            return
        fixed = [value for _, value in self._fixed]  # all after the VALUES tuple (checked by _multi_row_parts)
        start = 0
        for count in _chunk_sizes(len(parameters), self.max_rows):
            flat = [value for values in parameters[start:start + count] for value in values]
            flat.extend(fixed)
            connection.exec_driver_sql(self.multi_row_sql(count), tuple(flat))
            start += count


def _chunk_sizes(total: int, largest: int) -> list[int]:
    """``total`` as chunks of at most ``largest``, the rest in powers of two (few distinct statements)."""
    sizes = [largest] * (total // largest)
    rest = total % largest
    power = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if power <= rest:
            sizes.append(power)
            rest -= power
        power >>= 1
    return sizes


def _variable_limit(dialect: sa.Dialect) -> int:
    """Parameters one statement may take: SQLite's limit (999 before 3.32), else a bound of our own."""
    if dialect.name != "sqlite":
        return 32766
    version = getattr(dialect.loaded_dbapi, "sqlite_version_info", (0,))
    return 32766 if tuple(version) >= (3, 32, 0) else 999


def _multi_row_parts(compiled: Any, dialect: sa.Dialect, names: tuple[str, ...], row_keys: list[str],
                     fixed: list[tuple[int, Any]]) -> tuple[str, str, str] | None:
    """(before, VALUES tuple, after) of a SQLite statement whose VALUES tuple is plain placeholders for exactly the
    row's values, in the first places, with every literal after it; None for any other shape or dialect (a type
    with a bind expression, say: ``VALUES (?, lower(?))``)."""
    if dialect.name != "sqlite" or dialect.paramstyle != "qmark" or not row_keys:
        return None
    sql = compiled.string
    values = f"({', '.join(['?'] * len(row_keys))})"
    marker = f" VALUES {values}"
    if sql.count(marker) != 1 or sql.count("?") != len(names) or names[:len(row_keys)] != tuple(row_keys):
        return None
    if any(position < len(row_keys) for position, _ in fixed):
        return None
    head, tail = sql.split(marker)
    if "?" in head:
        return None
    return f"{head} VALUES ", values, tail
