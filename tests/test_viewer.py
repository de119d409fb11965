"""The run viewer's HTTP/websocket API: runs, events, incremental reads, live broadcast, token, read-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
from autogen import ConversableAgent, register_function

with warnings.catch_warnings():  # starlette >= 1.x suggests httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

import otel_cmbagent as oc
from otel_cmbagent.table.schema import is_message, row_kind
from otel_cmbagent.table import store
from otel_cmbagent.exporters.websocket import DATA_FIELDS
from otel_cmbagent.testing import text, tool_call
from otel_cmbagent.apps.viewer import ViewerServer, check_bind, create_app, serve_viewer
from sinks_util import PausedRun

from conftest import FAKE_KEY

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
BASE = "http://127.0.0.1:8765"
TOKEN = "viewer-test-token-0123456789"

# A run written by another process: setup_tracing + oc.run + a few spans (and messages) with sleeps.
# argv: db path (or SQLAlchemy URL), run id, steps, seconds per tool call
SYNTHETIC_WRITER = r"""
import json, sys, time
import otel_cmbagent as oc
from otel_cmbagent.instrumentation.spans import add_ordered_event

import os
db, run_id, steps, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
gate = sys.argv[5] if len(sys.argv) > 5 else None  # with a gate, step i > 0 waits for the file "<gate>.<i>"
tracing = oc.setup_tracing(sql_url=db if "://" in db else "sqlite:///" + db, otlp=False, instrument=False,
                           set_global=True, handle_sigterm=False)
tracer = tracing.tracer_provider.get_tracer("synthetic-writer")
with oc.run(name="synthetic from another process", run_id=run_id):
    for i in range(steps):
        deadline = time.monotonic() + 60
        while gate and i and not os.path.exists(f"{gate}.{i}") and time.monotonic() < deadline:
            time.sleep(0.02)
        with oc.step(step_id=f"step-{i}"):
            with tracer.start_as_current_span(f"invoke_agent worker", attributes={
                "cmbagent.event_type": "agent_call", "gen_ai.agent.name": "worker"}) as agent:
                add_ordered_event(agent, "cmbagent.message", {
                    "cmbagent.message.sender": "planner", "cmbagent.message.recipient": "worker",
                    "cmbagent.message.content": json.dumps([{"type": "text", "content": f"do step {i}"}])})
                with tracer.start_as_current_span(f"execute_tool square", attributes={
                        "cmbagent.event_type": "tool_call", "gen_ai.agent.name": "worker",
                        "gen_ai.tool.name": "square", "gen_ai.tool.call.arguments": json.dumps({"x": i})}) as tool:
                    time.sleep(pause)
                    tool.set_attribute("gen_ai.tool.call.result", str(i * i))
