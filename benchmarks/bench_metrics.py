"""Cost of the other two signals: the MetricsSpanProcessor per span, and log correlation per log record.

Run:  .venv/ag2/bin/python benchmarks/bench_metrics.py [--quick]

Every figure is against a baseline measured in the same run; timings are printed, never asserted.

1. ``MetricsSpanProcessor.on_end`` alone, per ended span, by kind: an LLM call (two token points, a cost
   point, a duration point), a tool call, an agent turn, and a span it ignores (a handoff), recording into a
   MeterProvider whose periodic reader does not export during the loop (the SDK's aggregation is the cost).
2. The same, end to end: spans like an LLM call's (name, kind CLIENT, its attributes) started and ended on a
   provider with the sequencer and an in-memory exporter, without and with the metrics processor.
3. ``logger.warning`` to a formatted stream inside a span: a plain format with the standard record factory,
   and ``oc.LOG_FORMAT`` with ours (trace id, span id, run id on every record).
"""

from __future__ import annotations

import argparse
import io
import logging
import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import otel_cmbagent as oc
from otel_cmbagent.pipeline import logs as log_correlation
from otel_cmbagent.pipeline import semconv

KINDS = {
    "llm_call": {semconv.EVENT_TYPE: semconv.EVENT_LLM_CALL, semconv.GEN_AI_OPERATION_NAME: "chat",
                 semconv.GEN_AI_PROVIDER_NAME: "openai", semconv.GEN_AI_REQUEST_MODEL: "gpt-4o",
                 semconv.GEN_AI_RESPONSE_MODEL: "gpt-4o-2024-08-06", semconv.GEN_AI_USAGE_INPUT_TOKENS: 812,
                 semconv.GEN_AI_USAGE_OUTPUT_TOKENS: 96, semconv.GEN_AI_USAGE_COST: 0.0031},
    "tool_call": {semconv.EVENT_TYPE: semconv.EVENT_TOOL_CALL, semconv.GEN_AI_TOOL_NAME: "fit_spectrum"},
    "agent_call": {semconv.EVENT_TYPE: semconv.EVENT_AGENT_CALL, semconv.GEN_AI_AGENT_NAME: "engineer"},
    "ignored": {semconv.EVENT_TYPE: semconv.EVENT_HANDOFF},
}


def _ended_spans(attributes: dict, count: int) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for _ in range(count):
        tracer.start_span("span", attributes=attributes).end()
    return list(exporter.get_finished_spans())


def _best(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench_on_end(count: int, rounds: int) -> None:
    processor = oc.MetricsSpanProcessor(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    print(f"1. MetricsSpanProcessor.on_end per ended span (best of {rounds}, {count:,} spans)")
    for kind, attributes in KINDS.items():
        spans = _ended_spans(attributes, count)

        def loop(spans=spans) -> None:
            for span in spans:
                processor.on_end(span)

        def empty(spans=spans) -> None:
            for span in spans:
                pass

        cost = (_best(loop, rounds) - _best(empty, rounds)) / count * 1e6
        print(f"   {kind:<11} {cost:6.2f} µs")
    counter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("bench").create_counter("c")
    attributes = {semconv.GEN_AI_TOOL_NAME: "fit_spectrum", semconv.OUTCOME: semconv.OUTCOME_SUCCESS}

    def add() -> None:
        for _ in range(count):
            counter.add(1, attributes)

    print(f"   (the SDK alone: one Counter.add with two attributes {_best(add, rounds) / count * 1e6:.2f} µs)")


def _span_loop(provider: TracerProvider, count: int) -> None:
    tracer = provider.get_tracer("bench")
    with oc.run(name="bench"):
        for _ in range(count):
            tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=KINDS["llm_call"]).end()


def bench_end_to_end(count: int, rounds: int) -> None:
    timings = {}
    for with_metrics in (False, True):
        provider = TracerProvider()
        provider.add_span_processor(oc.SequencingSpanProcessor())
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        if with_metrics:
            provider.add_span_processor(oc.MetricsSpanProcessor(MeterProvider(metric_readers=[InMemoryMetricReader()])))
        oc.pipeline.context._TracerSource.provider = provider  # oc.run on this provider

        def loop(provider=provider, exporter=exporter) -> None:
            _span_loop(provider, count)
            exporter.clear()

        timings[with_metrics] = _best(loop, rounds) / (count + 1) * 1e6
    oc.pipeline.context._TracerSource.provider = None
    base, ours = timings[False], timings[True]
    print(f"2. LLM-call span, start to end, sequencer + in-memory exporter: {base:.2f} µs; "
          f"+ metrics {ours:.2f} µs (+{ours - base:.2f} µs, ×{ours / base:.2f})")


PLAIN_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def bench_log_records(count: int, rounds: int) -> None:
    logger = logging.getLogger("bench.metrics.logs")
    logger.propagate = False
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    tracer = TracerProvider().get_tracer("bench")

    def loop() -> None:
        with oc.run(name="logs"), tracer.start_as_current_span("tool"):
            for index in range(count):
                logger.warning("record %d", index)
        handler.stream.seek(0)
        handler.stream.truncate()

    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    base = _best(loop, rounds) / count * 1e6
    log_correlation.install_log_correlation("bench")
    handler.setFormatter(logging.Formatter(oc.LOG_FORMAT))
    try:
        ours = _best(loop, rounds) / count * 1e6
    finally:
        log_correlation.uninstall_log_correlation()
    print(f"3. logger.warning to a formatted stream inside a span: plain format {base:.2f} µs; correlated "
          f"(factory + LOG_FORMAT) {ours:.2f} µs (+{ours - base:.2f} µs, ×{ours / base:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (a few seconds)")
    quick = parser.parse_args().quick
    count, rounds = (2_000, 2) if quick else (20_000, 5)
    bench_on_end(count, rounds)
    bench_end_to_end(count, rounds)
    bench_log_records(count, rounds)


if __name__ == "__main__":
    main()
