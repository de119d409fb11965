"""WebsocketCallbackProcessor and the websocket server: real AG2 chats, scripted LLM, a real websocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime

import pytest
from autogen import ConversableAgent, register_function
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.table.schema import is_message
import otel_cmbagent.pipeline.listeners as oc_live
from otel_cmbagent.table import rows
from otel_cmbagent.exporters.websocket import (
    DATA_FIELDS,
    EVENT_CAPTURED,
    WebsocketCallbackProcessor,
    envelope,
    serve,
)
from otel_cmbagent.server.net import is_loopback
from otel_cmbagent.testing import text, tool_call

from conftest import FAKE_KEY

websockets = pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

pytestmark = pytest.mark.usefixtures("chats_cwd")

IDENTITY_FIELDS = {
    "event_id", "run_id", "session_id", "node_id", "event_type", "event_subtype", "agent_name",
    "timestamp", "execution_order", "depth", "status",
}  # fmt: skip


def add(a: int, b: int) -> int:
    return a + b


def make_pair(llm, tool=add):
    assistant = ConversableAgent(
        "assistant", system_message="You add numbers.", llm_config=llm.llm_config(api_key=FAKE_KEY)
    )
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", max_consecutive_auto_reply=4)
    register_function(tool, caller=assistant, executor=user, name="add", description="Add two integers.")
    return assistant, user


def chat(llm, tool=add, run_id="run-ws", session_id="sess-ws"):
    """A chat with one tool call and a final answer, inside a run."""
    llm.push(tool_call("add", {"a": 2, "b": 3}), text("5 TERMINATE"))
    assistant, user = make_pair(llm, tool)
    with oc.run(name="ws", run_id=run_id, session_id=session_id):
        result = user.initiate_chat(assistant, message="What is 2+3?", max_turns=3, silent=True)
    assert any(m.get("content") == "5 TERMINATE" for m in result.chat_history)
    return result


@contextlib.contextmanager
def traced(callback, **options) -> Iterator[tuple[WebsocketCallbackProcessor, InMemorySpanExporter]]:
    """A provider with the sequencer, the websocket processor and an in-memory exporter; AG2 instrumented."""
    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    processor = WebsocketCallbackProcessor(callback, **options)
    provider.add_span_processor(processor)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield processor, exporter
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


class Recorder:
    """A sync callback that records (event_type, data, thread id)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, int]] = []
        self._lock = threading.Lock()

    def __call__(self, event_type: str, data: dict) -> None:
        with self._lock:
            self.calls.append((event_type, data, threading.get_ident()))

    @property
    def data(self) -> list[dict]:
        return [data for _, data, _ in self.calls]


def expected_events(spans) -> set[tuple[str, int]]:
    """(event_id, execution_order) of every exported span and message, from the shared row mapping."""
    expected = set()
    for span in spans:
        row = rows.span_row(span, ended=True)
        expected.add((row["id"], row["execution_order"]))
        expected.update((m["id"], m["execution_order"]) for m in rows.message_rows(span))
    return expected


def total_events(spans) -> int:
    """Callbacks a run should produce: a start and an end per span, one per message."""
    return 2 * len(spans) + sum(1 for s in spans for e in s.events if e.name == "cmbagent.message")


