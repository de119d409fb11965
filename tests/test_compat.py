"""cmbagent's event-capture API on the span pipeline, called the way cmbagent's shipped code calls it.

The call shapes are those of the fork UJ2202/MARS (``phases/execution_manager.py``,
``branching/branch_executor.py``, ``execution/ag2_hooks.py``) and of the "Stage 3" plan; the rows
land in a replica of cmbagent's tables with foreign keys on (tests/cmbagent_schema.py) and are read
with what cmbagent's readers compute (``enrich_node``, the run history).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session as OrmSession

import cmbagent_schema as cmb
from otel_cmbagent import compat
from otel_cmbagent.pipeline import context as compat_context
from otel_cmbagent.compat import EventCaptureManager, get_event_captor, set_event_captor
from otel_cmbagent.table.schema import is_message, row_kind

from conftest import FAKE_KEY

# The plan's own checks ("Stage 3: Event Tracking Overhaul", Verification), verbatim but for the import path.
PLAN_CHECKS = [
    """
import contextvars
from cmbagent.execution.event_capture import get_event_captor, set_event_captor
set_event_captor('main')
ctx = contextvars.copy_context()
ctx.run(lambda: (set_event_captor('branch'), None))
assert get_event_captor() == 'main'
print('OK: isolation works')
""",
    """
import threading
from cmbagent.execution.event_capture import EventCaptureManager
m = EventCaptureManager(None, 'r', 's', enabled=False)
orders = []
lock = threading.Lock()
def go():
    for _ in range(100):
        o = m._next_order()
        with lock: orders.append(o)
threads = [threading.Thread(target=go) for _ in range(10)]
[t.start() for t in threads]; [t.join() for t in threads]
assert len(set(orders)) == 1000
print('OK: thread-safe')
""",
]
# cmbagent's get_performance_stats() keys
CMBAGENT_STATS = {"total_events", "total_capture_time_ms", "avg_capture_time_ms", "enabled", "current_node_id",
                  "current_step_id", "execution_order"}


@pytest.fixture
def hooks():
    assert compat.install_ag2_hooks()
    yield
    compat.uninstall_ag2_hooks()
    set_event_captor(None)


@pytest.fixture(params=["sqlite", "postgresql"])
def cmbagent_db(request, tmp_path):
    """cmbagent's tables, foreign keys enforced (SQLite: PRAGMA foreign_keys=ON, as cmbagent's engine)."""
    url = f"sqlite:///{tmp_path / 'cmbagent.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = cmb.cmbagent_engine(url)
    yield engine
    engine.dispose()


def add(a: int, b: int) -> int:
    return a + b


# --- the plan's checks ------------------------------------------------------------------------
@pytest.mark.parametrize("check", PLAN_CHECKS, ids=["isolation", "thread-safe"])
def test_the_plans_own_checks_verbatim(check):
    """The plan's snippets, run as written (``set_event_captor('main')``: any object, as in cmbagent)."""
    code = check.replace("cmbagent.execution.event_capture", "otel_cmbagent.compat")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("OK:")


def test_two_contexts_see_their_own_captor():
    """contextvars isolate captors (session A never writes into session B's captor)."""
    a = EventCaptureManager(None, "run-a", "s", enabled=False)
    b = EventCaptureManager(None, "run-b", "s", enabled=False)
    seen = {}

    def use(captor, key):
        set_event_captor(captor)
        seen[key] = get_event_captor()

    contextvars.copy_context().run(use, a, "a")
    contextvars.copy_context().run(use, b, "b")
    assert seen == {"a": a, "b": b}
    assert get_event_captor() is None


def test_next_order_is_thread_safe():
    captor = EventCaptureManager(None, "run-orders", "s", enabled=False)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: [captor._next_order() for _ in range(100)], range(10)))
    values = [v for chunk in results for v in chunk]
    assert len(set(values)) == 1000 and sorted(values) == list(range(1, 1001))


def test_event_stack_is_thread_local():
    captor = EventCaptureManager(None, "run-stack", "s", enabled=False)
    captor.event_stack.append("main")
    other = []
    thread = threading.Thread(target=lambda: other.append(list(captor.event_stack)))
    thread.start()
    thread.join()
    assert other == [[]] and captor.event_stack == ["main"]


