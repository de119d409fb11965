"""Who writes a run's ``running`` rows, and whether that process still lives (a run killed with SIGKILL
otherwise looks live forever, its duration growing).

- Writer side: every row the SQL sink writes as ``running`` carries the writing process's identity in
  ``meta["cmbagent.writer"]``: ``host|boot id|pid|process start time`` (Linux ``/proc`` clock ticks; another
  process that later gets the same pid has another start time). Where the sink may create tables (its own
  event table, or ``heartbeat=True``) it also keeps a row per writer in ``otel_cmbagent_writers`` with the
  time it was last seen, refreshed every ``OTEL_CMBAGENT_HEARTBEAT_SECONDS`` (5 s) from its worker thread.
- Reader side (:func:`gone`): a writer on the reader's host is gone when the machine rebooted since, or its
  pid is not alive with that start time (or is a zombie); on another host, when its heartbeat is older than
  3 intervals + 5 s. A writer of unknown state (another host, no heartbeat table) counts as alive.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

_logger = logging.getLogger("otel_cmbagent.exporters")

WRITER_KEY = "cmbagent.writer"  # meta key of running rows
HEARTBEAT_TABLE = "otel_cmbagent_writers"
HEARTBEAT_ENV = "OTEL_CMBAGENT_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 5.0
FORGET_AFTER = timedelta(days=7)  # heartbeat rows of writers not seen for this long are deleted


def heartbeat_seconds() -> float:
    """``$OTEL_CMBAGENT_HEARTBEAT_SECONDS`` (> 0), else 5."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_HEARTBEAT_SECONDS
    except ValueError:
        value = 0.0
    if value > 0:
        return value
    _logger.warning("otel-cmbagent: ignoring %s=%r (expected seconds > 0)", HEARTBEAT_ENV, raw)
    return DEFAULT_HEARTBEAT_SECONDS


def heartbeat_table(metadata: sa.MetaData | None = None, schema: str | None = None) -> sa.Table:
    return sa.Table(
        HEARTBEAT_TABLE,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("writer", sa.String(255), primary_key=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("interval_seconds", sa.Float, nullable=False),
        schema=schema,
    )


# --- this process -----------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int | str) -> tuple[str, str] | None:
    """``(state, start time in clock ticks)`` of a process from ``/proc`` (None: no such process, or no /proc)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


@functools.lru_cache(maxsize=1)
def _host() -> tuple[str, str]:
    return socket.gethostname().replace("|", "_"), _read("/proc/sys/kernel/random/boot_id")


@functools.lru_cache(maxsize=4)
def _identity(pid: int) -> str:
    host, boot = _host()
    started = (_proc_stat("self") or ("", ""))[1]
    return f"{host}|{boot}|{pid}|{started}"


def this_writer() -> str:
    """This process's writer identity (a forked child has its own)."""
    return _identity(os.getpid())


# --- is a writer gone? --------------------------------------------------------------------------
def _alive_here(boot: str, pid: str, started: str) -> bool | None:
    """For a writer on this host: False when it is gone, True when alive, None when it cannot be told."""
    here_boot = _host()[1]
    if boot and here_boot and boot != here_boot:
        return False  # the machine rebooted since
    if not pid.isdigit():
        return None
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X") and (not started or stat[1] == started)
    if os.path.exists("/proc/self/stat"):
        return False
    try:  # no /proc: the pid alone
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _heartbeats(engine: Engine, writers: Iterable[str]) -> dict[str, tuple[datetime, float]]:
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table(HEARTBEAT_TABLE):
                return {}
            table = heartbeat_table()
            statement = sa.select(table.c.writer, table.c.last_seen_at, table.c.interval_seconds).where(
                table.c.writer.in_(sorted(writers)))
            return {writer: (_utc(seen), interval) for writer, seen, interval in connection.execute(statement)}
    except sa.exc.SQLAlchemyError:
        return {}


def _utc(value: Any) -> Any:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def gone(engine: Engine, writers: Iterable[str]) -> dict[str, datetime | None]:
    """The writers known to be gone, each with when it was last seen (its heartbeat; None when unknown)."""
    wanted = {writer for writer in writers if isinstance(writer, str) and writer.count("|") == 3}
    if not wanted:
        return {}
    beats = _heartbeats(engine, wanted)
    now = datetime.now(timezone.utc)
    out: dict[str, datetime | None] = {}
    for writer in wanted:
        host, boot, pid, started = writer.split("|")
        beat = beats.get(writer)
        alive = _alive_here(boot, pid, started) if host == _host()[0] else None
        if alive is None and beat is not None:
            alive = now - beat[0] <= timedelta(seconds=3 * beat[1] + 5)
        if alive is False:
            out[writer] = beat[0] if beat is not None else None
    return out


# --- the heartbeat ------------------------------------------------------------------------------
class Heartbeat:
    """This process's row in ``otel_cmbagent_writers``, refreshed by :meth:`beat` (from the sink's worker thread).

    ``create``: create the table when it is missing (else a missing table turns the heartbeat off).
    """

    def __init__(self, engine: Engine, *, create: bool, schema: str | None = None) -> None:
        self.engine = engine
        self.create = create
        self.table = heartbeat_table(schema=schema)
        self.interval = heartbeat_seconds()
        self.off = False
        self._ready = False

    def beat(self) -> None:
        if self.off:
            return
        now = datetime.now(timezone.utc)
        with self.engine.begin() as connection:
            if not self._ready and not self._prepare(connection, now):
                return
            row = {"writer": this_writer(), "last_seen_at": now, "interval_seconds": self.interval}
            c = self.table.c
            updated = connection.execute(sa.update(self.table).where(c.writer == row["writer"]).values(**row))
            if not updated.rowcount:
                connection.execute(sa.insert(self.table).values(**row))

    def _prepare(self, connection: sa.Connection, now: datetime) -> bool:
        exists = sa.inspect(connection).has_table(self.table.name, schema=self.table.schema)
        if not exists and not self.create:
            self.off = True
            return False
        if not exists:
            self.table.create(connection, checkfirst=True)
        connection.execute(sa.delete(self.table).where(self.table.c.last_seen_at < now - FORGET_AFTER))
        self._ready = True
        return True
