"""The ``otel-cmbagent`` console script, run for real in a subprocess against databases of real traced runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

import otel_cmbagent as oc
from otel_cmbagent.table import store
from otel_cmbagent.table.rows import event_id
from otel_cmbagent.table.schema import is_message
from otel_cmbagent.exporters.sql import SQLEventSink, make_engine
from otel_cmbagent.testing import ScriptedLLM
from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver
from sinks_util import PausedRun, scripted_run, table_rows
from test_store import CODE_RUN_PREFIX, TOOL_RUN_PREFIX, make_cmbagent_db, make_traced_db

CLI = Path(sys.executable).parent / "otel-cmbagent"
COMMANDS = ("runs", "tree", "timeline", "events", "export", "replay", "serve", "demo")


def run_cli(*args, cwd=None, env=None, timeout=120, check=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "COLUMNS"))}
    environment.update({"COLUMNS": "220", "PYTHONIOENCODING": "utf-8", **(env or {})})
    result = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                            env=environment, timeout=timeout)
    if check is not None:
        assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
    return result


def assert_one_line_error(result, *fragments, code=1):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("otel-cmbagent: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A database with two real traced runs (a tool chat, then a chat whose code fails)."""
    db = make_traced_db(tmp_path_factory.mktemp("cli"))
    db["rows"] = table_rows(make_engine(db["url"]))
    return db


def rows_of(traced, run_id):
    return [r for r in traced["rows"] if r["run_id"] == run_id]


def meta(row):
    return row["meta"] if isinstance(row["meta"], dict) else json.loads(row["meta"])


def inputs(row):
    return row["inputs"] if isinstance(row["inputs"], dict) else json.loads(row["inputs"])


# --- help ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_console_script_help_everywhere():
    assert CLI.exists(), f"console script not installed at {CLI}"
    top = run_cli("--help", check=0)
    for command in COMMANDS:
        assert command in top.stdout
        sub = run_cli(command, "--help", check=0)
        assert sub.stdout.startswith(f"Usage: otel-cmbagent {command}"), sub.stdout
    assert oc.__version__ in run_cli("--version", check=0).stdout


# --- runs ----------------------------------------------------------------------------------------
def test_runs_lists_the_runs(traced):
    result = run_cli("runs", "--db", traced["path"], check=0)
    lines = result.stdout.splitlines()
    code_line = next(line for line in lines if CODE_RUN_PREFIX[:8] in line and "failing-code" in line)
    tool_line = next(line for line in lines if "tool-chat" in line)
    assert lines.index(code_line) < lines.index(tool_line), "newest first"
    tool_rows = rows_of(traced, traced["tool_run"])
    llm = [meta(r) for r in tool_rows if r["event_type"] == "llm_call"]
    tokens_in = sum(m["gen_ai.usage.input_tokens"] for m in llm)
    tokens_out = sum(m["gen_ai.usage.output_tokens"] for m in llm)
    tokens = f"{tokens_in:,} / {tokens_out:,}"
    assert tokens in tool_line and "completed" in tool_line and f" {len(tool_rows)} " in tool_line
    assert "user, assistant" in tool_line and "$" in tool_line

    out = run_cli("runs", "--db", traced["path"], "--json", check=0).stdout
    as_json = [json.loads(line) for line in out.splitlines()]
    assert [r["run_id"] for r in as_json] == [traced["code_run"], traced["tool_run"]]
    assert as_json[1]["events"] == len(tool_rows) and as_json[1]["agents"] == ["user", "assistant"]
    assert datetime.fromisoformat(as_json[0]["started_at"]).tzinfo is not None
    assert len(run_cli("runs", "--db", traced["path"], "--json", "--limit", "1", check=0).stdout.splitlines()) == 1