def test_start_end_and_live_messages_for_every_span(scripted_llm):
    recorder = Recorder()
    bystander = WebsocketCallbackProcessor(Recorder())  # in no provider: must never be called
    try:
        with traced(recorder) as (processor, exporter):
            chat(scripted_llm)
            assert processor.force_flush(10_000)
            spans = exporter.get_finished_spans()
            stats = processor.stats
            assert processor.open_spans == 0
    finally:
        bystander.shutdown()
    assert bystander.stats["enqueued"] == 0

    assert {"run", "conversation", "agent_call", "llm_call", "tool_call"} <= {
        s.attributes["cmbagent.event_type"] for s in spans
    }
    assert len(recorder.calls) == total_events(spans)
    assert stats == {"enqueued": len(recorder.calls), "processed": len(recorder.calls), "dropped": 0, "failed": 0}
    assert {event_type for event_type, _, _ in recorder.calls} == {EVENT_CAPTURED}
    assert threading.get_ident() not in {thread for _, _, thread in recorder.calls}  # never the agent's thread

    data = recorder.data
    for item in data:
        assert list(item) == list(DATA_FIELDS)
        assert IDENTITY_FIELDS <= set(item)
        json.dumps(item)  # everything JSON-serialisable
        datetime.fromisoformat(item["timestamp"])
        assert item["run_id"] == "run-ws" and item["session_id"] == "sess-ws"

    # every span: a start (running) and later an end (completed), same id/order/depth as the exported row
    position = {}
    for index, item in enumerate(data):
        position.setdefault(item["event_id"], []).append(index)
    for span in spans:
        row = rows.span_row(span, ended=True)
        start_index, end_index = position[row["id"]]
        start, end = data[start_index], data[end_index]
        assert start_index < end_index
        assert (start["status"], start["event_subtype"]) == ("running", "start")
        assert start["duration_ms"] is None
        assert (end["status"], end["event_subtype"]) == ("completed", row["event_subtype"]) != ("completed", "start")
        assert end["duration_ms"] == row["duration_ms"]
        for item in (start, end):
            assert item["execution_order"] == row["execution_order"]
            assert item["depth"] == row["depth"]
            assert item["parent_event_id"] == row["parent_event_id"]
            assert (item["trace_id"], item["span_id"]) == (row["trace_id"], row["span_id"])
            assert item["timestamp"] == row["timestamp"].isoformat()

    # messages arrive live: after their span's start and before its end, with the message's own order
    messages = [item for item in data if is_message(item)]
    exported_messages = [m for s in spans for m in rows.message_rows(s)]
    assert len(messages) == len(exported_messages) >= 3
    assert {(m["event_id"], m["execution_order"]) for m in messages} == {
        (m["id"], m["execution_order"]) for m in exported_messages
    }
    for message in messages:
        index = data.index(message)
        parent_start, parent_end = position[message["parent_event_id"]]
        assert parent_start < index < parent_end
        assert message["status"] == "completed" and message["event_subtype"] == "message"
    assert "What is 2+3?" in json.dumps(messages[0]["inputs"])

    # the websocket and the exported spans show the same (id, order) pairs; orders are 1..N
    assert {(item["event_id"], item["execution_order"]) for item in data} == expected_events(spans)
    orders = sorted({item["execution_order"] for item in data})
    assert orders == list(range(1, len(orders) + 1))

    (tool_end,) = [d for d in data if d["event_type"] == "tool_call" and d["status"] == "completed"]
    assert tool_end["inputs"]["arguments"] == {"a": 2, "b": 3}
    assert tool_end["outputs"]["result"] == "5"
    assert tool_end["agent_name"] == "user"
    assert FAKE_KEY not in json.dumps(data)


def test_content_policy_applies_to_data(scripted_llm):
    recorder = Recorder()
    with traced(recorder, capture_content=False) as (processor, exporter):
        chat(scripted_llm)
        assert processor.force_flush(10_000)
    dumped = json.dumps(recorder.data)
    assert "What is 2+3?" not in dumped and "5 TERMINATE" not in dumped
    (tool_end,) = [d for d in recorder.data if d["event_type"] == "tool_call" and d["status"] == "completed"]
    assert "arguments" not in (tool_end["inputs"] or {}) and "result" not in (tool_end["outputs"] or {})
    assert len([d for d in recorder.data if is_message(d)]) >= 3  # the events still arrive


def test_raising_callback_never_breaks_the_chat(scripted_llm, caplog):
    calls = []

    def broken(event_type, data):
        calls.append(data["event_id"])
        raise RuntimeError("UI is down")

    with caplog.at_level(logging.WARNING, logger="otel_cmbagent.exporters.websocket"):
        with traced(broken) as (processor, exporter):
            chat(scripted_llm)
            assert processor.force_flush(10_000)
            spans = exporter.get_finished_spans()
            stats = processor.stats
    assert len(calls) == total_events(spans)
    assert stats == {"enqueued": len(calls), "processed": 0, "dropped": 0, "failed": len(calls)}
    logged = [r for r in caplog.records if r.name == "otel_cmbagent.exporters.websocket"]
    assert len(logged) == 1 < len(calls)  # once per FAILURE_LOG_EVERY (100) failures
    assert "UI is down" in logged[0].getMessage()


@pytest.mark.parametrize("max_queue", [10_000, 2])
def test_blocked_callback_never_blocks_the_agent(scripted_llm, max_queue, caplog):
    """A live view that cannot keep up loses events, never the agent's time: counted, and the log says the
    total (it said the count at the first drop only: "dropped 1 items so far")."""
    caplog.set_level(logging.WARNING, logger="otel_cmbagent")
    release = threading.Event()
    delivered = []

    def blocked(event_type, data):
        release.wait(10)
        delivered.append(data["event_id"])

    with traced(blocked, max_queue=max_queue) as (processor, exporter):
        try:
            chat(scripted_llm)
            assert not release.is_set()  # the chat returned while the callback was still blocked
            spans = exporter.get_finished_spans()
        finally:
            release.set()
        assert processor.force_flush(20_000)
        stats = processor.stats
    total = total_events(spans)
    assert stats["enqueued"] + stats["dropped"] == total
    assert stats["processed"] == stats["enqueued"] == len(delivered)
    assert stats["failed"] == 0
    said = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    if max_queue == 2:
        assert stats["dropped"] > 1  # what did not fit is counted, never waited for
        assert f"dropped {stats['dropped']} items so far" in said[-1], said
    else:
        assert stats["dropped"] == 0 and not said


