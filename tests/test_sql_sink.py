"""The SQL event table sink on real SQLite: live rows, gapless order, idempotent upserts, spill and replay."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

import otel_cmbagent as oc
from otel_cmbagent.table.rows import event_id
from otel_cmbagent.table.schema import is_message, row_kind
from otel_cmbagent.exporters.sql import SQLEventSink, execution_events_table, make_engine, replay
from otel_cmbagent.exporters.table_writer import TableWriter
from sinks_util import PausedRun, scripted_run, table_rows

from conftest import FAKE_KEY


@pytest.fixture
def tracing(tmp_path):
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{tmp_path / 'events.db'}", set_global=False, handle_sigterm=False)
    yield tracing
    tracing.shutdown()


def test_rows_match_spans(tracing, scripted_llm):
    """Every span and message becomes one row; orders gapless per run; parents are the parent spans' rows."""
    run = scripted_run(scripted_llm)
    assert tracing.force_flush()
    rows = table_rows(tracing.sql.engine)
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["run_id"] for r in rows} == {run.run_id}
    assert {r["status"] for r in rows} == {"completed"}
    types = [row_kind(r) for r in rows]
    assert {"run", "conversation", "agent_call", "llm_call", "tool_call", "message"} <= set(types)
    ids = {r["id"] for r in rows}
    by_id = {r["id"]: r for r in rows}
    assert rows[0]["parent_event_id"] is None
    for row in rows[1:]:
        assert row["parent_event_id"] in ids
        assert row["depth"] == by_id[row["parent_event_id"]]["depth"] + 1
    (tool,) = [r for r in rows if r["event_type"] == "tool_call"]
    context_span = tool["span_id"]
    assert tool["id"] == event_id(int(tool["trace_id"], 16), int(context_span, 16))
    assert json.loads(tool["inputs"])["arguments"]["a"] == 20
    assert json.loads(tool["outputs"])["result"] == "42"
    assert tool["agent_name"] == "user" and tool["duration_ms"] is not None
    llm = [r for r in rows if r["event_type"] == "llm_call"]
    assert all(json.loads(r["meta"])["gen_ai.usage.output_tokens"] > 0 for r in llm)
    assert FAKE_KEY not in json.dumps(rows, default=str)
    assert tracing.stats["sql"]["dropped"] == 0


def test_rows_are_visible_while_the_run_is_live(tracing, scripted_llm):
    """A running run shows up at once: the run, conversation and tool rows are 'running' while the tool blocks."""
    with PausedRun(scripted_llm):
        assert tracing.force_flush()
        live = {r["event_type"]: r for r in table_rows(tracing.sql.engine) if r["status"] == "running"}
        assert {"run", "conversation", "agent_call", "tool_call"} <= set(live)
        messages = [r for r in table_rows(tracing.sql.engine) if is_message(r)]
        assert messages, "messages are written as they are sent, not when the conversation ends"
    tracing.force_flush()
    assert {r["status"] for r in table_rows(tracing.sql.engine)} == {"completed"}



def _bare_tracing():
    return oc.setup_tracing(sql_url=None, otlp=False, instrument=False, set_global=False, handle_sigterm=False)


def test_an_open_span_gets_its_running_row_from_the_writer_once(tmp_path):
    """A start copies nothing on the agent's thread: it wakes the writer, which reads the spans still open and
    writes their running rows within its delay - no flush asked; later batches do not write them again."""
    sink = SQLEventSink(f"sqlite:///{tmp_path / 'open.db'}", heartbeat=False, delay=0.02, max_delay=0.2)
    tracing = _bare_tracing()
    tracing.tracer_provider.add_span_processor(sink)
    tracer = tracing.tracer_provider.get_tracer("open")
    try:
        with oc.run(name="open"), tracer.start_as_current_span("long", attributes={"cmbagent.event_type": "tool_call"}):
            deadline = time.monotonic() + 30
            while sink.rows_written < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            (running,) = table_rows(sink.engine)
            assert (running["event_type"], running["status"]) == ("tool_call", "running")
            assert "cmbagent.writer" in json.loads(running["meta"])
            assert sink.force_flush()
            written = sink.rows_written
            for index in range(3):  # spans that start and end between two batches: one final row each
                tracer.start_span(f"quick {index}").end()
                assert sink.force_flush()
            assert sink.rows_written - written == 3, "the open spans' running rows were written again"
    finally:
        tracing.shutdown()
        sink.shutdown()
    rows = table_rows(sink.engine)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}


