"""Sink throughput: SQL ``execution_events`` rows/s against cmbagent's legacy ORM path, and an OTLP burst.

Run:  make bench    (from the repo: .venv/ag2/bin/python benchmarks/bench_sinks.py; --quick: smoke run, seconds)
      --grpc: part 2 over OTLP/gRPC; --durable: SQLite synchronous=FULL (as cmbagent's own engine) and
      PostgreSQL with the server defaults (fsync on); by default both are tuned for speed.
Ratios are against baselines measured in the same run; timings are printed, never asserted.

1. SQLite (temp file) and PostgreSQL (a throwaway ``PostgresServer`` on loopback), one ``make_engine``
   engine per backend, a fresh table per path. legacy = cmbagent's EventCaptureManager pattern (ORM model
   with the execution_events columns, ``session.add(row); session.commit()`` per event; cmbagent's
   EventRepository also ran ``session.refresh(event)``, one more SELECT, not counted here); raw Core =
   executemany of prebuilt rows, 512-row transactions; writer only = prebuilt start+end rows into
   ``sink._writer.write``, 512 at a time; ours = spans in ``oc.run`` → ``SequencingSpanProcessor`` +
   ``SQLEventSink``, from the first span start until ``force_flush()`` returns (span creation included).
   rows/s = rows in the table at the end / elapsed; events/s = row writes submitted (2 per span for ours).
2. OTLP burst: spans started as fast as possible in one thread inside ``oc.run``, sequencer + OTLP
   exporter, then ``force_flush``: ``otlp_span_processor`` (our default queue) vs the SDK's default sizes
   (queue 2048, batch 512; drops counted). The receiver decodes every span into dicts: it runs in a
   child process (its CPU time is reported), off this process's GIL.
3. SQL burst (issue 14): ``setup_tracing(sql_url=...)`` with its defaults (queue 100,000 items), then 100,000
   spans of one run as fast as the tracer allows (200,002 queue items), ``force_flush()``: rows in the table,
   and the sink's ``stats`` (dropped must be 0; what the queue could not hold went to the overflow file and
   was written back: overflowed = drained). SQLite and PostgreSQL.
4. OTLP encoding: the spans of a scripted 50-turn two-agent chat (ours, content captured: ~25 attributes a
   span; as the sink's exporter gets them, made from its end records), encoded into one request by the SDK's
   ``encode_spans`` and by the sink's in-place encoder (``exporters/otlp_encoding.py``), serialised; best of 7,
   bytes checked identical (``--encoding-only``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from sqlalchemy import orm

import otel_cmbagent as oc
from otel_cmbagent.pipeline import context as oc_context
from otel_cmbagent.pipeline import semconv
from otel_cmbagent.exporters.otlp import (ContentPolicyExporter, CountingBatchSpanProcessor, make_otlp_exporter,
                                          otlp_span_processor)
from otel_cmbagent.table.rows import span_row
from otel_cmbagent.table.schema import EXECUTION_EVENT_COLUMNS
from otel_cmbagent.exporters.sql import SQLEventSink, execution_events_table, make_engine
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the real services the tests use
from services.postgres import PostgresServer  # noqa: E402

BATCH = 512
ATTRIBUTES = {semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_TOOL, semconv.EVENT_TYPE: semconv.EVENT_TOOL_CALL,
              semconv.GEN_AI_AGENT_NAME: "engineer", semconv.GEN_AI_TOOL_NAME: "add",
              semconv.GEN_AI_TOOL_CALL_ARGUMENTS: '{"a": 20, "b": 22}'}


class LegacyBase(orm.DeclarativeBase):
    pass


class LegacyExecutionEvent(LegacyBase):
    """cmbagent's ExecutionEvent model: the same columns (plus trace_id/span_id, left NULL here)."""

    __table__ = execution_events_table(LegacyBase.metadata, name="legacy_execution_events")