@pytest.mark.slow
def test_default_db_is_the_working_directory_file_or_the_env_url(traced, tmp_path):
    (tmp_path / "otel_cmbagent.db").symlink_to(traced["path"])
    assert "tool-chat" in run_cli("runs", cwd=tmp_path, check=0).stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "tool-chat" in run_cli("runs", cwd=elsewhere, env={"OTEL_CMBAGENT_SQL_URL": traced["url"]}, check=0).stdout
    assert_one_line_error(run_cli("runs", cwd=elsewhere), "no database at", "otel_cmbagent.db")


# --- tree ----------------------------------------------------------------------------------------
def test_tree_last_shows_the_nested_names(traced):
    out = run_cli("tree", "last", "--db", traced["path"], check=0).stdout
    lines = out.splitlines()
    assert traced["code_run"] in lines[0]

    def line_of(fragment, start=0):
        return next(i for i, line in enumerate(lines) if i >= start and fragment in line)

    def indent(i):
        return len(lines[i]) - len(lines[i].lstrip(" │├└─"))

    run_line = line_of("invoke_workflow failing-code")
    conversation = line_of("conversation runner")
    agent = line_of("invoke_agent runner")
    code_line = line_of("execute_code runner")
    llm_line = line_of("chat scripted-model")
    assert run_line < conversation < agent < code_line
    assert indent(run_line) < indent(conversation) < indent(agent) < indent(code_line)
    assert indent(llm_line) == indent(code_line), "both sit under an agent turn"
    assert "failed" in lines[code_line] and "exit code 3" in lines[code_line]
    assert "message" in out and "runner → coder" in out
    no_messages = run_cli("tree", "last", "--db", traced["path"], "--no-messages", check=0).stdout
    assert "runner → coder" not in no_messages and "execute_code runner" in no_messages
    for row in rows_of(traced, traced["code_run"]):
        assert f"#{row['execution_order']} " in out


def test_tree_accepts_a_unique_prefix(traced):
    out = run_cli("tree", TOOL_RUN_PREFIX, "--db", traced["path"], check=0).stdout
    assert traced["tool_run"] in out.splitlines()[0]
    assert "tool_call execute_tool add" in out


# --- timeline ------------------------------------------------------------------------------------
def test_timeline_last_draws_bars(traced):
    out = run_cli("timeline", "last", "--db", traced["path"], "--width", "60", check=0).stdout
    lines = out.splitlines()
    spans = [r for r in rows_of(traced, traced["code_run"]) if not is_message(r)]
    bar_lines = [line for line in lines if "█" in line or "▏" in line]
    assert len(bar_lines) >= len(spans)
    root = next(line for line in lines if line.startswith("invoke_workflow failing-code"))
    assert "█" * 55 in root, "the run spans (almost) the whole axis"
    code_line = next(line for line in lines if "execute_code runner" in line)
    assert "✗" in code_line and "ms" in code_line
    # indented by depth
    assert code_line.index("execute_code") > next(line for line in lines if "invoke_agent runner" in line).index(
        "invoke_agent")
    assert "✉" not in out, "messages only on request"
    with_messages = run_cli("timeline", "last", "--db", traced["path"], "--messages", check=0).stdout
    messages = [r for r in rows_of(traced, traced["code_run"]) if is_message(r)]
    assert with_messages.count("◆") == len(messages)


# --- events --------------------------------------------------------------------------------------
def test_events_json_lines(traced):
    out = run_cli("events", "last", "--db", traced["path"], "--json", check=0).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    stored = rows_of(traced, traced["code_run"])
    assert [r["execution_order"] for r in rows] == list(range(1, len(stored) + 1)), "gapless"
    assert {r["id"] for r in rows} == {r["id"] for r in stored}
    columns = {
        "id", "run_id", "node_id", "step_id", "session_id", "parent_event_id", "event_type", "event_subtype",
        "agent_name", "agent_role", "timestamp", "started_at", "completed_at", "duration_ms", "inputs", "outputs",
        "error_message", "meta", "execution_order", "depth", "status", "trace_id", "span_id"}
    assert all(columns <= set(r) for r in rows)
    for row in rows:
        assert datetime.fromisoformat(row["timestamp"]).tzinfo is not None
        assert isinstance(row["meta"], dict)


