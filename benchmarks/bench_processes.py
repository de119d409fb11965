"""What a run spread over processes costs: the cross-process order next to the single-process path.

Run:  .venv/ag2/bin/python benchmarks/bench_processes.py           (make bench runs it too)
      .venv/ag2/bin/python benchmarks/bench_processes.py --quick   (smoke run)

Every ratio is against the in-process counter measured in the same run; timings are printed, never asserted.

1. One number: ``OrderSequence.next()`` of a run that never left its process (``itertools.count``), and of a
   run whose order was handed over (``share``) to the file counter (mapped 8 bytes under ``flock``) and to
   the database counter (``UPDATE ... RETURNING`` on SQLite and on a throwaway PostgreSQL on loopback);
   alone, and with a second process taking numbers of the same run at the same time.
2. One span, end to end (SDK + ``SequencingSpanProcessor`` + ``SimpleSpanProcessor(InMemorySpanExporter)``,
   spans inside ``oc.run``): the same four order sources.
3. One process-pool task (a no-op, 2 forked workers, warm): uninstrumented vs traced into SQLite (the
   carrier, the pickled context, the worker's flush of its rows before the result returns).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.pipeline import context as oc_context
from otel_cmbagent.pipeline.context import OrderSequence
from otel_cmbagent.pipeline.order_source import DatabaseCounter, FileCounter, OrderRef, open_counter
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the real services the tests use
from services.postgres import PostgresServer  # noqa: E402

Source = tuple[str, Callable[[str], object] | None]  # (label, make a shared counter for a key; None: in-process)


def _best(function: Callable[[], float], repeats: int) -> float:
    return min(function() for _ in range(repeats))


# --- 1. one number ------------------------------------------------------------------------------
def _take(sequence: OrderSequence, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        sequence.next()
    return (time.perf_counter() - start) / count * 1e6


def _rival(ref: OrderRef | None, count: int, ready: multiprocessing.Event, go: multiprocessing.Event) -> None:
    """Another process of the run taking ``count`` numbers from the same shared counter."""
    sequence = OrderSequence()
    if ref is not None:
        sequence.share(open_counter(ref))
    ready.set()
    go.wait()
    _take(sequence, count)


def _sequence(make: Callable[[str], object] | None, key: str) -> OrderSequence:
    sequence = OrderSequence()
    if make is not None:
        sequence.share(make(key))
    return sequence


def _numbers(sources: list[Source], count: int, repeats: int) -> None:
    print(f"1. One order number, µs (best of {repeats}; {count:,} numbers per cell)")
    print(f"  {'order source':<34}{'alone':>10}{'×':>8}{'2 processes':>14}{'×':>8}")
    context = multiprocessing.get_context("fork")
    base_alone = base_pair = 0.0
    for index, (label, make) in enumerate(sources):
        alone = _best(lambda: _take(_sequence(make, f"bench-{label}-{time.perf_counter_ns()}"), count), repeats)

        def contended() -> float:
            sequence = _sequence(make, f"bench-pair-{label}-{time.perf_counter_ns()}")
            ref = sequence.shared.ref() if sequence.shared is not None else None
            ready, go = context.Event(), context.Event()
            rival = context.Process(target=_rival, args=(ref, count, ready, go))
            rival.start()
            ready.wait()
            go.set()
            took = _take(sequence, count)
            rival.join()
            return took

        pair = _best(contended, repeats)
        if index == 0:
            base_alone, base_pair = alone, pair
        print(f"  {label:<34}{alone:>10.3f}{alone / base_alone:>8.1f}{pair:>14.3f}{pair / base_pair:>8.1f}")
    print("  (2 processes: this process's cost per number while another process of the run takes as many)\n")


# --- 2. one span ------------------------------------------------------------------------------
def _span_cost(make: Callable[[str], object] | None, count: int) -> tuple[float, float]:
    """(wall µs, this thread's CPU µs) per span."""
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    with _tracer_source(provider), oc.run(name="bench") as run:
        if make is not None:
            oc_context.sequence_for_run(run.run_id).share(make(f"bench-span-{run.run_id}"))
        with tracer.start_as_current_span("parent"), _no_gc():  # the exporter's growing list is not per-span cost
            start, cpu_start = time.perf_counter(), time.thread_time()
            for _ in range(count):
                tracer.start_span("child").end()
            elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    provider.shutdown()
    return elapsed / count * 1e6, cpu / count * 1e6


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def _tracer_source(provider: TracerProvider) -> Iterator[None]:
    previous, oc_context._TracerSource.provider = oc_context._TracerSource.provider, provider
    try:
        yield
    finally:
        oc_context._TracerSource.provider = previous


def _spans(sources: list[Source], count: int, repeats: int) -> None:
    print(f"2. One span end to end, µs (SDK + our processor + in-memory exporter; best of {repeats}, {count:,} spans;"
          " cpu = this thread's CPU time, steadier on a shared machine; a database's own work is not in it)")
    print(f"  {'order source':<34}{'wall':>9}{'Δ':>8}{'×':>7}{'cpu':>9}{'Δ':>8}{'×':>7}")
    wall = {label: float("inf") for label, _ in sources}
    cpu = dict(wall)
    for _ in range(repeats):  # interleaved
        for label, make in sources:
            took, used = _span_cost(make, count)
            wall[label], cpu[label] = min(wall[label], took), min(cpu[label], used)
    base, base_cpu = wall[sources[0][0]], cpu[sources[0][0]]
    for label, _ in sources:
        print(f"  {label:<34}{wall[label]:>9.2f}{wall[label] - base:>+8.2f}{wall[label] / base:>7.2f}"
              f"{cpu[label]:>9.2f}{cpu[label] - base_cpu:>+8.2f}{cpu[label] / base_cpu:>7.2f}")
    print()


# --- 3. one pool task -----------------------------------------------------------------------------
def _noop(value: int) -> int:
    return value


def _pool_task_ms(tasks: int) -> float:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_noop, range(4)))  # warm: workers started (and set up) before timing
        start = time.perf_counter()
        for index in range(tasks):
            pool.submit(_noop, index).result()
        return (time.perf_counter() - start) / tasks * 1e3


