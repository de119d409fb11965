"""The OTLP sink under bad values and a dead endpoint (issue 10 items 1 and 7), with real OTLP receivers.

- A value an LLM can produce (a tool argument decoding to NUL and a lone surrogate, echoed in the tool's
  exception) must not cost another run its spans: values are made encodable before export.
- A span that still cannot be encoded is left out of its batch alone (counted, logged once, spilled).
- An endpoint that accepts TCP and never answers cannot hold shutdown longer than the configured bound.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.exporters.otlp import otlp_span_processor, prepare_span
from otel_cmbagent.testing import ScriptedLLM
from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver
from sinks_util import poisoned_and_innocent_runs
from spans_util import ended_spans

pytestmark = pytest.mark.usefixtures("chats_cwd")


@pytest.mark.parametrize("receiver_cls, protocol", [(OTLPHTTPReceiver, "http/protobuf"), (OTLPGRPCReceiver, "grpc")])
def test_a_poisoned_run_costs_the_innocent_run_no_span(monkeypatch, receiver_cls, protocol):
    """Two concurrent runs share OTLP batches; one LLM sends a tool argument with NUL and a lone surrogate
    and the tool raises with it (status description, exception text; the tool's own instrumented span is named
    and attributed with it). Every span of both runs arrives
    (it cost 28 of 36), the bad characters as U+FFFD, nothing failed or rejected."""
    memory = InMemorySpanExporter()
    with receiver_cls() as receiver, ScriptedLLM() as poisoned_llm, ScriptedLLM() as innocent_llm:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.removesuffix("/v1/traces"))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        tracing = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)  # default content policy
        tracing.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
        run_ids = poisoned_and_innocent_runs(
            poisoned_llm, innocent_llm, tracer=tracing.tracer_provider.get_tracer("app"))
        tracing.shutdown()
        received = receiver.spans
    run_ids.pop("poisoned raised", None)
    expected = {f"{s.context.span_id:016x}": s for s in memory.get_finished_spans()}
    by_run = {name: {i for i, s in expected.items() if s.attributes.get("cmbagent.run_id") == run_id}
              for name, run_id in run_ids.items()}
    arrived = {span["span_id"] for span in received}
    assert by_run["innocent"] and by_run["innocent"] <= arrived, "the innocent run lost spans"
    assert by_run["poisoned"] <= arrived, "the poisoned run's own spans are kept too, with the values replaced"
    (failed_tool,) = [s for s in received if s["name"] == "execute_tool lookup" and s["status_code"] == "ERROR"
                      and s["attributes"]["cmbagent.run_id"] == run_ids["poisoned"]]
    assert "bad\ufffdvalue\ufffd" in failed_tool["status_message"]
    assert tracing.stats["otlp"] == {"dropped": 0, "exported": len(expected), "failed": 0, "rejected": 0}


def test_a_span_that_still_cannot_be_encoded_is_left_out_alone(tmp_path, caplog):
    """A span OTLP cannot encode even after cleaning (here: a non-string name, a user bug) is rejected on its
    own: the rest of its batch arrives, it is counted, logged once and appended to the spill file. (An integer
    beyond 64 bits, which the encoder would drop with a traceback per span, is sent as text.)"""
    spill = tmp_path / "otlp.spill.jsonl"
    with OTLPHTTPReceiver() as receiver:
        processor = otlp_span_processor(endpoint=receiver.endpoint, capture_content=True, spill_path=spill)
        provider = TracerProvider()
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("isolation")
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"):
            for round_number in range(2):  # two batches, each with one bad span among good ones
                for index in range(3):
                    with tracer.start_as_current_span(f"good {round_number}.{index}") as span:
                        span.set_attribute("big", 2**64 + index)  # beyond int64: sent as text, not dropped
                with tracer.start_as_current_span(42):  # type: ignore[arg-type]
                    pass
                processor.force_flush()
        provider.shutdown()
        received = receiver.spans
    assert sorted(span["name"] for span in received) == [f"good {r}.{i}" for r in range(2) for i in range(3)]
    assert {span["attributes"]["big"] for span in received} == {str(2**64 + i) for i in range(3)}
    assert processor.stats == {"dropped": 0, "exported": 6, "failed": 0, "rejected": 2}
    assert [json.loads(line)["name"] for line in spill.read_text().splitlines()] == [42, 42]
    logged = [r.getMessage() for r in caplog.records if "cannot encode" in r.getMessage()]
    assert len(logged) == 1, logged


class SilentEndpoint:
    """A TCP server on loopback that accepts connections, reads, and never answers (until closed)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self._closed.set()
        for connection in [*self.connections, self.socket]:
            connection.close()


@pytest.mark.parametrize("protocol, path", [("http/protobuf", "/v1/traces"), ("grpc", "")])
def test_shutdown_with_an_endpoint_that_never_answers_is_bounded(monkeypatch, caplog, protocol, path):
    """The exporter may wait 10 minutes for an answer (OTEL_EXPORTER_OTLP_TIMEOUT=600); shutdown gives up after
    OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS and counts the spans it could not deliver (logged once)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "600")
    monkeypatch.setenv("OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS", "300")
    endpoint = SilentEndpoint()
    try:
        processor = otlp_span_processor(protocol=protocol, endpoint=f"http://127.0.0.1:{endpoint.port}{path}")
        provider = TracerProvider()
        provider.add_span_processor(processor)
        for index in range(3):
            with provider.get_tracer("silent").start_as_current_span(f"span {index}"):
                pass
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"):
            shutdown = threading.Thread(target=provider.shutdown)
            shutdown.start()
            shutdown.join(120)
            assert not shutdown.is_alive(), "shutdown waits for the endpoint's answer"
        stats = processor.stats
        assert stats["exported"] == 0 and stats["dropped"] + stats["failed"] == 3, stats
        logged = [r.getMessage() for r in caplog.records if "shutdown gave up" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        assert "after 0.3 s" in logged[0]  # the configured bound, not the exporter's 600 s nor the SDK's 30 s
    finally:
        endpoint.close()


def test_a_span_with_nothing_to_clean_is_exported_as_it_is():
    """No copy of a span whose values are already encodable (the common case): the SDK's properties return a new
    view per access, which made every span look changed and be rebuilt."""
    for span in ended_spans():
        assert prepare_span(span, strip_content=False) is span, span.name
    tool = next(span for span in ended_spans() if "gen_ai.tool.call.arguments" in span.attributes)
    stripped = prepare_span(tool, strip_content=True)
    assert stripped is not tool and "gen_ai.tool.call.arguments" not in stripped.attributes
    assert stripped.attributes["gen_ai.tool.name"] == "add"