def test_events_filters(traced):
    out = run_cli("events", TOOL_RUN_PREFIX, "--db", traced["path"], "--type", "tool_call", "--json", check=0).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["event_type"] for r in rows] == ["tool_call"]
    assert rows[0]["inputs"]["arguments"]["a"] == 20
    table = run_cli("events", TOOL_RUN_PREFIX, "--db", traced["path"], "-t", "tool_call", "-t", "llm_call", check=0)
    body = [line for line in table.stdout.splitlines() if "tool_call" in line or "llm_call" in line]
    assert len(body) == 4 and "execute_tool add" in table.stdout
    by_agent = run_cli("events", "last", "--db", traced["path"], "--agent", "coder", "--json", check=0).stdout
    assert {json.loads(line)["agent_name"] for line in by_agent.splitlines()} == {"coder"}
    table = run_cli("events", "last", "--db", traced["path"], check=0).stdout
    assert "failed" in next(line for line in table.splitlines() if "code_exec" in line)


# --- export --------------------------------------------------------------------------------------
def check_exported(spans, rows):
    """The received spans are the stored rows: same trace/span/parent ids, times, statuses; messages as events."""
    span_rows = {r["id"]: r for r in rows if not is_message(r)}
    messages = [r for r in rows if is_message(r)]
    assert len(spans) == len(span_rows)
    for span in spans:
        row = span_rows[event_id(int(span["trace_id"], 16), int(span["span_id"], 16))]
        assert span["trace_id"] == row["trace_id"] and span["span_id"] == row["span_id"]
        assert span["name"] == meta(row)["span_name"]
        parent_span = span["parent_span_id"]
        parent = event_id(int(span["trace_id"], 16), int(parent_span, 16)) if parent_span else None
        assert parent == row["parent_event_id"]
        assert span["attributes"]["cmbagent.execution_order"] == row["execution_order"]
        assert span["attributes"]["cmbagent.event_type"] == row["event_type"]
        assert span["resource"]["service.name"] == "cmbagent"
        started = row["started_at"]  # SQLite via text(): naive UTC, as a string
        started = datetime.fromisoformat(started) if isinstance(started, str) else started
        started = started.replace(tzinfo=timezone.utc)
        assert span["start_time_unix_nano"] == int(started.timestamp() * 1_000_000) * 1_000
        assert span["end_time_unix_nano"] >= span["start_time_unix_nano"]
        assert span["status_code"] == {"failed": "ERROR", "completed": "OK"}.get(row["status"], "UNSET")
        # the OpenInference keys the rows do not store come back (Phoenix reads them)
        assert span["attributes"]["openinference.span.kind"] in {"CHAIN", "AGENT", "LLM", "TOOL"}
        assert span["attributes"]["session.id"] == row["session_id"]
        assert "cmbagent.incomplete" not in span["attributes"]
        if row["event_type"] == "llm_call":
            assert span["kind"] == "CLIENT"
            assert span["attributes"]["gen_ai.usage.input_tokens"] == meta(row)["gen_ai.usage.input_tokens"]
    events = [(s, e) for s in spans for e in s["events"]]
    assert len(events) == len(messages)
    assert {e["name"] for _, e in events} == {"cmbagent.message"}
    for span, event in events:
        (message,) = [m for m in messages if m["execution_order"] == event["attributes"]["cmbagent.execution_order"]]
        assert event_id(int(span["trace_id"], 16), int(span["span_id"], 16)) == message["parent_event_id"]
        assert event["attributes"]["cmbagent.message.recipient"] == message["agent_name"]
        assert event["attributes"]["cmbagent.message.sender"] == inputs(message)["sender"]


