"""A burst the SQL sink's queue cannot hold (issue 14 item 1): nothing is dropped. What does not fit goes to the
overflow file and is written once the writer catches up; counted in ``stats`` and said right in the log.

Real SQLite and real PostgreSQL; the writer is held up the way a real one is - another connection holds the
table's write lock while the run bursts - so the queue fills without any timing in the test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time

import sqlalchemy as sa

import otel_cmbagent as oc
from otel_cmbagent.exporters.sql import SQLEventSink, replay
from sinks_util import scripted_run, table_rows, tracked_objects_per_span

BURST = 600  # spans: 1,200 queue items into a queue of 64


@contextlib.contextmanager
def write_lock(engine: sa.Engine, table: sa.Table):
    """Another connection holds the write lock of the table (SQLite: the database's) until the block ends."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.execute(sa.text(f"LOCK TABLE {table.name} IN EXCLUSIVE MODE"))
        yield
        connection.rollback()


def flushed_and_shut(tracing: oc.Tracing, sink: SQLEventSink) -> tuple[dict, list[dict]]:
    """Everything written (the lock released), then both shut down: the sink's stats and the table's rows."""
    try:
        assert sink.force_flush(120_000)
        return sink.stats, table_rows(sink.engine)
    finally:
        tracing.shutdown()
        sink.shutdown()


def burst_run(tracing: oc.Tracing, count: int) -> str:
    tracer = tracing.tracer_provider.get_tracer("burst")
    with oc.run(name="burst") as run:
        for index in range(count):
            with tracer.start_as_current_span(f"step {index}", attributes={"cmbagent.event_type": "tool_call"}):
                tracer.start_span("child").end()
    return run.run_id


def test_a_burst_that_fills_the_queue_ends_with_every_row_in_the_table(sqlite_or_postgres_url, tmp_path, scripted_llm, caplog):
    tracing = oc.setup_tracing(sql_url=None, otlp=False, set_global=False, handle_sigterm=False)
    sink = SQLEventSink(sqlite_or_postgres_url, max_queue=64, max_batch=16, spill_path=tmp_path / "failed.spill.jsonl")
    tracing.tracer_provider.add_span_processor(sink)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"), write_lock(sink.engine, sink.table):
            burst_id = burst_run(tracing, BURST // 2)
            chat_id = scripted_run(scripted_llm).run_id  # real AG2 spans and message rows in the same burst
            burst_id_2 = burst_run(tracing, BURST // 2)
    finally:
        stats, rows = flushed_and_shut(tracing, sink)
    by_run = {run_id: [r for r in rows if r["run_id"] == run_id] for run_id in (burst_id, chat_id, burst_id_2)}
    assert stats["dropped"] == stats["failed"] == stats["rows_spilled"] == 0, (stats, {k: len(v) for k, v in
                                                                                 by_run.items()})
    assert len(by_run[burst_id]) == len(by_run[burst_id_2]) == BURST + 1  # every span, plus the run span
    chat_kinds = {(r["event_type"], r["event_subtype"]) for r in by_run[chat_id]}
    assert {("agent_call", "message"), ("llm_call", "complete"), ("tool_call", "execute")} <= chat_kinds
    assert len(rows) == sum(len(v) for v in by_run.values())
    assert {r["status"] for r in rows} == {"completed"}  # no late running row overwrote a final one
    for run_rows in by_run.values():  # gapless order, parents present
        assert sorted(r["execution_order"] for r in run_rows) == list(range(1, len(run_rows) + 1))
        ids = {r["id"] for r in run_rows}
        assert all(r["parent_event_id"] in ids for r in run_rows if r["parent_event_id"] is not None)
    assert stats["overflowed"] > BURST and stats["drained"] == stats["overflowed"], stats
    assert stats["enqueued"] + stats["overflowed"] == stats["processed"], stats
    assert not list(tmp_path.glob("*.overflow-*.jsonl"))  # read to its end: removed
    said = [r.getMessage() for r in caplog.records if "overflow file" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    totals = re.search(r"(\d+) items went to the overflow file .* (\d+) of them written back; (\d+) dropped", said[-1])
    assert totals and totals.groups() == (str(stats["overflowed"]), str(stats["drained"]), "0"), said
    assert not [r for r in caplog.records if "dropped 1 items" in r.getMessage()]


def test_an_overflow_file_left_by_a_dead_process_is_replayed(tmp_path):
    """The overflow file is the spill format: a process that died mid-burst leaves rows ``replay()`` writes."""
    url = f"sqlite:///{tmp_path / 'left.db'}"
    tracing = oc.setup_tracing(sql_url=None, otlp=False, instrument=False, set_global=False, handle_sigterm=False)
    sink = SQLEventSink(url, max_queue=8, max_batch=4, spill_path=tmp_path / "left.spill.jsonl")
    tracing.tracer_provider.add_span_processor(sink)
    with write_lock(sink.engine, sink.table):
        run_id = burst_run(tracing, 50)
        (left,) = tmp_path.glob("left.spill.overflow-*.jsonl")
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(left.read_bytes())  # what a crash at this moment would leave behind
    tracing.shutdown()
    sink.shutdown()
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    lines = copy.read_text().splitlines()
    assert len(lines) > 50
    assert replay(copy, fresh) == len({json.loads(line)["id"] for line in lines})  # a start and an end: one row
    replayed = table_rows(sa.create_engine(fresh))
    assert {r["run_id"] for r in replayed} == {run_id} and len(replayed) == len({json.loads(x)["id"] for x in lines})


QUEUED = 2_000


def _wait_for_batch_in_hand(sink: SQLEventSink) -> None:
    """Until the writer has taken the first span and waits for the table's write lock."""
    deadline = time.monotonic() + 30
    while sink._worker.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink._worker.in_flight, "the writer never took the first span"


def test_a_queued_span_holds_few_objects_for_the_garbage_collector(tmp_path):
    """While its row waits for the writer, an ended span is queued as plain values, not as the SDK's
    ``ReadableSpan`` (~11 objects the collector tracks: bounded attributes, events and links, their deques,
    its status...): in a burst the collector walks every queued span on the agent's thread (issue 14 item 3).
    Counted with ``gc.get_objects()`` while the table's write lock holds the writer up; then every row lands."""
    url = f"sqlite:///{tmp_path / 'queued.db'}"
    tracing = oc.setup_tracing(sql_url=None, otlp=False, instrument=False, set_global=False, handle_sigterm=False)
    sink = SQLEventSink(url, max_batch=100_000, heartbeat=False)  # no heartbeat row: the writer waits on a span
    tracing.tracer_provider.add_span_processor(sink)
    tracer = tracing.tracer_provider.get_tracer("queued")
    attributes = {"cmbagent.event_type": "tool_call", "gen_ai.tool.name": "add", "gen_ai.agent.name": "engineer",
                  "gen_ai.tool.call.arguments": '{"a": 1}', "gen_ai.tool.call.result": "2"}
    try:
        with write_lock(sink.engine, sink.table), oc.run(name="queued") as run:
            tracer.start_span("first", attributes=attributes).end()
            _wait_for_batch_in_hand(sink)
            tracked_per_span = tracked_objects_per_span(tracer, QUEUED, attributes)
    finally:
        stats, rows = flushed_and_shut(tracing, sink)
    assert tracked_per_span <= 1.5, tracked_per_span  # the end record alone: no start copy (the SDK's: ~8 more)
    assert stats["dropped"] == stats["failed"] == stats["rows_spilled"] == 0, stats
    assert len(rows) == QUEUED + 1 and {r["run_id"] for r in rows} == {run.run_id}
    assert {r["status"] for r in rows} == {"completed"}
    assert [r["execution_order"] for r in rows] == list(range(1, QUEUED + 2))