tracing.shutdown()
"""


def xss_run(llm, *, gate=None, reached=None, start_gate=None, name="viewer: add numbers", delay=0.0, run_id=None):
    """A traced two-agent chat with a tool call; the first message carries an XSS payload.

    With ``gate`` the tool blocks until it is set (the run stays live); ``reached`` is set when the tool starts.
    With ``start_gate`` the run's root span is open (and written) but the chat waits for it.
    """
    llm.push(
        tool_call("add", {"a": 20, "b": 22}, delay=delay),
        text("The sum is 42.", delay=delay),
        text("TERMINATE", delay=delay),
    )

    def add(a: int, b: int) -> int:
        if reached is not None:
            reached.set()
        if gate is not None:
            gate.wait(60)
        return a + b

    assistant = ConversableAgent("assistant", llm_config=llm.llm_config(api_key=FAKE_KEY))
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    register_function(add, caller=assistant, executor=user, description="Add two numbers.")
    with oc.run(name=name, run_id=run_id) as run:
        if start_gate is not None:
            start_gate.wait(60)
        user.initiate_chat(assistant, message=f"{XSS} please add 20 and 22", max_turns=3, silent=True)
    return run


def tracing_for(db_path):
    return oc.setup_tracing(sql_url=f"sqlite:///{db_path}", otlp=False, set_global=False, handle_sigterm=False)


def write_synthetic(db_path, run_id, steps=3, pause=0.0, timeout=60):
    return subprocess.run(
        [sys.executable, "-c", SYNTHETIC_WRITER, str(db_path), run_id, str(steps), str(pause)],
        check=True, timeout=timeout, capture_output=True, text=True,
    )


@pytest.fixture
def viewer_db(tmp_path, scripted_llm):
    """A SQLite DB with an AG2 run (XSS in its first message) and, newer, a run from another process."""
    db = tmp_path / "viewer.db"
    tracing = tracing_for(db)
    try:
        run = xss_run(scripted_llm)
    finally:
        tracing.shutdown()
    time.sleep(0.01)
    write_synthetic(db, "synthetic-run-0001", steps=2)
    return db, run.run_id


@pytest.fixture
def client(viewer_db):
    db, _ = viewer_db
    with TestClient(create_app(str(db)), base_url=BASE) as test_client:
        yield test_client


def _gapless(rows):
    return [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))


# --- runs and events ---------------------------------------------------------------------------
def test_runs_newest_first_with_summary_fields(client, viewer_db):
    _, run_id = viewer_db
    runs = client.get("/api/runs").json()
    assert [r["run_id"] for r in runs] == ["synthetic-run-0001", run_id]
    for key in ("run_id", "session_id", "name", "started_at", "duration_ms", "status", "events", "agents",
                "input_tokens", "output_tokens", "cost"):
        assert key in runs[0] and key in runs[1], key
    ag2_run = runs[1]
    assert ag2_run["status"] == "completed" and ag2_run["events"] > 10
    assert set(ag2_run["agents"]) >= {"user", "assistant"}
    assert ag2_run["input_tokens"] > 0 and ag2_run["output_tokens"] > 0
    assert ag2_run["started_at"].endswith("+00:00")
    assert runs[0]["name"] == "invoke_workflow synthetic from another process"
    assert client.get("/api/runs?limit=1").json()[0]["run_id"] == "synthetic-run-0001"
    assert client.get("/api/runs?limit=x").status_code == 400


def test_run_events_all_columns_in_gapless_order(client, viewer_db):
    db, run_id = viewer_db
    response = client.get(f"/api/runs/{run_id}/events")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    rows = response.json()
    assert _gapless(rows)
    engine = store.open_store(str(db))
    expected = store.run_events(engine, run_id)
    assert len(rows) == len(expected)
    columns = set(store.events_table(engine).c.keys())
    assert set(rows[0]) == columns
    assert {row_kind(r) for r in rows} >= {"run", "conversation", "agent_call", "llm_call", "tool_call", "message"}
    tool = next(r for r in rows if r["event_type"] == "tool_call")
    assert tool["inputs"]["arguments"] == {"a": 20, "b": 22}  # JSON columns decoded
    assert tool["outputs"]["result"] == "42"
    assert isinstance(tool["meta"], dict) and tool["inputs"]["tool_name"] == "add" and "gen_ai.tool.name" not in tool["meta"]
    assert tool["started_at"].endswith("+00:00") and tool["completed_at"] > tool["started_at"]  # ISO, UTC
    assert {r["status"] for r in rows} == {"completed"}
    # the same rows, value for value, as the store returns them (datetimes as ISO)
    for got, want in zip(rows, expected):
        assert got["id"] == want["id"] and got["started_at"] == want["started_at"].isoformat()
        assert got["inputs"] == json.loads(json.dumps(want["inputs"]))
    # a unique prefix and "last" resolve too
    assert client.get(f"/api/runs/{run_id[:8]}/events").json() == rows
    assert client.get("/api/runs/last/events").json()[0]["run_id"] == "synthetic-run-0001"


def test_incremental_after_and_running(client, viewer_db):
    _, run_id = viewer_db
    rows = client.get(f"/api/runs/{run_id}/events").json()
    later = client.get(f"/api/runs/{run_id}/events", params={"after": 5}).json()
    assert later == rows[5:]
    assert client.get(f"/api/runs/{run_id}/events", params={"after": len(rows)}).json() == []
    # a client holding rows 2 and 3 as running gets their current versions too
    holding = f"{rows[1]['id']},{rows[2]['id']}"
    again = client.get(f"/api/runs/{run_id}/events", params={"after": 10, "running": holding}).json()
    assert [r["execution_order"] for r in again] == [2, 3] + list(range(11, len(rows) + 1))
    tools = client.get(f"/api/runs/{run_id}/events", params={"type": "tool_call"}).json()
    assert [r["event_type"] for r in tools] == ["tool_call"]
    assert client.get(f"/api/runs/{run_id}/events", params={"after": "-1"}).status_code == 400
    assert client.get(f"/api/runs/{run_id}/events", params={"after": "abc"}).json()["error"]


def test_unknown_run_is_404_json(client):
    response = client.get("/api/runs/no-such-run/events")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert "no-such-run" in response.json()["error"]
    assert client.get("/api/runs/no-such-run").status_code == 404
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/api/nothing").json()["error"]


def test_api_returns_raw_strings(client, viewer_db):
    """Escaping is the page's job: the API hands the stored text back byte for byte."""
    _, run_id = viewer_db
    rows = client.get(f"/api/runs/{run_id}/events").json()
    first = next(r for r in rows if is_message(r))
    assert first["inputs"]["content"] == f"{XSS} please add 20 and 22"
    assert "&lt;" not in json.dumps(rows)
    assert FAKE_KEY not in json.dumps(rows)