@pytest.mark.parametrize("receiver_cls,protocol,base_url", [
    (OTLPHTTPReceiver, "http/protobuf", True),
    (OTLPHTTPReceiver, "http/protobuf", False),
    (OTLPGRPCReceiver, "grpc", False),
])
def test_export_keeps_the_original_trace(traced, receiver_cls, protocol, base_url):
    rows = rows_of(traced, traced["code_run"])
    with receiver_cls() as receiver:
        endpoint = receiver.endpoint.removesuffix("/v1/traces") if base_url else receiver.endpoint
        result = run_cli("export", "last", "--otlp", endpoint, "--protocol", protocol, "--db", traced["path"], check=0)
        spans = receiver.wait_for(len([r for r in rows if not is_message(r)]), timeout=10)
    check_exported(spans, rows)
    trace_id = rows[0]["trace_id"]
    assert f"exported {len(spans)} spans" in result.stdout
    assert trace_id in result.stdout and f"/trace/{trace_id}" in result.stdout
    assert result.stderr == ""
    failed = next(s for s in spans if s["name"] == "execute_code runner")
    assert failed["status_code"] == "ERROR" and "exit code 3" in failed["status_message"]
    assert "cmbagent.code.blocks" not in failed["attributes"], "content stays out of OTLP by default"
    assert failed["attributes"]["ag2.code_execution.exit_code"] == 3, "non-content outputs go back as attributes"


def test_export_with_content_and_endpoint_from_the_environment(traced):
    rows = rows_of(traced, traced["tool_run"])
    with OTLPHTTPReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint.removesuffix("/v1/traces"),
               "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
               "OTEL_SERVICE_NAME": "cmbagent"}
        run_cli("export", TOOL_RUN_PREFIX, "--db", traced["path"], env=env, check=0)
        spans = receiver.wait_for(len([r for r in rows if not is_message(r)]), timeout=10)
    check_exported(spans, rows)
    (tool,) = [s for s in spans if s["name"] == "execute_tool add"]
    assert json.loads(tool["attributes"]["gen_ai.tool.call.arguments"])["a"] == 20
    assert tool["attributes"]["gen_ai.tool.call.result"] == "42"
    contents = [e["attributes"].get("cmbagent.message.content") for s in spans for e in s["events"]]
    assert all(contents) and any("add 20 and 22" in c for c in contents)


@pytest.mark.slow
def test_cmbagents_own_table(tmp_path):
    """cmbagent's table keeps trace/span ids in meta: every command works, and export restores them."""
    url, engine = make_cmbagent_db(tmp_path)
    raw = table_rows(engine, where="where run_id = 'cmb-run-1'")
    rows = []
    for row in raw:
        row = dict(row, meta=meta(row))
        rows.append(dict(row, trace_id=row["meta"]["trace_id"], span_id=row["meta"]["span_id"]))
    runs = run_cli("runs", "--db", url, check=0).stdout
    assert "cmb-run-2" in runs and "cmb-run-1" in runs
    assert "execute_code runner" in run_cli("tree", "last", "--db", url, check=0).stdout
    assert "█" in run_cli("timeline", "cmb-run-1", "--db", url, check=0).stdout
    events = [json.loads(line) for line in run_cli("events", "cmb-run-1", "--db", url, "--json", check=0).stdout
              .splitlines()]
    assert [e["span_id"] for e in events] == [r["span_id"] for r in rows]
    with OTLPHTTPReceiver() as receiver:
        run_cli("export", "cmb-run-1", "--otlp", receiver.endpoint, "--db", url, check=0)
        spans = receiver.wait_for(len([r for r in rows if not is_message(r)]), timeout=10)
    check_exported(spans, rows)