@pytest.fixture
def running_loop() -> Iterator[tuple[asyncio.AbstractEventLoop, threading.Thread]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ui-loop", daemon=True)
    thread.start()
    try:
        yield loop, thread
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_async_callback_runs_on_the_given_loop(scripted_llm, running_loop):
    loop, loop_thread = running_loop
    received: list[tuple[dict, int]] = []

    async def emit(event_type, data):
        assert event_type == EVENT_CAPTURED
        await asyncio.sleep(0)
        received.append((data, threading.get_ident()))

    with traced(emit, loop=loop) as (processor, exporter):
        chat(scripted_llm)
        assert processor.force_flush(10_000)
        spans = exporter.get_finished_spans()
        stats = processor.stats
    assert {thread for _, thread in received} == {loop_thread.ident}
    assert len(received) == total_events(spans) == stats["processed"]
    assert stats["failed"] == stats["dropped"] == 0
    assert {(d["event_id"], d["execution_order"]) for d, _ in received} == expected_events(spans)


def test_hung_async_callback_times_out_and_counts_failed(running_loop):
    loop, _ = running_loop

    async def hung(event_type, data):
        await asyncio.Event().wait()  # never set

    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    processor = WebsocketCallbackProcessor(hung, loop=loop, callback_timeout=0.2)
    provider.add_span_processor(processor)
    try:
        with provider.get_tracer("test").start_as_current_span("one"):
            pass
        assert processor.force_flush(10_000)
        assert processor.stats == {"enqueued": 2, "processed": 0, "dropped": 0, "failed": 2}
    finally:
        provider.shutdown()
    assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10) is None  # the loop is still free


def test_constructor_checks():
    with pytest.raises(TypeError, match="callable"):
        WebsocketCallbackProcessor("not a function")

    async def emit(event_type, data):
        pass

    with pytest.raises(ValueError, match="loop"):
        WebsocketCallbackProcessor(emit)


def test_shutdown_is_idempotent_and_removes_the_listener():
    processor = WebsocketCallbackProcessor(Recorder())
    assert processor._on_message in oc_live._listeners
    assert processor.shutdown() is True
    assert processor._on_message not in oc_live._listeners
    assert processor.shutdown() is True
    assert processor.force_flush(1000) in (True, False)  # after shutdown: returns, never raises


def test_envelope_shape():
    data = {"event_id": "e1", "run_id": "r1", "session_id": "s1", "status": "running"}
    message = envelope(data)
    assert set(message) == {"event_type", "timestamp", "run_id", "session_id", "data"}
    assert message["event_type"] == "event_captured"
    assert (message["run_id"], message["session_id"], message["data"]) == ("r1", "s1", data)
    assert datetime.fromisoformat(message["timestamp"]).tzinfo is not None
    json.dumps(message)


# --- the server -------------------------------------------------------------------


def _wait_for_clients(broadcaster, count: int) -> None:
    ready = threading.Event()
    for _ in range(200):
        if broadcaster.client_count >= count:
            return
        ready.wait(0.05)
    raise AssertionError(f"{count} client(s) never registered with the server")