def test_children_that_end_first_are_written_after_their_parents(tmp_path):
    """Ends arrive children first; in one batch the rows go in start order (SQLite's rowid order shows it), so on
    cmbagent's table (foreign key on parent_event_id, enforced) no child row waits for, or loses, its parent -
    also where a batch is written row by row or split (other dialects, a refused row)."""
    import cmbagent_schema as cmb

    engine = cmb.cmbagent_engine(f"sqlite:///{tmp_path / 'nested.db'}")
    cmb.add_run(engine, "run-nested", "session-nested")
    sink = SQLEventSink(engine, table=cmb.execution_events, delay=60, max_delay=60)  # one batch: the flush
    tracing = _bare_tracing()
    tracing.tracer_provider.add_span_processor(sink)
    tracer = tracing.tracer_provider.get_tracer("nested")
    try:
        with oc.run(name="nested", run_id="run-nested", session_id="session-nested"):
            with tracer.start_as_current_span("a"), tracer.start_as_current_span("b"):
                with tracer.start_as_current_span("c"):
                    tracer.start_span("d").end()
        assert sink.force_flush()
    finally:
        tracing.shutdown()
        sink.shutdown()
    rows = cmb.history(engine, "run-nested")
    names = {r["id"]: r["meta"]["span_name"] for r in rows}
    parents = {r["meta"]["span_name"]: names.get(r["parent_event_id"]) for r in rows}
    assert parents == {"a": None, "b": "a", "c": "b", "d": "c"}, parents
    assert sink.stats["fk_nulled"] == 0 and sink.stats["rows_held"] == 0, sink.stats
    with engine.connect() as connection:
        inserted = connection.execute(sa.text("select id from execution_events order by rowid")).scalars().all()
    assert [names[row_id] for row_id in inserted] == ["a", "b", "c", "d"]



def test_replay_writes_a_file_of_ends_parents_first(tmp_path):
    """A dead process's overflow file holds ends as they came, children first; ``replay`` writes each batch in
    start order too, so on cmbagent's table no child row goes in before its parent."""
    import cmbagent_schema as cmb
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from otel_cmbagent.exporters.spill import append_rows
    from otel_cmbagent.table.rows import span_row

    engine = cmb.cmbagent_engine(f"sqlite:///{tmp_path / 'replayed.db'}")
    cmb.add_run(engine, "run-replayed", "session-replayed")
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("replayed")
    with oc.run(name="replayed", run_id="run-replayed", session_id="session-replayed"):
        with tracer.start_as_current_span("a"), tracer.start_as_current_span("b"):
            tracer.start_span("c").end()
    ends = memory.get_finished_spans()
    assert [span.name for span in ends] == ["c", "b", "a"]
    spill = tmp_path / "left.jsonl"
    append_rows(spill, [span_row(span, ended=True) for span in ends])
    assert replay(spill, engine, table=cmb.execution_events) == 3
    with engine.connect() as connection:
        inserted = connection.execute(sa.text("select meta from execution_events order by rowid")).scalars().all()
    assert [json.loads(meta)["span_name"] for meta in inserted] == ["a", "b", "c"]
    names = {r["id"]: r["meta"]["span_name"] for r in cmb.history(engine, "run-replayed")}
    assert {r["meta"]["span_name"]: names.get(r["parent_event_id"]) for r in cmb.history(engine, "run-replayed")} \
        == {"a": None, "b": "a", "c": "b"}


def test_rewrites_are_idempotent(tmp_path, tracer_provider, memory_exporter, monkeypatch):
    """The same spans written twice (a retry, a duplicate) leave one row each."""
    monkeypatch.setattr(oc.pipeline.context._TracerSource, "provider", tracer_provider)
    engine = make_engine(f"sqlite:///{tmp_path / 'dup.db'}")
    sink = SQLEventSink(engine)
    tracer_provider.add_span_processor(sink)
    tracer = tracer_provider.get_tracer("t")
    with oc.run(name="dup"):
        with tracer.start_as_current_span("a"):
            pass
    spans = memory_exporter.get_finished_spans()
    for span in spans:  # a duplicated delivery of every end
        sink.on_end(span)
    sink.force_flush()
    rows = table_rows(engine)
    assert len(rows) == len({r["id"] for r in rows}) == 2
    sink.shutdown()