@pytest.mark.slow
def test_export_of_a_live_run_marks_it_incomplete(tmp_path):
    """Rows still running (the process is mid-run) are exported ending now, with cmbagent.incomplete=true."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    tracing = oc.setup_tracing(sql_url=url, set_global=False, handle_sigterm=False)
    with ScriptedLLM() as llm:
        try:
            with PausedRun(llm, run_id="live-run"):
                tracing.force_flush()
                runs = run_cli("runs", "--db", url, check=0).stdout
                assert "live" in next(line for line in runs.splitlines() if "live-run" in line)
                tree = run_cli("tree", "last", "--db", url, check=0).stdout
                assert "live" in next(line for line in tree.splitlines() if "execute_tool add" in line)
                timeline = run_cli("timeline", "last", "--db", url, check=0).stdout
                assert "▸" in timeline and "live" in timeline
                rows = table_rows(make_engine(url))
                with OTLPHTTPReceiver() as receiver:
                    run_cli("export", "live-run", "--otlp", receiver.endpoint, "--db", url, check=0)
                    spans = receiver.wait_for(len([r for r in rows if not is_message(r)]), timeout=10)
        finally:
            tracing.shutdown()
    running = {r["span_id"] for r in rows if r["status"] == "running"}
    assert {"invoke_workflow sinks", "execute_tool add"} <= {s["name"] for s in spans if s["span_id"] in running}
    for span in spans:
        assert span["attributes"].get("cmbagent.incomplete", False) is (span["span_id"] in running)
        assert span["end_time_unix_nano"] >= span["start_time_unix_nano"]


# --- replay --------------------------------------------------------------------------------------
def spilled_run(tmp_path, llm):
    """A real run whose sink spills every row (its database is a directory): (spill file, run)."""
    spill = tmp_path / "rows.spill.jsonl"
    not_a_db = tmp_path / "a-directory"
    not_a_db.mkdir()
    tracing = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
    sink = SQLEventSink(f"sqlite:///{not_a_db}", spill_path=spill, max_retries=1, retry_backoff=0.01)
    tracing.tracer_provider.add_span_processor(sink)
    try:
        run = scripted_run(llm, run_id="spilled-run")
        sink.force_flush()
    finally:
        tracing.shutdown()
    assert sink.stats["rows_spilled"] > 0 and spill.exists()
    return spill, run


def test_replay_a_spill_file(tmp_path, scripted_llm):
    """Rows a real sink spilled (its database is unusable) are written back by `replay`."""
    spill, run = spilled_run(tmp_path, scripted_llm)
    target = tmp_path / "replayed.db"
    result = run_cli("replay", spill, "--db", target, check=0)
    rows = table_rows(make_engine(f"sqlite:///{target}"))
    assert f"replayed {len(rows)} rows" in result.stdout
    assert {r["run_id"] for r in rows} == {run.run_id}
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["status"] for r in rows} == {"completed"}
    assert not spill.exists() and spill.with_name(spill.name + ".replayed").exists()
    assert "spilled-" in run_cli("runs", "--db", target, check=0).stdout  # its short id


def test_replay_skips_a_cut_last_line_and_a_refused_row_and_writes_every_valid_row(tmp_path, scripted_llm):
    """A spill file whose last line was cut short (the process died mid-write) and one of whose rows the
    database refuses (a timestamp written as a number by another tool): `replay` writes every other row,
    reports both lines by number with the first error, leaves them in the file and exits 1. (It wrote 0 rows
    and raised before.)"""
    spill, _run = spilled_run(tmp_path, scripted_llm)
    lines = spill.read_text().splitlines(keepends=True)
    bad = json.loads(lines[2])
    bad["timestamp"] = 1767225600
    lines[2] = json.dumps(bad) + "\n"
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    spill.write_text("".join(lines))
    # A span's running and completed rows can both be spilled (on a busy machine they land in separate batches):
    # ids, not lines, are what the table holds.
    valid = {json.loads(line)["id"] for line in lines[:2] + lines[3:-1]}
    target = tmp_path / "replayed.db"
    result = run_cli("replay", spill, "--db", target, check=1)
    rows = table_rows(make_engine(f"sqlite:///{target}"))
    assert {r["id"] for r in rows} == valid and len(valid) >= 3
    assert f"replayed {len(rows)} rows" in result.stdout
    assert f"skipped 1 line (not a spilled row): line {len(lines)}" in result.stdout
    assert "skipped 1 line (refused by the database): line 3" in result.stdout
    assert "first error: line 3: StatementError" in result.stdout, result.stdout
    assert spill.read_text().splitlines() == [lines[2].rstrip("\n"), lines[-1]]
    again = run_cli("replay", spill, "--db", target, check=1)  # the two lines are still reported, nothing lost
    assert "replayed 0 rows" in again.stdout and "line 1" in again.stdout and "line 2" in again.stdout


# --- errors: one line, no traceback --------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_errors_are_one_clear_line(traced, tmp_path):
    db = traced["path"]
    missing = tmp_path / "missing.db"
    assert_one_line_error(run_cli("runs", "--db", missing), f"no database at {missing}")
    assert_one_line_error(run_cli("tree", "last", "--db", missing), "no database at")
    assert not missing.exists()
    assert_one_line_error(run_cli("tree", "no-such-run", "--db", db), "no run matches 'no-such-run'")
    assert_one_line_error(run_cli("events", "no-such-run", "--db", db), "no run matches")
    ambiguous = run_cli("timeline", "cli-run-", "--db", db)
    assert_one_line_error(ambiguous, "ambiguous", traced["tool_run"], traced["code_run"])
    assert_one_line_error(run_cli("export", "last", "--db", db, "--otlp", "ftp://x"), "http://")
    assert_one_line_error(run_cli("export", "last", "--db", db, "--otlp", "http://127.0.0.1:99999"), "invalid")
    port = _closed_port()
    for protocol in ("http/protobuf", "grpc"):
        result = run_cli("export", "last", "--db", db, "--otlp", f"http://127.0.0.1:{port}", "--protocol", protocol,
                         "--timeout", "1")
        assert_one_line_error(result, "failed", str(port))
    assert_one_line_error(run_cli("replay", tmp_path / "nope.spill.jsonl", "--db", tmp_path / "x.db"),
                          "no spill file at")
    assert_one_line_error(run_cli("runs", "--db", "nosuchdriver://x"), "nosuchdriver")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("runs", "--db", empty), "no table 'execution_events'")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    assert_one_line_error(run_cli("runs", "--db", garbage))
    # usage errors: exit code 2, still one line
    assert_one_line_error(run_cli("tree", "--db", db), "RUN_ID", code=2)
    assert_one_line_error(run_cli("export", "last", "--db", db), "--otlp", code=2)
    assert_one_line_error(run_cli("no-such-command"), code=2)
    assert_one_line_error(run_cli("runs", "--limit", "0", "--db", db), code=2)


# --- serve ---------------------------------------------------------------------------------------
def _first_url(process) -> str:
    for line in process.stdout:
        for word in line.split():
            if word.startswith("http://127.0.0.1:"):
                return _wait_until_up(word.rstrip("/"))
    raise AssertionError(process.stderr.read())


def _wait_until_up(url: str) -> str:
    """The URL is printed just before the server accepts connections: poll (bounded) until it does."""
    import httpx

    for _ in range(100):
        try:
            httpx.get(url + "/api/config", timeout=2)
            return url
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"viewer at {url} never came up")


@pytest.mark.slow
def test_serve_until_interrupted(tmp_path):
    """`serve` runs the viewer (page, API, /ws) on loopback with a token until SIGINT."""
    import httpx
    from websockets.sync.client import connect

    db = make_traced_db(tmp_path)["path"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen([str(CLI), "serve", "--db", str(db), "--port", "0", "--token", "t0ken"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        url = _first_url(process)
        assert httpx.get(url + "/api/runs").status_code == 401
        runs = httpx.get(url + "/api/runs", headers={"Authorization": "Bearer t0ken"}).json()
        assert runs and runs[0]["events"] > 0
        ws_url = url.replace("http://", "ws://") + "/ws"
        with connect(ws_url + "?token=t0ken") as client:
            client.ping().wait(5)
        with pytest.raises(Exception):
            connect(ws_url).close()  # no token: 401
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_demo_serve_shows_the_run_in_the_viewer(tmp_path):
    """`demo --serve 0` starts the viewer before the run, prints its URL, and serves the finished run."""
    import httpx

    db = tmp_path / "demo.db"
    process = subprocess.Popen([str(CLI), "demo", "--db", str(db), "--no-live", "--serve", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = _first_url(process)
        for line in process.stdout:
            if "viewer still serving" in line:
                break
        runs = httpx.get(url + "/api/runs").json()
        assert isinstance(runs, list), runs
        assert len(runs) == 1 and runs[0]["status"] == "completed"
        events = httpx.get(f"{url}/api/runs/{runs[0]['run_id']}/events").json()
        assert [e["execution_order"] for e in events] == list(range(1, len(events) + 1))
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0


def test_serve_off_loopback_needs_a_token():
    assert_one_line_error(run_cli("serve", "--host", "0.0.0.0", "--port", "0"), "token", code=2)


def test_store_and_cli_agree_on_the_default_database():
    assert store.DEFAULT_DB == "otel_cmbagent.db"
    assert sa.engine.make_url(store.db_url("x.db")).get_backend_name() == "sqlite"


# --- big runs: a page at a time (issue 14) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 1,264-row run (250 units: agent, LLM and tool spans, two messages each) through the real SQL sink."""
    from big_run import write_big_run

    db = tmp_path_factory.mktemp("big-cli") / "big.db"
    total = write_big_run(db, "big-cli-run", 250)
    return {"db": db, "total": total, "rows": store.run_events(store.open_store(str(db)), "big-cli-run")}


