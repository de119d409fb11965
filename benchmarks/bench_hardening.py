"""What the issue-10 hardening costs on the hot paths (figures for the README's reliability section).

Run:  .venv/ag2/bin/python benchmarks/bench_hardening.py   (--quick for a smoke run; printed, never asserted)

1. Noticing secrets set after setup: one ``notice_environment()`` call (a compare of ``os.environ`` with the
   copy taken at the last scan), per recorded value; and the cost of a rescan when a variable changed.
2. Recording a message (content -> message part -> JSON; values made storable and scrubbed before
   serialisation, cut after scrubbing) with 0 and 10 registered secrets; with ``--baseline-rev REV`` also
   with ``utils.py`` of that revision (which scrubbed the JSON text once), in the same run.
3. OTLP: ``prepare_span`` (strip content, make every string encodable) per span of a realistic attribute set,
   vs the OTLP protobuf encoding of the same span (which the exporter does anyway).
4. Viewer: one keep-alive ``GET /api/config`` on the socket created as TCP (TCP_NODELAY set on accepted
   connections) vs created with proto 0 (as before: no TCP_NODELAY).
5. SQL: values fitted to the table's columns (``TableFit.fit``) per row of a realistic batch, for an engine
   the sink made and a host's PostgreSQL engine, vs writing the row (``_TableWriter.write`` of 512-row batches
   into a SQLite file: mapping, fitting and the upsert); the SQLite file check per batch.
6. Tracking open spans (so SIGTERM can end them as interrupted): a span's start + end with and without the
   ``OpenSpans`` processor, next to the sequencer, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def best_per_call(fn: Callable[[], Any], calls: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` seconds per call."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def environment(calls: int) -> None:
    from otel_cmbagent import utils

    utils.notice_environment()
    steady = best_per_call(utils.notice_environment, calls)

    def changed() -> None:
        os.environ["BENCH_HARDENING_NOTE"] = str(time.perf_counter_ns())
        utils.notice_environment()

    rescan = best_per_call(changed, max(100, calls // 100))
    os.environ.pop("BENCH_HARDENING_NOTE", None)
    print(f"1. environment check: {steady * 1e6:.2f} µs per recorded value ({len(os.environ)} variables); "
          f"a rescan after a change: {rescan * 1e6:.1f} µs")


def _utils_at(revision: str) -> Any:
    """``otel_cmbagent/utils.py`` as it was at a git revision, loaded as a module of its own."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{revision}:otel_cmbagent/utils.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_utils.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _message_cost(module: Any, contents: list[str], repeat: int = 5) -> float:
    """Seconds per message: the content becomes a message part (jsonable), the parts are serialised (to_json),
    as ``messages.to_otel_message`` + ``to_json`` do; every message a distinct string."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for content in contents:
            module.to_json([{"type": "text", "content": module.jsonable(content, 16_384)}], 16_384)
        best = min(best, (time.perf_counter() - started) / len(contents))
    return best


def messages(count: int, baseline_revision: str | None) -> None:
    from otel_cmbagent import utils

    modules = {"this version": utils}
    if baseline_revision:
        modules[baseline_revision] = _utils_at(baseline_revision)
    prose = ("The fitted spectrum has a tilt of 0.965 ± 0.004; the residuals are flat. " * 3)[:200]
    code = ("def fit(x):\n    return np.polyfit(x, y, 3)\n" * 600)[:20_000]
    for label, base, n in (("200-char message", prose, count), ("20,000-char code (cut at 16,384)", code, count // 20)):
        contents = [f"{index:06d}{base}" for index in range(n)]
        for secrets in (0, 10):
            for module in modules.values():
                for index in range(secrets):
                    module.register_secret(f"bench-secret-{index:04d}-abcdefgh")
            cells = [f"{name} {_message_cost(module, contents) * 1e6:.1f} µs" for name, module in modules.items()]
            print(f"2. {label}, {secrets} registered secrets: " + ", ".join(cells))


def otlp(calls: int) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_cmbagent.exporters.otlp import prepare_span

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    attributes = {
        "gen_ai.operation.name": "execute_tool", "cmbagent.event_type": "tool_call", "gen_ai.tool.name": "fit",
        "cmbagent.run_id": "0f8b2c1e-5d7a-4b3c-9e2f-1a2b3c4d5e6f", "cmbagent.session_id": "sess-1",
        "cmbagent.execution_order": 42, "cmbagent.depth": 3, "gen_ai.agent.name": "engineer",
        "gen_ai.tool.call.arguments": json.dumps({"model": "lcdm", "ell_max": 2500}),
        "gen_ai.tool.call.result": "chi2/dof = 1.02 " * 20, "cmbagent.tool.success": True,
    }
    with provider.get_tracer("bench").start_as_current_span("execute_tool fit", attributes=attributes) as span:
        span.add_event("cmbagent.message", {"cmbagent.message.content": "done " * 40})
    (finished,) = memory.get_finished_spans()
    encode = best_per_call(lambda: encode_spans([finished]).SerializePartialToString(), calls // 10)
    for strip in (True, False):
        prepare = best_per_call(lambda: prepare_span(finished, strip_content=strip), calls // 10)
        policy = "content stripped (default)" if strip else "content kept"
        print(f"3. OTLP prepare_span, {policy}: {prepare * 1e6:.1f} µs per span; encoding it: "
              f"{encode * 1e6:.1f} µs (prepare / encode = {prepare / encode:.2f})")


def viewer(requests: int) -> None:
    import httpx

    from otel_cmbagent.viewer import app as viewer_app

    def bind_without_tcp(host: str, port: int) -> socket.socket:  # the previous _bind_socket
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        return sock

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        db = str(Path(folder) / "empty.db")
        for label, binder in (("created as TCP", viewer_app._bind_socket), ("proto 0 (before)", bind_without_tcp)):
            original = viewer_app._bind_socket
            viewer_app._bind_socket = binder
            try:
                with viewer_app.ViewerServer(db) as server, httpx.Client() as client:
                    url = server.url + "api/config"
                    client.get(url)
                    times = []
                    for _ in range(requests):
                        started = time.perf_counter()
                        client.get(url)
                        times.append(time.perf_counter() - started)
                results[label] = statistics.median(times)
            finally:
                viewer_app._bind_socket = original
    tcp, before = results["created as TCP"], results["proto 0 (before)"]
    print(f"4. viewer keep-alive GET, median of {requests}: {tcp * 1e3:.2f} ms with TCP_NODELAY, "
          f"{before * 1e3:.2f} ms without (×{before / tcp:.0f})")


def _span_rows(count: int) -> list[dict[str, Any]]:
    """Start and end rows of ``count`` realistic tool spans, as the SQL sink builds them."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_cmbagent.exporters.rows import span_row

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for index in range(count // 2):
        attributes = {
            "gen_ai.operation.name": "execute_tool", "cmbagent.event_type": "tool_call", "gen_ai.tool.name": "fit",
            "cmbagent.run_id": "0f8b2c1e-5d7a-4b3c-9e2f-1a2b3c4d5e6f", "cmbagent.session_id": "sess-1",
            "cmbagent.execution_order": index + 1, "cmbagent.depth": 3, "gen_ai.agent.name": "engineer",
            "gen_ai.tool.call.arguments": json.dumps({"model": "lcdm", "ell_max": 2500, "index": index}),
            "gen_ai.tool.call.result": "chi2/dof = 1.02 " * 20, "cmbagent.tool.success": True,
        }
        with tracer.start_as_current_span(f"execute_tool fit {index}", attributes=attributes):
            pass
    spans = memory.get_finished_spans()
    return [span_row(span, ended=ended) for span in spans for ended in (False, True)]


def sql_fitting(count: int) -> None:
    from otel_cmbagent.exporters.fit import TableFit
    from otel_cmbagent.exporters.sql import SQLEventSink, _TableWriter

    rows = _span_rows(count)
    with tempfile.TemporaryDirectory() as folder:
        sink = SQLEventSink(f"sqlite:///{Path(folder) / 'fit.db'}", heartbeat=False)
        writer = _TableWriter(sink.engine, sink.table)
        mapped = [writer.to_table(row) for row in rows]
        cells = []
        for label, dialect in (("an engine the sink made (SQLite; JSON made safe as it is serialised)",
                                sink.engine.dialect),
                               ("a host's PostgreSQL engine (lengths enforced, JSON checked here)", "postgresql")):
            fit = TableFit(sink.table, dialect, "meta")
            started = time.perf_counter()
            for row in mapped:
                fit.fit(row)
            cells.append(f"{label} {(time.perf_counter() - started) / len(mapped) * 1e6:.2f} µs")
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for start in range(0, len(rows), 512):
                writer.write(rows[start:start + 512])
            best = min(best, (time.perf_counter() - started) / len(rows))
        check = best_per_call(sink._file.check, 2_000)
        sink.shutdown()
    print(f"5. SQL value fitting per row: {', '.join(cells)}; writing a row (map + fit + upsert, 512-row batches, "
          f"SQLite): {best * 1e6:.1f} µs; the SQLite file check: {check * 1e6:.1f} µs per batch")


def open_span_tracking(spans: int) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    import otel_cmbagent as oc
    from otel_cmbagent.open_spans import OpenSpans

    cells = {}
    for label, processors in (("sequencer", [oc.SequencingSpanProcessor()]),
                              ("sequencer + OpenSpans", [oc.SequencingSpanProcessor(), OpenSpans()])):
        provider = TracerProvider()
        for processor in processors:
            provider.add_span_processor(processor)
        tracer = provider.get_tracer("bench")

        def span() -> None:
            with tracer.start_as_current_span("s"):
                pass

        cells[label] = best_per_call(span, spans)
    base, tracked = cells["sequencer"], cells["sequencer + OpenSpans"]
    print(f"6. a span's start + end: {base * 1e6:.1f} µs with the sequencer, {tracked * 1e6:.1f} µs with OpenSpans "
          f"too (+{(tracked - base) * 1e6:.2f} µs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--baseline-rev", default=None, metavar="REV",
                        help="also time message recording with otel_cmbagent/utils.py of this git revision")
    args = parser.parse_args()
    calls = 2_000 if args.quick else 100_000
    environment(calls)
    messages(calls // 20, args.baseline_rev)
    otlp(calls)
    viewer(10 if args.quick else 50)
    sql_fitting(2_048 if args.quick else 20_480)
    open_span_tracking(calls // 10)


if __name__ == "__main__":
    main()
