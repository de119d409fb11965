"""Where a run's ``execution_order`` comes from once its work runs in more than one process.

A run starts with an in-process counter (``itertools.count``: no lock, no syscall). The first time work
of the run leaves the process (a process-pool task, a ``multiprocessing.Process``), its
:class:`~otel_cmbagent.pipeline.context.OrderSequence` is *shared*: from then on every process of the run - the
parent included - takes numbers from one counter that outlives any of them:

- :class:`FileCounter` (default, one machine): 8 bytes in a small file every process maps. The increment
  runs under ``fcntl.flock``, which the kernel releases when its holder dies, so a worker killed at any
  point never blocks the others; a thread lock serialises the threads of one process (``flock`` does not
  exclude threads sharing a descriptor). ~1-2 µs per number (benchmarks/bench_processes.py).
- :class:`DatabaseCounter` (``OTEL_CMBAGENT_SHARED_ORDER=database``; works across machines): one row per run
  in ``otel_cmbagent_orders`` of the run's SQL database, incremented with ``UPDATE ... RETURNING`` in its own
  one-statement transaction: a round trip per number; a client that dies mid-statement is rolled back by the
  server.

Numbers are taken only when a span or message starts, so the order stays gapless; a killed process
loses only the numbers of rows it had not written yet (nothing waits for them).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

_logger = logging.getLogger(__name__)

SHARED_ORDER_ENV = "OTEL_CMBAGENT_SHARED_ORDER"
ORDER_DIR_ENV = "OTEL_CMBAGENT_ORDER_DIR"
KIND_FILE = "file"
KIND_DATABASE = "database"
ORDERS_TABLE = "otel_cmbagent_orders"

_U64 = struct.Struct("=Q")


class SharedCounter(Protocol):
    """What :meth:`OrderSequence.share` needs: numbers after the ones every process has taken."""

    lock: threading.Lock

    def __next__(self) -> int: ...

    def start_after_locked(self, value: int) -> None:
        """Make the next number at least ``value + 1`` (the caller holds ``lock``)."""

    def continue_after(self, value: int) -> None: ...

    def ref(self) -> OrderRef: ...


@dataclass(frozen=True)
class OrderRef:
    """How another process reaches a shared counter (pickled into the work it is handed)."""

    kind: str
    location: str  # the file path, or the database URL
    key: str  # the run (or trace) the counter numbers


# --- one machine: a mapped file under flock ----------------------------------------------------
# Counters alive in this process: a forked child gives each its own lock and descriptor/connection.
_live_counters: weakref.WeakSet[Any] = weakref.WeakSet()


class FileCounter:
    """A 64-bit counter in a file that each process maps (``MAP_SHARED``), incremented under ``flock``."""

    def __init__(self, path: str, key: str = "") -> None:
        self.path = path
        self.key = key
        self.lock = threading.Lock()
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._open()
        _live_counters.add(self)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if os.fstat(fd).st_size < _U64.size:
                os.ftruncate(fd, _U64.size)  # zero-filled; a second creator extends nothing
            self._map = mmap.mmap(fd, _U64.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def after_fork(self) -> None:
        """In a forked child: its own lock, descriptor and mapping. The inherited descriptor (and the mapping's
        duplicate of it) share the parent's open file - and so its flock - and must not outlive the fork here."""
        self.lock = threading.Lock()
        old_fd, old_map = self._fd, self._map
        try:
            self._open()
        finally:
            if old_map is not None:
                old_map.close()
            if old_fd >= 0:
                os.close(old_fd)

    def __next__(self) -> int:
        with self.lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                value = _U64.unpack_from(self._map)[0] + 1  # type: ignore[arg-type]
                _U64.pack_into(self._map, 0, value)  # type: ignore[arg-type]
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return value

    def start_after_locked(self, value: int) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if _U64.unpack_from(self._map)[0] < value:  # type: ignore[arg-type]
                _U64.pack_into(self._map, 0, value)  # type: ignore[arg-type]
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def continue_after(self, value: int) -> None:
        with self.lock:
            self.start_after_locked(value)

    def holding_lock(self) -> Any:
        """``with counter.holding_lock():`` - hold the cross-process lock (tests kill a process inside it)."""
        return _Flocked(self._fd)

    @property
    def value(self) -> int:
        """The last number taken by any process."""
        return int(_U64.unpack_from(self._map)[0])  # type: ignore[arg-type]

    def ref(self) -> OrderRef:
        return OrderRef(KIND_FILE, self.path, self.key)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Flocked:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _after_fork_in_child() -> None:
    _held_for_fork.clear()  # the child's counters get new locks below
    for engine in list(_engines.values()):
        engine.dispose(close=False)  # the parent's pooled connections stay the parent's
    for counter in list(_live_counters):
        try:
            counter.after_fork()
        except Exception as exc:  # noqa: BLE001 - e.g. the file is gone: say so, never break the fork
            _logger.warning("otel-cmbagent: cannot reopen the order counter %s after fork: %s", counter.ref(), exc)