def _orders(output):
    return [int(m) for m in re.findall(r"#(\d+) ", output)]


def test_tree_of_a_big_run_is_its_first_page_and_says_how_to_page(big):
    total = big["total"]
    first = run_cli("tree", "last", "--db", big["db"], check=0).stdout
    assert _orders(first) == list(range(1, 501))
    assert f"rows 1–500 of {total:,} (next page: --offset 500; all: --limit 0)" in first
    second = run_cli("tree", "last", "--db", big["db"], "--offset", "500", "-n", "100", check=0).stdout
    assert _orders(second) == list(range(501, 601))
    assert f"rows 501–600 of {total:,} (next page: --offset 600; all: --limit 0)" in second
    spans = [row for row in big["rows"] if not is_message(row)]
    no_messages = run_cli("tree", "last", "--db", big["db"], "--no-messages", check=0).stdout
    assert _orders(no_messages) == [row["execution_order"] for row in spans[:500]]
    assert f"rows 1–500 of {len(spans):,}" in no_messages
    everything = run_cli("tree", "last", "--db", big["db"], "--limit", "0", check=0).stdout
    assert _orders(everything) == list(range(1, total + 1)) and "rows " not in everything


def test_timeline_and_events_table_of_a_big_run_page_too(big):
    spans = [row for row in big["rows"] if not is_message(row)]
    timeline = run_cli("timeline", "last", "--db", big["db"], "-w", "40", "--limit", "200", check=0).stdout
    assert f"rows 1–200 of {len(spans):,} (next page: --offset 200; all: --limit 0)" in timeline
    assert len(timeline.splitlines()) == 2 + 2 + 200 + 2  # header, axis, one line per span, legend, note
    table = run_cli("events", "last", "--db", big["db"], "--offset", "1200", check=0).stdout
    orders = [int(line.split()[0]) for line in table.splitlines() if line.split() and line.split()[0].isdigit()]
    assert orders == list(range(1201, big["total"] + 1))
    assert f"rows 1,201–{big['total']:,} of {big['total']:,} (all: --limit 0)" in table
    small = run_cli("events", "last", "--db", big["db"], "--type", "tool_call", "--limit", "0", check=0).stdout
    assert small.rstrip().endswith("250 events")


def test_events_json_of_a_big_run_streams_every_row(big):
    out = run_cli("events", "last", "--db", big["db"], "--json", check=0).stdout.splitlines()
    assert [json.loads(line)["id"] for line in out] == [row["id"] for row in big["rows"]]
    page = run_cli("events", "last", "--db", big["db"], "--json", "--limit", "10", "--offset", "5", check=0).stdout
    assert [json.loads(line)["execution_order"] for line in page.splitlines()] == list(range(6, 16))