def test_late_start_row_never_overwrites_a_completed_row(tmp_path, tracer_provider, memory_exporter):
    """A replayed 'running' row after the 'completed' one keeps the row completed."""
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    sink = SQLEventSink(engine)
    tracer_provider.add_span_processor(sink)
    with tracer_provider.get_tracer("t").start_as_current_span("a") as span:
        pass
    sink.force_flush()
    sink.on_start(span)  # late start delivery
    sink.force_flush()
    assert [r["status"] for r in table_rows(engine)] == ["completed"]
    sink.shutdown()


def test_batches_of_different_columns_each_upsert_what_they_carry(tmp_path):
    """The upsert statement is built once per set of columns (and reused): a batch never takes another batch's."""
    engine = make_engine(f"sqlite:///{tmp_path / 'columns.db'}")
    table = execution_events_table()
    table.metadata.create_all(engine)
    writer = TableWriter(engine, table)
    base = {"event_type": "tool_call", "timestamp": datetime.now(timezone.utc), "execution_order": 1, "depth": 0}
    running = {**base, "id": "a", "status": "running"}
    final = {**base, "id": "a", "status": "completed", "agent_name": "engineer", "duration_ms": 5}
    other = {**base, "id": "b", "status": "completed", "error_message": "boom"}
    for batch in ([running], [final], [running], [other], [final, other]):
        writer.write(batch)
    rows = {row["id"]: row for row in table_rows(engine)}
    assert (rows["a"]["status"], rows["a"]["agent_name"], rows["a"]["duration_ms"]) == ("completed", "engineer", 5)
    assert (rows["b"]["status"], rows["b"]["error_message"], rows["b"]["agent_name"]) == ("completed", "boom", None)
    assert len(writer._statements) == 4  # running/final/other/final+other: built once each, reused after


def test_failing_database_spills_and_replay_restores_everything(tmp_path, tracer_provider, scripted_llm):
    """Table gone mid-run: batches are retried, spilled to JSONL, counted; replay writes each event once."""
    db = tmp_path / "faulty.db"
    spill = tmp_path / "spill.jsonl"
    sink = SQLEventSink(f"sqlite:///{db}", spill_path=spill, max_retries=2, retry_backoff=0.01)
    tracer_provider.add_span_processor(sink)
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        with PausedRun(scripted_llm) as run:
            sink.force_flush()
            before = len(table_rows(sink.engine))
            with sink.engine.begin() as connection:  # the database "fails": its table disappears
                connection.execute(sa.text("drop table execution_events"))
            run.release()
        sink.force_flush()
    finally:
        instrumentor.uninstrument()
    assert sink.stats["rows_spilled"] > 0 and sink.stats["retries"] > 0
    assert spill.exists()
    spilled = [json.loads(line) for line in spill.read_text().splitlines()]
    assert FAKE_KEY not in spill.read_text()
    written = replay(spill, sink.engine)
    assert written == len({r["id"] for r in spilled})
    assert not spill.exists() and spill.with_name(spill.name + ".replayed").exists()
    rows = table_rows(sink.engine)
    assert len(rows) == len({r["id"] for r in rows})
    # the rows written before the failure were lost with the table; everything after it is back, completed
    assert {r["status"] for r in rows if r["event_type"] == "run"} == {"completed"}
    assert before > 0
    sink.shutdown()


def test_replay_twice_is_idempotent(tmp_path):
    """Replaying the same spill file again changes nothing."""
    spill = tmp_path / "s.jsonl"
    row = {
        "id": str(uuid.uuid4()), "run_id": "r", "session_id": "s", "event_type": "tool_call",
        "timestamp": "2026-01-01T00:00:00+00:00", "execution_order": 1, "depth": 1, "status": "completed",
    }
    spill.write_text(json.dumps(row) + "\n")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert replay(spill, url, remove=False) == 1
    assert replay(spill, url, remove=False) == 1
    assert len(table_rows(make_engine(url))) == 1


