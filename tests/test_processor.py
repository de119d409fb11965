"""SequencingSpanProcessor: gapless per-run order under threads, depth, identity, per-trace order, memory, fault isolation."""

from __future__ import annotations

import pytest

import gc
import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import context as otel_context
from opentelemetry import trace

import otel_cmbagent as oc
import otel_cmbagent.pipeline.context as oc_context
import otel_cmbagent.pipeline.processor as oc_processor
from otel_cmbagent.pipeline.values import log_internal_error

ORDER = "cmbagent.execution_order"
DEPTH = "cmbagent.depth"
RUN_ID = "cmbagent.run_id"
SESSION_ID = "cmbagent.session_id"
NODE_ID = "cmbagent.node_id"
STEP_ID = "cmbagent.step_id"

THREADS = 10
SPANS_PER_THREAD = 100


def _emit(tracer, thread_no: int, barrier: threading.Barrier) -> None:
    barrier.wait(timeout=60)  # all threads run at once: maximum contention on the run's counter
    for index in range(SPANS_PER_THREAD):
        attributes = {"test.thread": thread_no, "test.index": index, "test.ident": threading.get_ident()}
        with tracer.start_as_current_span(f"work {thread_no}.{index}", attributes=attributes):
            pass


def _assert_fanout(spans, run) -> None:
    assert len(spans) == 1 + THREADS * SPANS_PER_THREAD
    (run_span,) = [s for s in spans if s.attributes.get("cmbagent.event_type") == "run"]
    assert run_span.attributes[ORDER] == 1
    assert sorted(s.attributes[ORDER] for s in spans) == list(range(1, len(spans) + 1))

    workers = [s for s in spans if s is not run_span]
    assert len({s.attributes["test.ident"] for s in workers}) == THREADS
    per_thread: dict[int, list] = defaultdict(list)
    for span in workers:
        assert span.attributes[RUN_ID] == run.run_id
        assert span.attributes[SESSION_ID] == run.session_id
        assert span.context.trace_id == run_span.context.trace_id
        assert span.parent is not None and span.parent.span_id == run_span.context.span_id
        assert span.attributes[DEPTH] == 1
        per_thread[span.attributes["test.thread"]].append(span)
    for thread_spans in per_thread.values():
        orders = [s.attributes[ORDER] for s in sorted(thread_spans, key=lambda s: s.attributes["test.index"])]
        assert all(a < b for a, b in zip(orders, orders[1:])), "orders must increase in start order within a thread"


def test_thread_pool_fanout_orders_are_gapless_and_distinct(instrument_with_content, tracer_provider, memory_exporter):
    """10 ThreadPoolExecutor threads x 100 spans in one run get orders 1..1001, each once, increasing per thread."""
    tracer = tracer_provider.get_tracer("test")
    barrier = threading.Barrier(THREADS)
    with oc.run(name="fanout") as run:
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            for future in [pool.submit(_emit, tracer, n, barrier) for n in range(THREADS)]:
                future.result()
    _assert_fanout(memory_exporter.get_finished_spans(), run)


