"""AG2 1.x (``pip install "ag2[openai,tracing]"``, module ``ag2``): its TelemetryMiddleware's spans become our rows.

Real AG2 1.x agents, the real openai SDK against the scripted LLM on loopback, a real SQLite table, the real
websocket callback, the CLI's store functions and the viewer's API. Runs only in the AG2 1.x virtualenv
(``make test-ag2x``); the classic lines leave the module out (tests/conftest.py), so nothing skips there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import warnings

import pytest

ag2 = pytest.importorskip("ag2")  # never skips where it is collected: conftest collects it only with AG2 1.x
from ag2 import Agent  # noqa: E402
from ag2.config import OpenAIConfig  # noqa: E402

import otel_cmbagent as oc  # noqa: E402
from otel_cmbagent.table.store import open_store, run_events, run_summary  # noqa: E402
from otel_cmbagent.testing import ScriptedLLM, text, tool_call  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from otel_cmbagent.apps.viewer import create_app  # noqa: E402

pytestmark = pytest.mark.ag2x


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _config(llm: ScriptedLLM) -> OpenAIConfig:
    return OpenAIConfig(model=llm.model, base_url=llm.base_url, api_key="sk-scripted-not-a-real-key", max_retries=0)


def _ask(llm: ScriptedLLM, question: str) -> str:
    agent = Agent("calc", "Use tools.", config=_config(llm), tools=[add],
                  middleware=[oc.ag2x.telemetry_middleware("calc")])
    return asyncio.run(agent.ask(question)).body


@pytest.fixture
def traced(tmp_path):
    """setup_tracing on a SQLite file with the websocket callback; yields (tracing, db path, ws messages)."""
    db = tmp_path / "ag2x.db"
    messages: list[tuple[str, dict]] = []
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{db}", otlp=False, set_global=False, handle_sigterm=False,
                               ws_callback=lambda kind, data: messages.append((kind, data)))
    yield tracing, db, messages
    tracing.shutdown()


def _tool_run(tracing, name: str = "ag2x") -> tuple[oc.run, str]:
    script = [tool_call("add", {"a": 2, "b": 3}), text("2+3=5")]
    with ScriptedLLM(script) as llm, oc.run(name=name) as run:
        reply = _ask(llm, "What is 2+3?")
    tracing.shutdown()
    return run, reply


def test_agent_run_gives_ordered_rows_of_the_right_types(traced):
    """One agent with a tool inside oc.run(): gapless rows, cmbagent's event types, agent names, linear inputs,
    tokens counted once (record_usage repeats them), the agent row's message and reply, in the viewer too."""
    tracing, db, _ = traced
    run, reply = _tool_run(tracing)
    assert reply == "2+3=5"
    engine = open_store(str(db))
    rows = run_events(engine, run.run_id)
    spans = [r for r in rows if r["meta"].get("span_name", "").split()[0] != "record_usage"]
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert [(r["event_type"], r["meta"]["span_name"]) for r in spans] == [
        ("run", "invoke_workflow ag2x"),
        ("agent_call", "invoke_agent calc"),
        ("llm_call", "chat scripted-model"),
        ("tool_call", "execute_tool add"),
        ("llm_call", "chat scripted-model"),
    ]
    usage = [r for r in rows if r not in spans]
    assert len(usage) == 2 and {r["event_type"] for r in usage} == {"info"}  # ordered, never summed
    assert all(r["status"] == "completed" and r["agent_name"] == "calc" for r in spans[1:])
    (agent,) = [r for r in rows if r["event_type"] == "agent_call"]
    assert agent["inputs"]["message"] == "What is 2+3?" and agent["outputs"]["response"] == "2+3=5"
    (tool,) = [r for r in rows if r["event_type"] == "tool_call"]
    assert tool["inputs"] == {"tool_name": "add", "arguments": {"a": 2, "b": 3}} and tool["outputs"]["result"] == "5"
    chats = [r for r in rows if r["event_type"] == "llm_call"]
    assert [len(c["inputs"]["messages"]) for c in chats] == [1, 1]  # the newest message only: linear
    assert chats[1]["meta"]["cmbagent.llm.history_messages_omitted"] == 2
    assert chats[1]["inputs"]["messages"][0]["role"] == "tool"
    tokens = [c["meta"]["tokens"] for c in chats]
    assert all(t > 0 for t in tokens)
    summary = run_summary(engine, run.run_id)  # what `otel-cmbagent runs` shows
    assert summary["llm_calls"] == 2 and summary["input_tokens"] + summary["output_tokens"] == sum(tokens)
    with TestClient(create_app(str(db)), base_url="http://127.0.0.1") as client:  # the viewer's API
        shown = client.get(f"/api/runs/{run.run_id}/events").json()
    assert [(r["event_type"], r["agent_name"]) for r in shown] == [(r["event_type"], r["agent_name"]) for r in rows]


