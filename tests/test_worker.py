"""The sinks' background worker (``exporters/worker.py``): when it takes a batch.

With ``max_delay`` it writes in the agent's quiet (no item for ``delay``), and in a busy stretch at the latest
``max_delay`` after the first item; without it, ``delay`` after the first item as before. Generous margins: the
assertions are about which rule took the batch, not about speed.
"""

from __future__ import annotations

import threading
import time

import pytest

from otel_cmbagent.exporters.sql import SQLEventSink
from otel_cmbagent.exporters.worker import BackgroundWorker


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[float, list[int]]] = []
        self.handled = threading.Event()

    def __call__(self, batch: list[int]) -> None:
        self.batches.append((time.monotonic(), list(batch)))
        self.handled.set()


def produce(worker: BackgroundWorker, seconds: float, every: float) -> list[float]:
    """Put an item every ``every`` seconds for ``seconds``; the times of the puts."""
    times, end, n = [], time.monotonic() + seconds, 0
    while time.monotonic() < end:
        worker.put(n)
        times.append(time.monotonic())
        n += 1
        time.sleep(every)
    return times


def test_a_quiet_queue_is_written_after_delay_not_max_delay():
    recorder = Recorder()
    worker = BackgroundWorker("test-quiet", recorder, delay=0.05, max_delay=30.0)
    try:
        worker.put(1)
        assert recorder.handled.wait(10), "one item and then quiet: written after the quiet delay, not max_delay"
        assert recorder.batches[0][1] == [1]
    finally:
        worker.shutdown()


def busy_stretch(seconds: float, **timing: float) -> tuple[int, list[list[int]]]:
    """An item every 10 ms for ``seconds``, then a flush: (batches taken while items kept coming, every batch)."""
    recorder = Recorder()
    worker = BackgroundWorker("test-busy", recorder, **timing)
    try:
        puts = produce(worker, seconds=seconds, every=0.01)
        assert worker.flush(10)
    finally:
        worker.shutdown()
    batches = [batch for _, batch in recorder.batches]
    assert sorted(item for batch in batches for item in batch) == list(range(len(puts)))
    return sum(taken < puts[-1] for taken, _ in recorder.batches), batches


def test_a_busy_stretch_is_gathered_into_few_batches_but_never_held_past_max_delay():
    during, batches = busy_stretch(2.4, delay=0.2, max_delay=0.8)
    # Every 0.2 s (the delay alone) would be ~12 batches while items keep coming; max_delay 0.8 s gives ~3.
    assert 1 <= during <= 6, [len(batch) for batch in batches]


def test_without_max_delay_a_batch_is_taken_after_delay_while_items_keep_coming():
    during, batches = busy_stretch(1.5, delay=0.05)
    assert during >= 6, [len(batch) for batch in batches]  # ~30 at full speed


def test_a_flush_does_not_wait_for_the_quiet():
    recorder = Recorder()
    worker = BackgroundWorker("test-flush", recorder, delay=30.0, max_delay=60.0)
    try:
        worker.put(1)
        assert worker.flush(10)
        assert [batch for _, batch in recorder.batches] == [[1]]
    finally:
        worker.shutdown()


def test_a_nudge_wakes_the_worker_only_while_its_queue_has_room(tmp_path):
    """``nudge`` (the SQL sink's "a span started") takes a batch after the quiet delay like an item; with the
    queue full it is not queued (the worker is busy anyway), and it never goes to the overflow file nor counts
    as dropped."""
    from otel_cmbagent.exporters.overflow import OverflowFile

    recorder = Recorder()
    worker = BackgroundWorker("test-nudge", recorder, delay=0.05, max_delay=30.0)
    try:
        worker.nudge("started")
        assert recorder.handled.wait(10), "a nudge alone wakes the worker"
        assert [batch for _, batch in recorder.batches] == [["started"]]
    finally:
        worker.shutdown()
    gate = threading.Event()
    full = BackgroundWorker("test-nudge-full", lambda batch: gate.wait(30), max_queue=2, delay=30.0, max_delay=60.0,
                            overflow=OverflowFile(tmp_path / "nudge.jsonl", lambda item: {"item": item},
                                                  lambda row: row["item"]))
    try:
        full.put(1)
        full.put(2)
        full.nudge("started")
        assert full.queued == 2 and full.stats.overflowed == 0 and full.stats.dropped == 0
        full.put(3)  # an item still goes on, to the overflow file
        assert full.stats.overflowed == 1
        full.nudge("started")
        assert full.stats.overflowed == 1 and full.queued == 2
    finally:
        gate.set()
        full.shutdown()


@pytest.mark.parametrize("delay, max_delay", [(0, 1.0), (-1, 1.0), (2.0, 1.0)])
def test_the_sql_sink_refuses_delays_that_cannot_hold(tmp_path, delay, max_delay):
    with pytest.raises(ValueError, match="delay"):
        SQLEventSink(f"sqlite:///{tmp_path / 'e.db'}", delay=delay, max_delay=max_delay)
