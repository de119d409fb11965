"""The agent thread's cost per span with every sink on, against a bare SDK span (issue 14 item 3).

Run:  .venv/ag2/bin/python benchmarks/bench_hot_path.py   (--quick: smoke run; --profile: cProfile; --parts: each
      processor's cost in place)

Each cell: ``threads`` threads each start and end spans (a tool-call span with five attributes, under a
per-thread parent) as fast as they can; µs/span = wall time of the loop / spans. Configurations:
  bare SDK   a ``TracerProvider`` without processors (what a span costs at all);
  SDK+OTLP   the SDK's own ``BatchSpanProcessor(OTLPSpanExporter)`` (what plain OTel tracing to a collector costs);
  ours       ``setup_tracing(sql_url=<SQLite file>, otlp=True)``: the sequencer (which keeps open spans), the SQL
             sink (live running rows) and our OTLP processor, inside ``oc.run()``.
OTLP goes over HTTP/protobuf to a loopback receiver in a child process (decoding there, off this GIL). Every
cell is flushed (rows written, spans exported) before the next one starts, so no sink's backlog spills into
another cell; the writer and exporter threads do run during the loop and share the GIL with the agent threads:
that is part of what the agent pays. "agent CPU" is the emitting threads' own CPU time (``time.thread_time``)
per span. Cells are interleaved and each keeps its best of ``--repeats``; "med Δ" is the median of each repeat's own
ours - bare (adjacent cells: drift between repeats cancels). Timings are printed, never asserted.

Two rhythms: a burst (spans as fast as a loop can make them: the sinks fall behind, their queues hold thousands
of spans, and the garbage collector walks them — the worst case) and an agent's pace (a few spans, then a
wait as for an LLM call: the sinks keep up). The "gc" column says how much of the agent threads' CPU went to the
collector, so the two costs can be told apart.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import gc
import io
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import otel_cmbagent as oc
from otel_cmbagent.pipeline import context as oc_context
from otel_cmbagent.exporters.otlp import make_otlp_exporter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sinks import ATTRIBUTES, child_receiver  # noqa: E402 - the same span and receiver as the sink benchmark

TARGET_US = 20.0
CONFIGS = ("bare SDK", "SDK+OTLP", "ours")


class GCClock:
    """CPU time the emitting threads spend in the cyclic garbage collector (its callbacks run in the thread that
    triggered the collection): how much of a burst's cost is the collector walking the sinks' queued spans."""

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.seconds = 0.0
        self._started = threading.local()

    def __call__(self, phase: str, _info: dict) -> None:
        if threading.get_ident() not in self.threads:
            return
        if phase == "start":
            self._started.at = time.thread_time()
        elif getattr(self._started, "at", None) is not None:
            self.seconds += time.thread_time() - self._started.at
            self._started.at = None

    def __enter__(self) -> "GCClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self)


# --parts: "ours" with only some of its processors (by class), each part's cost in place
PART_PROCESSORS = ("SequencingSpanProcessor", "SQLEventSink", "CountingBatchSpanProcessor")
PARTS = {"+ sequencer": 1, "+ SQL sink": 2, "+ OTLP = ours": 3}  # how many of them (the sequencer keeps open spans)


def _build(config: str, folder: str, endpoint: str) -> tuple[TracerProvider, object | None]:
    """The provider of a configuration, and what to shut down after the cell."""
    if config == "bare SDK":
        return TracerProvider(), None
    if config == "SDK+OTLP":
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(make_otlp_exporter("http/protobuf", endpoint)))
        return provider, None
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{folder}/hot.sqlite", otlp=True, instrument=False,
                               set_global=False, handle_sigterm=False)
    if config in PARTS:  # the SDK's own list of processors, cut (all of them still shut down with ``tracing``)
        active = tracing.tracer_provider._active_span_processor
        kept = PART_PROCESSORS[:PARTS[config]]
        active._span_processors = tuple(p for p in active._span_processors if type(p).__name__ in kept)
        assert len(active._span_processors) == PARTS[config], active._span_processors
    return tracing.tracer_provider, tracing


def _cell(config: str, threads: int, total: int, folder: str, endpoint: str,
          profile: cProfile.Profile | None = None, pace: int = 0) -> tuple[float, float, float]:
    """(wall µs, agent-thread CPU µs, of it in the garbage collector µs) per span.

    ``pace``: 0 = a burst; n = the agent's rhythm, ``n`` spans then a 5 ms wait (an LLM call takes far longer),
    so the sinks keep up (its wall time includes the waits: only the CPU figures compare)."""
    provider, tracing = _build(config, folder, endpoint)
    tracer = provider.get_tracer("bench")
    per_thread = total // threads
    barrier = threading.Barrier(threads + 1)
    cpu: list[float] = []
    gc_clock = GCClock()

    def work() -> None:
        gc_clock.threads.add(threading.get_ident())
        with tracer.start_as_current_span("conversation"):
            barrier.wait()
            if profile is not None:
                profile.enable()
            started = time.thread_time()
            for index in range(per_thread):
                tracer.start_span("execute_tool add", attributes=ATTRIBUTES).end()
                if pace and index % pace == pace - 1:
                    time.sleep(0.005)
            cpu.append(time.thread_time() - started)
            if profile is not None:
                profile.disable()

    oc_context._TracerSource.provider = provider  # what oc.run uses (as oc.instrument(tracer_provider=...) sets)
    scope = oc.run(name="bench") if tracing is not None else contextlib.nullcontext()
    with scope:
        workers = [threading.Thread(target=oc.propagate_context(work)) for _ in range(threads)]
        gc.collect()
        with gc_clock:
            for worker in workers:
                worker.start()
            barrier.wait()
            start = time.perf_counter()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - start
    provider.force_flush(600_000)
    if tracing is not None:
        stats = tracing.stats
        tracing.shutdown()
        lost = stats["sql"]["dropped"] + stats["otlp"]["dropped"]
        if lost:
            print(f"    note: {config} at {threads} threads lost {lost} items")
    else:
        provider.shutdown()
    spans = per_thread * threads
    return elapsed / spans * 1e6, sum(cpu) / spans * 1e6, gc_clock.seconds / spans * 1e6


MODES = {"burst": 0, "paced": 10}  # spans between 5 ms waits (0: none)


def _paced_spans(total: int) -> int:
    return total // 2


def bench(total: int, repeats: int, thread_counts: tuple[int, ...]) -> None:
    best: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    # (mode, threads) -> ours - bare of each repeat (the two cells run one after the other: drift cancels)
    paired: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder, child_receiver("http") as (endpoint, _poll):
        for config in CONFIGS:  # warm-up: imports, first connections
            _cell(config, 1, total // 10, folder, endpoint)
        for _ in range(repeats):
            for mode, pace in MODES.items():
                spans = total if not pace else _paced_spans(total)
                for threads in thread_counts:
                    cpu: dict[str, float] = {}
                    for config in CONFIGS:
                        cell = _cell(config, threads, spans, folder, endpoint, pace=pace)
                        cpu[config] = cell[1]
                        kept = best.get((mode, config, threads))
                        best[mode, config, threads] = cell if kept is None or cell[1] < kept[1] else kept
                    paired.setdefault((mode, threads), []).append(cpu["ours"] - cpu["bare SDK"])
    print("Agent thread cost per span, µs (cpu = the emitting threads' own CPU time per span, garbage collection "
          f"included; gc = of it in the collector; wall = the loop's wall time / spans; best of {repeats}; "
          "med Δ = median over the repeats of each repeat's own ours - bare)")
    for mode, pace in MODES.items():
        what = (f"{total:,} spans per cell as fast as they go" if not pace else
                f"{_paced_spans(total):,} spans per cell, {pace} spans then a 5 ms wait (the sinks keep up)")
        print(f"\n{mode}: {what}")
        head = ("threads", "cpu bare", "cpu SDK+OTLP", "cpu ours", "Δ ours", "med Δ", "Δ of it gc", "wall bare",
                "wall SDK+OTLP", "wall ours", f"Δ≤+{TARGET_US:.0f}?")
        print("  " + "".join(f"{h:>14}" for h in head))
        for t in thread_counts:
            bare, sdk, ours = (best[mode, c, t] for c in CONFIGS)
            delta, median = ours[1] - bare[1], statistics.median(paired[mode, t])
            walls = (f"{bare[0]:.1f}", f"{sdk[0]:.1f}", f"{ours[0]:.1f}") if not pace else ("–",) * 3  # waits overlap
            cells = (t, f"{bare[1]:.1f}", f"{sdk[1]:.1f}", f"{ours[1]:.1f}", f"{delta:+.1f}", f"{median:+.1f}",
                     f"{ours[2] - bare[2]:+.1f}", *walls, "yes" if max(delta, median) <= TARGET_US else "NO")
            print("  " + "".join(f"{c:>14}" for c in cells))


def parts(total: int, repeats: int) -> None:
    """Each processor's cost where it runs (one thread): ``ours`` built up one processor at a time, every cell
    measured as the main table measures it. Warm micro-timings of each hook come out at a third to a half of
    these: in place, every part also pays for the memory it touches."""
    configs = ("bare SDK", *PARTS)
    best: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as folder, child_receiver("http") as (endpoint, _poll):
        for config in configs:
            _cell(config, 1, total // 10, folder, endpoint)
        for _ in range(repeats):
            for mode, pace in MODES.items():
                for config in configs:
                    cpu = _cell(config, 1, total if not pace else _paced_spans(total), folder, endpoint,
                                pace=pace)[1]
                    best[mode, config] = min(best.get((mode, config), float("inf")), cpu)
    print(f"Agent thread CPU per span, µs, one thread, best of {repeats}: ours built up one processor at a time "
          "(Δ = what that processor adds)")
    print("  " + f"{'':<8}" + "".join(f"{config:>22}" for config in configs))
    for mode in MODES:
        cells, previous = [], None
        for config in configs:
            cpu = best[mode, config]
            cells.append(f"{cpu:.1f}" + (f" (Δ {cpu - previous:+.1f})" if previous is not None else ""))
            previous = cpu
        print("  " + f"{mode:<8}" + "".join(f"{cell:>22}" for cell in cells))


def profile(total: int) -> None:
    """cProfile of the emitting thread only (ours, one thread): where the agent's time goes."""
    with tempfile.TemporaryDirectory() as folder, child_receiver("http") as (endpoint, _poll):
        _cell("ours", 1, total // 10, folder, endpoint)
        profiler = cProfile.Profile()
        _cell("ours", 1, total, folder, endpoint, profile=profiler)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 spans per cell, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="best of (default 5, --quick 1)")
    parser.add_argument("--profile", action="store_true", help="cProfile the emitting thread (ours, 1 thread)")
    parser.add_argument("--parts", action="store_true", help="each processor's cost in place (ours built up one "
                                                             "processor at a time, 1 thread)")
    args = parser.parse_args()
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    total = 2_000 if args.quick else 20_000
    if args.profile:
        profile(total)
        return
    print(f"otel-cmbagent hot path (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    if args.parts:
        parts(total, args.repeats or (1 if args.quick else 5))
        return
    bench(total, args.repeats or (1 if args.quick else 5), (1, 2, 8))


if __name__ == "__main__":
    main()