def test_websocket_start_messages_are_typed_at_start(traced):
    """AG2 1.x sets nothing before its spans start: our processor types them, so start messages are not 'info'."""
    tracing, _db, messages = traced
    _tool_run(tracing)
    starts = [d for kind, d in messages if kind == "event_captured" and d.get("event_subtype") == "start"]
    typed = {(d["event_type"], d["agent_name"]) for d in starts}
    assert {("agent_call", "calc"), ("llm_call", "calc"), ("tool_call", "calc")} <= typed, typed


def test_threads_and_one_log_line_on_ag2_1x(traced, caplog):
    """instrument() on AG2 1.x: one line saying what is used, and a thread pool still carries the run."""
    tracing, db, _ = traced
    with caplog.at_level(logging.WARNING, logger="otel_cmbagent"):
        oc.AG2Instrumentor().uninstrument()
        oc.instrument(tracer_provider=tracing.tracer_provider, add_sequencer=False)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("otel_cmbagent")]
    assert len(lines) == 1 and "TelemetryMiddleware" in lines[0] and "classic AG2 patches are not applied" in lines[0]
    try:
        with ScriptedLLM([text("in a thread")]) as llm, oc.run(name="pool") as run:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                assert pool.submit(_ask, llm, "hello").result() == "in a thread"
        tracing.shutdown()
    finally:
        oc.AG2Instrumentor().uninstrument()
    rows = run_events(open_store(str(db)), run.run_id)
    assert {r["event_type"] for r in rows} >= {"run", "agent_call", "llm_call"}
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))


def test_network_conversation_rows(traced):
    """Two AG2 1.x agents on a Hub, registered inside the run: every turn is an agent row of the run."""
    from ag2.knowledge import MemoryKnowledgeStore
    from ag2.network import EV_TEXT, Hub

    tracing, db, _ = traced

    async def converse(llm_a: ScriptedLLM, llm_b: ScriptedLLM) -> None:
        hub = await Hub.open(MemoryKnowledgeStore(), ttl_sweep_interval=0, expectation_sweep_interval=0)
        alice = await hub.register(Agent("alice", config=_config(llm_a),
                                         middleware=[oc.ag2x.telemetry_middleware("alice")]))
        await hub.register(Agent("bob", config=_config(llm_b), middleware=[oc.ag2x.telemetry_middleware("bob")]))
        channel = await alice.open(type="conversation", target="bob")
        await channel.send("hello bob, what is 6*7?")
        for _ in range(500):
            if len([e for e in await hub.read_wal(channel.channel_id) if e.event_type == EV_TEXT]) >= 3:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        await channel.close(reason="done")
        await hub.close()

    async def main() -> oc.run:
        with ScriptedLLM([text("")]) as llm_a, ScriptedLLM([text("42")]) as llm_b:
            async with oc.run(name="network") as run:
                await converse(llm_a, llm_b)
        return run

    run = asyncio.run(main())
    tracing.shutdown()
    rows = run_events(open_store(str(db)), run.run_id)
    agents = [(r["agent_name"], r["outputs"]) for r in rows if r["event_type"] == "agent_call"]
    assert ("bob", {"response": "42"}) in agents, agents
    assert {name for name, _ in agents} == {"alice", "bob"}
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(json.dumps(r["run_id"]) for r in rows)
