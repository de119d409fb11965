"""The SQL sink under bad values (issue 10 item 1, SQL half), on real SQLite and a real PostgreSQL.

- A value an LLM can produce (a tool argument decoding to NUL and a lone surrogate, echoed in the tool's
  exception) must not cost another run its rows: every value is made storable before it is written.
- Ids and names longer than cmbagent's columns land, fitted with a mark, findable, the full value kept.
- A row the database still refuses is isolated: the rest of its batch lands; it alone is spilled, counted and
  logged once.
"""

from __future__ import annotations

import json
import logging
import threading

import pytest
import sqlalchemy as sa
from autogen import ConversableAgent, register_function
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_schema as cmb
import otel_cmbagent as oc
from otel_cmbagent import store
from otel_cmbagent.exporters.rows import event_id, message_rows
from otel_cmbagent.exporters.sql import SQLEventSink
from otel_cmbagent.testing import ScriptedLLM, text, tool_call
from sinks_util import poisoned_and_innocent_runs, table_rows

pytestmark = pytest.mark.usefixtures("chats_cwd")


def expected_rows(spans, run_id: str) -> set[str]:
    """The row ids a run's finished spans make: one per span, one per message event."""
    ids = set()
    for span in spans:
        if span.attributes.get("cmbagent.run_id") != run_id:
            continue
        ids.add(event_id(span.context.trace_id, span.context.span_id))
        ids.update(row["id"] for row in message_rows(span))
    return ids


