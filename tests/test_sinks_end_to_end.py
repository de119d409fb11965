"""One scripted AG2 run through setup_tracing() into SQLite, PostgreSQL, OTLP over the wire and a callback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

import otel_cmbagent as oc
from otel_cmbagent.table.rows import event_id
from otel_cmbagent.table.schema import is_message, row_kind
from otel_cmbagent.exporters.sql import SQLEventSink, make_engine, replay
from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver
from cmbagent_schema import add_run, cmbagent_engine, rows_of
import cmbagent_schema as cmb
from sinks_util import PausedRun, scripted_run, table_rows

from conftest import FAKE_KEY

CONTENT_KEYS = {"gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.output.messages"}


def _otlp_env(monkeypatch, receiver, protocol):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.removesuffix("/v1/traces"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def test_same_events_everywhere(tmp_path, postgres_url, scripted_llm, monkeypatch):
    """SQLite, PostgreSQL, OTLP/HTTP and the callback see the same events, orders and parent links."""
    received: list[dict] = []
    with OTLPHTTPReceiver() as receiver:
        _otlp_env(monkeypatch, receiver, "http/protobuf")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "cmbagent-e2e")
        tracing = oc.setup_tracing(
            sql_url=f"sqlite:///{tmp_path / 'e.db'}",
            ws_callback=lambda event_type, data: received.append(data),
            set_global=False,
            handle_sigterm=False,
        )
        assert tracing.otlp is not None, "OTLP turns on when the endpoint variable is set"
        postgres_sink = SQLEventSink(postgres_url)
        tracing.tracer_provider.add_span_processor(postgres_sink)
        run = scripted_run(scripted_llm)
        tracing.shutdown()
        otlp_spans = receiver.spans
    sqlite_rows = table_rows(tracing.sql.engine)
    postgres_rows = table_rows(postgres_sink.engine)

    def shape(rows):
        return sorted((r["id"], r["execution_order"], r["parent_event_id"], r["event_type"], r["status"]) for r in rows)

    assert shape(sqlite_rows) == shape(postgres_rows)
    assert [r["execution_order"] for r in sqlite_rows] == list(range(1, len(sqlite_rows) + 1))
    assert {r["run_id"] for r in sqlite_rows} == {run.run_id}

    span_rows = {r["id"]: r for r in sqlite_rows if not is_message(r)}
    assert len(otlp_spans) == len(span_rows)
    for span in otlp_spans:
        row = span_rows[event_id(int(span["trace_id"], 16), int(span["span_id"], 16))]
        assert span["attributes"]["cmbagent.execution_order"] == row["execution_order"]
        parent = event_id(int(span["trace_id"], 16), int(span["parent_span_id"], 16)) if span["parent_span_id"] else None
        assert parent == row["parent_event_id"]
        assert span["resource"]["service.name"] == "cmbagent-e2e"
        assert not CONTENT_KEYS & set(span["attributes"]), "OTLP carries no content unless enabled"
        assert span["name"] == json.loads(row["meta"])["span_name"] if isinstance(row["meta"], str) else row["meta"]["span_name"]

    finals = {d["event_id"]: d for d in received if d["status"] != "running"}
    assert {(i, r["execution_order"]) for i, r in ((r["id"], r) for r in sqlite_rows)} == {
        (i, d["execution_order"]) for i, d in finals.items()
    }
    starts = [d for d in received if d["status"] == "running"]
    assert len(starts) == len(span_rows), "the callback sees every span start"
    everything = json.dumps([sqlite_rows, postgres_rows, otlp_spans, received], default=str)
    assert FAKE_KEY not in everything


def test_otlp_grpc_with_content_enabled(scripted_llm, monkeypatch):
    """capture_content=True sends content over OTLP/gRPC too; parents survive the wire."""
    with OTLPGRPCReceiver() as receiver:
        _otlp_env(monkeypatch, receiver, "grpc")
        tracing = oc.setup_tracing(sql_url=None, capture_content=True, set_global=False, handle_sigterm=False)
        scripted_run(scripted_llm)
        tracing.shutdown()
        spans = receiver.spans
    (tool,) = [s for s in spans if s["name"] == "execute_tool add"]
    assert json.loads(tool["attributes"]["gen_ai.tool.call.arguments"])["a"] == 20
    by_id = {s["span_id"]: s for s in spans}
    assert by_id[tool["parent_span_id"]]["name"] == "invoke_agent user"
    assert FAKE_KEY not in json.dumps(spans, default=str)


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_dead_or_hung_otlp_endpoint_never_blocks_the_run(tmp_path, scripted_llm, monkeypatch, mode):
    """The run returns while the endpoint is down or hanging; failures are counted; SQL gets every event."""
    with OTLPHTTPReceiver(mode=mode) as receiver:
        _otlp_env(monkeypatch, receiver, "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        tracing = oc.setup_tracing(sql_url=f"sqlite:///{tmp_path / 'd.db'}", set_global=False, handle_sigterm=False)
        run = scripted_run(scripted_llm)
        assert run.span.end_time is not None  # the run finished with the sink failing/blocked
        tracing.sql.force_flush()
        tracing.otlp.force_flush()  # the export fails (503) or times out (hung endpoint)
        receiver.release()
        tracing.shutdown()
    assert tracing.stats["otlp"]["failed"] > 0, (tracing.stats, tracing.otlp)
    rows = table_rows(tracing.sql.engine)
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))


def test_postgres_stopped_mid_run_then_replayed(postgres_server, postgres_url, tracer_provider, scripted_llm, tmp_path):
    """PostgreSQL stops mid-run and comes back: after replay() every event is in the table exactly once."""
    spill = tmp_path / "pg.spill.jsonl"
    sink = SQLEventSink(postgres_url, spill_path=spill, max_retries=2, retry_backoff=0.05)
    tracer_provider.add_span_processor(sink)
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        with PausedRun(scripted_llm) as run:
            sink.force_flush()
            postgres_server.stop_server()
            run.release()
        sink.force_flush()
    finally:
        instrumentor.uninstrument()
        postgres_server.restart()
        postgres_server.wait_ready()
    assert sink.stats["rows_spilled"] > 0
    replay(spill, postgres_url)
    rows = table_rows(make_engine(postgres_url))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["status"] for r in rows} == {"completed"}
    sink.shutdown()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rows_land_in_cmbagents_own_table(backend, tmp_path, postgres_url, scripted_llm, caplog):
    """sql_table=cmbagent's execution_events (foreign keys on): rows land linked and ordered; a run whose
    workflow_runs row does not exist yet is held - one warning naming the table - and lands once it does."""
    url = f"sqlite:///{tmp_path / 'cmb.db'}" if backend == "sqlite" else postgres_url
    engine = cmbagent_engine(url)
    add_run(engine, "run-cmb", "session-cmb")
    tracing = oc.setup_tracing(
        sql_url=engine, sql_table=cmb.execution_events, spill_path=tmp_path / "cmb.spill.jsonl",
        set_global=False, handle_sigterm=False,
    )
    try:
        scripted_run(scripted_llm, run_id="run-cmb", session_id="session-cmb")
        with oc.run(run_id="run-created-late", session_id="session-cmb"):
            pass
        assert not tracing.sql.force_flush(), "rows are still waiting for their run"
        assert tracing.stats["sql"]["rows_held"] >= 1 and tracing.stats["sql"]["rows_spilled"] == 0
        assert not table_rows(engine, where="where run_id = 'run-created-late'")
        warnings = [r.getMessage() for r in caplog.records if "run-created-late" in r.getMessage()]
        assert len(warnings) == 1 and "workflow_runs" in warnings[0] and "Create that row" in warnings[0]
        add_run(engine, "run-created-late", "session-cmb", with_session=False)
        assert tracing.sql.force_flush()
    finally:
        tracing.shutdown()
    assert tracing.stats["sql"]["rows_held"] == 0 and tracing.stats["sql"]["rows_spilled"] == 0
    assert [r["event_type"] for r in table_rows(engine, where="where run_id = 'run-created-late'")] == ["run"]
    rows = table_rows(engine, where="where run_id = 'run-cmb'")
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    meta = rows[0]["meta"] if isinstance(rows[0]["meta"], dict) else json.loads(rows[0]["meta"])
    assert len(meta["trace_id"]) == 32 and len(meta["span_id"]) == 16
    assert {"run", "conversation", "agent_call", "llm_call", "tool_call", "message"} <= {row_kind(r) for r in rows}
    by_id = {r["id"]: r for r in rows}
    assert all(r["parent_event_id"] in by_id for r in rows[1:])
    # cmbagent's side tables: a messages row per message, a cost_records row per LLM call
    messages = [r for r in rows if is_message(r)]
    llm_calls = [r for r in rows if r["event_type"] == "llm_call"]
    assert sorted(m["event_id"] for m in rows_of(engine, cmb.messages)) == sorted(m["id"] for m in messages)
    costs = rows_of(engine, cmb.cost_records, run_id="run-cmb")
    assert len(costs) == len(llm_calls) == 3
    decoded = [r["meta"] if isinstance(r["meta"], dict) else json.loads(r["meta"]) for r in llm_calls]
    assert sum(c["total_tokens"] for c in costs) == sum(m["tokens"] for m in decoded) > 0


@pytest.mark.slow
def test_sigterm_flushes_every_sink(tmp_path):
    """A process that gets SIGTERM after a run has written every row (the exit hook flushes the sinks)."""
    db = tmp_path / "term.db"
    script = f"""