def test_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page  # inlined: no CDN, no sub-requests
    assert "data-testid=\"waterfall\"" in page and "function renderWindow" in page and ".bar.running" in page
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    config = client.get("/api/config").json()
    assert config["jaeger_url"] is None and config["poll_interval"] == 0.5


def test_jaeger_url_validated_and_exposed(viewer_db):
    db, _ = viewer_db
    app = create_app(str(db), jaeger_url="http://localhost:16686/")
    with TestClient(app, base_url=BASE) as test_client:
        assert test_client.get("/api/config").json()["jaeger_url"] == "http://localhost:16686"
        assert '"jaeger_url": "http://localhost:16686"' in test_client.get("/").text
    with pytest.raises(ValueError, match="jaeger_url"):
        create_app(str(db), jaeger_url="javascript:alert(1)")
    with pytest.raises(ValueError, match="poll_interval"):
        create_app(str(db), poll_interval=0)


# --- read-only, hosts, origins -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/api/runs", "/api/runs/last", "/api/runs/last/events", "/anything"])
def test_no_write_methods(client, viewer_db, method, path):
    db, _ = viewer_db
    before = os.path.getsize(db)
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert "read-only" in response.json()["error"]
    assert os.path.getsize(db) == before


def test_head_is_allowed(client):
    assert client.head("/api/runs").status_code == 200