def test_no_backend_imports():
    """Importing otel_cmbagent pulls in no web backend or websocket server package."""
    code = (
        "import sys, otel_cmbagent, otel_cmbagent.compat\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('websockets', 'fastapi', 'starlette', 'uvicorn', 'aiohttp', 'flask', 'backend', 'websocket_events')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_disabled_captor_is_a_no_op():
    captor = EventCaptureManager(None, "run-off", "s", enabled=False)
    assert captor.capture_tool_call("a", "t", {"x": 1}) is None
    assert captor.capture_message("a", "b", "hi") is None
    assert captor._next_order() == 1


# --- cmbagent's constructor, attributes, hooks ------------------------------------------------------
def test_constructor_and_attributes_as_cmbagents(cmbagent_db):
    """The keyword shapes of execution_manager.py and branch_executor.py, the positional websocket/callback,
    the plan's ws_emit_callback; cmbagent's attributes and performance-stat keys."""
    run_id = str(uuid.uuid4())  # a run's order counter is per process: a run id of its own
    cmb.add_run(cmbagent_db, run_id, "session-shapes")
    shared: dict = {"_session_id": "session-shapes"}
    with OrmSession(cmbagent_db) as db_session:
        manager = EventCaptureManager(db_session=db_session, run_id=run_id,
                                      session_id=shared.get("_session_id", "unknown"), enabled=True, websocket=None)
        assert (manager.db, manager.websocket, manager.current_node_id, manager.current_step_id) == (
            db_session, None, None, None)
        assert manager.total_events == 0 and manager.total_capture_time_ms == 0
        manager.capture_tool_call("engineer", "fit", {"ell_max": 2000})
        stats = manager.get_performance_stats()
        assert CMBAGENT_STATS <= set(stats) and stats["total_events"] == manager.total_events == 1
        assert stats["execution_order"] == 2  # the run's root row, then the tool call
        manager.close()
        assert manager.enabled is False  # as cmbagent's close()

        def branch():
            captor = EventCaptureManager(db_session=db_session, run_id=run_id, session_id="session-shapes")
            set_event_captor(captor)
            return captor

        branch_captor = contextvars.copy_context().run(branch)
        assert get_event_captor() is None and branch_captor.enabled
        branch_captor.close()

    async def emit(websocket, event, run_id):
        pass

    positional = EventCaptureManager(None, "run-pos", "s", True, 10, "a websocket", emit)
    assert (positional.buffer_size, positional.websocket) == (10, "a websocket")
    positional.close()
    plan = EventCaptureManager(None, "run-plan", "s", enabled=True, buffer_size=10, ws_emit_callback=lambda t, d: None)
    assert plan.ws_emit_callback is not None and plan.db_session is None
    plan.close()


def test_set_context_only_changes_what_is_given():
    captor = EventCaptureManager(None, "run-ctx", "s", enabled=False)
    captor.set_context(node_id="node-a", step_id="step-a")
    captor.set_context(node_id=None, step_id="step-b")
    assert (captor.current_node_id, captor.current_step_id) == ("node-a", "step-b")
    captor.set_context(node_id=None, step_id=None)
    assert (captor.current_node_id, captor.current_step_id) == ("node-a", "step-b")


def test_hook_functions_as_cmbagents(hooks, tmp_path, memory_exporter, tracer_provider, monkeypatch):
    """install_ag2_hooks() is True when already installed; the patch_* functions of ag2_hooks exist and work;
    patch_code_executor() with no argument covers LocalCommandLineCodeExecutor, with one a custom class."""
    from autogen.coding import CodeBlock, LocalCommandLineCodeExecutor
    from autogen.coding.base import CodeResult

    from otel_cmbagent.instrumentation.instrumentor import AG2Instrumentor

    assert compat.install_ag2_hooks() is True
    assert compat.patch_conversable_agent() is True and compat.patch_group_chat() is True
    assert compat.patch_code_executor() is True
    patched = {(owner, name) for owner, name, _ in AG2Instrumentor().patched_attributes}
    assert (LocalCommandLineCodeExecutor, "execute_code_blocks") in patched

    class SandboxExecutor:
        def execute_code_blocks(self, code_blocks):
            return CodeResult(exit_code=0, output="ran " + str(len(code_blocks)))

    assert compat.patch_code_executor(SandboxExecutor) is True
    assert compat.patch_code_executor(SandboxExecutor) is True  # already traced
    captor = EventCaptureManager(None, "run-hooks", "s")
    rows: list = []
    captor._sinks = (*captor._sinks, _RowRecorder(rows))
    set_event_captor(captor)
    SandboxExecutor().execute_code_blocks([CodeBlock(code="print(1)", language="python")])
    LocalCommandLineCodeExecutor(work_dir=tmp_path).execute_code_blocks([CodeBlock(code="print(2)", language="python")])
    captor.close()
    set_event_captor(None)
    code_runs = [r for r in rows if r["event_type"] == "code_exec" and r["status"] != "running"]
    assert sorted(r["meta"]["cmbagent.code.executor"] for r in code_runs) == ["LocalCommandLineCodeExecutor",
                                                                             "SandboxExecutor"]
    assert {r["inputs"]["code"] for r in code_runs} == {"print(1)", "print(2)"}
    assert {r["run_id"] for r in code_runs} == {"run-hooks"}


# --- the rows, as cmbagent's readers read them -------------------------------------------------------
def scripted_capture_run(db_session, run_id: str, session_id: str) -> dict:
    """One phase of a cmbagent run as its PhaseExecutionManager drives the captor, then every capture call
    in the shape cmbagent's ag2_hooks make them. Returns the ids of what it captured."""
    ids: dict = {}
    captor = EventCaptureManager(db_session=db_session, run_id=run_id, session_id=session_id, enabled=True,
                                 websocket=None)
    captor.set_context(node_id=None, step_id=None)
    set_event_captor(captor)
    compat.install_ag2_hooks()
    captor.set_context(node_id="step_1", step_id="step_1")  # start_step(1): f"step_{n}" for both
    call = captor.capture_agent_call(
        agent_name="engineer", message="Fit the spectrum",
        metadata={"sender": "planner", "llm_config": {"model": "gpt-4o", "api_key": FAKE_KEY}})
    ids["message"] = captor.capture_message(sender="planner", recipient="engineer", content="Fit the spectrum",
                                            tokens=42)
    ids["tool"] = captor.capture_tool_call("engineer", "fit_power_law", {"ell_max": 2000}, result="slope=-2.1")
    ids["code_ok"] = captor.capture_code_execution(agent_name="engineer", code="fit()", language="python",
                                                   result="chi2=1.02", exit_code=0, duration_ms=12)
    ids["code_failed"] = captor.capture_code_execution(agent_name="engineer", code="plot()", language="python",
                                                       result="NameError", exit_code=1, duration_ms=3)
    ids["plot"] = captor.capture_file_generation("engineer", "plots/fit.png", "plot", size_bytes=2048)
    ids["data"] = captor.capture_file_generation("engineer", "data/fit.csv", "data", size_bytes=512,
                                                 metadata={"rows": 40})
    captor.capture_agent_response(agent_name="engineer", response="Fit done", event_id=call,
                                  metadata={"duration_ms": 40, "tokens": 300, "cost_usd": 0.0125})
    ids["call"] = call
    ids["handoff"] = captor.capture_handoff(from_agent="engineer", to_agent="reviewer", reason="group_chat_selection")
    ids["reply"] = captor.capture_message(sender="engineer", recipient="reviewer", content="Please review",
                                          metadata={"tokens": None})
    ids["error"] = captor.capture_error("reviewer", "fit diverged", error_type="FitError")
    ids["response_only"] = captor.capture_agent_response("reviewer", "Looks wrong")
    captor.flush()
    captor.close()
    set_event_captor(None)
    ids["stats"] = captor.get_performance_stats()
    return ids


# What cmbagent's own capture writes for the calls above (one row per call; the agent call's start row
# becomes its complete row): (event_type, event_subtype, agent_name), in call order.
CMBAGENT_ROWS = [
    ("agent_call", "complete", "engineer"),
    ("agent_call", "message", "engineer"),
    ("tool_call", "execute", "engineer"),
    ("code_exec", "complete", "engineer"),
    ("code_exec", "error", "engineer"),
    ("file_gen", "create", "engineer"),
    ("file_gen", "create", "engineer"),
    ("handoff", "transfer", "engineer"),
    ("agent_call", "message", "reviewer"),
    ("error", "FitError", "reviewer"),
    ("agent_call", "complete", "reviewer"),
]
# ... and what enrich_node computes on those rows for node step_1
CMBAGENT_FIGURES = {
    "event_types": {"agent_call": 4, "tool_call": 1, "code_exec": 2, "file_gen": 2, "handoff": 1, "error": 1},
    "agent_call_counts": {"engineer": 2, "reviewer": 2},  # responses and messages, by recipient
    "files_generated": 2,
    "files_by_type": {"plot": 1, "data": 1},
    "messages_count": 2,
    "total_tokens": 342,  # the message's 42 + the response's metadata tokens 300
    "total_cost_usd": 0.0125,
    "error_count": 1,
}


def test_cmbagent_call_shapes_give_cmbagents_rows(hooks, cmbagent_db, caplog):
    """Every capture call in cmbagent's shape, into cmbagent's tables with foreign keys on: the rows,
    the files/messages rows, and enrich_node's and the history's figures are those of cmbagent's own capture."""
    caplog.set_level(logging.WARNING, logger="otel_cmbagent")
    cmb.add_run(cmbagent_db, "run-1", "session-1")
    node = cmb.add_dag_node(cmbagent_db, "run-1", "session-1", "step_1")  # cmbagent hashes node ids
    with OrmSession(cmbagent_db) as db_session:
        ids = scripted_capture_run(db_session, "run-1", "session-1")
    sink_stats = ids["stats"]["SQLEventSink"]
    assert sink_stats["rows_spilled"] == 0 and sink_stats["rows_held"] == 0

    history = cmb.history(cmbagent_db, "run-1")
    ours = [(r["event_type"], r["event_subtype"], r["agent_name"]) for r in history if r["event_type"] != "run"]
    assert ours == CMBAGENT_ROWS
    assert [r["event_type"] for r in history if r["event_type"] not in {t for t, _, _ in CMBAGENT_ROWS}] == ["run"]
    assert [r["execution_order"] for r in history] == sorted(r["execution_order"] for r in history)
    by_id = {r["id"]: r for r in history}

    call = by_id[ids["call"]]
    assert call["inputs"] == {"message": "Fit the spectrum", "context": {}}
    assert call["outputs"] == {"response": "Fit done"}
    assert call["meta"]["sender"] == "planner" and call["meta"]["duration_ms"] == 40  # metadata merged, not a string
    assert call["meta"]["llm_config"] == {"model": "gpt-4o", "api_key": "[REDACTED]"}
    message = by_id[ids["message"]]
    assert message["inputs"] == {"sender": "planner", "recipient": "engineer", "content": "Fit the spectrum"}
    assert message["meta"]["tokens"] == 42
    assert "tokens" not in by_id[ids["reply"]]["meta"], "a None never reaches enrich_node's sum"
    tool = by_id[ids["tool"]]
    assert (tool["inputs"], tool["outputs"]) == ({"tool_name": "fit_power_law", "arguments": {"ell_max": 2000}},
                                                 {"result": "slope=-2.1"})
    code_ok, code_failed = by_id[ids["code_ok"]], by_id[ids["code_failed"]]
    assert (code_ok["inputs"], code_ok["outputs"]) == ({"code": "fit()"}, {"result": "chi2=1.02"})
    assert {k: code_ok["meta"][k] for k in ("language", "exit_code", "code_length")} == {
        "language": "python", "exit_code": 0, "code_length": 5}
    assert code_ok["duration_ms"] == 12 and code_failed["meta"]["exit_code"] == 1
    plot, data = by_id[ids["plot"]], by_id[ids["data"]]
    assert plot["inputs"] == {"file_path": "plots/fit.png", "file_type": "plot"} and plot["meta"]["size_bytes"] == 2048
    assert data["meta"]["rows"] == 40
    handoff = by_id[ids["handoff"]]
    assert handoff["inputs"] == {"from_agent": "engineer", "to_agent": "reviewer", "context": {}}
    assert handoff["meta"]["reason"] == "group_chat_selection"
    error = by_id[ids["error"]]
    assert (error["status"], error["error_message"]) == ("failed", "fit diverged")

    # part 4: "step_1" is not a dag_nodes / workflow_steps id - resolved like cmbagent's readers do, or NULL
    captured = [r for r in history if r["event_type"] != "run"]
    assert {r["node_id"] for r in captured} == {node} and {r["step_id"] for r in captured} == {None}
    assert all(r["meta"]["node_id_ref"] == "step_1" == r["meta"]["step_id_ref"] for r in captured)
    step_warnings = [r for r in caplog.records if "step_id 'step_1'" in r.getMessage()]
    assert len(step_warnings) == 1 and "workflow_steps" in step_warnings[0].getMessage()

    files = cmb.rows_of(cmbagent_db, cmb.files)
    assert {(f["event_id"], f["file_path"], f["file_type"], f["size_bytes"]) for f in files} == {
        (ids["plot"], "plots/fit.png", "plot", 2048), (ids["data"], "data/fit.csv", "data", 512)}
    assert {(f["run_id"], f["node_id"], f["step_id"]) for f in files} == {("run-1", node, None)}
    messages = cmb.rows_of(cmbagent_db, cmb.messages)
    assert sorted((m["event_id"], m["sender"], m["recipient"], m["content"], m["tokens"]) for m in messages) == sorted([
        (ids["message"], "planner", "engineer", "Fit the spectrum", 42),
        (ids["reply"], "engineer", "reviewer", "Please review", None)])

    figures = cmb.enrich_node(cmbagent_db, node, "run-1")
    assert {key: figures[key] for key in CMBAGENT_FIGURES} == CMBAGENT_FIGURES
    assert figures["total_events"] == len(CMBAGENT_ROWS)


def test_a_second_phase_continues_the_runs_order(cmbagent_db):
    """cmbagent makes a new captor per phase (or process) for the same run: its rows go on after the rows
    already in the table (cmbagent's counter starts again at 1)."""
    run_id = str(uuid.uuid4())
    cmb.add_run(cmbagent_db, run_id, "session-2")

    def phase(name: str) -> None:
        with OrmSession(cmbagent_db) as db_session:
            captor = EventCaptureManager(db_session=db_session, run_id=run_id, session_id="session-2")
            captor.capture_agent_response(name, "done")
            captor.flush()
            captor.close()

    phase("planning")
    gc.collect()  # nothing of the first phase is left in this process: the next one starts from the table
    assert compat_context.live_run_count() == 0 or run_id not in compat_context._run_sequences
    phase("control")
    rows = cmb.history(cmbagent_db, run_id)
    assert [r["execution_order"] for r in rows] == [1, 2, 3, 4]
    assert [r["agent_name"] for r in rows if r["event_type"] == "agent_call"] == ["planning", "control"]


def test_plan_code_execution_shapes():
    """The plan's patch: a start per block, then one end with (agent_name=, result=, success=) and no event id."""
    captor = EventCaptureManager(None, "run-plan-code", "s")
    rows: list = []
    captor._sinks = (*captor._sinks, _RowRecorder(rows))
    first = captor.capture_code_execution_start(agent_name="executor", code="a = 1", language="python")
    second = captor.capture_code_execution_start(agent_name="executor", code="b = 2", language="python")
    assert captor.capture_code_execution_end(agent_name="executor", result="ok", success=True) in (first, second)
    third = captor.capture_code_execution_start("executor", "boom()")
    assert captor.capture_code_execution_end(third, result="NameError", exit_code=1) == third
    assert captor.capture_code_execution_end(agent_name="executor", result="again", success=True) is None
    captor.close()
    final = {r["id"]: r for r in rows if r["status"] != "running"}
    assert {final[first]["event_subtype"], final[second]["event_subtype"]} == {"complete"}
    assert final[first]["outputs"] == {"result": "ok"} and final[first]["inputs"] == {"code": "a = 1"}
    assert (final[third]["status"], final[third]["event_subtype"], final[third]["meta"]["exit_code"]) == (
        "failed", "error", 1)


class _RowRecorder:
    """A span processor that keeps the rows the shared mapping makes of each span (start and end)."""

    def __init__(self, rows: list) -> None:
        from otel_cmbagent.table.rows import snapshot, span_row

        self.rows, self._snapshot, self._row = rows, snapshot, span_row

    def on_start(self, span, parent_context=None):
        self.rows.append(self._row(self._snapshot(span), ended=False))

    def on_end(self, span):
        self.rows.append(self._row(span, ended=True))

    def force_flush(self, timeout_millis=30_000):
        return True

    def shutdown(self):
        pass


# --- foreign keys: rows are never lost quietly ------------------------------------------------------
def test_readme_ids_that_are_no_rows_never_cost_a_row(cmbagent_db, caplog):
    """node_id="node-1", step_id="planning" are no dag_nodes/workflow_steps ids: NULL, kept in meta, one warning each."""
    caplog.set_level(logging.WARNING, logger="otel_cmbagent")
    cmb.add_run(cmbagent_db, "run-readme", "session-readme")
    with OrmSession(cmbagent_db) as db_session:
        captor = EventCaptureManager(db_session, "run-readme", "session-readme")
        captor.set_context(node_id="node-1", step_id="planning")
        for n in range(3):
            captor.capture_tool_call("engineer", "fit", {"n": n})
        captor.capture_file_generation("engineer", "fit.png", "plot", size_bytes=1)
        assert captor.flush()
        stats = captor.get_performance_stats()["SQLEventSink"]
        captor.close()
    rows = [r for r in cmb.history(cmbagent_db, "run-readme") if r["event_type"] != "run"]
    assert len(rows) == 4 and stats["rows_spilled"] == 0 and stats["fk_nulled"] >= 8
    assert {(r["node_id"], r["step_id"], r["meta"]["node_id_ref"], r["meta"]["step_id_ref"]) for r in rows} == {
        (None, None, "node-1", "planning")}
    assert cmb.table_count(cmbagent_db, cmb.files, run_id="run-readme") == 1
    warnings = [r.getMessage() for r in caplog.records if "(foreign key)" in r.getMessage()]
    assert len(warnings) == 2 and any("dag_nodes.id" in w for w in warnings) and any("workflow_steps" in w for w in warnings)


def test_a_missing_session_row_holds_the_rows_until_it_exists(cmbagent_db, caplog):
    """execution_manager's default session id 'unknown' has no sessions row: one warning naming the table and
    the fix, rows held (not spilled, not dropped), written as soon as the row exists."""
    caplog.set_level(logging.WARNING, logger="otel_cmbagent")
    run_id = str(uuid.uuid4())
    cmb.add_run(cmbagent_db, run_id, "session-real")
    shared: dict = {}
    with OrmSession(cmbagent_db) as db_session:
        captor = EventCaptureManager(db_session=db_session, run_id=run_id,
                                     session_id=shared.get("_session_id", "unknown"), enabled=True, websocket=None)
        captor.capture_agent_response("engineer", "first")
        captor.capture_message("engineer", "reviewer", "second", tokens=5)
        assert captor.flush() is False
        stats = captor.get_performance_stats()["SQLEventSink"]
        assert stats["rows_held"] >= 3 and stats["rows_spilled"] == 0
        assert cmb.history(cmbagent_db, run_id) == []
        (warning,) = [r.getMessage() for r in caplog.records if "'unknown'" in r.getMessage()]
        assert "sessions" in warning and "Create that row" in warning
        cmb.add_session(cmbagent_db, "unknown")
        captor.capture_tool_call("engineer", "fit", {})
        assert captor.flush() is True
        captor.close()
    rows = cmb.history(cmbagent_db, run_id)
    assert [row_kind(r) for r in rows] == ["run", "agent_call", "message", "tool_call"]
    assert [r["execution_order"] for r in rows] == [1, 2, 3, 4]
    assert captor.get_performance_stats()["SQLEventSink"]["rows_spilled"] == 0
    assert cmb.table_count(cmbagent_db, cmb.messages, run_id=run_id) == 1


def test_cmbagents_one_connection_engine_keeps_the_sessions_transaction(tmp_path):
    """cmbagent's SQLite engine has one connection (StaticPool): the sink writes on a connection of its own,
    so it never rolls back (the pool's reset) nor commits what the caller's session has pending; foreign keys
    stay on for it."""
    url = f"sqlite:///{tmp_path / 'static.db'}"
    engine = sa.create_engine(url, connect_args={"check_same_thread": False}, poolclass=sa.pool.StaticPool)
    sa.event.listen(engine, "connect", lambda connection, _: connection.execute("PRAGMA foreign_keys=ON"))
    cmb.metadata.create_all(engine)
    cmb.add_run(engine, "run-static", "session-static")
    with OrmSession(engine) as db_session:
        db_session.execute(sa.insert(cmb.sessions).values(id="pending", name="the caller's own work"))
        captor = EventCaptureManager(db_session=db_session, run_id="run-static", session_id="session-static")
        captor.set_context(node_id="step_9", step_id="step_9")
        captor.capture_tool_call("engineer", "fit", {"ell_max": 2000})
        db_session.commit()
        assert captor.flush()
        captor.close()
    assert cmb.table_count(engine, cmb.sessions, id="pending") == 1
    rows = [r for r in cmb.history(engine, "run-static") if r["event_type"] == "tool_call"]
    assert len(rows) == 1 and (rows[0]["node_id"], rows[0]["meta"]["node_id_ref"]) == (None, "step_9")


def test_bad_metadata_never_poisons_later_captures(cmbagent_db):
    """cmbagent's first capture deadlocks and one unserialisable meta value breaks every later one; not here."""

    class Config:
        api_key = FAKE_KEY

    cyclic: dict = {}
    cyclic["self"] = cyclic
    cmb.add_run(cmbagent_db, "run-bad", "session-bad")
    with OrmSession(cmbagent_db) as db_session:
        captor = EventCaptureManager(db_session, "run-bad", "session-bad")
        first = captor.capture_agent_call("engineer", {"content": b"\x00bytes"}, metadata={
            "llm_config": Config(), "blob": b"\xff", "nan": float("nan"), "cyclic": cyclic, "api_key": FAKE_KEY,
            "tokens": "many", "cost_usd": None})
        second = captor.capture_tool_call("engineer", "fit", {"x": float("inf")})
        captor.capture_agent_response("engineer", object(), event_id=first)
        captor.close()
    rows = {r["id"]: r for r in cmb.history(cmbagent_db, "run-bad")}
    assert {first, second} <= set(rows)
    meta = rows[first]["meta"]
    assert meta["nan"] == "NaN" and meta["cyclic"] == {"self": "<cycle>"} and meta["api_key"] == "[REDACTED]"
    assert "tokens" not in meta and "cost_usd" not in meta
    assert FAKE_KEY not in json.dumps(list(rows.values()), default=str)
    assert cmb.enrich_node  # the readers' sums work on these rows
    assert sum((r["meta"] or {}).get("tokens", 0) for r in rows.values()) == 0


# --- the websocket: cmbagent's emit_event_callback and the plan's ws_emit_callback -------------------------
async def test_emit_event_callback_over_a_real_websocket():
    """``await callback(websocket, event, run_id)`` with ExecutionEvent's attributes, for captures made in a
    worker thread (cmbagent's create_task sends nothing from there); nothing while the websocket is None."""
    import websockets

    received: list[dict] = []

    async def server(connection):
        async for text in connection:
            received.append(json.loads(text))

    async def emit(websocket, event, run_id):
        await websocket.send(json.dumps({
            "run_id": run_id, "id": event.id, "event_type": event.event_type, "event_subtype": event.event_subtype,
            "agent_name": event.agent_name, "execution_order": event.execution_order, "depth": event.depth,
            "inputs": event.inputs, "meta_keys": sorted(event.meta or {}), "status": event.status,
            "timestamp": event.timestamp.isoformat()}))

    async with websockets.serve(server, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}") as client:
            captor = EventCaptureManager(None, "run-emit", "s", websocket=None, emit_event_callback=emit)
            await asyncio.to_thread(captor.capture_tool_call, "engineer", "ignored", {})
            captor.websocket = client
            tool = await asyncio.to_thread(captor.capture_tool_call, "engineer", "fit", {"ell_max": 2000})
            message = await asyncio.to_thread(captor.capture_message, "planner", "engineer", "go", 7)
            await asyncio.to_thread(captor.flush)
            for _ in range(200):
                if len(received) >= 3:
                    break
                await asyncio.sleep(0.02)
            stats = captor.get_performance_stats()["EventObjectCallbackProcessor"]
            await asyncio.to_thread(captor.close)
    by_id = {}
    for event in received:
        by_id.setdefault(event["id"], []).append(event)
    assert {e["inputs"]["tool_name"] for e in received if e["event_type"] == "tool_call"} == {"fit"}
    assert [e["event_subtype"] for e in by_id[tool]] == ["start", "execute"]
    (sent,) = by_id[message]
    assert (sent["event_type"], sent["event_subtype"], sent["agent_name"]) == ("agent_call", "message", "engineer")
    assert "tokens" in sent["meta_keys"] and {e["run_id"] for e in received} == {"run-emit"}
    assert stats["failed"] == 0 and stats["emitted"] >= 3


def test_raising_ws_callback_never_breaks_capture(hooks):
    """A ws_emit_callback (the plan's shape) that raises: capture goes on and returns ids."""

    def broken(event_type, data):
        raise RuntimeError("UI is down")

    captor = EventCaptureManager(None, "run-ws", "s", ws_emit_callback=broken)
    assert captor.capture_tool_call("a", "t", {"x": 1}) is not None
    captor.flush()
    stats = captor.get_performance_stats()
    assert stats["events_by_type"] == {"tool_call": 1}
    assert stats["WebsocketCallbackProcessor"]["failed"] > 0
    captor.close()


# --- AG2 spans and capture calls in one run --------------------------------------------------------------
def test_ag2_spans_and_captures_land_in_cmbagents_tables(hooks, cmbagent_db, scripted_llm):
    """AG2 spans (through install_ag2_hooks) and capture_* calls share the run's order and links, read the
    same way (messages are agent_call/message rows with a messages row; LLM calls have cost_records)."""
    from autogen import ConversableAgent, register_function

    from otel_cmbagent.testing import text, tool_call

    cmb.add_run(cmbagent_db, "run-ag2", "session-ag2")
    node = cmb.add_dag_node(cmbagent_db, "run-ag2", "session-ag2", "step_1")
    received = []
    with OrmSession(cmbagent_db) as db_session:
        captor = EventCaptureManager(db_session, "run-ag2", "session-ag2",
                                     ws_emit_callback=lambda t, d: received.append((t, d)))
        set_event_captor(captor)
        captor.set_context(node_id="step_1", step_id="step_1")
        call = captor.capture_agent_call("planner", "plan the analysis", metadata={"api_key": FAKE_KEY})
        scripted_llm.push(tool_call("add", {"a": 1, "b": 2}), text("3", prompt_tokens=30, completion_tokens=4),
                          text("TERMINATE"))
        assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config(api_key=FAKE_KEY))
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        register_function(add, caller=assistant, executor=user, description="add")
        user.initiate_chat(assistant, message="add", max_turns=2, silent=True)
        captor.capture_agent_response("planner", "here is the plan", event_id=call)
        captor.close()
        set_event_captor(None)
    rows = cmb.history(cmbagent_db, "run-ag2")
    assert {r["run_id"] for r in rows} == {"run-ag2"}
    assert sorted(r["execution_order"] for r in rows) == list(range(1, len(rows) + 1))
    by_id = {r["id"]: r for r in rows}
    assert all(r["parent_event_id"] in by_id for r in rows if r["event_type"] != "run")
    conversation = next(r for r in rows if r["event_type"] == "conversation")
    assert conversation["parent_event_id"] == call, "the AG2 chat nests under the agent call open around it"
    llm_calls = [r for r in rows if r["event_type"] == "llm_call"]
    assert llm_calls and all(r["node_id"] == node for r in llm_calls)
    messages = [r for r in rows if is_message(r)]
    assert messages and all(r["agent_name"] == r["inputs"]["recipient"] for r in messages)
    assert cmb.table_count(cmbagent_db, cmb.messages, run_id="run-ag2") == len(messages)
    costs = cmb.rows_of(cmbagent_db, cmb.cost_records, run_id="run-ag2")
    assert len(costs) == len(llm_calls) and {c["session_id"] for c in costs} == {"session-ag2"}
    assert sum(c["total_tokens"] for c in costs) == sum(r["meta"]["tokens"] for r in llm_calls)
    figures = cmb.enrich_node(cmbagent_db, node, "run-ag2")
    assert figures["total_tokens"] == sum(r["meta"]["tokens"] for r in llm_calls), "tokens counted once"
    assert figures["messages_count"] == len(messages)
    assert FAKE_KEY not in json.dumps(rows, default=str) + json.dumps(received, default=str)
    assert all(t == "event_captured" for t, _ in received) and call in {d["event_id"] for _, d in received}