def test_side_rows_are_written_once_whatever_is_replayed(tmp_path, tracer_provider, memory_exporter, scripted_llm):
    """cmbagent's messages/cost_records rows (autoincrement ids, no upsert) stay one per event when every span
    is delivered again and the run's rows are replayed from a spill file."""
    import cmbagent_schema as cmb
    from otel_cmbagent.table.rows import message_rows, span_row
    from otel_cmbagent.exporters.spill import append_rows

    engine = cmb.cmbagent_engine(f"sqlite:///{tmp_path / 'side.db'}")
    cmb.add_run(engine, "run-side", "session-side")
    sink = SQLEventSink(engine, table=cmb.execution_events)
    tracer_provider.add_span_processor(sink)
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        scripted_run(scripted_llm, run_id="run-side", session_id="session-side")
        sink.force_flush()
        counts = (cmb.table_count(engine, cmb.messages), cmb.table_count(engine, cmb.cost_records))
        spans = memory_exporter.get_finished_spans()
        for span in spans:
            sink.on_end(span)  # a duplicated delivery of every end
        sink.force_flush()
    finally:
        instrumentor.uninstrument()
        sink.shutdown()
    spill = tmp_path / "side.spill.jsonl"
    append_rows(spill, [row for span in spans for row in [span_row(span, ended=True), *message_rows(span)]])
    replay(spill, engine, table=cmb.execution_events)
    messages = [r for r in table_rows(engine) if is_message(r)]
    assert counts == (len(messages), len([r for r in table_rows(engine) if r["event_type"] == "llm_call"])) == (
        cmb.table_count(engine, cmb.messages), cmb.table_count(engine, cmb.cost_records))
    assert counts[0] >= 3 and counts[1] == 3
    assert sink.stats["messages_written"] == counts[0] and sink.stats["rows_spilled"] == 0


def test_bad_sql_url_is_a_clear_error():
    """Malformed URLs and unknown drivers fail at setup with the URL named (password hidden)."""
    with pytest.raises(ValueError, match="invalid sql_url"):
        oc.setup_tracing(sql_url="not a url", set_global=False, instrument=False)
    with pytest.raises(ValueError, match="cannot use sql_url"):
        oc.setup_tracing(sql_url="nosuchdb://user:hunter2@host/db", set_global=False, instrument=False)
    with pytest.raises(ValueError) as excinfo:
        oc.setup_tracing(sql_url="nosuchdb://user:hunter2@host/db", set_global=False, instrument=False)
    assert "hunter2" not in str(excinfo.value)


def test_unreachable_database_at_setup_does_not_crash(tmp_path, scripted_llm):
    """A database that is down at setup: the agent runs, rows are spilled and counted."""
    spill = tmp_path / "down.jsonl"
    tracing = oc.setup_tracing(
        sql_url="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1",
        spill_path=spill, set_global=False, handle_sigterm=False,
    )
    tracing.sql.max_retries = 1
    try:
        scripted_run(scripted_llm)
        tracing.force_flush()
        assert tracing.stats["sql"]["rows_spilled"] > 0
    finally:
        tracing.shutdown()


def test_several_processes_write_one_sqlite_file(tmp_path):
    """Two processes tracing into one SQLite file (WAL, busy timeout): every row lands, orders gapless per run."""
    db = tmp_path / "shared.db"
    script = (
        "import otel_cmbagent as oc, sys\n"
        f"t = oc.setup_tracing(sql_url='sqlite:///{db}', set_global=False, instrument=False)\n"
        "tracer = t.tracer_provider.get_tracer('p')\n"
        "oc.pipeline.context._TracerSource.provider = t.tracer_provider\n"
        "with oc.run(run_id=sys.argv[1]):\n"
        "    for i in range(300):\n"
        "        with tracer.start_as_current_span(f's{i}'): pass\n"
        "t.shutdown()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, f"run-{n}"]) for n in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    engine = make_engine(f"sqlite:///{db}")
    for n in range(2):
        rows = table_rows(engine, where=f"where run_id = 'run-{n}'")
        assert [r["execution_order"] for r in rows] == list(range(1, 302))


def test_default_table_shape():
    """cmbagent's columns with their types, plus trace/span ids and the documented indexes."""
    table = execution_events_table()
    assert isinstance(table.c.id.type, sa.String) and table.c.id.type.length == 36
    assert isinstance(table.c.timestamp.type, sa.DateTime) and table.c.timestamp.type.timezone
    assert isinstance(table.c.inputs.type, sa.JSON)
    indexed = {tuple(c.name for c in index.columns) for index in table.indexes}
    for wanted in [("run_id",), ("session_id",), ("run_id", "execution_order"), ("event_type",), ("agent_name",)]:
        assert wanted in indexed
    assert {"trace_id", "span_id"} <= set(table.c.keys())