class RowCollector(SpanProcessor):
    """Keeps the rows the sink would queue (start and end, in order): the prebuilt input of the baselines."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_start(self, span, parent_context=None) -> None:
        self.rows.append(span_row(span, ended=False))

    def on_end(self, span) -> None:
        self.rows.append(span_row(span, ended=True))


def use_provider(*processors: SpanProcessor) -> TracerProvider:
    provider = TracerProvider()
    for processor in (oc.SequencingSpanProcessor(), *processors):
        provider.add_span_processor(processor)
    oc_context._TracerSource.provider = provider  # what oc.instrument(tracer_provider=...) sets; oc.run uses it
    return provider


def emit(provider: TracerProvider, n: int) -> float:
    """``n`` tool-call spans under one run span, as fast as possible; returns the seconds taken."""
    tracer = provider.get_tracer("bench")
    start = time.perf_counter()
    with oc.run(name="bench"):
        for _ in range(n):
            tracer.start_span("execute_tool add", attributes=ATTRIBUTES).end()
    return time.perf_counter() - start


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


# --- 1. SQL -------------------------------------------------------------------------------------
def bench_sql(label: str, engine: sa.Engine, n: int, n_legacy: int, spill: Path) -> None:
    collector = RowCollector()
    emit(use_provider(collector), n)
    prebuilt = collector.rows  # 2 rows per span (+ the run span's 2)
    final = [row for row in prebuilt if row["status"] != "running"]
    bare = emit(use_provider(), n)  # span creation with the sequencer alone, for reference
    LegacyBase.metadata.create_all(engine)  # also opens the pool's first connection outside any timing

    def legacy() -> None:
        with orm.Session(engine) as session:
            for row in final[:n_legacy]:
                session.add(LegacyExecutionEvent(**{key: row[key] for key in EXECUTION_EVENT_COLUMNS}))
                session.commit()

    results = [("legacy: ORM add+commit per event", LegacyExecutionEvent.__table__, timed(legacy), n_legacy)]
    core, only = (execution_events_table(sa.MetaData(), name=name) for name in ("core_events", "sink_only_events"))
    core.create(engine)
    only.create(engine)
    sink = SQLEventSink(engine, table=only, spill_path=spill)
    mapped = [sink._writer.to_table(row) for row in final]

    def raw_core() -> None:
        for i in range(0, len(mapped), BATCH):
            with engine.begin() as connection:
                connection.execute(core.insert(), mapped[i:i + BATCH])

    results.append(("raw Core executemany, 512-row txns", core, timed(raw_core), len(mapped)))
    upserts = []
    writer_only = timed(lambda: upserts.extend(sink._writer.write(prebuilt[i:i + BATCH])[0]  # (written, held)
                                               for i in range(0, len(prebuilt), BATCH)))
    results.append(("ours: sink writer only (prebuilt rows)", only, writer_only, len(prebuilt)))
    sink.shutdown()

    sink = SQLEventSink(engine, spill_path=spill)  # our default table, created by the sink
    provider = use_provider(sink)
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    created = emit(provider, n)
    flushed = provider.force_flush(600_000)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = sink.stats
    results.append(("ours: spans → sequencer → SQLEventSink", sink.table, elapsed, stats["enqueued"]))
    provider.shutdown()

    print(f"  {label}")
    legacy_rate = None
    for name, table, seconds, events in results:
        rows = count(engine, table)
        legacy_rate = legacy_rate or rows / seconds
        print(f"    {name:<40}{rows:>9,}{seconds:>10.3f}{rows / seconds:>11,.0f}{events / seconds:>11,.0f}"
              f"{rows / seconds / legacy_rate:>10.1f}×")
    ours = count(engine, sink.table) / elapsed / legacy_rate
    print(f"    ours: spans created in {created:.3f} s = {created / (n + 1) * 1e6:.0f} µs/span (sequencer alone "
          f"{bare / (n + 1) * 1e6:.0f}), flushed={flushed}, upserts executed {stats['rows_written']:,} (writer "
          f"only {sum(upserts):,}: start+end of a span in one batch coalesce)")
    print(f"          process CPU {cpu:.2f} s in {elapsed:.2f} s elapsed (the span thread and the writer share a GIL);"
          f" dropped {stats['dropped']}, spilled {stats['rows_spilled']}, failed {stats['failed']};"
          f" target ≥ 100× legacy: {'met' if ours >= 100 else 'MISSED'} ({ours:.1f}×)")


def run_sql(n: int, n_legacy: int, durable: bool) -> None:
    print(f"1. SQL execution_events: legacy {n_legacy:,} events, ours {n:,} spans (+1 run span); "
          "rows = rows in the table, events = row writes submitted")
    print(f"    {'path':<40}{'rows':>9}{'elapsed s':>10}{'rows/s':>11}{'events/s':>11}{'× legacy':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/bench.sqlite")
        if durable:  # after make_engine's pragmas: cmbagent's engine sets WAL only, so synchronous stays FULL
            sa.event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA synchronous=FULL"))
        spill = Path(tmp, "spill.jsonl")
        sync = "FULL" if durable else "NORMAL"
        bench_sql(f"SQLite (temp file; WAL, synchronous={sync})", engine, n, n_legacy, spill)
        engine.dispose()
        try:
            pg = PostgresServer(settings={} if durable else None).start()
        except RuntimeError as exc:
            print(f"  PostgreSQL: skipped ({exc})")
            return
        try:
            engine = make_engine(pg.url)
            with engine.connect() as connection:
                version, fsync = (connection.execute(sa.text(f"show {name}")).scalar_one().split()[0]
                                  for name in ("server_version", "fsync"))
            bench_sql(f"PostgreSQL {version} (loopback, fsync={fsync})", engine, n, n_legacy, spill)
            engine.dispose()
        finally:
            pg.stop()


# --- 3. SQL burst ---------------------------------------------------------------------------------
def bench_burst(label: str, url: str, n: int) -> None:
    tracing = oc.setup_tracing(sql_url=url, otlp=False, instrument=False, set_global=False, handle_sigterm=False)
    oc_context._TracerSource.provider = tracing.tracer_provider
    gc.collect()
    start = time.perf_counter()
    created = emit(tracing.tracer_provider, n)
    flushed = tracing.sql.force_flush(600_000)
    elapsed = time.perf_counter() - start
    stats = tracing.sql.stats
    tracing.shutdown()
    rows = count(tracing.sql.engine, tracing.sql.table)
    print(f"    {label:<34}{n:>9,}{created:>9.2f}{elapsed:>10.2f}{rows:>9,}{stats['dropped']:>9,}"
          f"{stats['overflowed']:>11,}{stats['drained']:>9,}{stats['rows_spilled']:>8,}  {'ok' if flushed else 'TIMEOUT'}"
          f"{'' if rows == n + 1 and not stats['dropped'] else '  ROWS MISSING'}")


def run_sql_burst(n: int) -> None:
    print(f"\n3. SQL burst: {n:,} spans of one run (+1 run span) as fast as the tracer allows, setup_tracing(sql_url=...)"
          " defaults, then force_flush()")
    print(f"    {'database':<34}{'spans':>9}{'create s':>9}{'elapsed s':>10}{'rows':>9}{'dropped':>9}{'overflowed':>11}"
          f"{'drained':>9}{'spilled':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        bench_burst("SQLite (temp file)", f"sqlite:///{tmp}/burst.sqlite", n)
        try:
            pg = PostgresServer().start()
        except RuntimeError as exc:
            print(f"    PostgreSQL: skipped ({exc})")
            return
        try:
            bench_burst("PostgreSQL (loopback)", pg.url, n)
        finally:
            pg.stop()
    print("    rows = rows in the table after force_flush (every span's row: spans + 1); overflowed = queue items the"
          " full queue sent to the overflow file; drained = of those, written back")


# --- 2. OTLP burst ------------------------------------------------------------------------------
def receiver_child(kind: str) -> None:
    """Child process: serve a receiver; answer each stdin line with 'spans received, CPU seconds'."""
    from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver

    receiver = (OTLPGRPCReceiver if kind == "grpc" else OTLPHTTPReceiver)().start()
    print(receiver.endpoint, flush=True)
    for _ in sys.stdin:
        print(len(receiver.spans), time.process_time(), flush=True)
    receiver.stop()


@contextlib.contextmanager
def child_receiver(kind: str):
    proc = subprocess.Popen([sys.executable, __file__, "--receiver-child", kind],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def poll() -> tuple[int, float]:
        proc.stdin.write("\n")
        proc.stdin.flush()
        spans, cpu = proc.stdout.readline().split()
        return int(spans), float(cpu)

    try:
        yield proc.stdout.readline().strip(), poll
    finally:
        proc.stdin.close()
        proc.wait(30)


def run_burst(n: int, protocol: str) -> None:
    kind = "grpc" if protocol == "grpc" else "http"
    print(f"\n2. OTLP burst: {n:,} spans (+1 run span) in one thread inside oc.run → OTLP {protocol} → "
          f"OTLP{kind.upper()}Receiver in a child process")
    print(f"    {'processor':<30}{'queue/batch':>13}{'create s':>9}{'elapsed s':>10}{'spans/s':>9}{'dropped':>9}"
          f"{'exported':>10}{'failed':>7}{'received':>10}{'rx CPU s':>9}{'our CPU s':>10}")
    configs = {
        "ours: otlp_span_processor()": lambda endpoint: otlp_span_processor(
            capture_content=True, protocol=protocol, endpoint=endpoint),
        "SDK default sizes": lambda endpoint: CountingBatchSpanProcessor(
            ContentPolicyExporter(make_otlp_exporter(protocol, endpoint), capture_content=True),
            max_queue_size=2048, max_export_batch_size=512),
    }
    for name, make in configs.items():
        with child_receiver(kind) as (endpoint, poll):
            processor = make(endpoint)
            provider = use_provider(processor)
            batch = processor._batch_processor
            _, rx_cpu = poll()
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            created = emit(provider, n)
            provider.force_flush(600_000)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            received, rx_cpu_end = poll()
            stats = processor.stats
            provider.shutdown()
        print(f"    {name:<30}{f'{batch._max_queue_size}/{batch._max_export_batch_size}':>13}{created:>9.2f}"
              f"{elapsed:>10.2f}{stats['exported'] / elapsed:>9,.0f}{stats['dropped']:>9,}{stats['exported']:>10,}"
              f"{stats['failed']:>7,}{received:>10,}{rx_cpu_end - rx_cpu:>9.2f}{cpu:>10.2f}")
    print("    spans/s = exported / elapsed (first span start → force_flush returned); target: 0 dropped for ours.\n"
          "    rx CPU ≈ elapsed would make the receiver the bottleneck; our CPU ≈ elapsed: this process (GIL) is.")


def run_encoding(turns: int) -> None:
    import os
    import timeit

    from autogen import ConversableAgent
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_cmbagent.exporters.otlp_encoding import encode_request, in_place_matches_sdk
    from otel_cmbagent.table.rows import SpanAtEnd
    from otel_cmbagent.testing.scripted_llm import ScriptedLLM, text

    memory = InMemorySpanExporter()
    provider = use_provider(SimpleSpanProcessor(memory))
    instrumentor = oc.instrument(tracer_provider=provider, capture_content=True)
    with ScriptedLLM(lambda request: text("The estimate converges; residuals stay below tolerance. ok")) as server:
        a, b = (ConversableAgent(name, llm_config=server.llm_config(price=[0, 0]), human_input_mode="NEVER")
                for name in "ab")
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), oc.run(name="encoding"):
            a.initiate_chat(b, message="Start the analysis. " * 3, max_turns=turns, silent=True)
    instrumentor.uninstrument()
    spans = [SpanAtEnd(span).readable() for span in memory.get_finished_spans()]  # as the sink's exporter gets them
    attributes = sum(len(span.attributes) for span in spans)
    same = encode_request(spans).SerializeToString() == encode_spans(spans).SerializeToString()

    def best(encode) -> float:
        return min(timeit.repeat(lambda: encode(spans).SerializePartialToString(), number=3, repeat=7)) / 3

    sdk, in_place = best(encode_spans), best(encode_request)
    print(f"\n4. OTLP encoding of a {turns}-turn chat's {len(spans)} spans ({attributes:,} attributes), one request:")
    print(f"    SDK encode_spans {sdk * 1e3:.2f} ms, in place {in_place * 1e3:.2f} ms (×{sdk / in_place:.2f} faster; "
          f"probe check {'passed' if in_place_matches_sdk() else 'FAILED: the SDK encoder is used'}; "
          f"bytes identical: {same})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 spans, 200 legacy rows, 10,000 burst")
    parser.add_argument("--grpc", action="store_true", help="OTLP burst over gRPC instead of HTTP/protobuf")
    parser.add_argument("--durable", action="store_true", help="SQLite synchronous=FULL, PostgreSQL fsync on")
    parser.add_argument("--burst-only", action="store_true", help="only part 3, the SQL burst")
    parser.add_argument("--encoding-only", action="store_true", help="only part 4, the OTLP encoding")
    parser.add_argument("--receiver-child", choices=("http", "grpc"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver_child:
        receiver_child(args.receiver_child)
        return
    # Drops and failures are counted and printed: the SDK's per-span "Queue full" warnings would flood stderr.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    logging.getLogger("otel_cmbagent").setLevel(logging.ERROR)
    n, n_legacy, n_burst = (2_000, 200, 10_000) if args.quick else (20_000, 2_000, 100_000)
    started = time.perf_counter()
    if args.burst_only:
        run_sql_burst(n_burst)
        return
    if args.encoding_only:
        run_encoding(4 if args.quick else 50)
        return
    print(f"otel-cmbagent sink throughput (python {sys.version.split()[0]}, SQLAlchemy {sa.__version__})\n")
    run_sql(n, n_legacy, args.durable)
    run_burst(n_burst, "grpc" if args.grpc else "http/protobuf")
    run_sql_burst(n_burst)
    run_encoding(4 if args.quick else 50)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