def test_raw_thread_fanout_with_propagate_context(tracer, memory_exporter):
    """10 plain threading.Threads (propagate_context) x 100 spans in one run get orders 1..1001, each once."""
    barrier = threading.Barrier(THREADS)
    with oc.run(name="fanout") as run:
        threads = [
            threading.Thread(target=oc.propagate_context(_emit), args=(tracer, n, barrier)) for n in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    _assert_fanout(memory_exporter.get_finished_spans(), run)


def test_orders_follow_start_order_in_one_thread(tracer, memory_exporter):
    """In one thread, orders are 1, 2, 3... in the order spans start (not the order they end)."""
    with oc.run():
        with tracer.start_as_current_span("a"):
            with tracer.start_as_current_span("b"):
                pass
        with tracer.start_as_current_span("c"):
            pass
    orders = {s.name: s.attributes[ORDER] for s in memory_exporter.get_finished_spans()}
    assert orders == {"invoke_workflow": 1, "a": 2, "b": 3, "c": 4}


def test_depth_counts_nesting_from_the_run(tracer, memory_exporter):
    """Depth is 0 for the run, 1 for its children, 2 for grandchildren (steps count as a level)."""
    with oc.run():
        with tracer.start_as_current_span("child"):
            with tracer.start_as_current_span("grandchild"):
                pass
        with oc.step(step_id="s1"):
            with tracer.start_as_current_span("in step"):
                pass
    depths = {s.name: s.attributes[DEPTH] for s in memory_exporter.get_finished_spans()}
    assert depths == {"invoke_workflow": 0, "child": 1, "grandchild": 2, "step s1": 1, "in step": 2}


def test_run_is_depth_zero_even_under_an_outer_span(tracer, memory_exporter):
    """A run opened under an ordinary span is still the root of its own depth count."""
    with tracer.start_as_current_span("outer"):
        with oc.run():
            with tracer.start_as_current_span("inner"):
                pass
    depths = {s.name: s.attributes[DEPTH] for s in memory_exporter.get_finished_spans()}
    assert depths == {"outer": 0, "invoke_workflow": 0, "inner": 1}


def test_identity_attributes_are_copied_to_every_span(tracer, memory_exporter):
    """run_id/session_id reach every span of the run; node_id/step_id only spans inside the step."""
    with oc.run(run_id="run-1", session_id="sess-1"):
        with tracer.start_as_current_span("before step"):
            pass
        with oc.step(node_id="node-A", step_id="step-3"):
            with tracer.start_as_current_span("in step"):
                pass
        with tracer.start_as_current_span("after step"):
            pass
    spans = {s.name: s.attributes for s in memory_exporter.get_finished_spans()}
    assert set(spans) == {"invoke_workflow", "before step", "step step-3", "in step", "after step"}
    for attributes in spans.values():
        assert attributes[RUN_ID] == "run-1"
        assert attributes[SESSION_ID] == "sess-1"
    for name in ("step step-3", "in step"):
        assert spans[name][NODE_ID] == "node-A"
        assert spans[name][STEP_ID] == "step-3"
    for name in ("invoke_workflow", "before step", "after step"):
        assert NODE_ID not in spans[name]
        assert STEP_ID not in spans[name]


def test_spans_without_a_run_are_ordered_per_trace(tracer, memory_exporter):
    """Without a run, each trace has its own order from 1, and no run identity is stamped."""
    baseline = oc_processor.open_trace_sequences()
    with tracer.start_as_current_span("a root"):
        with tracer.start_as_current_span("a child"):
            assert oc_processor.open_trace_sequences() == baseline + 1
        with tracer.start_as_current_span("a child 2"):
            pass
    with tracer.start_as_current_span("b root"):
        with tracer.start_as_current_span("b child"):
            pass
    spans = {s.name: s for s in memory_exporter.get_finished_spans()}
    assert {n: s.attributes[ORDER] for n, s in spans.items()} == {
        "a root": 1,
        "a child": 2,
        "a child 2": 3,
        "b root": 1,
        "b child": 2,
    }
    assert {n: s.attributes[DEPTH] for n, s in spans.items()} == {
        "a root": 0,
        "a child": 1,
        "a child 2": 1,
        "b root": 0,
        "b child": 1,
    }
    assert spans["a root"].context.trace_id != spans["b root"].context.trace_id
    assert all(RUN_ID not in s.attributes for s in spans.values())
    assert oc_processor.open_trace_sequences() == baseline


def test_interleaved_traces_without_a_run_keep_separate_counters(tracer, memory_exporter):
    """Two no-run traces open at once, with children started alternately, are each gapless from 1."""
    baseline = oc_processor.open_trace_sequences()
    root_a = tracer.start_span("a")
    root_b = tracer.start_span("b")
    assert oc_processor.open_trace_sequences() == baseline + 2
    for index in range(3):
        for label, root in (("a", root_a), ("b", root_b)):
            tracer.start_span(f"{label}{index}", context=trace.set_span_in_context(root)).end()
    root_a.end()
    root_b.end()
    orders: dict[str, list[int]] = defaultdict(list)
    for span in memory_exporter.get_finished_spans():
        orders[span.name[0]].append(span.attributes[ORDER])
    assert sorted(orders["a"]) == [1, 2, 3, 4]
    assert sorted(orders["b"]) == [1, 2, 3, 4]
    assert oc_processor.open_trace_sequences() == baseline


def test_late_span_in_a_no_run_trace_continues_the_order(tracer, memory_exporter):
    """A span started after its (no-run) parent ended still gets the next order of that trace, not 1 again."""
    with tracer.start_as_current_span("root"):
        captured = otel_context.get_current()
    with tracer.start_as_current_span("late", context=captured):
        pass
    orders = {s.name: s.attributes[ORDER] for s in memory_exporter.get_finished_spans()}
    assert orders == {"root": 1, "late": 2}


def test_late_span_in_a_run_continues_the_order(tracer, memory_exporter):
    """A span started with a run's context after the run ended continues that run's sequence."""
    with oc.run() as run:
        captured = otel_context.get_current()
    with tracer.start_as_current_span("late", context=captured):
        pass
    spans = {s.name: s.attributes for s in memory_exporter.get_finished_spans()}
    assert spans["late"][RUN_ID] == run.run_id
    assert spans["late"][ORDER] == 2


@pytest.mark.slow
def test_run_counters_are_released_after_many_runs(tracer, memory_exporter):
    """10,000 sequential runs (each with a child span) leave no per-run counters behind."""
    gc.collect()
    baseline_traces = oc_processor.open_trace_sequences()
    with oc.run():
        assert oc_context.live_run_count() >= 1
    for _ in range(10_000):
        with oc.run():
            with tracer.start_as_current_span("child"):
                pass
    gc.collect()
    assert oc_context.live_run_count() < 10
    assert oc_processor.open_trace_sequences() == baseline_traces
    assert len(memory_exporter.get_finished_spans()) == 1 + 20_000  # the probe run, then 10,000 runs x 2 spans


def test_trace_counters_are_released_after_no_run_traces_end(tracer, memory_exporter):
    """Per-trace counters of no-run traces are dropped once all their spans end."""
    baseline = oc_processor.open_trace_sequences()
    for _ in range(1_000):
        with tracer.start_as_current_span("root"):
            with tracer.start_as_current_span("child"):
                pass
    assert oc_processor.open_trace_sequences() == baseline
    assert len(memory_exporter.get_finished_spans()) == 2_000


class InjectedFault(RuntimeError):
    """Raised by a deliberately broken internal to check that hooks never fail the host."""


def test_hook_error_is_swallowed_and_logged_once(tracer, memory_exporter, monkeypatch, caplog):
    """A failing on_start never raises into the caller, is logged once for many spans, and spans still export."""

    def broken_identity(*args, **kwargs):
        raise InjectedFault("boom")

    monkeypatch.setattr(oc_processor, "_write_attributes", broken_identity)
    monkeypatch.setattr(log_internal_error, "_seen", set())  # forget kinds logged by earlier tests
    caplog.set_level(logging.WARNING, logger="otel_cmbagent")

    with oc.run():
        for index in range(50):
            with tracer.start_as_current_span(f"span {index}"):
                pass

    internal = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(internal) == 1
    assert internal[0].levelno == logging.WARNING
    assert "SequencingSpanProcessor.on_start" in internal[0].getMessage()
    spans = memory_exporter.get_finished_spans()
    assert len(spans) == 51
    assert all(ORDER not in s.attributes for s in spans if s.name.startswith("span "))


def test_the_sequencer_keeps_the_open_spans_registry_in_its_own_hooks():
    """``setup_tracing`` has the sequencer keep the registry of open spans (SIGTERM ends them; the SQL sink writes
    their running rows) rather than a processor of its own: a span is in it from its start, in whatever thread it
    ends, and out of it before any sink's ``on_end``."""
    from opentelemetry.sdk.trace import SpanProcessor

    tracing = oc.setup_tracing(sql_url=None, otlp=False, instrument=False, set_global=False, handle_sigterm=False)
    registry = tracing.open_spans
    active = tracing.tracer_provider._active_span_processor._span_processors
    assert type(active[0]) is oc.SequencingSpanProcessor and registry not in active
    seen_at_end = []

    class Sink(SpanProcessor):
        def on_end(self, span):
            seen_at_end.append(span.context.span_id in registry.spans)

    tracing.tracer_provider.add_span_processor(Sink())
    tracer = tracing.tracer_provider.get_tracer("registry")
    try:
        outer = tracer.start_span("outer")
        with trace.use_span(outer):
            inner = tracer.start_span("inner")
        assert set(registry.spans) == {outer.context.span_id, inner.context.span_id} and len(registry) == 2
        worker = threading.Thread(target=inner.end)
        worker.start()
        worker.join()
        assert set(registry.spans) == {outer.context.span_id}
        assert tracing.interrupt("test") == 1 and not registry.spans and not outer.is_recording()
        assert seen_at_end == [False, False]
    finally:
        tracing.shutdown()