def test_foreign_host_header_refused_without_token(client):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not read the runs."""
    response = client.get("/api/runs", headers={"Host": "evil.example:8765"})
    assert response.status_code == 403
    assert client.get("/api/runs", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/api/runs", headers={"Host": "[::1]:8765"}).status_code == 200


def test_cross_origin_websocket_refused_without_token(client):
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect(f"{BASE.replace('http', 'ws')}/ws", headers={"Origin": "http://evil.example"}):
            pass
    assert denied.value.status_code == 403
    with client.websocket_connect(f"{BASE.replace('http', 'ws')}/ws", headers={"Origin": BASE}):
        pass


# --- token ----------------------------------------------------------------------------------------
@pytest.fixture
def token_client(viewer_db):
    db, _ = viewer_db
    with TestClient(create_app(str(db), token=TOKEN), base_url="http://192.168.1.20:8765") as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/", "/api/config", "/api/runs", "/api/runs/last/events", "/nothing"])
def test_token_required_on_every_request(token_client, path):
    response = token_client.get(path)
    assert response.status_code == 401
    assert response.json()["error"].startswith("a valid token is required")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert token_client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert token_client.get(path, params={"token": TOKEN[:-1]}).status_code == 401


def test_token_accepted_as_bearer_header_or_query(token_client):
    assert token_client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert token_client.get("/api/runs", headers={"X-Token": TOKEN}).status_code == 200
    assert token_client.get("/api/runs", params={"token": TOKEN}).status_code == 200
    assert token_client.get("/", params={"token": TOKEN}).status_code == 200
    # a token does not make the API writable
    assert token_client.post("/api/runs", headers={"X-Token": TOKEN}).status_code == 405


def test_websocket_needs_the_token(token_client):
    url = "ws://192.168.1.20:8765/ws"
    with pytest.raises(WebSocketDenialResponse) as denied:
        with token_client.websocket_connect(url):
            pass
    assert denied.value.status_code == 401
    with pytest.raises(WebSocketDenialResponse):
        with token_client.websocket_connect(url + "?token=nope"):
            pass
    with token_client.websocket_connect(url + f"?token={TOKEN}"):
        pass
    with token_client.websocket_connect(url, headers={"Authorization": f"Bearer {TOKEN}"}):
        pass


def test_non_loopback_bind_needs_a_token(viewer_db):
    db, _ = viewer_db
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com", ""):
        with pytest.raises(ValueError, match="without a token"):
            serve_viewer(str(db), host=host, port=0)
        with pytest.raises(ValueError, match="without a token"):
            ViewerServer(str(db), host=host)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(ValueError, match="non-empty"):
        check_bind("127.0.0.1", "")


def test_real_server_refuses_websocket_without_token(viewer_db):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    db, _ = viewer_db
    with ViewerServer(str(db), token=TOKEN) as server:
        import httpx

        assert httpx.get(server.url + "api/runs").status_code == 401
        assert httpx.get(server.url + "api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        ws_url = server.url.replace("http://", "ws://") + "ws"
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, open_timeout=5)
        assert refused.value.response.status_code == 401
        with connect(ws_url + f"?token={TOKEN}", open_timeout=5):
            pass


# --- live feed ------------------------------------------------------------------------------------
def _collect(ws, until, timeout=60.0):
    """Envelopes from the websocket until ``until(envelopes)`` holds."""
    received = []
    deadline = time.monotonic() + timeout
    while not until(received):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; got {len(received)} envelopes"
        try:
            received.append(json.loads(ws.recv(timeout=min(remaining, 1.0))))
        except TimeoutError:
            continue
    return received


def _run_completed(envelopes):
    return any(e["data"]["event_type"] == "run" and e["data"]["status"] == "completed" for e in envelopes)


def _drain(ws, quiet=1.0):
    out = []
    while True:
        try:
            out.append(json.loads(ws.recv(timeout=quiet)))
        except TimeoutError:
            return out


@pytest.mark.slow
def test_websocket_broadcasts_rows_written_by_another_process(tmp_path):
    """A run written by a subprocess shows up on /ws live: running rows first, then their completion."""
    from websockets.sync.client import connect

    db = tmp_path / "live.db"
    write_synthetic(db, "earlier-run", steps=1)  # the database exists before the viewer starts
    with ViewerServer(str(db), poll_interval=0.1) as server:
        with connect(server.url.replace("http://", "ws://") + "ws", open_timeout=5) as ws:
            time.sleep(0.3)  # the poller's first pass records the state of the table
            writer = subprocess.Popen(
                [sys.executable, "-c", SYNTHETIC_WRITER, str(db), "live-run", "4", "0.3"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            try:
                envelopes = _collect(ws, _run_completed)
                envelopes += _drain(ws)  # the rest of the poll that completed the run
            finally:
                _, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
    assert {e["event_type"] for e in envelopes} == {"event_captured"}
    assert {e["run_id"] for e in envelopes} == {"live-run"}
    data = [e["data"] for e in envelopes]
    for item in data:
        assert set(DATA_FIELDS) <= set(item)
        assert item["event_id"] == item["id"] and item["run_key"] == "live-run"
    rows = store.run_events(store.open_store(str(db)), "live-run")
    assert {d["execution_order"] for d in data} == set(range(1, len(rows) + 1)), "every row reached the socket"
    running = {d["event_id"] for d in data if d["status"] == "running"}
    finals = {d["event_id"]: d for d in data if d["status"] != "running"}
    assert running, "spans were seen while they ran"
    assert running <= set(finals), "every running row was followed by its completion"
    tools = [d for d in finals.values() if d["event_type"] == "tool_call"]
    assert len(tools) == 4 and {t["outputs"]["result"] for t in tools} == {"0", "1", "4", "9"}
    assert all(t["duration_ms"] >= 250 for t in tools)
    # a completion is never broadcast before the row's start
    first_seen = {}
    for index, d in enumerate(data):
        first_seen.setdefault(d["event_id"], (index, d["status"]))
    assert all(status == "running" for event_id, (index, status) in first_seen.items() if event_id in running)


def test_viewer_waits_for_the_database(tmp_path):
    """Started before anything was traced: 503 with a message, then the runs once the table exists."""
    db = tmp_path / "later.db"
    with TestClient(create_app(str(db), poll_interval=0.05), base_url=BASE) as test_client:
        response = test_client.get("/api/runs")
        assert response.status_code == 503 and "no database" in response.json()["error"]
        assert test_client.get("/").status_code == 200
        write_synthetic(db, "late-run", steps=1)
        assert [r["run_id"] for r in test_client.get("/api/runs").json()] == ["late-run"]
        assert _gapless(test_client.get("/api/runs/late-run/events").json())


def test_in_process_writer_is_broadcast_over_testclient(tmp_path, scripted_llm):
    """The websocket also carries rows of an AG2 run traced in this process (through the table, not a callback)."""
    db = tmp_path / "inproc.db"
    tracing = tracing_for(db)
    try:
        with TestClient(create_app(str(db), poll_interval=0.05), base_url=BASE) as test_client:
            with test_client.websocket_connect(BASE.replace("http", "ws") + "/ws") as ws:
                time.sleep(0.2)
                with PausedRun(scripted_llm, run=xss_run):
                    seen = []
                    while not any(e["data"]["event_type"] == "tool_call" for e in seen):
                        seen.append(ws.receive_json())
                    tool = next(e["data"] for e in seen if e["data"]["event_type"] == "tool_call")
                    assert tool["status"] == "running" and tool["inputs"]["arguments"] == {"a": 20, "b": 22}
                finals = [e["data"] for e in seen if e["data"]["event_id"] == tool["event_id"]][1:]
                while not finals:
                    data = ws.receive_json()["data"]
                    if data["event_id"] == tool["event_id"]:
                        finals.append(data)
                assert finals[0]["status"] == "completed" and finals[0]["outputs"]["result"] == "42"
    finally:
        tracing.shutdown()


def test_postgresql_runs_events_and_live_feed(postgres_url):
    """The same API and live feed on PostgreSQL (the table is created after the viewer starts)."""
    from websockets.sync.client import connect

    with ViewerServer(postgres_url, poll_interval=0.1) as server:
        import httpx

        response = httpx.get(server.url + "api/runs")
        assert response.status_code == 503 and "execution_events" in response.json()["error"]
        write_synthetic(postgres_url, "pg-first", steps=1)
        assert [r["run_id"] for r in httpx.get(server.url + "api/runs").json()] == ["pg-first"]
        with connect(server.url.replace("http://", "ws://") + "ws", open_timeout=5) as ws:
            time.sleep(0.5)
            writer = subprocess.Popen([sys.executable, "-c", SYNTHETIC_WRITER, postgres_url, "pg-live", "3", "0.2"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                envelopes = _collect(ws, _run_completed)
                envelopes += _drain(ws)
            finally:
                _, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
        rows = httpx.get(server.url + "api/runs/pg-live/events").json()
        assert _gapless(rows) and {r["status"] for r in rows} == {"completed"}
        assert rows[0]["started_at"].endswith("+00:00")
        received = {e["data"]["execution_order"] for e in envelopes if e["run_id"] == "pg-live"}
        assert received == set(range(1, len(rows) + 1))
        assert any(e["data"]["status"] == "running" for e in envelopes)
        runs = httpx.get(server.url + "api/runs").json()
        assert [r["run_id"] for r in runs] == ["pg-live", "pg-first"] and runs[0]["status"] == "completed"


# --- a run as columns, details on demand (issue 14: a 100,000-event run opens in <= 2 s) ------------------------
def _epoch_ms(text):
    from datetime import datetime, timezone

    value = datetime.fromisoformat(text)
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def test_columns_hold_what_the_rows_hold(client, viewer_db):
    """/columns is /events cut to what a waterfall row shows: the same rows, order, parents, kinds,
    statuses, agents, names, times (ms), durations and LLM usage (by order)."""
    _, run_id = viewer_db
    rows = client.get(f"/api/runs/{run_id}/events").json()
    response = client.get(f"/api/runs/{run_id[:8]}/columns")
    assert response.status_code == 200 and response.headers["x-run-id"] == run_id
    cols = response.json()
    ids = cols["id"]
    assert cols["run"] == run_id and cols["count"] == len(rows) > 10
    assert ids == [r["id"] for r in rows]
    assert cols["parent"] == [r["parent_event_id"] for r in rows]
    assert cols["order"] == [r["execution_order"] for r in rows] and len(set(cols["order"])) == len(rows)
    assert cols["depth"] == [r["depth"] for r in rows]
    assert cols["kind"] == [row_kind(r) for r in rows]
    assert cols["status"] == [r["status"] for r in rows]
    assert cols["agent"] == [r["agent_name"] for r in rows]
    names = [f"message {r['inputs']['sender']} → {r['inputs']['recipient']}" if is_message(r)
             else r["meta"]["span_name"] for r in rows]
    assert cols["name"] == names and any(name.startswith("message ") for name in names)
    assert cols["base"] == _epoch_ms(rows[0]["started_at"])
    assert [cols["base"] + s for s in cols["start"]] == [_epoch_ms(r["started_at"]) for r in rows]
    assert [None if e is None else cols["base"] + e for e in cols["end"]] == [
        _epoch_ms(r["completed_at"]) if r["completed_at"] else None for r in rows]
    assert cols["duration"] == [r["duration_ms"] for r in rows]
    llm = [(r["execution_order"], r["meta"]["gen_ai.usage.input_tokens"], r["meta"]["gen_ai.usage.output_tokens"])
           for r in rows if r["event_type"] == "llm_call"]
    assert llm and [(order, tokens_in, tokens_out) for order, tokens_in, tokens_out, _cost in cols["usage"]] == llm
    assert cols["trace_id"] == rows[0]["trace_id"]
    assert client.get("/api/runs/no-such-run/columns").status_code == 404


def test_an_events_details_come_on_demand_with_its_messages(client, viewer_db):
    """/api/events/{id}: the row with every column (as /events has it) and the messages sent during it."""
    _, run_id = viewer_db
    rows = client.get(f"/api/runs/{run_id}/events").json()
    parents = [r["parent_event_id"] for r in rows if is_message(r)]
    span = next(r for r in rows if r["id"] == max(set(parents), key=parents.count))
    details = client.get(f"/api/events/{span['id']}").json()
    assert details["event"] == span
    sent = [r for r in rows if is_message(r) and r["parent_event_id"] == span["id"]]
    assert details["messages"] == sent and details["message_count"] == len(sent) > 0
    tool = next(r for r in rows if r["event_type"] == "tool_call")
    assert client.get(f"/api/events/{tool['id']}").json() == {"event": tool, "messages": [], "message_count": 0}
    missing = client.get("/api/events/no-such-event")
    assert missing.status_code == 404 and "no-such-event" in missing.json()["error"]


def test_columns_and_details_on_postgresql(postgres_url):
    """The columns' SQL on PostgreSQL (->> for names, extract(epoch) for times) gives what the rows hold."""
    from otel_cmbagent.table.columns import event_details, run_columns

    write_synthetic(postgres_url, "pg-columns", steps=3)
    engine = store.open_store(postgres_url)
    rows = json.loads(json.dumps(store.run_events(engine, "pg-columns"), default=str))
    cols = run_columns(engine, "pg-columns")
    assert cols["id"] == [r["id"] for r in rows] and len(rows) == 1 + 3 * 4
    assert cols["parent"] == [r["parent_event_id"] for r in rows]
    assert cols["kind"] == [row_kind(r) for r in rows] and cols["status"] == [r["status"] for r in rows]
    assert cols["name"] == [
        f"message {r['inputs']['sender']} → {r['inputs']['recipient']}" if is_message(r) else r["meta"]["span_name"]
        for r in rows]
    assert [cols["base"] + s for s in cols["start"]] == [_epoch_ms(r["started_at"]) for r in rows]
    assert [None if e is None else cols["base"] + e for e in cols["end"]] == [
        _epoch_ms(r["completed_at"]) if r["completed_at"] else None for r in rows]
    agent = next(r for r in rows if r["event_type"] == "agent_call" and not is_message(r))
    details = event_details(engine, agent["id"])
    assert details["event"]["id"] == agent["id"] and details["message_count"] == 1
    assert details["messages"][0]["inputs"]["recipient"] == "worker"


