"""The examples run as users run them (subprocess, in a fresh directory), and produce what they claim."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from otel_cmbagent.table.schema import is_message, row_kind
from otel_cmbagent.testing import ScriptedLLM, text
from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver

pytestmark = pytest.mark.slow  # every example runs as a script in a subprocess: not in make test-fast

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
SPAN_TYPES = {"run", "conversation", "agent_call", "llm_call", "tool_call", "code_exec", "file_gen"}


def run(args: list[str], tmp_path: Path, **env: str) -> str:
    completed = subprocess.run(
        args, check=False, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def example(name: str, tmp_path: Path, *args: str, **env: str) -> str:
    """Run examples/NAME.py in tmp_path/cwd, its temp dirs under tmp_path/tmp."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    (cwd / "chats").mkdir(parents=True, exist_ok=True)  # cmbagent's AG2 fork writes group chats under ./chats
    tmp.mkdir(exist_ok=True)
    return run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd, TMPDIR=str(tmp), **env)


def db_rows(db: Path) -> list[dict]:
    """Every execution_events row, by order, with the JSON columns decoded."""
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in connection.execute("select * from execution_events order by execution_order")]
    finally:
        connection.close()
    for row in rows:
        for column in ("inputs", "outputs", "meta"):
            row[column] = json.loads(row[column]) if row[column] else {}
    return rows


def assert_gapless(rows: list[dict]) -> None:
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))


def assert_tree(rows: list[dict]) -> None:
    """One root (the run); every other row's parent is a row of the run, one level up (a message's: its span)."""
    by_id = {r["id"]: r for r in rows}
    assert [r["event_type"] for r in rows if r["parent_event_id"] is None] == ["run"]
    for row in rows:
        if row["parent_event_id"] is not None:
            parent = by_id[row["parent_event_id"]]
            assert row["depth"] == parent["depth"] + 1, row


def test_quickstart_prints_a_gapless_tree(tmp_path):
    """quickstart.py: every span type of a chat with a tool and a code run, orders 1..N."""
    out = example("quickstart", tmp_path)
    rows = re.findall(r"^\s+(\d+)  (\w+)", out, re.MULTILINE)
    orders = [int(order) for order, _ in rows]
    assert orders == list(range(1, len(orders) + 1))
    kinds = {kind for _, kind in rows}
    assert SPAN_TYPES | {"message"} <= kinds
    assert "file result.json" in out
    assert [p.name for p in (tmp_path / "cwd").iterdir()] == ["chats"], "nothing written to the current directory"
    (out_dir,) = (tmp_path / "tmp").iterdir()
    assert (out_dir / "events.db").is_file() and (out_dir / "coding" / "result.json").is_file()


def test_quickstart_rows_in_sqlite(tmp_path):
    """quickstart.py --db: the printed rows are the database's rows, completed, one tree, one order."""
    db = tmp_path / "quickstart.db"
    out = example("quickstart", tmp_path, "--db", str(db))
    rows = db_rows(db)
    run_id = re.search(r"^run (\S+)  trace ([0-9a-f]{32})", out, re.MULTILINE)
    assert {r["run_id"] for r in rows} == {run_id.group(1)} and {r["trace_id"] for r in rows} == {run_id.group(2)}
    assert_gapless(rows)
    assert_tree(rows)
    printed = [(int(o), k, a) for o, k, a in re.findall(r"^\s+(\d+)  (\w+)\s+(\S+)", out, re.MULTILINE)]
    assert printed == [(r["execution_order"], row_kind(r), r["agent_name"] or "-") for r in rows]
    assert {r["status"] for r in rows} == {"completed"}
    assert SPAN_TYPES | {"message"} <= {row_kind(r) for r in rows}
    (tool,) = [r for r in rows if r["event_type"] == "tool_call"]
    assert tool["inputs"]["arguments"] == {"a": 6, "b": 7} and tool["outputs"]["result"] == "42"
    (code,) = [r for r in rows if r["event_type"] == "code_exec"]
    assert code["meta"]["exit_code"] == 0 and "saved result.json" in code["outputs"]["result"]
    (file,) = [r for r in rows if r["event_type"] == "file_gen"]
    assert file["inputs"]["file_path"].endswith("/coding/result.json") and file["parent_event_id"] == code["id"]
    assert rows[0]["meta"]["gen_ai.usage.input_tokens"] > 0