@pytest.fixture(params=["sqlite", "postgresql", "postgresql, the host's engine"])
def sql_url(request, tmp_path):
    """A URL (the sink makes the engine: JSON made safe as it is serialised), or a host's plain Engine (the
    sink checks JSON values itself)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'poison.db'}"
    url = request.getfixturevalue("postgres_url")
    return url if request.param == "postgresql" else sa.create_engine(url)


def test_a_poisoned_run_costs_the_innocent_run_no_row(sql_url, tmp_path, caplog):
    """Two concurrent real AG2 runs write into one table; one LLM sends a tool argument decoding to NUL and a
    lone surrogate and the tool raises with it, inside a span of its own (as OpenTelemetry-instrumented code does)
    whose name, attribute and status (the exception's text) carry the raw value. Every
    row of both runs lands, the bad characters as U+FFFD; nothing is spilled or rejected."""
    memory = InMemorySpanExporter()
    spill = tmp_path / "poison.spill.jsonl"
    with ScriptedLLM() as poisoned_llm, ScriptedLLM() as innocent_llm:
        tracing = oc.setup_tracing(sql_url=sql_url, otlp=False, spill_path=spill, set_global=False,
                                   handle_sigterm=False)
        tracing.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
        tracing.sql.max_retries = 2
        tracing.sql.retry_backoff = 0.01
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"):
            run_ids = poisoned_and_innocent_runs(
                poisoned_llm, innocent_llm, tracer=tracing.tracer_provider.get_tracer("app"))
            tracing.force_flush()
        engine = tracing.sql.engine
        rows = {row["id"]: row for row in table_rows(engine)}
        stats = tracing.stats["sql"]
        tracing.shutdown()
    spans = memory.get_finished_spans()
    innocent = expected_rows(spans, run_ids["innocent"])
    poisoned = expected_rows(spans, run_ids["poisoned"])
    lost = innocent - set(rows)
    assert innocent and not lost, f"the innocent run lost {len(lost)} of {len(innocent)} rows"
    assert poisoned <= set(rows), "the poisoned run's own rows land too, the values replaced"
    failed = [r for r in rows.values() if r["run_id"] == run_ids["poisoned"] and r["status"] == "failed"
              and "bad" in (r["error_message"] or "")]
    assert failed and all("bad\ufffdvalue\ufffd" in r["error_message"] for r in failed)
    assert stats["rows_spilled"] == stats["rows_rejected"] == 0, stats
    assert not spill.exists()
    assert not [r for r in caplog.records if "spilled" in r.getMessage()]


def test_bytes_and_nan_attributes_cost_no_row(sql_url, tmp_path):
    """Host code sets a bytes and a NaN attribute on the current span (OpenTelemetry keeps both as they are;
    bytes fail JSON serialisation, PostgreSQL's json rejects NaN): the row lands with the bytes decoded as text
    and NaN as "NaN", and so do the other rows of its batch."""
    memory = InMemorySpanExporter()
    tracing = oc.setup_tracing(sql_url=sql_url, otlp=False, set_global=False,
                               handle_sigterm=False, spill_path=tmp_path / "bytes.spill.jsonl")
    tracing.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))

    def checksum(path: str) -> str:
        trace.get_current_span().set_attribute("app.digest", b"\x89PNG\r\n\x1a\n\xff\x00")
        trace.get_current_span().set_attribute("app.ratio", float("nan"))
        return "ok"

    with ScriptedLLM() as llm:
        llm.push(tool_call("checksum", {"path": "a.png"}), text("TERMINATE"))
        assistant = ConversableAgent("assistant", llm_config=llm.llm_config(), human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        register_function(checksum, caller=assistant, executor=user, description="Checksum a file.")
        with oc.run(name="bytes") as run:
            user.initiate_chat(assistant, message="checksum a.png", max_turns=2, silent=True)
        tracing.force_flush()
        rows = table_rows(tracing.sql.engine)
        stats = tracing.stats["sql"]
        tracing.shutdown()
    assert {r["id"] for r in rows} == expected_rows(memory.get_finished_spans(), run.run_id)
    (tool,) = [store.decode_row(r) for r in rows if r["event_type"] == "tool_call"]
    assert tool["meta"]["app.digest"] == "\ufffdPNG\r\n\x1a\n\ufffd\ufffd" and tool["meta"]["app.ratio"] == "NaN"
    assert stats["rows_spilled"] == 0, stats


def test_ids_and_names_longer_than_cmbagents_columns_land_and_are_findable(postgres_url, tmp_path):
    """PostgreSQL enforces cmbagent's column sizes (our default table has them): run_id and session_id are
    VARCHAR(36), agent_name VARCHAR(100). Two runs whose 60-character ids share their first 54 characters, with
    a 150-character agent name, land fitted to the columns with a mark; the full values are kept in meta; each
    run is found by its full id and the two stay apart."""
    long_ids = ["run-" + "x" * 50 + "-one", "run-" + "x" * 50 + "-two"]
    long_name = "analyst_" + "a" * 142
    tracing = oc.setup_tracing(sql_url=postgres_url, otlp=False, set_global=False, handle_sigterm=False,
                               spill_path=tmp_path / "long.spill.jsonl")
    with ScriptedLLM() as llm:
        for run_id in long_ids:
            llm.push(text("hello"), text("TERMINATE"))
            assistant = ConversableAgent(long_name, llm_config=llm.llm_config(), human_input_mode="NEVER")
            user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
            with oc.run(name="long", run_id=run_id, session_id="s" * 45):
                user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
        assert tracing.force_flush()
        stats = tracing.stats["sql"]
        engine = tracing.sql.engine
        tracing.shutdown()
    assert stats["rows_spilled"] == stats["rows_rejected"] == 0, stats
    rows = [store.decode_row(row) for row in table_rows(engine)]
    found = {run_id: store.resolve_run(store.open_store(engine), run_id) for run_id in long_ids}
    assert len(set(found.values())) == 2
    for run_id, fitted in found.items():
        mine = [r for r in rows if r["run_id"] == fitted]
        assert len(mine) >= 5 and all(r["meta"]["run_id_full"] == run_id for r in mine)
        assert len(fitted) == 36 and fitted.startswith("run-xxx") and "\u2026" in fitted
        assert store.run_summary(engine, fitted)["events"] == len(mine)
    assert {len(r["session_id"]) for r in rows} == {36}
    names = {r["agent_name"] for r in rows if (r["agent_name"] or "").startswith("analyst_")}
    assert len(names) == 1 and len(next(iter(names))) == 100
    assert {r["meta"].get("agent_name_full") for r in rows if r["agent_name"] in names} == {long_name}


def test_a_row_the_database_still_refuses_is_isolated(postgres_url, tmp_path, caplog):
    """cmbagent's cost_records.cost_usd is NUMERIC(10, 6): an LLM call priced absurdly (a config_list 'price'
    in the wrong unit) costs more than 9,999.999999 and PostgreSQL refuses its row. The other rows of the batch
    - the same run's and a concurrent run's - land; that row alone is spilled, counted and logged once."""
    engine = cmb.cmbagent_engine(postgres_url)
    spill = tmp_path / "refused.spill.jsonl"
    sink = SQLEventSink(engine, table=cmb.execution_events, spill_path=spill, max_retries=2, retry_backoff=0.01)
    memory = InMemorySpanExporter()
    tracing = oc.setup_tracing(sql_url=None, otlp=False, set_global=False, handle_sigterm=False)
    tracing.tracer_provider.add_span_processor(sink)
    tracing.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    runs = {"pricey": ("run-pricey", [1e9, 1e9]), "plain": ("run-plain", None)}
    for run_id, _price in runs.values():
        cmb.add_run(engine, run_id, f"session-{run_id}")
    gate = threading.Barrier(2)

    def chat(llm: ScriptedLLM, run_id: str, price) -> None:
        llm.push(text("hello"), text("TERMINATE"))
        config = llm.llm_config()
        if price is not None:
            config["config_list"][0]["price"] = price
        assistant = ConversableAgent("assistant", llm_config=config, human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        gate.wait(30)
        with oc.run(name=run_id, run_id=run_id, session_id=f"session-{run_id}"):
            user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)

    with ScriptedLLM() as pricey_llm, ScriptedLLM() as plain_llm, caplog.at_level(logging.WARNING, "otel_cmbagent"):
        threads = [threading.Thread(target=chat, args=(llm, *runs[name])) for name, llm in
                   (("pricey", pricey_llm), ("plain", plain_llm))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        sink.force_flush()
        tracing.shutdown()
    spans = memory.get_finished_spans()
    rows = {r["id"] for r in cmb.rows_of(engine, cmb.execution_events)}
    (refused,) = [event_id(s.context.trace_id, s.context.span_id) for s in spans
                  if s.attributes.get("cmbagent.run_id") == "run-pricey" and s.name.startswith("chat ")]
    assert expected_rows(spans, "run-plain") <= rows
    assert expected_rows(spans, "run-pricey") - {refused} <= rows
    assert refused not in rows
    assert [json.loads(line)["id"] for line in spill.read_text().splitlines()] == [refused]
    assert sink.stats["rows_rejected"] == 1 and sink.stats["rows_spilled"] == 1, sink.stats
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(logged) == 1, logged