def test_columns_usage_and_parents_on_postgresql(postgres_url, scripted_llm):
    """An AG2 run into PostgreSQL: /columns' JSON made by json_agg holds the rows' parents, kinds, agents and
    LLM usage as numbers (jsonb ->), as the rows hold them."""
    from otel_cmbagent.table.columns import run_columns

    tracing = oc.setup_tracing(sql_url=postgres_url, otlp=False, set_global=False, handle_sigterm=False)
    try:
        run = xss_run(scripted_llm)
    finally:
        tracing.shutdown()
    engine = store.open_store(postgres_url)
    rows = store.run_events(engine, run.run_id)
    cols = run_columns(engine, run.run_id)
    assert cols["id"] == [r["id"] for r in rows] and cols["order"] == [r["execution_order"] for r in rows]
    assert cols["parent"] == [r["parent_event_id"] for r in rows]
    assert cols["agent"] == [r["agent_name"] for r in rows] and cols["kind"] == [row_kind(r) for r in rows]
    llm = [[r["execution_order"], r["meta"]["gen_ai.usage.input_tokens"], r["meta"]["gen_ai.usage.output_tokens"]]
           for r in rows if r["event_type"] == "llm_call"]
    assert llm and [usage[:3] for usage in cols["usage"]] == llm
    assert cols["trace_id"] == rows[0]["trace_id"] and cols["base"] is not None


