"""A bounded queue drained by one daemon thread: how sinks stay off the agent's path.

``put`` never blocks: when the queue is full the item goes to the sink's overflow file (read back, in order,
once the worker has caught up) or, for a sink without one (the live websocket view), is dropped and counted.
Like the SDK's batch processor, the worker is re-created in a forked child.
"""

from __future__ import annotations

import collections
import inspect
import functools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY  # the API's key (contrib re-exports it)

from otel_cmbagent.pipeline.values import log_internal_error

from .overflow import OverflowFile

_logger = logging.getLogger("otel_cmbagent.exporters")

SHUTDOWN_TIMEOUT_ENV = "OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS"
DEFAULT_SHUTDOWN_TIMEOUT_MILLIS = 5_000


def is_coroutine_callable(callback: Any) -> bool:
    """A coroutine function, or an object with ``async def __call__`` (a callback the worker must schedule)."""
    if inspect.iscoroutinefunction(callback):
        return True
    call = getattr(callback, "__call__", None)  # noqa: B004
    return call is not None and inspect.iscoroutinefunction(call)


def shutdown_timeout(millis: float | None = None) -> float:
    """Seconds a sink's shutdown may wait for a slow or hung consumer: ``millis`` if given, else
    ``$OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS``, else 5 s (a bad variable is logged and ignored)."""
    if millis is not None:
        if isinstance(millis, bool) or not isinstance(millis, (int, float)) or millis < 0:
            raise ValueError(f"shutdown_timeout_millis must be a number >= 0, not {millis!r}")
        return float(millis) / 1000
    raw = os.environ.get(SHUTDOWN_TIMEOUT_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
            if value >= 0:
                return value / 1000
        except ValueError:
            pass
        _logger.warning("otel-cmbagent: ignoring %s=%r (expected milliseconds >= 0)", SHUTDOWN_TIMEOUT_ENV, raw)
    return DEFAULT_SHUTDOWN_TIMEOUT_MILLIS / 1000


def _quiesce(worker_ref: weakref.ref[BackgroundWorker]) -> None:
    """Before a fork: wait (bounded) until the worker is between batches, so no write is half done in the child."""
    worker = worker_ref()
    if worker is not None and not worker._shutdown and worker._thread is not threading.current_thread():
        worker._io_held_for_fork = worker._io.acquire(timeout=shutdown_timeout())


def _resume(worker_ref: weakref.ref[BackgroundWorker]) -> None:
    worker = worker_ref()
    if worker is not None and worker._io_held_for_fork:
        worker._io_held_for_fork = False
        worker._io.release()


@dataclass
class WorkerStats:
    taken: int = 0  # items the worker took off the queue (or shutdown cleared from it)
    processed: int = 0
    dropped: int = 0
    failed: int = 0
    overflowed: int = 0  # items the full queue sent to the overflow file
    drained: int = 0  # of those, read back and handled
    queue: collections.deque[Any] = field(default_factory=collections.deque, repr=False)

    @property
    def enqueued(self) -> int:
        """Items ever queued: counted by the worker (``put`` takes no lock to count on the agent's thread)."""
        return self.taken + len(self.queue)

    def as_dict(self) -> dict[str, int]:
        return {"enqueued": self.enqueued, "processed": self.processed, "dropped": self.dropped, "failed": self.failed}

    def with_overflow(self) -> dict[str, int]:
        return {**self.as_dict(), "overflowed": self.overflowed, "drained": self.drained}


class BackgroundWorker:
    """Calls ``handle(batch)`` on a daemon thread with up to ``max_batch`` queued items at a time.

    A batch is taken ``delay`` after the worker sees the queue's first item; with ``max_delay`` (> ``delay``) the
    worker gathers on while items keep coming, and takes the batch once the queue was quiet for ``delay`` or its
    first item waited ``max_delay``: an agent mostly waits (on an LLM, a tool, a person), and a batch written
    in that quiet costs it nothing, while writing in the middle of a busy stretch takes the GIL from it, and fewer,
    larger batches cost less (the SQL writer's CPU for a zero-latency 50-turn chat's ~660 rows: 72–77 ms in 12–14
    batches, 44–50 ms in 2). A full batch, a flush or a shutdown never waits.

    ``handle`` owns retries; if it raises, the batch is counted as failed (and logged). With an ``overflow``
    file, a full queue never drops: from the first item that does not fit until the file is read to its end,
    every item goes to the file (so the order stays the order of ``put``), and the worker handles the file's
    items after the queue's.
    The worker thread runs under OTel's suppress-instrumentation key, so nothing a
    sink does (HTTP, SQL drivers) produces spans of its own.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[list[Any]], None],
        *,
        max_queue: int = 100_000,
        max_batch: int = 512,
        delay: float = 0.1,
        max_delay: float | None = None,
        tick: Callable[[], None] | None = None,
        tick_interval: float = 5.0,
        quiesce_on_fork: bool = False,
        overflow: OverflowFile | None = None,
    ) -> None:
        if max_queue <= 0 or max_batch <= 0:
            raise ValueError("max_queue and max_batch must be positive")
        self.name = name
        self._handle = handle
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.delay = delay
        self.max_delay = delay if max_delay is None else max_delay
        self.tick = tick
        self.tick_interval = tick_interval
        self.stats = WorkerStats()
        self.overflow = overflow
        self._last_drop_log: float | None = None
        self._logged_counts = (0, 0)  # (dropped, overflowed) as the last log line said
        self._after_shutdown_logged = False
        self.abandoned = 0  # queued items dropped because shutdown gave up on a busy handler
        self._io = threading.Lock()  # held while handle/tick run: a fork waits for the batch in hand
        self._io_held_for_fork = False
        self._init_state()
        weak_self = weakref.ref(self)

        def _after_fork() -> None:
            worker = weak_self()
            if worker is not None and not worker._shutdown:  # a shut-down sink stays shut down in the child
                worker._io, worker._io_held_for_fork = threading.Lock(), False
                if worker.overflow is not None:
                    worker.overflow.after_fork()
                worker._init_state()

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork)
            if quiesce_on_fork:  # e.g. SQLite: a child forked mid-transaction finds the file locked by itself
                os.register_at_fork(
                    before=functools.partial(_quiesce, weak_self), after_in_parent=functools.partial(_resume, weak_self)
                )

    def _init_state(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self.stats.queue = self._queue
        self._condition = threading.Condition()
        self._shutdown = False
        self._busy = False
        self._overflowing = False  # items go to the overflow file until it is read to its end
        self.in_flight = 0  # items of the batch being handled
        self._flushers = 0
        self._last_tick = float("-inf")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> bool:
        """Queue ``item`` (or, the queue being full, append it to the overflow file); False (and counted as
        dropped) if neither can take it or the worker is shut down.

        The agent's path takes no lock: ``deque.append`` is atomic, and the worker wakes every ``delay`` anyway
        (a full batch wakes it at once). An item racing ``shutdown`` is counted as dropped there.
        """
        queue = self._queue
        if not (self._overflowing or self._shutdown) and len(queue) < self.max_queue:
            queue.append(item)
            if len(queue) == self.max_batch:
                with self._condition:
                    self._condition.notify_all()
            return True
        return self._put_full(item)

    def nudge(self, marker: Any) -> None:
        """Queue ``marker`` so the worker takes a batch (after ``delay``, as for an item) - only while the queue
        has room: a full or overflowing queue keeps the worker busy anyway, and a marker is no row to keep."""
        queue = self._queue
        if not (self._overflowing or self._shutdown) and len(queue) < self.max_queue:
            queue.append(marker)

    def _put_full(self, item: Any) -> bool:
        with self._condition:
            closed = self._shutdown
            if closed:
                taken = False
            elif not self._overflowing and len(self._queue) < self.max_queue:  # drained meanwhile
                self._queue.append(item)
                return True
            else:
                taken = self._to_overflow(item)  # under the lock: the worker sees whole lines, in put order
            if not taken:
                self.stats.dropped += 1
        if closed:
            if not self._after_shutdown_logged:  # once: a late span after shutdown is not a full queue
                self._after_shutdown_logged = True
                _logger.warning("otel-cmbagent: %s is shut down; items arriving now are dropped and counted", self.name)
        else:
            now = time.monotonic()
            if self._last_drop_log is None or now - self._last_drop_log > 10:
                self._last_drop_log = now
                self._log_counts()
        return taken

    def _to_overflow(self, item: Any) -> bool:
        if self.overflow is None:
            return False
        try:
            self.overflow.append(item)
        except Exception as exc:  # noqa: BLE001 - disk full, an unencodable item: dropped, counted, logged once
            log_internal_error(f"{self.name} overflow file", exc)
            return False
        self.stats.overflowed += 1
        self._overflowing = True
        return True

    def _log_counts(self) -> None:
        """One line with the counts so far (the first full queue, then at most every 10 s, and at flush when
        they changed since the last line)."""
        dropped, overflowed = self.stats.dropped, self.stats.overflowed
        self._logged_counts = (dropped, overflowed)
        if overflowed:
            _logger.warning(
                "otel-cmbagent: %s queue full (%d items): %d items went to the overflow file %s so far, %d of them "
                "written back; %d dropped", self.name, self.max_queue, overflowed,
                self.overflow.path if self.overflow else None, self.stats.drained, dropped,
            )
        elif dropped:
            _logger.warning("otel-cmbagent: %s queue full (%d items), dropped %d items so far", self.name,
                            self.max_queue, dropped)

    def _run(self) -> None:
        otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        while True:
            self._maybe_tick()
            with self._condition:
                if not self._queue and not self._shutdown and not self._overflowing:
                    self._condition.wait(self.delay)  # idle
                # Gather for a fuller batch (``delay``, and with ``max_delay`` until the queue is quiet), unless a
                # flush or shutdown is waiting, the batch is full, or the queue is (items go to the overflow file).
                if self._queue and not self._batch_due():
                    self._gather()
                if self._queue:
                    batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                    self.stats.taken += len(batch)
                elif self._overflowing:
                    batch = None  # the queue is empty: the overflow file's turn
                elif self._shutdown:
                    return
                else:
                    continue
                self._busy = True
            if batch is None:
                batch = self._read_overflow()
                if not batch:
                    continue
                self.stats.drained += len(batch)
            self.in_flight = len(batch)
            try:
                with self._io:
                    self._handle(batch)
                self.stats.processed += len(batch)
            except Exception:  # noqa: BLE001
                self.stats.failed += len(batch)
                _logger.exception("otel-cmbagent: %s failed on a batch of %d items", self.name, len(batch))
            finally:
                with self._condition:
                    self._busy = False
                    self.in_flight = 0
                    self._condition.notify_all()

    def _batch_due(self) -> bool:
        return len(self._queue) >= self.max_batch or bool(self._flushers or self._shutdown or self._overflowing)

    def _gather(self) -> None:
        """Wait (holding the condition) until the batch is due: ``delay``, then while items keep coming, until a
        quiet ``delay`` or ``max_delay`` (see the class docstring)."""
        deadline = time.monotonic() + self.max_delay
        while True:
            size = len(self._queue)
            self._condition.wait(max(min(self.delay, deadline - time.monotonic()), 0.0))
            if self._batch_due() or len(self._queue) == size or time.monotonic() >= deadline:
                return

    def _read_overflow(self) -> list[Any]:
        """The overflow file's next batch; at its end (checked under the lock: no append in between) the file is
        removed and ``put`` queues again."""
        try:
            batch = self.overflow.read(self.max_batch)
        except OSError as exc:  # unreadable: left in place for replay(), counted as failed
            log_internal_error(f"{self.name} overflow file (left for replay())", exc)
            batch = None
        with self._condition:
            if batch is None or (not batch and not self.overflow.pending):
                if batch is None:
                    self.stats.failed += self.stats.overflowed - self.stats.drained
                    self.overflow.close()
                else:
                    self.overflow.reset()
                self._overflowing = False
                self._busy = False
                self._condition.notify_all()
                caught_up = batch is not None
            else:
                caught_up = False
                if not batch:
                    self._busy = False
        if caught_up:
            self._log_counts()
        return batch or []

    def _maybe_tick(self) -> None:
        """Call ``tick`` (e.g. a heartbeat) every ``tick_interval`` seconds, between batches."""
        now = time.monotonic()
        if self.tick is None or now - self._last_tick < self.tick_interval:
            return
        self._last_tick = now
        try:
            with self._io:
                self.tick()
        except Exception as exc:  # noqa: BLE001
            log_internal_error(f"{self.name} tick", exc)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far has been handled (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            self._flushers += 1
            try:
                self._condition.notify_all()
                while self._queue or self._busy or self._overflowing:
                    if not self._thread.is_alive():
                        return False
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._condition.wait(min(remaining, 0.05))
                    self._condition.notify_all()
            finally:
                self._flushers -= 1
        if (self.stats.dropped, self.stats.overflowed) != self._logged_counts:
            self._log_counts()  # the totals, not only the first full queue's count
        return True

    def shutdown(self, timeout: float = 30.0, *, abandon: bool = False) -> bool:
        """Flush, then stop the thread; the whole call takes at most ``timeout``.

        If ``handle`` is still busy then (a slow or hung consumer): with ``abandon`` the items still queued
        are dropped, counted (``stats.dropped``, ``abandoned``) and never handled - the caller accounts for
        the batch in hand (``in_flight``) and logs; without it they stay queued for the daemon thread (handled
        if the process lives on) and one line says so.
        """
        deadline = time.monotonic() + timeout
        flushed = self.flush(timeout)
        with self._condition:
            self._shutdown = True
            self._condition.notify_all()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive() and self._queue:  # put() raced the shutdown: never handled, counted
            with self._condition:
                late = len(self._queue)
                self._queue.clear()
                self.stats.taken += late
                self.stats.dropped += late
        elif self._thread.is_alive():
            with self._condition:
                left = len(self._queue)
                if abandon:
                    self._queue.clear()
                    self.stats.taken += left
                    self.stats.dropped += left
                    self.abandoned += left
            if not abandon:
                _logger.warning(
                    "otel-cmbagent: %s still busy %.1f s into shutdown: %d items in hand, %d queued (handled only "
                    "if the process lives on)", self.name, timeout, self.in_flight, left,
                )
            if self._overflowing:
                _logger.warning(
                    "otel-cmbagent: %s: %d items of the overflow file %s not written back yet (written if the "
                    "process lives on; otherwise replay the file with replay())", self.name,
                    self.stats.overflowed - self.stats.drained, self.overflow.path if self.overflow else None,
                )
        return flushed

    @property
    def queued(self) -> int:
        return len(self._queue)