import sys, time
import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, text
from autogen import ConversableAgent
tracing = oc.setup_tracing(sql_url="sqlite:///{db}")
tracing.sql._worker.delay = tracing.sql._worker.max_delay = 300  # the worker sits on the rows: only SIGTERM's flush writes them
tracing.sql.force_flush()  # (the worker now idles with the long delay)
with ScriptedLLM([text("hi"), text("TERMINATE")]) as llm:
    a = ConversableAgent("a", llm_config=llm.llm_config())
    b = ConversableAgent("b", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    with oc.run(run_id="sigterm-run"):
        b.initiate_chat(a, message="hello", max_turns=1, silent=True)
print("ran", flush=True)
time.sleep(60)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # AG2 prints its own progress first
        if line.strip() == "ran":
            break
    else:
        pytest.fail("the traced run did not finish")
    assert not table_rows(make_engine(f"sqlite:///{db}"), where="where status = 'completed'"), "rows still queued"
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == -signal.SIGTERM
    rows = table_rows(make_engine(f"sqlite:///{db}"), where="where run_id = 'sigterm-run'")
    assert rows and {r["status"] for r in rows} == {"completed"}
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))


def test_setup_errors_are_clear(monkeypatch):
    """A non-callable callback or an unknown OTLP protocol fails at setup with a clear message."""
    with pytest.raises(TypeError, match="ws_callback"):
        oc.setup_tracing(sql_url=None, ws_callback="not callable", set_global=False, instrument=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="OTLP protocol"):
        oc.setup_tracing(sql_url=None, otlp=True, set_global=False, instrument=False)


def test_default_service_name(monkeypatch):
    """service.name: argument > OTEL_SERVICE_NAME > 'cmbagent'."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    t = oc.setup_tracing(sql_url=None, set_global=False, instrument=False)
    assert t.tracer_provider.resource.attributes["service.name"] == "cmbagent"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    t2 = oc.setup_tracing(sql_url=None, set_global=False, instrument=False)
    assert t2.tracer_provider.resource.attributes["service.name"] == "from-env"
    t3 = oc.setup_tracing("explicit", sql_url=None, set_global=False, instrument=False)
    assert t3.tracer_provider.resource.attributes["service.name"] == "explicit"
    for t_ in (t, t2, t3):
        t_.shutdown()


def test_shutting_down_an_old_setup_keeps_the_new_one_instrumented(scripted_llm):
    """A second setup_tracing() owns the patches: shutting the first one down does not uninstrument it."""
    first = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
    second = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
    try:
        first.shutdown()
        assert oc.AG2Instrumentor().is_instrumented_by_opentelemetry
        assert oc.AG2Instrumentor().tracer_provider is second.tracer_provider
    finally:
        second.shutdown()
    assert not oc.AG2Instrumentor().is_instrumented_by_opentelemetry
