"""The viewer's live feed: poll the table for new and changed rows, broadcast them on the live server's hub.

Rows written by any process (another terminal's ``otel-cmbagent demo``) appear, because the feed reads the
table, not this process's spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from ...server.hub import Hub
from ...table import store, writers
from ...table.encoding import dumps
from ...table.envelope import envelope, event_data
from ...table.reading import run_key_of
from ...table.schema import STATUS_RUNNING
from .source import Source

_logger = logging.getLogger("otel_cmbagent.viewer")

# how far back (by row timestamp) the poller looks for activity; a full scan of run ids runs every
# FULL_SCAN_SECONDS as a safety net for rows whose timestamps fall outside the window (clock skew)
RECENT_WINDOW = timedelta(minutes=10)
FULL_SCAN_SECONDS = 15.0
RECENT_SCAN_COST_RATIO = 20  # the scan for recent rows takes at most ~1/20 of the poller's time (see _maxima)
GAP_TTL_SECONDS = 30.0
LIVENESS_SECONDS = 2.0  # how often the writers of running rows are checked (a killed process: "interrupted")
MAX_GAPS = 2_000
_CHUNK = 500

Change = tuple[str, dict[str, Any]]  # (run key, decoded row)


class _RunState:
    __slots__ = ("max_order", "gaps")

    def __init__(self, max_order: int) -> None:
        self.max_order = max_order
        self.gaps: dict[int, float] = {}  # missing order -> when it was first missed (monotonic)


class Poller:
    """Finds new and changed rows since the previous poll (runs in a worker thread, one poll at a time).

    Per run: the highest ``execution_order`` seen and the orders missing below it (orders are gapless
    per run, so a missing one is a row still on its way: e.g. a message enqueued just after its
    neighbours); and every row last seen ``running``. Each poll reads the runs with recent rows
    (``timestamp`` index), fetches their rows above the known order or in a gap, and re-reads the
    running rows by id. The first poll only records the state.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.runs: dict[str, _RunState] = {}
        self.running: dict[str, str] = {}  # row id -> run key
        self.writers: dict[str, str] = {}  # running row id -> the process that wrote it
        self._last_liveness = 0.0
        self._last_full_scan = 0.0
        self._next_recent_scan = 0.0
        self._active: set[str] = set()  # run ids the last scan of recent rows found
        self.ready = False
        self.polls = 0
        self.broadcast_rows = 0

    def poll(self) -> list[Change]:
        try:
            engine = self.source.engine()
            shape = self.source.shape()
        except store.StoreError:
            return []
        monotonic = time.monotonic()
        self.polls += 1
        with engine.connect() as connection:
            maxima = self._maxima(connection, shape, monotonic)
            if not self.ready:
                self._first_poll(connection, shape, maxima)
                return []
            out = self._new_rows(connection, shape, maxima, monotonic)
            out.extend(self._finished(connection, shape, {row.get("id") for _k, row in out}))
        out.extend(self._interrupted(engine, shape.table, monotonic))
        self.broadcast_rows += len(out)
        return out

    def _maxima(self, connection: Any, shape: store.TableShape, monotonic: float) -> dict[str, int]:
        """The highest order of every run with recent rows (and, now and then, of every run).

        Finding the runs with recent rows reads every recent row: a live 100,000-event run makes that ~60 ms,
        which at every poll took a quarter of a core from everything else (opening that run in the page too).
        So it runs at most once per RECENT_SCAN_COST_RATIO times its own duration (every poll while it is
        cheap); in between, the runs it found active are asked for their highest order (one index lookup each).
        """
        c = shape.table.c
        if monotonic >= self._next_recent_scan:
            started = time.monotonic()
            maxima = self._recent(connection, shape)
            self._next_recent_scan = started + (time.monotonic() - started) * RECENT_SCAN_COST_RATIO
        else:
            maxima = {}
            for run_id in self._active:
                highest = connection.execute(sa.select(sa.func.max(c.execution_order)).where(c.run_id == run_id)).scalar()
                if highest is not None:
                    maxima[run_id] = highest
        if monotonic - self._last_full_scan >= FULL_SCAN_SECONDS:
            self._last_full_scan = monotonic
            full = sa.select(c.run_id, sa.func.max(c.execution_order)).where(c.run_id.is_not(None)).group_by(c.run_id)
            for k, m in connection.execute(full):
                if m is not None and m > maxima.get(k, -1):
                    maxima[k] = m
        return maxima

    def _recent(self, connection: Any, shape: store.TableShape) -> dict[str, int]:
        """The highest order of every run with rows in RECENT_WINDOW; remembers which of them are run ids."""
        c = shape.table.c
        key = shape.key.label("run_key")
        since = datetime.now(timezone.utc) - RECENT_WINDOW
        recent = sa.select(key, sa.func.max(c.execution_order), sa.func.max(c.run_id)).where(
            c.timestamp >= since).group_by(key)
        maxima, active = {}, set()
        for k, highest, run_id in connection.execute(recent):
            if k is not None and highest is not None:
                maxima[k] = highest
                if run_id == k:  # keyed by run id (a trace outside any run is only found by this scan)
                    active.add(k)
        self._active = active
        return maxima

    def _first_poll(self, connection: Any, shape: store.TableShape, maxima: dict[str, int]) -> None:
        for k, m in maxima.items():
            self.runs[k] = _RunState(m)
        if shape.has_status:
            for row in self.source.read(connection, sa.select(shape.table).where(shape.table.c.status == STATUS_RUNNING)):
                if run_key_of(row) is not None:
                    self._track(row, run_key_of(row))
        self.ready = True

    def _new_rows(self, connection: Any, shape: store.TableShape, maxima: dict[str, int], monotonic: float
                  ) -> list[Change]:
        out: list[Change] = []
        for k, highest in maxima.items():
            state = self.runs.setdefault(k, _RunState(0))
            for order, first in list(state.gaps.items()):
                if monotonic - first > GAP_TTL_SECONDS:
                    del state.gaps[order]  # a row that never came (dropped by a full queue, skipped)
            if highest <= state.max_order and not state.gaps:
                continue
            wanted = shape.table.c.execution_order > state.max_order
            if state.gaps:
                wanted = sa.or_(wanted, shape.table.c.execution_order.in_(sorted(state.gaps)))
            rows = self.source.read(connection, shape.ordered(sa.select(shape.table).where(shape.where_run(k), wanted)))
            self._note_orders(state, rows, monotonic)
            for row in rows:
                self._track(row, k)
                out.append((k, row))
        return out

    @staticmethod
    def _note_orders(state: _RunState, rows: list[dict[str, Any]], monotonic: float) -> None:
        """Advance the run's highest order; orders skipped below it are gaps (rows still on their way)."""
        seen = {row.get("execution_order") for row in rows}
        top = max((o for o in seen if isinstance(o, int)), default=state.max_order)
        if top > state.max_order:
            missing = set(range(state.max_order + 1, top)) - seen
            if len(state.gaps) + len(missing) <= MAX_GAPS:
                for order in missing:
                    state.gaps[order] = monotonic
            state.max_order = top
        for order in seen:
            state.gaps.pop(order, None)

    def _finished(self, connection: Any, shape: store.TableShape, fresh: set[Any]) -> list[Change]:
        """Rows last seen running that are final now (re-read by id)."""
        if not self.running or not shape.has_status:
            return []
        ids = [row_id for row_id in self.running if row_id not in fresh]
        finished: list[Change] = []
        for start in range(0, len(ids), _CHUNK):
            statement = sa.select(shape.table).where(shape.table.c.id.in_(ids[start:start + _CHUNK]),
                                                     shape.table.c.status != STATUS_RUNNING)
            for row in self.source.read(connection, statement):
                k = self.running.get(row["id"])
                if k is not None:
                    self._track(row, k)
                    finished.append((k, row))
        finished.sort(key=lambda item: (item[0], item[1].get("execution_order") or 0))
        return finished

    def _track(self, row: Mapping[str, Any], run_key: str) -> None:
        """Remember a running row (and its writer), forget a final one."""
        if row.get("status") == STATUS_RUNNING:
            self.running[row["id"]] = run_key
            meta = row.get("meta")
            writer = meta.get(writers.WRITER_KEY) if isinstance(meta, dict) else None
            if isinstance(writer, str):
                self.writers[row["id"]] = writer
        else:
            self.running.pop(row["id"], None)
            self.writers.pop(row["id"], None)

    def _interrupted(self, engine: Engine, table: sa.Table, monotonic: float) -> list[Change]:
        """Every LIVENESS_SECONDS: the running rows whose writer is gone (killed), as ``interrupted`` rows."""
        if not self.writers or monotonic - self._last_liveness < LIVENESS_SECONDS:
            return []
        self._last_liveness = monotonic
        gone = writers.gone(engine, set(self.writers.values()))
        ids = [row_id for row_id, writer in self.writers.items() if writer in gone]
        if not ids:
            return []
        with engine.connect() as connection:
            statement = sa.select(table).where(table.c.id.in_(ids[:_CHUNK]), table.c.status == STATUS_RUNNING)
            rows = self.source.read(connection, statement)
        out = []
        for row in store.mark_interrupted(engine, rows, table=table):
            k = self.running.get(row["id"])
            if k is not None and row.get("status") != STATUS_RUNNING:
                self._track(row, k)
                out.append((k, row))
        return out


class Feed:
    """Polls in the background (on the server's loop) and broadcasts each change as an envelope on ``hub``."""

    def __init__(self, source: Source, poll_interval: float, hub: Hub) -> None:
        self.poller = Poller(source)
        self.poll_interval = poll_interval
        self.hub = hub
        self._task: asyncio.Task | None = None

    @property
    def dropped_clients(self) -> int:
        return self.hub.dropped_clients

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="otel-cmbagent-viewer-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                changes = await run_in_threadpool(self.poller.poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad poll (database busy, server down) is retried
                _logger.warning("otel-cmbagent viewer: polling the event table failed: %s: %s", type(exc).__name__, exc)
                changes = []
            if changes and self.hub.clients:
                self.hub.publish(dumps(envelope(event_data(row, every_column=True, run_key=k))) for k, row in changes)
            await asyncio.sleep(max(0.02, self.poll_interval - (time.monotonic() - started)))
