"""cmbagent's event-capture API on the span pipeline: the "Stage 3" checks, and rows in cmbagent's own table."""

from __future__ import annotations

import contextvars
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session as OrmSession

from otel_cmbagent import compat
from otel_cmbagent.compat import EventCaptureManager, get_event_captor, set_event_captor
from sinks_util import table_rows
from test_sinks_end_to_end import Base, WorkflowRun
from test_sinks_end_to_end import Session as SessionRow

from conftest import FAKE_KEY


@pytest.fixture
def hooks():
    compat.install_ag2_hooks()
    yield
    compat.uninstall_ag2_hooks()
    set_event_captor(None)


def add(a: int, b: int) -> int:
    return a + b


def test_two_contexts_see_their_own_captor():
    """Stage 3 check: contextvars isolate captors (session A never writes into session B's captor)."""
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
    """Stage 3 check: 10 threads x 100 _next_order() calls give 1,000 unique values."""
    captor = EventCaptureManager(None, "run-orders", "s", enabled=False)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: [captor._next_order() for _ in range(100)], range(10)))
    values = [v for chunk in results for v in chunk]
    assert len(set(values)) == 1000 and sorted(values) == list(range(1, 1001))


def test_event_stack_is_thread_local():
    """Each thread has its own nesting stack."""
    captor = EventCaptureManager(None, "run-stack", "s", enabled=False)
    captor.event_stack.append("main")
    other = []
    thread = threading.Thread(target=lambda: other.append(list(captor.event_stack)))
    thread.start()
    thread.join()
    assert other == [[]] and captor.event_stack == ["main"]


def test_no_backend_imports():
    """Stage 3 check: importing otel_cmbagent pulls in no web backend or websocket server package."""
    code = (
        "import sys, otel_cmbagent, otel_cmbagent.compat\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('websockets', 'fastapi', 'starlette', 'uvicorn', 'aiohttp', 'flask', 'backend', 'websocket_events')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_disabled_captor_is_a_no_op():
    """enabled=False: every capture returns None, _next_order still counts."""
    captor = EventCaptureManager(None, "run-off", "s", enabled=False)
    assert captor.capture_tool_call("a", "t", {"x": 1}) is None
    assert captor.capture_message("a", "b", "hi") is None
    assert captor._next_order() == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hooks_and_legacy_calls_land_in_cmbagents_table(hooks, backend, tmp_path, postgres_url, scripted_llm):
    """AG2 spans and legacy capture_* calls land in a cmbagent-shaped ExecutionEvent table, linked, one order."""
    from autogen import ConversableAgent, register_function

    from otel_cmbagent.testing import text, tool_call

    url = f"sqlite:///{tmp_path / 'cmb.db'}" if backend == "sqlite" else postgres_url
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(sa.insert(WorkflowRun.__table__).values(id="run-1"))
        connection.execute(sa.insert(SessionRow.__table__).values(id="session-1"))
    received = []
    with OrmSession(engine) as db_session:
        captor = EventCaptureManager(
            db_session, "run-1", "session-1", ws_emit_callback=lambda t, d: received.append((t, d))
        )
        set_event_captor(captor)
        captor.set_context(node_id="node-1", step_id="step-1")
        call = captor.capture_agent_call("planner", "plan the analysis", metadata={"api_key": FAKE_KEY})
        scripted_llm.push(tool_call("add", {"a": 1, "b": 2}), text("3"), text("TERMINATE"))
        assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config(api_key=FAKE_KEY))
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        register_function(add, caller=assistant, executor=user, description="add")
        user.initiate_chat(assistant, message="add", max_turns=2, silent=True)
        captor.capture_agent_response("planner", "here is the plan", event_id=call)
        tool = captor.capture_tool_call("engineer", "fit", {"ell_max": 2000}, result="ok")
        code = captor.capture_code_execution_start("executor", "print(1)")
        captor.capture_code_execution_end(code, result="1", exit_code=0)
        captor.capture_file_generation("executor", "/tmp/plot.png", "plot", size_bytes=10)
        captor.capture_handoff("planner", "engineer", reason="plan ready")
        message = captor.capture_message("planner", "engineer", "go")
        captor.capture_error("engineer", "fit diverged", error_type="FitError")
        captor.close()
        set_event_captor(None)
    rows = table_rows(engine)
    assert rows and {r["run_id"] for r in rows} == {"run-1"}
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    by_id = {r["id"]: r for r in rows}
    assert {tool, code, message, call} <= set(by_id)
    root = rows[0]
    assert root["event_type"] == "run" and root["parent_event_id"] is None
    assert all(r["parent_event_id"] in by_id for r in rows[1:])
    types = {r["event_type"] for r in rows}
    assert {"agent_call", "llm_call", "tool_call", "code_exec", "file_gen", "handoff", "message", "error"} <= types
    ag2_rows = [r for r in rows if r["event_type"] == "llm_call"]
    assert ag2_rows and all(r["node_id"] == "node-1" and r["step_id"] == "step-1" for r in ag2_rows)
    # the AG2 conversation nests under the legacy agent call that was open when it ran
    conversation = next(r for r in rows if r["event_type"] == "conversation")
    assert conversation["parent_event_id"] == call
    assert by_id[call]["status"] == "completed"
    error_row = next(r for r in rows if r["event_type"] == "error")
    assert error_row["status"] == "failed" and "fit diverged" in error_row["error_message"]
    assert FAKE_KEY not in json.dumps(rows, default=str) + json.dumps(received, default=str)
    assert {d["event_id"] for _, d in received} >= {tool, code}
    assert all(t == "event_captured" for t, _ in received)


def test_raising_ws_callback_never_breaks_capture(hooks):
    """A ws_emit_callback that raises: capture goes on and returns ids."""

    def broken(event_type, data):
        raise RuntimeError("UI is down")

    captor = EventCaptureManager(None, "run-ws", "s", ws_emit_callback=broken)
    assert captor.capture_tool_call("a", "t", {"x": 1}) is not None
    captor.flush()
    stats = captor.get_performance_stats()
    assert stats["events_by_type"] == {"tool_call": 1}
    assert stats["WebsocketCallbackProcessor"]["failed"] > 0
    captor.close()
