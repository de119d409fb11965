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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import sqlalchemy as sa

Processor = Callable[[Any], Any]


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

    __slots__ = ("sql", "positional", "names", "_get", "_processors", "_fixed")

    def __init__(self, sql: str, positional: bool, names: tuple[str, ...], keys: tuple[str, ...],
                 processors: tuple[tuple[int, Processor, int], ...], fixed: tuple[tuple[int, Any], ...]) -> None:
        self.sql = sql
        self.positional = positional
        self.names = names  # every parameter, in the compiled order
        self._get = itemgetter(*keys) if len(keys) > 1 else (lambda row, key=keys[0]: (row[key],))
        # (position among the row's values, processor, number of its kind of processing) for those that have one
        self._processors = processors
        self._fixed = fixed  # (position among all parameters, processed value) of the statement's own literals

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
        return cls(compiled.string, dialect.positional, names, tuple(row_keys), tuple(processors), tuple(fixed))

    def parameters(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The rows as the driver takes them: tuples in the compiled order (positional), else dicts by name.
        Every row must carry every key."""
        get, processors, fixed = self._get, self._processors, self._fixed
        out: list[Any] = []
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
            for position, value in fixed:
                values.insert(position, value)
            out.append(tuple(values) if self.positional else dict(zip(self.names, values)))
        return out

    def execute(self, connection: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        try:
            parameters = self.parameters(rows)
        except Exception as exc:  # a value a bind processor refuses: reported as SQLAlchemy reports it
            raise sa.exc.DBAPIError.instance(self.sql, None, exc, connection.dialect.loaded_dbapi.Error,
                                             dialect=connection.dialect) from exc
        connection.exec_driver_sql(self.sql, parameters)