def test_group_chat_handoffs_and_message_counts(tmp_path):
    """group_chat.py: round-robin handoffs under the group conversation; printed counts match the database."""
    db = tmp_path / "group.db"
    out = example("group_chat", tmp_path, "--db", str(db))
    rows = db_rows(db)
    assert_gapless(rows)
    assert_tree(rows)
    (group,) = [r for r in rows if r["meta"].get("cmbagent.conversation.kind") == "group_chat"]
    assert group["meta"]["cmbagent.group.agents"] == ["user", "planner", "engineer", "reviewer"]
    handoffs = [r for r in rows if r["event_type"] == "handoff"]
    pairs = [(h["inputs"]["from_agent"], h["inputs"]["to_agent"]) for h in handoffs]
    assert pairs == [("user", "planner"), ("planner", "engineer"), ("engineer", "reviewer")]
    assert all(h["parent_event_id"] == group["id"] for h in handoffs)
    assert re.findall(r"^\s+\d+  (\w+) -> (\w+)$", out, re.MULTILINE) == pairs
    counts: dict[str, int] = {}
    for r in rows:
        if is_message(r):
            counts[r["inputs"]["sender"]] = counts.get(r["inputs"]["sender"], 0) + 1
    assert {a: int(n) for a, n in re.findall(r"^  (\w+)\s+(\d+)$", out, re.MULTILINE)} == counts
    assert {"planner", "engineer", "reviewer", "chat_manager"} <= set(counts)
    assert "TERMINATE" in json.dumps([r["inputs"] for r in rows if is_message(r) and r["inputs"]["sender"] == "reviewer"])


def dag_example(name: str, tmp_path: Path) -> tuple[str, list[dict], dict[str, dict]]:
    """Run a DAG example: its output, its rows (one run, one trace, one tree, gapless) and its plan/fit/plot steps."""
    db = tmp_path / f"{name}.db"
    out = example(name, tmp_path, "--db", str(db))
    rows = db_rows(db)
    assert_gapless(rows)
    assert_tree(rows)
    root = rows[0]
    assert len({r["run_id"] for r in rows}) == 1 and {r["trace_id"] for r in rows} == {root["trace_id"]}
    steps = {r["step_id"]: r for r in rows if r["event_type"] == "step"}
    assert set(steps) == {"plan", "fit", "plot"}
    assert all(s["parent_event_id"] == root["id"] and s["node_id"] == f"node-{k}" for k, s in steps.items())
    return out, rows, steps


def test_dag_parallel_steps_share_the_run_and_overlap(tmp_path):
    """dag_parallel_steps.py: fit and plot run in two threads, in one run and trace, at the same time."""
    out, rows, steps = dag_example("dag_parallel_steps", tmp_path)
    root = rows[0]
    fit, plot = steps["fit"], steps["plot"]
    start = max(datetime.fromisoformat(fit["started_at"]), datetime.fromisoformat(plot["started_at"]))
    end = min(datetime.fromisoformat(fit["completed_at"]), datetime.fromisoformat(plot["completed_at"]))
    assert start < end, "the parallel steps overlap in time"
    assert datetime.fromisoformat(steps["plan"]["completed_at"]) <= datetime.fromisoformat(fit["started_at"])
    for step_id in ("fit", "plot"):  # each step's LLM call carries the step identity of its thread
        (llm,) = [r for r in rows if r["event_type"] == "llm_call" and r["agent_name"] == step_id]
        assert llm["step_id"] == step_id
    assert "same run and trace: True; overlapping: True" in out
    assert "gapless: True" in out and f"trace {root['trace_id']}" in out


def test_process_pool_steps_join_the_run(tmp_path):
    """process_pool.py: steps in spawned workers and their code run land in the run's trace and one order."""
    out, rows, _ = dag_example("process_pool", tmp_path)
    for step_id in ("fit", "plot"):  # the worker's own AG2 spans, under its step
        assert {"conversation", "agent_call", "llm_call"} <= {r["event_type"] for r in rows if r["step_id"] == step_id}
    (run_code,) = [r for r in rows if r["event_type"] == "code_exec"]
    assert run_code["step_id"] == "fit" and run_code["meta"]["exit_code"] == 0
    assert f"parent span {run_code['span_id']}" in run_code["outputs"]["result"]
    assert run_code["meta"]["cmbagent.code.cpu_user_s"] > 0 and run_code["meta"]["cmbagent.code.max_rss_bytes"] > 0
    workers = re.search(r"^this process (\d+), workers \[(\d+), (\d+)\]$", out, re.MULTILINE)
    assert workers and len(set(workers.groups())) == 3
    assert "its TRACEPARENT names this span: True" in out
    assert f"{len(rows)} rows from 3 processes, one trace: True; orders 1..{len(rows)} gapless: True" in out


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_otlp_collector_sends_the_trace(tmp_path, protocol):
    """otlp_collector.py: the run's spans reach a real OTLP receiver; the printed Jaeger URL names that trace."""
    receiver_class = OTLPGRPCReceiver if protocol == "grpc" else OTLPHTTPReceiver
    with receiver_class() as receiver:
        endpoint = receiver.endpoint.removesuffix("/v1/traces")
        out = example("otlp_collector", tmp_path, "--endpoint", endpoint, *(["--grpc"] if protocol == "grpc" else []),
                      OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="")
        trace_id = re.search(r"^http://localhost:16686/trace/([0-9a-f]{32})$", out, re.MULTILINE).group(1)
        spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
    assert spans and len(spans) == len(receiver.spans)
    names = {s["name"] for s in spans}
    assert {"invoke_workflow otlp-demo", "conversation user", "chat scripted-model", "execute_tool lookup_h0"} <= names
    assert {s["resource"]["service.name"] for s in spans} == {"cmbagent"}
    orders = sorted(s["attributes"]["cmbagent.execution_order"] for s in spans)
    assert len(set(orders)) == len(orders)
    (tool,) = [s for s in spans if s["name"] == "execute_tool lookup_h0"]
    assert tool["attributes"]["cmbagent.tool.success"] is True
    assert "gen_ai.tool.call.result" not in tool["attributes"], "content stays out of OTLP by default"
    assert f"sent {len(spans)} spans" in out and "failed 0" in out


