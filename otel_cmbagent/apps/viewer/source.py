"""The viewer's database, opened lazily (a viewer may start before the first run creates the file)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ...table import store
from ...table.encoding import decode_row
from ...table.schema import kinds_condition


class Source:
    """The event table the viewer reads: the engine once the table exists, its shape, incremental reads."""

    def __init__(self, db: str | Engine, table: str) -> None:
        self.db = db
        self.table_name = table
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        """The engine on the event table; raises :class:`store.StoreError` while it does not exist."""
        with self._lock:
            if self._engine is None:
                self._engine = store.open_store(self.db, table=self.table_name)
            return self._engine

    def shape(self) -> store.TableShape:
        return store.TableShape(store.events_table(self.engine(), self.table_name))

    def describe(self) -> str:
        if isinstance(self.db, Engine):
            return self.db.url.render_as_string(hide_password=True)
        text = str(self.db)
        if "://" in text:
            with contextlib.suppress(Exception):
                return sa.engine.make_url(text).render_as_string(hide_password=True)
        return text

    def read(self, connection: Any, statement: Any) -> list[dict[str, Any]]:
        return [decode_row(row._mapping) for row in connection.execute(statement)]

    def rows_after(
        self,
        run_key: str,
        after: int,
        running_ids: Sequence[str] = (),
        event_types: Sequence[str] = (),
        agents: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Rows of a run with ``execution_order > after``, plus the current rows of ``running_ids``."""
        shape = self.shape()
        c = shape.table.c
        changed = c.execution_order > after
        if running_ids:
            changed = sa.or_(changed, c.id.in_(list(running_ids)))
        statement = sa.select(shape.table).where(shape.where_run(run_key), changed)
        if event_types:
            statement = statement.where(kinds_condition(c, event_types))
        if agents:
            statement = statement.where(c.agent_name.in_(list(agents)))
        with self.engine().connect() as connection:
            rows = self.read(connection, shape.ordered(statement))
        return store.mark_interrupted(self.engine(), rows, table=shape.table)