def _columns_match_rows(cols, rows):
    """What the page reads from /columns is what the rows hold."""
    assert cols["count"] == len(rows) > 0
    assert cols["id"] == [r["id"] for r in rows] and cols["parent"] == [r["parent_event_id"] for r in rows]
    assert cols["order"] == [r["execution_order"] for r in rows] and cols["kind"] == [row_kind(r) for r in rows]
    assert cols["status"] == [r["status"] for r in rows] and cols["agent"] == [r["agent_name"] or None for r in rows]
    assert cols["name"] == [f"message {r['inputs']['sender']} → {r['inputs']['recipient']}" if is_message(r)
                            else r["meta"]["span_name"] for r in rows]
    assert cols["trace_id"] == rows[0]["trace_id"] and len(cols["trace_id"]) == 32
    llm = [r["execution_order"] for r in rows if r["event_type"] == "llm_call"]
    assert llm and [usage[0] for usage in cols["usage"]] == llm


def test_columns_of_a_chat_outside_any_run(sqlite_or_postgres_url, scripted_llm):
    """A bare AG2 chat (rows without run_id, grouped by trace): /columns finds its rows by trace id, on SQLite
    and PostgreSQL, as /events does."""
    from otel_cmbagent.table.columns import run_columns

    tracing = oc.setup_tracing(sql_url=sqlite_or_postgres_url, otlp=False, set_global=False, handle_sigterm=False)
    try:
        scripted_llm.push(text("hi"), text("TERMINATE"))
        a = ConversableAgent("a", llm_config=scripted_llm.llm_config(api_key=FAKE_KEY))
        b = ConversableAgent("b", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        b.initiate_chat(a, message="hello", max_turns=1, silent=True)
    finally:
        tracing.shutdown()
    engine = store.open_store(sqlite_or_postgres_url)
    run_key = store.resolve_run(engine, "last")
    rows = store.run_events(engine, run_key)
    assert all(r["run_id"] is None for r in rows)
    _columns_match_rows(run_columns(engine, run_key), rows)


def test_columns_of_cmbagents_own_table(tmp_path):
    """cmbagent's table (no trace_id/span_id columns; trace ids in meta): /columns as the rows hold them."""
    from otel_cmbagent.table.columns import run_columns
    from test_store import make_cmbagent_db

    url, _ = make_cmbagent_db(tmp_path)
    engine = store.open_store(url)
    for run_id in ("cmb-run-1", "cmb-run-2"):
        rows = store.run_events(engine, run_id)
        _columns_match_rows(run_columns(engine, run_id), rows)


def test_the_poller_reads_recent_rows_only_as_often_as_it_can_afford(tmp_path, monkeypatch):
    """Finding the runs with recent rows reads every recent row (a live 100,000-event run: ~60 ms a poll). With
    that scan made costly, the poller runs it once; a run it found keeps streaming its new rows (one index lookup
    per poll)."""
    import sqlalchemy as sa

    from otel_cmbagent.apps.viewer import feed

    monkeypatch.setattr(feed, "RECENT_SCAN_COST_RATIO", 10_000_000, raising=False)  # any scan "costs" hours
    db = tmp_path / "poll.db"
    tracing = tracing_for(db)
    try:
        with oc.run(name="polled", run_id="polled-run"):
            with oc.step(step_id="first"):
                pass
            tracing.force_flush()
            poller = feed.Poller(feed.Source(str(db), "execution_events"))
            scans: list[str] = []
            sa.event.listen(poller.source.engine(), "before_cursor_execute",
                            lambda _c, _cur, statement, *_a: scans.append(statement) if "timestamp >=" in statement else None)
            assert poller.poll() == [] and poller.poll() == []  # the first poll records the state
            with oc.step(step_id="second"):
                pass
            tracing.force_flush()
            changes = poller.poll()
    finally:
        tracing.shutdown()
    assert [(k, row["event_type"], row["step_id"]) for k, row in changes] == [("polled-run", "step", "second")]
    assert len(scans) == 1, scans
