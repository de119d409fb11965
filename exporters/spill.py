"""Spill files: rows the database could not take, as JSON Lines, and ``replay`` to write them back.

A spill append first ends a cut last line (a crash mid-write), so new lines stay whole. ``replay`` skips and
reports lines that are not rows and rows the database refuses, writes every valid row (idempotent upserts)
and leaves what it could not write in the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from otel_cmbagent.table.encoding import json_default, row_from_json
from otel_cmbagent.table.schema import execution_events_table

from .table_writer import DatabaseFailed, TableWriter, database_failed, first_line, in_start_order, write_isolating

_logger = logging.getLogger("otel_cmbagent.exporters")


def append_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows as JSON Lines; a last line cut short (a crash mid-write) is ended first, so the new lines
    stay whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(json.dumps(row, default=json_default) + "\n" for row in rows).encode("utf-8"))


@dataclass
class ReplayReport:
    """What :func:`replay_report` did: rows written, rows still waiting for their run/session row, and the
    lines it could not use (``unreadable``: not a spilled row, e.g. cut short; ``refused``: the database
    refused the row), by line number, with the first error. Every line not written is left in ``path``."""

    path: Path
    written: int = 0
    held: int = 0
    incomplete: int = 0  # rows without a value the table requires (e.g. a run_id for cmbagent's table)
    unreadable: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    first_error: str | None = None  # the error of the lowest line number skipped
    left_in: Path | None = None
    _first_line: int = field(default=0, repr=False)

    def note(self, lines: list[int], line: int, error: str) -> None:
        lines.append(line)
        if self.first_error is None or line < self._first_line:
            self.first_error, self._first_line = f"line {line}: {error}", line


def _read_spill(path: Path, report: ReplayReport) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not row.get("id"):
                    raise ValueError("not a row object with an id")
                yield number, row_from_json(row)
            except (ValueError, TypeError) as exc:
                report.note(report.unreadable, number, f"not a spilled row ({type(exc).__name__}: {exc})"[:300])


def replay_report(
    spill_path: str | os.PathLike[str],
    target: str | Engine,
    *,
    table: sa.Table | None = None,
    batch_size: int = 512,
    remove: bool = True,
) -> ReplayReport:
    """Write a spill file back into the table (idempotent upserts), skipping what cannot be written.

    Lines that are not rows (a last line cut short by a crash) and rows the database refuses are skipped and
    reported by line number; every valid row is written. What was not written (those lines, and rows whose
    run/session row still does not exist) is left in the file; with ``remove`` and nothing left, the file is
    renamed ``*.replayed``. A database that fails raises (nothing is removed).
    """
    path = Path(spill_path)
    from .sql import make_engine

    engine = make_engine(target)
    if table is None:
        table = execution_events_table()
        table.metadata.create_all(engine, tables=[table], checkfirst=True)
    writer = TableWriter(engine, table)
    report = ReplayReport(path)
    numbers: dict[int, int] = {}  # id(row) -> its line number, for the rows in hand
    held: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    for number, row in _read_spill(path, report):
        numbers[id(row)] = number
        batch.append(row)
        if len(batch) >= batch_size:
            _replay_batch(writer, batch, held, report, numbers)
            numbers = {id(row): numbers[id(row)] for row in held}
            batch = []
    if batch:
        _replay_batch(writer, batch, held, report, numbers)
    report.held = len(held)
    report.incomplete = writer.skipped
    _leave_unwritten(path, report, [json.dumps(row, default=json_default) + "\n" for row in held], remove)
    return report


def _replay_batch(writer: TableWriter, batch: list[dict[str, Any]], held: list[dict[str, Any]],
                  report: ReplayReport, numbers: dict[int, int]) -> None:
    def write(rows: list[dict[str, Any]]) -> None:
        written, waiting = writer.write(rows)
        report.written += written
        held.extend(waiting)

    rows, held[:] = in_start_order(held + batch), []  # an overflow file holds ends children first
    try:
        write(rows)
        return
    except Exception as exc:  # noqa: BLE001
        if database_failed(exc):
            raise
    try:
        refused = write_isolating(write, rows)
    except DatabaseFailed as failed:
        raise failed.error from None
    for row, error in refused:
        report.note(report.refused, numbers[id(row)], f"{type(error).__name__}: {first_line(error)}")


def _leave_unwritten(path: Path, report: ReplayReport, held: list[str], remove: bool) -> None:
    """Rewrite ``path`` with what was not written (held rows, then the skipped lines as they were)."""
    skipped = set(report.unreadable) | set(report.refused)
    kept: list[str] = []
    if skipped:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            kept = [line if line.endswith("\n") else line + "\n"
                    for number, line in enumerate(handle, 1) if number in skipped]
    if held or kept:
        path.write_text("".join(held + kept), encoding="utf-8", errors="surrogateescape")
        report.left_in = path
        if report.held:
            _logger.warning("otel-cmbagent: %d spilled rows still have no run/session row; left in %s",
                            report.held, path)
        if kept:
            _logger.warning("otel-cmbagent: %d lines of %s could not be written (%s); left in the file",
                            len(kept), path, report.first_error)
    elif remove:
        path.rename(path.with_name(path.name + ".replayed"))


def replay(spill_path: str | os.PathLike[str], target: str | Engine, **options: Any) -> int:
    """:func:`replay_report` (same options), returning the number of rows written."""
    return replay_report(spill_path, target, **options).written
