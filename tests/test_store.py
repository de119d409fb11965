"""The read side of the event table (otel_cmbagent.table.store) on databases written by real traced AG2 runs."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import datetime, timezone

import pytest
from autogen import ConversableAgent
from autogen.coding import LocalCommandLineCodeExecutor

import otel_cmbagent as oc
from otel_cmbagent.table.schema import row_kind
from otel_cmbagent.table import store
from otel_cmbagent.exporters.sql import make_engine
from otel_cmbagent.testing import ScriptedLLM, code, text
from sinks_util import PausedRun, scripted_run, table_rows

TOOL_RUN_PREFIX = "cli-run-tool-"
CODE_RUN_PREFIX = "cli-run-code-"


def failing_code_run(llm, work_dir, *, run_id=None, session_id=None, name="failing-code"):
    """A traced chat whose code block exits 3: the code_exec row is failed, the run completes."""
    llm.push(code("raise SystemExit(3)"), text("TERMINATE"))
    work_dir.mkdir(parents=True, exist_ok=True)
    coder = ConversableAgent("coder", llm_config=llm.llm_config())
    runner = ConversableAgent(
        "runner",
        llm_config=False,
        human_input_mode="NEVER",
        code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=str(work_dir))},
    )
    with oc.run(name=name, run_id=run_id, session_id=session_id) as run:
        runner.initiate_chat(coder, message="run this", max_turns=2, silent=True)
    return run


def make_traced_db(directory, **setup_options):
    """Two real traced runs into ``directory/traced.db``: a tool chat, then a chat whose code fails.

    Returns ``{"path", "url", "tool_run", "code_run", "stats"}`` (run ids share the ``cli-run-`` prefix).
    """
    path = directory / "traced.db"
    url = f"sqlite:///{path}"
    tool_run = TOOL_RUN_PREFIX + uuid.uuid4().hex
    code_run = CODE_RUN_PREFIX + uuid.uuid4().hex
    tracing = oc.setup_tracing(sql_url=url, set_global=False, handle_sigterm=False, **setup_options)
    try:
        with ScriptedLLM() as llm:
            scripted_run(llm, name="tool-chat", run_id=tool_run)
            failing_code_run(llm, directory / "work", run_id=code_run)
        tracing.force_flush()
    finally:
        tracing.shutdown()
    return {"path": path, "url": url, "tool_run": tool_run, "code_run": code_run, "stats": tracing.stats}


@pytest.fixture(scope="module")
def traced_db(tmp_path_factory):
    return make_traced_db(tmp_path_factory.mktemp("store"))


def _meta(row):
    return row["meta"] if isinstance(row["meta"], dict) else json.loads(row["meta"])


# --- open_store ---------------------------------------------------------------------------------
def test_open_store_accepts_a_path_or_a_url(traced_db):
    for target in (str(traced_db["path"]), traced_db["path"], traced_db["url"]):
        engine = store.open_store(target)
        assert engine.url.get_backend_name() == "sqlite"
        assert store.list_runs(engine)


def test_open_store_errors_are_clear(tmp_path, monkeypatch):
    missing = tmp_path / "nope.db"
    with pytest.raises(store.StoreError, match=f"no database at {missing}"):
        store.open_store(str(missing))
    with pytest.raises(store.StoreError, match="no database at"):
        store.open_store(f"sqlite:///{missing}")
    assert not missing.exists(), "opening must not create an empty database"
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(store.StoreError, match="no table 'execution_events'"):
        store.open_store(str(empty))
    with pytest.raises(store.StoreError, match="cannot use"):
        store.open_store("nosuchdriver://host/db")
    with pytest.raises(store.StoreError, match="directory"):
        store.open_store(str(tmp_path))
    monkeypatch.setenv(store.SQL_URL_ENV, f"sqlite:///{missing}")
    assert store.default_db() == f"sqlite:///{missing}"
    with pytest.raises(store.StoreError, match="no database at"):
        store.open_store(None)


# --- list_runs ----------------------------------------------------------------------------------
def test_list_runs_newest_first_with_per_call_sums(traced_db):
    engine = store.open_store(str(traced_db["path"]))
    runs = store.list_runs(engine)
    assert [r["run_id"] for r in runs] == [traced_db["code_run"], traced_db["tool_run"]], "newest first"
    rows = table_rows(make_engine(traced_db["url"]))
    for run in runs:
        mine = [r for r in rows if r["run_id"] == run["run_id"]]
        llm_calls = [_meta(r) for r in mine if r["event_type"] == "llm_call"]
        root = next(r for r in mine if r["event_type"] == "run")
        assert run["events"] == len(mine)
        assert run["llm_calls"] == len(llm_calls) >= 2
        assert run["input_tokens"] == sum(m["gen_ai.usage.input_tokens"] for m in llm_calls) > 0
        assert run["output_tokens"] == sum(m["gen_ai.usage.output_tokens"] for m in llm_calls) > 0
        assert run["cost"] == pytest.approx(sum(m.get("gen_ai.usage.cost") or 0 for m in llm_calls))
        assert run["name"] == _meta(root)["span_name"]
        assert run["trace_id"] == root["trace_id"] and len(run["trace_id"]) == 32
        assert run["session_id"] == root["session_id"]
        assert run["status"] == "completed" and run["live"] is False
        assert run["duration_ms"] == root["duration_ms"]
        assert isinstance(run["started_at"], datetime) and run["started_at"].tzinfo is not None
        assert set(run["agents"]) == {r["agent_name"] for r in mine if r["agent_name"]}
    assert runs[0]["name"] == "invoke_workflow failing-code"
    assert runs[1]["agents"] == ["user", "assistant"], "agents in order of first appearance"
    assert len(store.list_runs(engine, limit=1)) == 1


def test_tokens_are_summed_per_call_not_from_cumulative_totals(traced_db):
    """The run and conversation rows carry totals too: only llm_call rows are summed (no double count)."""
    engine = store.open_store(str(traced_db["path"]))
    (run,) = [r for r in store.list_runs(engine) if r["run_id"] == traced_db["tool_run"]]
    rows = store.run_events(engine, traced_db["tool_run"])
    everything = sum((r["meta"] or {}).get("gen_ai.usage.input_tokens") or 0 for r in rows)
    assert everything > run["input_tokens"], "other rows repeat the totals"
    (root,) = [r for r in rows if r["event_type"] == "run"]
    assert root["meta"]["gen_ai.usage.input_tokens"] == run["input_tokens"]


# --- resolve_run --------------------------------------------------------------------------------
def test_resolve_run(traced_db):
    engine = store.open_store(str(traced_db["path"]))
    tool_run, code_run = traced_db["tool_run"], traced_db["code_run"]
    assert store.resolve_run(engine, tool_run) == tool_run
    assert store.resolve_run(engine, "last") == code_run
    assert store.resolve_run(engine, TOOL_RUN_PREFIX) == tool_run
    assert store.resolve_run(engine, code_run[:len(CODE_RUN_PREFIX) + 3]) == code_run
    trace_id = store.list_runs(engine)[0]["trace_id"]
    assert store.resolve_run(engine, trace_id) == code_run, "a trace id finds its run"
    with pytest.raises(store.AmbiguousRunError) as ambiguous:
        store.resolve_run(engine, "cli-run-")
    message = str(ambiguous.value)
    assert "ambiguous" in message and tool_run in message and code_run in message
    assert ambiguous.value.candidates == [code_run, tool_run]
    with pytest.raises(store.RunNotFoundError, match="no run matches 'no-such-run'"):
        store.resolve_run(engine, "no-such-run")
    with pytest.raises(store.StoreError):
        store.resolve_run(engine, "")
    with pytest.raises(store.RunNotFoundError):
        store.resolve_run(engine, "cli%")  # LIKE wildcards are literal


def test_resolve_last_in_an_empty_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    tracing = oc.setup_tracing(sql_url=url, set_global=False, handle_sigterm=False, instrument=False)
    tracing.shutdown()
    engine = store.open_store(url)
    assert store.list_runs(engine) == []
    with pytest.raises(store.RunNotFoundError, match="no runs"):
        store.resolve_run(engine, "last")


# --- run_events / event_tree --------------------------------------------------------------------
def test_run_events_ordered_decoded_and_filtered(traced_db):
    engine = store.open_store(str(traced_db["path"]))
    rows = store.run_events(engine, traced_db["tool_run"])
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(isinstance(r["meta"], dict) for r in rows)
    assert all(r["started_at"].tzinfo is timezone.utc for r in rows)
    assert all(len(r["trace_id"]) == 32 and len(r["span_id"]) == 16 for r in rows)
    (tool,) = [r for r in rows if r["event_type"] == "tool_call"]
    assert tool["inputs"]["arguments"]["a"] == 20 and tool["outputs"]["result"] == "42"
    assert [r["event_type"] for r in store.run_events(engine, traced_db["tool_run"], event_type="tool_call")] == [
        "tool_call"
    ]
    several = store.run_events(engine, traced_db["tool_run"], event_type="tool_call,llm_call")
    assert {r["event_type"] for r in several} == {"tool_call", "llm_call"}
    assert [r["execution_order"] for r in several] == sorted(r["execution_order"] for r in several)
    by_agent = store.run_events(engine, traced_db["tool_run"], agent="assistant")
    assert by_agent and {r["agent_name"] for r in by_agent} == {"assistant"}
    failed = store.run_events(engine, traced_db["code_run"], event_type=["code_exec"])
    assert [r["status"] for r in failed] == ["failed"] and failed[0]["error_message"]


def test_event_tree_nests_by_parent(traced_db):
    engine = store.open_store(str(traced_db["path"]))
    rows = store.run_events(engine, traced_db["tool_run"])
    roots = store.event_tree(rows)
    assert len(roots) == 1 and roots[0]["event"]["event_type"] == "run"

    def walk(node, parent=None, seen=None):
        seen = seen if seen is not None else []
        seen.append(node["event"]["id"])
        if parent is not None:
            assert node["event"]["parent_event_id"] == parent["event"]["id"]
        orders = [child["event"]["execution_order"] for child in node["children"]]
        assert orders == sorted(orders)
        for child in node["children"]:
            walk(child, node, seen)
        return seen

    assert sorted(walk(roots[0])) == sorted(r["id"] for r in rows)
    (conversation,) = roots[0]["children"]
    assert conversation["event"]["event_type"] == "conversation"
    kinds = {row_kind(child["event"]) for child in conversation["children"]}
    assert kinds == {"message", "agent_call"}
    # a filtered list: rows whose parent is missing become roots
    only_llm = store.event_tree(store.run_events(engine, traced_db["tool_run"], event_type="llm_call"))
    assert all(not node["children"] for node in only_llm) and len(only_llm) == 3


def test_event_tree_survives_bad_links():
    rows = [
        {"id": "a", "parent_event_id": "b", "execution_order": 1},
        {"id": "b", "parent_event_id": "a", "execution_order": 2},
        {"id": "c", "parent_event_id": "c", "execution_order": 3},
        {"id": "d", "parent_event_id": "zzz", "execution_order": 4},
    ]
    roots = store.event_tree(rows)
    assert {node["event"]["id"] for node in roots} >= {"c", "d"}


def test_run_summary_counts_types(traced_db):
    engine = store.open_store(str(traced_db["path"]))
    summary = store.run_summary(engine, traced_db["tool_run"])
    rows = store.run_events(engine, traced_db["tool_run"])
    assert sum(summary["by_type"].values()) == len(rows) == summary["events"]
    assert summary["by_type"]["tool_call"] == 1 and list(summary["by_type"])[0] == "run"
    with pytest.raises(store.RunNotFoundError):
        store.run_summary(engine, "nope")


# --- live runs ----------------------------------------------------------------------------------
def test_a_live_run_is_running(tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    tracing = oc.setup_tracing(sql_url=url, set_global=False, handle_sigterm=False)
    with ScriptedLLM() as llm:
        try:
            with PausedRun(llm, run_id="live-run"):
                tracing.force_flush()
                engine = store.open_store(url)
                (run,) = store.list_runs(engine)
                assert run["run_id"] == "live-run" and run["status"] == "running" and run["live"] is True
                assert run["duration_ms"] is not None and run["duration_ms"] >= 0
                running = [r for r in store.run_events(engine, "live-run") if r["status"] == "running"]
                assert {"run", "conversation", "agent_call", "tool_call"} <= {r["event_type"] for r in running}
        finally:
            tracing.shutdown()
    (run,) = store.list_runs(store.open_store(url))
    assert run["status"] == "completed"


# --- runs outside oc.run(): grouped by trace ----------------------------------------------------
def test_rows_outside_a_run_are_grouped_by_trace(tmp_path):
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    tracing = oc.setup_tracing(sql_url=url, set_global=False, handle_sigterm=False)
    try:
        with ScriptedLLM([text("hi"), text("TERMINATE")]) as llm:
            a = ConversableAgent("a", llm_config=llm.llm_config())
            b = ConversableAgent("b", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
            b.initiate_chat(a, message="hello", max_turns=1, silent=True)
        tracing.force_flush()
    finally:
        tracing.shutdown()
    engine = store.open_store(url)
    (run,) = store.list_runs(engine)
    assert run["run_id"] == run["trace_id"] and run["name"] == "conversation b"
    rows = store.run_events(engine, store.resolve_run(engine, "last"))
    assert rows and all(r["run_id"] is None for r in rows)
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))


# --- cmbagent's own table -----------------------------------------------------------------------
def make_cmbagent_db(directory):
    """cmbagent's own tables (ExecutionEvent has no trace_id/span_id columns) with two traced runs:
    ``cmb-run-1`` (a tool chat) and ``cmb-run-2`` (failing code). Returns ``(url, engine)``."""
    import cmbagent_schema as cmb

    url = f"sqlite:///{directory / 'cmb.db'}"
    engine = make_engine(url)
    cmb.metadata.create_all(engine)
    cmb.add_session(engine, "cmb-session")
    for run_id in ("cmb-run-1", "cmb-run-2"):
        cmb.add_run(engine, run_id, "cmb-session", with_session=False)
    tracing = oc.setup_tracing(sql_url=engine, sql_table=cmb.execution_events, set_global=False,
                               handle_sigterm=False)
    try:
        with ScriptedLLM() as llm:
            scripted_run(llm, run_id="cmb-run-1", session_id="cmb-session")
            failing_code_run(llm, directory / "work", run_id="cmb-run-2", session_id="cmb-session")
        tracing.force_flush()
    finally:
        tracing.shutdown()
    assert "trace_id" not in {c.name for c in cmb.execution_events.c}
    return url, engine


def test_cmbagents_own_table_without_trace_columns(tmp_path):
    url, engine = make_cmbagent_db(tmp_path)

    reader = store.open_store(url)
    runs = store.list_runs(reader)
    assert [r["run_id"] for r in runs] == ["cmb-run-2", "cmb-run-1"]
    raw = table_rows(engine)
    for run in runs:
        mine = [r for r in raw if r["run_id"] == run["run_id"]]
        root = next(r for r in mine if r["event_type"] == "run")
        assert run["trace_id"] == _meta(root)["trace_id"] and len(run["trace_id"]) == 32
        assert run["events"] == len(mine)
        assert run["input_tokens"] == sum(
            _meta(r)["gen_ai.usage.input_tokens"] for r in mine if r["event_type"] == "llm_call"
        )
    assert store.resolve_run(reader, "last") == "cmb-run-2"
    assert store.resolve_run(reader, "cmb-run-1") == "cmb-run-1"
    with pytest.raises(store.AmbiguousRunError):
        store.resolve_run(reader, "cmb-run")
    rows = store.run_events(reader, "cmb-run-1")
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(len(r["trace_id"]) == 32 and len(r["span_id"]) == 16 for r in rows), "ids come from meta"
    (tree_root,) = store.event_tree(rows)
    assert tree_root["event"]["event_type"] == "run"
    assert [r["status"] for r in store.run_events(reader, "cmb-run-2", event_type="code_exec")] == ["failed"]


# --- PostgreSQL ---------------------------------------------------------------------------------
def test_postgresql(postgres_url, tmp_path):
    """The same queries on PostgreSQL (timestamptz, native JSON, GROUP BY on coalesce)."""
    tracing = oc.setup_tracing(sql_url=postgres_url, set_global=False, handle_sigterm=False)
    try:
        with ScriptedLLM() as llm:
            scripted_run(llm, run_id="pg-run-tool")
            failing_code_run(llm, tmp_path / "work", run_id="pg-run-code")
            a = ConversableAgent("a", llm_config=llm.llm_config())
            b = ConversableAgent("b", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
            llm.push(text("TERMINATE"))
            b.initiate_chat(a, message="outside any run", max_turns=1, silent=True)
        tracing.force_flush()
    finally:
        tracing.shutdown()
    engine = store.open_store(postgres_url)
    runs = store.list_runs(engine)
    assert [r["run_id"] for r in runs][1:] == ["pg-run-code", "pg-run-tool"]
    assert runs[0]["run_id"] == runs[0]["trace_id"], "the bare chat is grouped by its trace"
    raw = table_rows(make_engine(postgres_url), where="where run_id = 'pg-run-tool'")
    (tool_run,) = [r for r in runs if r["run_id"] == "pg-run-tool"]
    assert tool_run["events"] == len(raw)
    assert tool_run["input_tokens"] == sum(
        r["meta"]["gen_ai.usage.input_tokens"] for r in raw if r["event_type"] == "llm_call"
    )
    assert store.resolve_run(engine, "pg-run-t") == "pg-run-tool"
    with pytest.raises(store.AmbiguousRunError):
        store.resolve_run(engine, "pg-run")
    rows = store.run_events(engine, "pg-run-tool", event_type="tool_call")
    assert len(rows) == 1 and rows[0]["started_at"].tzinfo is not None
    assert len(store.event_tree(store.run_events(engine, "pg-run-tool"))) == 1
    with pytest.raises(store.StoreError, match="no table"):
        store.open_store(postgres_url, table="nope")
