"""The SQLite file under the SQL sink: deleted or replaced while open, or its WAL index (``-shm``) cut short.

Checked before every batch (two ``stat`` calls), so no row is counted as written into a file that is gone:

- **deleted**: open connections keep writing into the unlinked file, and every row vanishes with it. The
  sink spills instead (logged once). The file is not recreated: deleting it was someone's decision, and a
  new file would hold a run's rows from the middle on; the spill file holds all of them, for ``replay`` into
  whichever database the user picks.
- **replaced** (another file at the path): an engine the sink made is reconnected to the new file (and the
  table created there); a host's engine is not ours to reset (its pool serves the host), so rows are spilled.
- **WAL index cut short**: SQLite maps ``<db>-shm`` into memory; touching a page past the end of a file that
  was truncated under the mapping (``truncate``, a clean-up script, a full disk) kills the process with SIGBUS.
  The file's size never shrinks and it has no holes while SQLite uses it; when it does, it is re-extended
  with zeros (``posix_fallocate``), from which SQLite rebuilds its index out of the WAL. When that fails (a
  full or read-only disk) this process never touches the database again: rows are spilled, and the open
  connections are kept, never closed, until the process ends (closing one would touch the mapping).

A truncation in the microseconds between the check and the write can still crash, as for any SQLite user.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

_logger = logging.getLogger("otel_cmbagent.exporters")

OK, RECONNECTED, BLOCKED = "ok", "reconnected", "blocked"
_KEPT_OPEN: list[Any] = []  # connections on a WAL index that cannot be repaired: never closed, never freed


def sqlite_file(engine: Engine) -> Path | None:
    """The database file of a SQLite engine (None for other databases and in-memory ones)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


class SQLiteFileGuard:
    """Per batch: :meth:`check` before writing (``OK``, ``RECONNECTED`` or ``BLOCKED``), :meth:`wrote` after."""

    def __init__(self, engine: Engine, *, reconnect: bool, spill_path: Path) -> None:
        self.engine = engine
        self.path = sqlite_file(engine)
        self.reconnect = reconnect
        self.spill_path = spill_path
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connections opened
        self.shm_size = 0  # the largest size the WAL index was seen with (what SQLite may have mapped)
        self.abandoned = False
        self._warned: set[str] = set()
        self._records: weakref.WeakSet[Any] = weakref.WeakSet()
        if self.path is not None:
            sa.event.listen(engine, "connect", self._on_connect)

    def _on_connect(self, _dbapi_connection: Any, record: Any) -> None:
        self._records.add(record)

    @property
    def shm_path(self) -> Path:
        return Path(f"{self.path}-shm")

    def check(self) -> str:
        """Whether the next batch may be written (``RECONNECTED``: into a new file: create the table again)."""
        if self.path is None:
            return OK
        if self.abandoned:
            return BLOCKED
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            if self.identity is None:
                return OK  # not opened yet: the write creates it
            self._warn("gone", "the SQLite file %s is gone (deleted while open): the rows written before went "
                       "with it, the rows from now on are spilled to %s (replay them with `otel-cmbagent replay`); "
                       "it is not recreated", self.path, self.spill_path)
            return BLOCKED
        except OSError:
            return OK  # the write reports it
        identity = (stat.st_dev, stat.st_ino)
        if self.identity is not None and identity != self.identity:
            if not self.reconnect:
                self._warn("replaced", "the SQLite file %s was replaced by another file; the host's engine still "
                           "points at the old one, so rows are spilled to %s", self.path, self.spill_path)
                return BLOCKED
            self._warn("reconnected", "the SQLite file %s was replaced by another file: writing into the new one",
                       self.path)
            self.engine.dispose()
            self.identity, self.shm_size = identity, 0
            return RECONNECTED
        return self._check_shm()

    def wrote(self) -> None:
        """After a write: remember the file the connections use and how far the WAL index reaches."""
        if self.path is None:
            return
        try:
            if self.identity is None:
                stat = os.stat(self.path)
                self.identity = (stat.st_dev, stat.st_ino)
            self.shm_size = max(self.shm_size, os.stat(self.shm_path).st_size)
        except OSError:
            pass

    def _check_shm(self) -> str:
        try:
            stat = os.stat(self.shm_path)
        except OSError:
            return OK  # not in WAL mode (yet), or unlinked: a mapping of an unlinked file stays valid
        if stat.st_size >= self.shm_size and stat.st_blocks * 512 >= stat.st_size:
            return OK
        try:
            _allocate(self.shm_path, max(stat.st_size, self.shm_size))
        except OSError as exc:
            self._abandon()
            self._warn("shm", "the WAL index %s was cut short while open and cannot be re-extended (%s): this "
                       "process does not touch the database again (SQLite would crash it with SIGBUS); rows are "
                       "spilled to %s", self.shm_path, exc, self.spill_path)
            return BLOCKED
        self._warn("shm repaired", "the WAL index %s was cut short while open (SQLite would crash the process "
                   "with SIGBUS); re-extended with zeros, SQLite rebuilds it from the WAL", self.shm_path)
        return OK

    def _abandon(self) -> None:
        """Keep every connection of the engine open for good: closing (or freeing) one touches the mapping."""
        self.abandoned = True
        for record in list(self._records):
            connection = getattr(record, "dbapi_connection", None)
            if connection is None:
                continue
            _KEPT_OPEN.append(connection)
            try:  # interpreter shutdown frees module lists too: one reference more keeps it alive
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(connection))
            except (AttributeError, OSError):  # not CPython
                pass

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            _logger.warning("otel-cmbagent: " + message + " (logged once)", *args)


def _allocate(path: Path, size: int) -> None:
    """Back every byte of ``path`` up to ``size`` with disk (zeros where it was cut or had holes)."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except (AttributeError, OSError) as exc:  # no fallocate here: at least no page past the end
            if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
    finally:
        os.close(fd)