def test_server_broadcasts_envelopes_live(scripted_llm):
    """A real websocket client sees the run start while the run is still going (the tool waits for it)."""
    run_seen = threading.Event()
    received: list[dict] = []

    def slow_add(a: int, b: int) -> int:
        slow_add.seen_during_run = run_seen.wait(10)
        return a + b

    slow_add.seen_during_run = False
    with serve() as broadcaster:
        assert broadcaster.url.startswith("ws://127.0.0.1:")
        with connect(broadcaster.url, open_timeout=10) as client:
            _wait_for_clients(broadcaster, 1)

            def receive() -> None:
                try:
                    while True:
                        message = json.loads(client.recv(timeout=30))
                        received.append(message)
                        if message["data"]["event_type"] == "run" and message["data"]["status"] == "running":
                            run_seen.set()
                except (ConnectionClosed, TimeoutError):
                    return

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            with traced(broadcaster.callback) as (processor, exporter):
                chat(scripted_llm, tool=slow_add)
                assert processor.force_flush(10_000)
                spans = exporter.get_finished_spans()
                total = total_events(spans)
                assert processor.stats["processed"] == total
            ready = threading.Event()
            for _ in range(200):
                if len(received) >= total:
                    break
                ready.wait(0.05)
    receiver.join(10)
    assert slow_add.seen_during_run, "the client did not see the run start while the run was going"
    assert len(received) == total
    for message in received:
        assert set(message) == {"event_type", "timestamp", "run_id", "session_id", "data"}
        assert message["event_type"] == "event_captured"
        assert (message["run_id"], message["session_id"]) == ("run-ws", "sess-ws")
        assert list(message["data"]) == list(DATA_FIELDS)
    assert {(m["data"]["event_id"], m["data"]["execution_order"]) for m in received} == expected_events(spans)
    assert broadcaster.stats["sent"] == total and broadcaster.stats["dropped"] == 0


def test_server_token_required():
    token = "s3cret-token-for-tests"
    with serve(token=token) as broadcaster:
        for url, headers in ((broadcaster.url, None), (broadcaster.url + "?token=wrong", None)):
            with pytest.raises(InvalidStatus) as rejected:
                with connect(url, additional_headers=headers, open_timeout=10):
                    pass
            assert rejected.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as rejected:
            with connect(broadcaster.url, additional_headers={"Authorization": "Bearer nope"}, open_timeout=10):
                pass
        assert rejected.value.response.status_code == 401
        assert broadcaster.stats["rejected"] == 3

        with connect(broadcaster.url + f"?token={token}", open_timeout=10) as by_query, connect(
            broadcaster.url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ) as by_header:
            _wait_for_clients(broadcaster, 2)
            broadcaster.callback(EVENT_CAPTURED, {"event_id": "e1", "run_id": "r1", "session_id": "s1"})
            for client in (by_query, by_header):
                message = json.loads(client.recv(timeout=10))
                assert message["data"]["event_id"] == "e1" and message["run_id"] == "r1"


def test_server_close_disconnects_clients_and_is_idempotent():
    broadcaster = serve("localhost")
    with connect(broadcaster.url, open_timeout=10) as client:
        _wait_for_clients(broadcaster, 1)
        broadcaster.close()
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=10)
    broadcaster.close()
    broadcaster.callback(EVENT_CAPTURED, {"event_id": "late"})  # after close: dropped, never raises
    assert broadcaster.stats["dropped"] == 1


def test_non_loopback_bind_needs_a_token():
    with pytest.raises(ValueError, match="token"):
        serve("0.0.0.0")
    with pytest.raises(ValueError, match="token"):
        serve("")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST", "viewer.localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com", "", None):
        assert not is_loopback(host), host


# --- issue 10 item 4: a hung callback at shutdown ----------------------------------------------------


def _shutdown_in_thread(processor) -> threading.Thread:
    """Shut the processor down in a thread; the test only checks that it returns (bounded), never how fast."""
    thread = threading.Thread(target=processor.shutdown, name="shutdown-under-test")
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "shutdown is waiting for a hung callback instead of giving up"
    return thread


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_hung_callback_at_shutdown_counts_every_undelivered_event_and_logs_once(
    scripted_llm, running_loop, monkeypatch, caplog, kind
):
    """A callback that hangs on its first event: shutdown gives up after OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS,
    every event the callback did not get is counted (the one it hangs in as failed, the rest as dropped),
    one log line says so, and nothing is delivered after shutdown."""
    monkeypatch.setenv("OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS", "300")
    release = threading.Event()
    got: list[str] = []

    def hung_sync(event_type, data):
        got.append(data["event_id"])
        release.wait(120)

    async def hung_async(event_type, data):
        got.append(data["event_id"])
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 120)

    loop, _ = running_loop
    options = {"loop": loop, "callback_timeout": 60} if kind == "async" else {}
    with traced(hung_sync if kind == "sync" else hung_async, **options) as (processor, exporter):
        chat(scripted_llm)
        total = total_events(exporter.get_finished_spans())
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"):
            _shutdown_in_thread(processor)
        stats = processor.stats
        release.set()
    assert len(got) == 1 and total > 10
    assert stats == {"enqueued": total, "processed": 0, "dropped": total - 1, "failed": 1}, stats
    lines = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert len(lines) == 1 and f"{total - 1} events not delivered" in lines[0], lines
    assert processor.stats == stats and len(got) == 1  # the released callback gets nothing more
