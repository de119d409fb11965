"""Rows against the foreign keys of a user's event table (cmbagent's, with ``PRAGMA foreign_keys=ON``).

cmbagent's ``execution_events`` points at ``workflow_runs``/``sessions`` (required) and at
``dag_nodes``/``workflow_steps``/itself (optional). A value that is not a row there must not
cost the row: an optional one is resolved like cmbagent's own readers do (a DAG node's short id,
e.g. ``step_1``, is the ``meta["id"]`` of its ``dag_nodes`` row in the same run) or written as
NULL with the value kept in ``meta["<column>_ref"]`` (warned once per column); a row whose run
or session row does not exist yet is held, with one warning naming the table and the fix, and
written once the parent row exists. Lookups are cached: in steady state no query per row.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

_logger = logging.getLogger("otel_cmbagent.exporters")

Pair = tuple[dict[str, Any], dict[str, Any]]  # (row as built from the span, row mapped onto the table)


@dataclass(frozen=True)
class Link:
    column: str
    target: sa.Table
    target_column: str
    required: bool

    @property
    def target_name(self) -> str:
        return f"{self.target.name}.{self.target_column}"


class _Known:
    """Ids known to exist in a table (bounded, most recent kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[Any, None] = OrderedDict()

    def __contains__(self, value: Any) -> bool:
        return value in self._ids

    def add(self, values: Iterable[Any]) -> None:
        for value in values:
            self._ids[value] = None
            self._ids.move_to_end(value)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


def links_of(table: sa.Table) -> list[Link]:
    """The table's single-column foreign keys (reflected or declared)."""
    links = []
    for constraint in table.foreign_key_constraints:
        if len(constraint.elements) != 1:
            continue
        element = constraint.elements[0]
        try:
            target = element.column
        except (sa.exc.NoReferencedTableError, sa.exc.NoReferencedColumnError):
            continue
        column = element.parent
        links.append(Link(column.name, target.table, target.name, required=not column.nullable))
    return links


class ForeignKeyGuard:
    """Checks a batch's foreign keys before it is written; ``stats`` counts what it did."""

    def __init__(self, table: sa.Table, meta_column: str | None, *, recheck_seconds: float = 2.0, cache_size: int = 65_536) -> None:
        self.table = table
        self.meta_column = meta_column
        self.links = links_of(table)
        self.recheck_seconds = recheck_seconds
        self._known: dict[str, _Known] = {link.target_name: _Known(cache_size) for link in self.links}
        self._absent: dict[tuple[str, Any], float] = {}  # (target, value) -> when last seen missing
        self._resolved: dict[tuple[str, Any, Any], Any] = {}  # (target, run_id, short id) -> id
        self._enforced: bool | None = None
        self._warned: set[Any] = set()
        self.nulled = 0
        self.resolved = 0

    def forget_absent(self) -> None:
        """Look again at every missing parent on the next batch (a flush asked to retry held rows)."""
        self._absent.clear()

    def _is_enforced(self, connection: sa.Connection) -> bool:
        if self._enforced is None:
            if connection.dialect.name == "sqlite":
                self._enforced = bool(connection.exec_driver_sql("PRAGMA foreign_keys").scalar())
            else:
                self._enforced = True
        return self._enforced

    def prepare(self, connection: sa.Connection, pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
        """``(ready, held)``: optional references fixed in place, rows with a missing run/session held."""
        if not self.links or not self._is_enforced(connection):
            return pairs, []
        batch_ids = {mapped.get("id") for _, mapped in pairs}
        held_ids: set[Any] = set()
        for link in self.links:
            self._look_up(connection, link, pairs, batch_ids)
        ready, held = [], []
        for pair in pairs:
            if self._check(pair[1], batch_ids, held_ids):
                ready.append(pair)
            else:
                held_ids.add(pair[1].get("id"))
                held.append(pair)
        return ready, held

    def confirm(self, pairs: Iterable[Pair]) -> None:
        """The rows are in: their ids exist for later rows that point at them."""
        for link in self.links:
            if link.target is self.table or link.target.name == self.table.name:
                self._known[link.target_name].add(mapped.get("id") for _, mapped in pairs)

    # --- lookups ---------------------------------------------------------------------------
    def _unknown(self, link: Link, values: set[Any], now: float) -> set[Any]:
        known = self._known[link.target_name]
        return {
            value for value in values
            if value not in known and now - self._absent.get((link.target_name, value), -1e18) >= self.recheck_seconds
        }

    def _look_up(self, connection: sa.Connection, link: Link, pairs: list[Pair], batch_ids: set[Any]) -> None:
        values = {mapped.get(link.column) for _, mapped in pairs} - {None}
        if link.target.name == self.table.name:
            values -= batch_ids
        now = time.monotonic()
        unknown = self._unknown(link, values, now)
        if not unknown:
            return
        column = link.target.c[link.target_column]
        found = {row[0] for row in connection.execute(sa.select(column).where(column.in_(sorted(unknown, key=str))))}
        self._known[link.target_name].add(found)
        missing = unknown - found
        for value in missing:
            self._absent[(link.target_name, value)] = now
        if missing and not link.required:
            self._resolve_short_ids(connection, link, pairs, missing)

    def _resolve_short_ids(self, connection: sa.Connection, link: Link, pairs: list[Pair], missing: set[Any]) -> None:
        """cmbagent's readers find a DAG node by its short id in ``meta["id"]`` within the run: so do we."""
        columns = link.target.c
        if "meta" not in columns or "run_id" not in columns:
            return
        runs = {mapped.get("run_id") for _, mapped in pairs if mapped.get(link.column) in missing} - {None}
        if not runs:
            return
        statement = sa.select(columns[link.target_column], columns.run_id, columns.meta).where(columns.run_id.in_(sorted(runs)))
        for target_id, run_id, meta in connection.execute(statement):
            if isinstance(meta, (str, bytes)):
                try:
                    meta = json.loads(meta)
                except ValueError:
                    continue
            short = meta.get("id") if isinstance(meta, dict) else None
            if short in missing:
                self._resolved[(link.target_name, run_id, short)] = target_id

    # --- per row ---------------------------------------------------------------------------
    def _present(self, link: Link, value: Any, batch_ids: set[Any], held_ids: set[Any]) -> bool:
        if link.target.name == self.table.name and value in batch_ids:
            return value not in held_ids
        return value in self._known[link.target_name]

    def _check(self, mapped: dict[str, Any], batch_ids: set[Any], held_ids: set[Any]) -> bool:
        for link in self.links:
            value = mapped.get(link.column)
            if value is None or self._present(link, value, batch_ids, held_ids):
                continue
            if link.required:
                self._warn_missing_parent(link, value)
                return False
            self._replace(mapped, link, value)
        return True

    def _replace(self, mapped: dict[str, Any], link: Link, value: Any) -> None:
        resolved = self._resolved.get((link.target_name, mapped.get("run_id"), value))
        meta = mapped.get(self.meta_column) if self.meta_column else None
        if isinstance(meta, dict):
            meta[f"{link.column}_ref"] = value
        mapped[link.column] = resolved
        if resolved is not None:
            self.resolved += 1
            return
        self.nulled += 1
        if link.column not in self._warned:
            self._warned.add(link.column)
            _logger.warning(
                "otel-cmbagent: %s.%s %r is not a %s (foreign key): written as NULL, the value kept in meta[%r] "
                "(warned once per column)",
                self.table.name, link.column, value, link.target_name, f"{link.column}_ref",
            )

    def _warn_missing_parent(self, link: Link, value: Any) -> None:
        key = (link.target_name, value)
        if key in self._warned:
            return
        self._warned.add(key)
        _logger.warning(
            "otel-cmbagent: no %s row with %s=%r (foreign key %s.%s): rows are held and written once it exists. "
            "Create that row before capturing (cmbagent: the %s row of the run), or flush after creating it.",
            link.target.name, link.target_column, value, self.table.name, link.column, link.target.name,
        )