def _pool(tasks: int, repeats: int, tmp: str) -> None:
    plain = _best(lambda: _pool_task_ms(tasks), repeats)
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{tmp}/pool.db", otlp=False, set_global=False, handle_sigterm=False)
    try:
        with oc.run(name="pool"):
            traced = _best(lambda: _pool_task_ms(tasks), repeats)
    finally:
        tracing.shutdown()
    print(f"3. One process-pool task, ms (submit + result of a no-op, one at a time; best of {repeats}, {tasks} tasks)")
    print(f"  uninstrumented {plain:.3f}   traced into SQLite {traced:.3f}   Δ {traced - plain:+.3f} ms   "
          f"×{traced / plain:.2f}")
    print("  (the traced task carries the context and flushes the worker's providers before returning)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL cells")
    args = parser.parse_args()
    count, spans, repeats, tasks = (2_000, 2_000, 2, 50) if args.quick else (50_000, 10_000, 5, 300)
    db_count = count // 10
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        files = itertools.count()
        sources: list[Source] = [
            ("in-process (run never left)", None),
            ("shared file (flock + mmap)", lambda key: FileCounter(os.path.join(tmp, f"order-{next(files)}"), key)),
        ]
        sqlite_url = f"sqlite:///{tmp}/order.db"
        db_sources: list[Source] = [("database: SQLite file", lambda key: DatabaseCounter(sqlite_url, key))]
        if not args.no_postgres:
            try:
                server = PostgresServer().start()
                server.wait_ready()
                stack.callback(server.stop)
                db_sources.append(("database: PostgreSQL (loopback)", lambda key: DatabaseCounter(server.url, key)))
            except RuntimeError as exc:
                print(f"PostgreSQL cells skipped ({exc})")
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
        _numbers(sources, count, repeats)
        _numbers(sources[:1] + db_sources, db_count, repeats)
        _spans(sources, spans, repeats)
        _spans(sources[:1] + db_sources, db_count, repeats)
        _pool(tasks, repeats, tmp)


if __name__ == "__main__":
    main()