def test_live_websocket_streams_envelopes_during_the_run(tmp_path):
    """live_websocket.py: a client receives every start/end/message envelope, live, matching the SQL rows."""
    db = tmp_path / "live.db"
    out = example("live_websocket", tmp_path, "--db", str(db))
    seen = re.findall(r"^(during|after)\s+(\w+)\s+order=(\d+)\s+(\w+)\s+agent=(\S+)\s+(\w+)$", out, re.MULTILINE)
    assert seen, out
    assert {envelope for _, envelope, *_ in seen} == {"event_captured"}
    assert seen[0][2:] == ("1", "run", "-", "running") and seen[-1][2:] == ("1", "run", "-", "completed")
    assert sum(when == "during" for when, *_ in seen) >= 3, "envelopes arrive while the agents talk"
    statuses: dict[int, set] = {}
    for _, _, order, kind, agent, status in seen:
        statuses.setdefault(int(order), set()).add((kind, agent, status))
    rows = db_rows(db)
    assert_gapless(rows)
    assert sorted(statuses) == [r["execution_order"] for r in rows]  # every event of the run came over the wire
    for row in rows:
        final = (row["event_type"], row["agent_name"] or "-", row["status"])
        expected = {final} if is_message(row) else {final, final[:2] + ("running",)}
        assert statuses[row["execution_order"]] == expected
    assert re.search(rf"^run {rows[0]['run_id']}: {len(seen)} envelopes sent", out, re.MULTILINE)


def test_cmbagent_drop_in_rows_in_one_order(tmp_path):
    """cmbagent_drop_in.py: AG2 spans and legacy capture_* calls share one gapless order in execution_events."""
    db = tmp_path / "cmbagent.db"
    out = example("cmbagent_drop_in", tmp_path, "--db", str(db))
    rows = db_rows(db)
    assert_gapless(rows)
    assert_tree(rows)
    assert len({r["run_id"] for r in rows}) == 1 and len({r["session_id"] for r in rows}) == 1
    assert SPAN_TYPES - {"code_exec", "file_gen"} | {"handoff", "message"} <= {row_kind(r) for r in rows}
    by_type = {}
    for r in rows:
        by_type.setdefault(r["event_type"], []).append(r)
    (planner,) = [r for r in by_type["agent_call"] if r["agent_name"] == "planner" and not is_message(r)]
    (conversation,) = by_type["conversation"]
    assert conversation["parent_event_id"] == planner["id"], "the AG2 chat nests under the open legacy agent call"
    assert planner["outputs"] == {"response": "Plan: fit up to ell_max = 2500"}
    assert planner["inputs"] == {"message": "Plan the power-spectrum analysis", "context": {}}
    assert (planner["meta"]["sender"], planner["meta"]["duration_ms"]) == ("user", 40)
    assert {r["step_id"] for r in by_type["llm_call"]} == {"planning"}
    assert by_type["tool_call"][0]["outputs"]["result"] == "2500"
    (code,) = by_type["code_exec"]
    assert code["step_id"] == "fit" and code["outputs"] == {"result": "chi2 = 1.02"} and code["meta"]["exit_code"] == 0
    assert code["duration_ms"] == 12 and code["event_subtype"] == "complete"
    assert by_type["file_gen"][0]["inputs"] == {"file_path": "plots/cl_fit.png", "file_type": "plot"}
    assert by_type["handoff"][0]["meta"]["reason"] == "plan ready" and by_type["handoff"][0]["agent_name"] == "planner"
    (done,) = [r for r in rows if is_message(r) and r["inputs"]["recipient"] == "planner"]
    assert (done["agent_name"], done["meta"]["tokens"], done["step_id"]) == ("planner", 6, "fit")
    printed = [int(o) for o in re.findall(r"^\s+(\d+)  \w+", out, re.MULTILINE)]
    assert printed == list(range(1, len(rows) + 1))
    assert f"one gapless order 1..{len(rows)}: True" in out


@pytest.mark.parametrize(
    "name",
    ["quickstart", "group_chat", "dag_parallel_steps", "process_pool", "otlp_collector", "live_websocket",
     "cmbagent_drop_in"],
)
def test_examples_take_a_real_endpoint(tmp_path, name):
    """--llm-url/--model send every LLM call of the example to that OpenAI-compatible endpoint instead."""
    with ScriptedLLM(default=text("All done. TERMINATE"), model="served-model") as llm, OTLPHTTPReceiver() as otlp:
        extra = ["--endpoint", otlp.endpoint.removesuffix("/v1/traces")] if name == "otlp_collector" else []
        example(name, tmp_path, "--llm-url", llm.base_url, "--model", "my-model", *extra,
                OPENAI_API_KEY="sk-from-the-environment-0123456789")
    assert llm.requests and {r["model"] for r in llm.requests} == {"my-model"}