_held_for_fork: list[threading.Lock] = []


def _before_fork() -> None:
    """Let a database increment in flight finish first (SQLite: a child forked mid-statement finds the file locked)."""
    for counter in list(_live_counters):
        if isinstance(counter, DatabaseCounter) and counter.lock.acquire(timeout=5.0):
            _held_for_fork.append(counter.lock)


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class _OrderDirectory:
    """This process's private directory of order files (0700, removed at exit)."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def path(self) -> str:
        with self._lock:
            if self._path is None or self._pid != os.getpid():  # a forked child makes its own
                base = os.environ.get(ORDER_DIR_ENV) or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
                try:
                    self._path = tempfile.mkdtemp(prefix="otel-cmbagent-order-", dir=base)
                except OSError:  # /dev/shm not writable: the default temp dir
                    self._path = tempfile.mkdtemp(prefix="otel-cmbagent-order-")
                self._pid = os.getpid()
                atexit.register(_remove_directory, self._path, self._pid)
            return self._path


def _remove_directory(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


_directory = _OrderDirectory()


def new_file_counter(key: str, owner: Any) -> FileCounter:
    """A counter file for ``key`` in this process's order directory, removed when ``owner`` is released."""
    name = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    counter = FileCounter(os.path.join(_directory.path(), name), key)
    weakref.finalize(owner, _unlink, counter.path)
    return counter


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- across machines: a row in the run's database ----------------------------------------------
_engines: dict[str, Any] = {}
_engines_lock = threading.Lock()


def _engine(url: str) -> Any:
    """One engine per database URL in this process (its counters share the pool)."""
    from otel_cmbagent.exporters.sql import make_engine

    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
            table = orders_table()
            table.metadata.create_all(engine, tables=[table], checkfirst=True)
        return engine


class DatabaseCounter:
    """The run's counter as a row of ``otel_cmbagent_orders`` (key, last), one round trip per number."""

    def __init__(self, url: str, key: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self.key = key
        self.lock = threading.Lock()
        self._engine = _engine(url)
        self._table = table = orders_table()
        self._pid = os.getpid()
        self._connection: Any = None
        _live_counters.add(self)
        self._increment = (
            sa.update(table).where(table.c.key == key).values(last=table.c.last + 1).returning(table.c.last)
        )
        self._ensure_row()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self._pid = os.getpid()
        self._connection = None  # the parent's: never used (nor closed) here

    def _connect(self) -> Any:
        if self._connection is None:
            self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._connection

    def _ensure_row(self) -> None:
        import sqlalchemy as sa

        table = self._table
        with self._engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            if connection.execute(sa.select(table.c.key).where(table.c.key == self.key)).first() is None:
                try:
                    connection.execute(sa.insert(table).values(key=self.key, last=0))
                except sa.exc.IntegrityError:  # another process created it first
                    pass

    def __next__(self) -> int:
        with self.lock:
            return int(self._connect().execute(self._increment).scalar_one())

    def start_after_locked(self, value: int) -> None:
        import sqlalchemy as sa

        table = self._table
        self._connect().execute(
            sa.update(table).where(table.c.key == self.key, table.c.last < value).values(last=value)
        )

    def continue_after(self, value: int) -> None:
        with self.lock:
            self.start_after_locked(value)

    def ref(self) -> OrderRef:
        return OrderRef(KIND_DATABASE, self.url, self.key)

    def __del__(self) -> None:
        connection = self._connection
        if connection is not None and self._pid == os.getpid():
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def orders_table(metadata: Any = None) -> Any:
    import sqlalchemy as sa

    metadata = metadata if metadata is not None else sa.MetaData()
    return sa.Table(
        ORDERS_TABLE,
        metadata,
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("last", sa.BigInteger, nullable=False),
    )


# --- counters of this process, by reference --------------------------------------------------
# Weak: a worker process that served many runs keeps only the counters of runs still alive in it.
_opened: weakref.WeakValueDictionary[OrderRef, Any] = weakref.WeakValueDictionary()
_opened_lock = threading.Lock()


def open_counter(ref: OrderRef) -> SharedCounter:
    """This process's handle on the shared counter ``ref`` names (opened once per process)."""
    with _opened_lock:
        counter = _opened.get(ref)
        if counter is None:
            kind = FileCounter if ref.kind == KIND_FILE else DatabaseCounter
            counter = kind(ref.location, ref.key)
            _opened[ref] = counter
        return counter


def shared_kind() -> str:
    """``file`` (default) or ``database`` from ``$OTEL_CMBAGENT_SHARED_ORDER`` (anything else: logged, file)."""
    raw = (os.environ.get(SHARED_ORDER_ENV) or KIND_FILE).strip().lower()
    if raw in (KIND_FILE, KIND_DATABASE):
        return raw
    _logger.warning("otel-cmbagent: ignoring %s=%r (expected file or database); using file", SHARED_ORDER_ENV, raw)
    return KIND_FILE
