"""``run_demo``: the cmb-demo workflow with real AG2 agents, read back from its SQLite ``execution_events``."""

from __future__ import annotations

import io
import os
import tempfile
from collections import Counter

import pytest
import sqlalchemy as sa
from rich.console import Console

from otel_cmbagent.table.schema import row_kind
from otel_cmbagent.apps.demo import RUN_NAME, DemoResult, code_result, db_work_dir, run_demo
from otel_cmbagent.testing import ScriptedLLM, text

EVENT_TYPES = {"run", "step", "conversation", "agent_call", "llm_call", "tool_call", "code_exec", "file_gen",
               "handoff", "message"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_rows(db_path: str) -> list[dict]:
    engine = sa.create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as connection:
            result = connection.execute(sa.text("select * from execution_events order by execution_order"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def meta(row: dict) -> dict:
    import json

    value = row["meta"]
    return json.loads(value) if isinstance(value, str) else (value or {})


def inputs(row: dict) -> dict:
    import json

    value = row["inputs"]
    return json.loads(value) if isinstance(value, str) else (value or {})


def check_run(rows: list[dict], result: DemoResult) -> None:
    """The invariants every demo run satisfies, whatever the LLM."""
    assert rows, "no rows written"
    assert {row["run_id"] for row in rows} == {result.run_id}
    (run,) = [row for row in rows if row["event_type"] == "run"]
    assert meta(run)["span_name"] == f"invoke_workflow {RUN_NAME}"
    assert {row["trace_id"] for row in rows} == {result.trace_id}
    orders = [row["execution_order"] for row in rows]
    assert orders == list(range(1, len(rows) + 1)), "execution_order must be gapless 1..N"
    assert {row["status"] for row in rows} <= {"completed", "failed"}, "no row may stay running"
    steps = {row["step_id"]: row for row in rows if row["event_type"] == "step"}
    assert set(steps) == {"plan", "fit", "plot", "report"}
    for step in steps.values():
        assert step["parent_event_id"] == run["id"], "every step is a child of the run"
    plot, report = steps["plot"], steps["report"]
    assert plot["started_at"] < report["completed_at"] and report["started_at"] < plot["completed_at"], (
        "plot and report run in parallel"
    )
    stats = result.stats["sql"]
    assert stats["dropped"] == stats["failed"] == stats["rows_spilled"] == 0


@pytest.mark.parametrize("live", [False, True], ids=["quiet", "live"])
def test_demo_workflow(tmp_path, capfd, live):
    db_path = str(tmp_path / "demo.db")
    cwd = os.getcwd()
    buffer = io.StringIO()
    options = {"console": Console(file=buffer, width=200)} if live else {}

    result = run_demo(db_path, live=live, work_dir=db_work_dir(db_path), **options)

    assert os.getcwd() == cwd, "the working directory is restored"
    assert result.wall_time_s < 30
    rows = read_rows(db_path)
    check_run(rows, result)
    counts = Counter(row_kind(row) for row in rows)
    assert EVENT_TYPES <= set(counts), f"missing event types: {EVENT_TYPES - set(counts)}"

    # the planning group chat: every speaker change is a handoff
    handoffs = [meta(row)["span_name"] for row in rows if row["event_type"] == "handoff"]
    assert handoffs[:4] == ["handoff executor -> planner", "handoff planner -> engineer",
                            "handoff engineer -> executor", "handoff executor -> reviewer"]
    assert {row["step_id"] for row in rows if row["event_type"] == "handoff"} == {"plan"}

    # the fit: the tool fails once, is retried with other arguments and succeeds
    tools = [row for row in rows if row["event_type"] == "tool_call"]
    fits = [row for row in tools if inputs(row)["tool_name"] == "fit_power_law"]
    assert [row["status"] for row in fits] == ["failed", "completed"]
    assert "did not converge" in fits[0]["error_message"]
    assert {row["step_id"] for row in fits} == {"fit"}

    # code runs and the files they wrote
    code_runs = [row for row in rows if row["event_type"] == "code_exec"]
    assert [row["status"] for row in code_runs] == ["completed", "completed"]
    assert [row["step_id"] for row in code_runs] == ["plan", "plot"]
    files = {os.path.basename(inputs(row)["file_path"]): row for row in rows if row["event_type"] == "file_gen"}
    assert {"spectrum.csv", "spectrum.png"} <= set(files)
    assert inputs(files["spectrum.csv"])["file_type"] == "data"
    assert inputs(files["spectrum.png"])["file_type"] == "plot"
    for name in ("spectrum.csv", "spectrum.png"):
        assert files[name]["parent_event_id"] == code_runs[0]["id"]
    with open(inputs(files["spectrum.png"])["file_path"], "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert os.path.commonpath([result.work_dir, inputs(files["spectrum.csv"])["file_path"]]) == result.work_dir
    assert os.path.isfile(os.path.join(result.work_dir, "report", "report.md"))

    # parallel steps have their own conversations, in the same run
    for step_id in ("plot", "report"):
        assert any(row["event_type"] == "conversation" and row["step_id"] == step_id for row in rows)
    assert all(row["status"] == "completed" for row in rows if row["event_type"] in ("llm_call", "step", "run"))

    out, _ = capfd.readouterr()
    assert "EXECUTING" not in out and ">>>>>>>>" not in out and "Prompt Tokens" not in out, "AG2 output leaked"
    if live:
        shown = buffer.getvalue()
        for word in ("tool_call", "code_exec", "file_gen", "fit_power_law", "failed", "handoff planner -> engineer",
                     result.run_id):
            assert word in shown
        assert result.live_events["tool_call"] == 3 and result.live_events["step"] == 4
        assert result.stats["websocket"]["dropped"] == result.stats["websocket"]["failed"] == 0
        assert result.work_dir.startswith(os.path.join(str(tmp_path), "otel_cmbagent_demo"))
        assert out == "", "with an explicit console nothing goes to stdout"
        rows_in_table = len(rows)
        assert f"{rows_in_table} rows in {db_path}" in shown, "the closing line counts the run's rows in the table"
    else:
        assert out == "", "live=False is quiet"
        assert result.live_events == {} and "websocket" not in result.stats


def test_demo_without_a_work_dir_leaves_nothing_behind(tmp_path, monkeypatch):
    """Without ``work_dir`` the agents' files go to a temp dir that is removed before run_demo returns (every
    demo run and the test suite used to leave an otel-cmbagent-demo-* folder in /tmp)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    result = run_demo(str(tmp_path / "demo.db"), live=False)
    check_run(read_rows(str(tmp_path / "demo.db")), result)
    assert os.path.commonpath([str(temp), result.work_dir]) == str(temp)
    assert list(temp.iterdir()) == [], "the temp work dir is removed"


def test_demo_with_an_endpoint_that_never_terminates(tmp_path, monkeypatch):
    """llm_url mode: a model that never writes code, calls tools or says TERMINATE still ends (bounded chats)."""
    fake_key = "sk-demo-FAKEKEY-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", fake_key)
    with ScriptedLLM(lambda request: text("Let me think about it.", delay=0.002), model="endpoint-model") as server:
        result = run_demo(str(tmp_path / "demo.db"), llm_url=server.base_url, model="endpoint-model", live=False,
                          work_dir=tmp_path / "work")
        assert server.requests and all(r["model"] == "endpoint-model" for r in server.requests)
    rows = read_rows(str(tmp_path / "demo.db"))
    check_run(rows, result)
    assert not any(row["event_type"] in ("tool_call", "code_exec") for row in rows)
    assert fake_key not in repr(rows)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("exitcode: 0 (execution succeeded)\nCode output: ok", True),
        ("exitcode: 1 (execution failed)\nCode output: boom", False),
        ("Execution results:\n\nExecution output: ok", True),  # cmbagent's fork
        ("execution results:\nExecution output: boom", False),
        ("Here is the plan", None),
    ],
)
def test_code_result(content, expected):
    assert code_result(content) is expected
