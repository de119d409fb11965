"""End to end against a real trace backend: setup_tracing(otlp=True) into Arize Phoenix, read back over its REST API.

Phoenix runs from its own virtualenv as a separate server (see tests/services/phoenix.py). Without it
these tests skip, except under CI (the variable CI is set), where a missing Phoenix is a failure.
"""

from __future__ import annotations

import json
import os

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.pipeline.semconv import CONTENT_ATTRIBUTES, EXECUTION_ORDER
from services.phoenix import PhoenixNotFound, PhoenixServer, find_phoenix
from sinks_util import scripted_run

from conftest import FAKE_KEY

EXPECTED_NAMES = {
    "invoke_workflow sinks",
    "conversation user",
    "invoke_agent assistant",
    "invoke_agent user",
    "chat scripted-model",
    "execute_tool add",
}
# Namespaces of the attributes otel-cmbagent sends (Phoenix may add others, derived from these).
OUR_NAMESPACES = ("gen_ai.", "cmbagent.", "ag2.")
# Pieces of the scripted chat's content: the user's message, a tool argument's name, and the marker that
# replaces the key inside content (content only: in no attribute that OTLP may carry).
CONTENT_TEXTS = ("add 20 and 22", '"token"', "REDACTED")
# Variables that would override the ones this test sets (or turn content on in OTLP).
_OVERRIDES = (
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)


@pytest.fixture(scope="module")
def phoenix():
    """One Phoenix server for the module: skipped when Phoenix is not installed, a failure under CI."""
    try:
        find_phoenix()
    except PhoenixNotFound as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Phoenix end-to-end tests, but: {exc}", pytrace=False)
        pytest.skip(str(exc))
    with PhoenixServer() as server:
        yield server


def _json_values(attributes) -> dict:
    """Attribute values as they come back in JSON: sequences as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(attributes or {}).items()}


def _content_keys(attributes: dict) -> set[str]:
    return {k for k in attributes if any(k == c or k.startswith(c + ".") for c in CONTENT_ATTRIBUTES)}


def _traced_run(monkeypatch, scripted_llm, *, protocol: str, endpoint: str, project: str | None):
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "cmbagent-phoenix-e2e")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    if project is not None:  # Phoenix files spans under the resource attribute openinference.project.name
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={project}")
    tracing = oc.setup_tracing(sql_url=None, otlp=True, set_global=False, handle_sigterm=False)
    memory = InMemorySpanExporter()  # what the same provider produced, to compare with what Phoenix stored
    tracing.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        run = scripted_run(scripted_llm)
    finally:
        tracing.shutdown()
    return tracing, run, memory.get_finished_spans()


@pytest.mark.parametrize(
    "protocol, project",
    [("http/protobuf", None), ("grpc", "otel-cmbagent-grpc")],
    ids=["otlp-http", "otlp-grpc"],
)
def test_scripted_run_lands_in_phoenix(phoenix, scripted_llm, monkeypatch, protocol, project):
    """Every span reaches Phoenix with its name, parent, execution_order and attributes, and no content."""
    endpoint = phoenix.base_url if protocol == "http/protobuf" else phoenix.otlp_grpc_endpoint
    tracing, run, expected = _traced_run(monkeypatch, scripted_llm, protocol=protocol, endpoint=endpoint,
                                         project=project)
    assert tracing.stats["otlp"] == {"dropped": 0, "exported": len(expected), "failed": 0, "rejected": 0}, tracing.stats

    got = phoenix.wait_for_spans(len(expected), project=project or "default", timeout=60)
    trace_ids = {format(s.context.trace_id, "032x") for s in expected}
    got = [s for s in got if s["context"]["trace_id"] in trace_ids]
    by_id = {s["context"]["span_id"]: s for s in got}
    want = {format(s.context.span_id, "016x"): s for s in expected}
    assert len(got) == len(by_id) == len(expected)
    assert by_id.keys() == want.keys()

    # span names
    names = [s["name"] for s in got]
    assert EXPECTED_NAMES <= set(names), sorted(names)
    assert set(names) == {s.name for s in expected}

    # parent links: one root; every other parent is a span Phoenix has, the same as on the provider
    roots = [s for s in got if s["parent_id"] is None]
    assert [r["name"] for r in roots] == ["invoke_workflow sinks"]
    for span_id, span in by_id.items():
        sent = want[span_id]
        assert span["parent_id"] == (format(sent.parent.span_id, "016x") if sent.parent else None), span["name"]
        if span["parent_id"] is not None:
            assert span["parent_id"] in by_id, f"{span['name']}: parent {span['parent_id']} missing in Phoenix"

    def parent_name(span):
        return by_id[span["parent_id"]]["name"]

    (tool,) = [s for s in got if s["name"] == "execute_tool add"]
    assert parent_name(tool) == "invoke_agent user"
    (conversation,) = [s for s in got if s["name"] == "conversation user"]
    assert parent_name(conversation) == "invoke_workflow sinks"
    assert {parent_name(s) for s in got if s["name"] == "chat scripted-model"} == {"invoke_agent assistant"}
    assert {parent_name(s) for s in got if s["name"].startswith("invoke_agent")} == {"conversation user"}

    # execution order: the same (name, order) pairs as the provider recorded; with the message events
    # (span events, each with its own order) the orders are gapless 1..N
    assert {(s["name"], s["attributes"][EXECUTION_ORDER]) for s in got} == {
        (s.name, s.attributes[EXECUTION_ORDER]) for s in expected
    }
    span_orders = [s["attributes"][EXECUTION_ORDER] for s in got]
    event_orders = [e["attributes"][EXECUTION_ORDER] for s in got for e in s["events"]
                    if EXECUTION_ORDER in e["attributes"]]
    assert event_orders, "message events (with their orders) reach Phoenix"
    assert sorted(span_orders + event_orders) == list(range(1, len(span_orders) + len(event_orders) + 1))
    assert {s["attributes"]["cmbagent.run_id"] for s in got} == {run.run_id}

    # attributes: everything the provider recorded, less content (content was there before the OTLP sink);
    # Phoenix only adds its own OpenInference attributes derived from them (llm.*, session.id, output.*)
    sent_tool = next(s for s in expected if s.name == "execute_tool add")
    assert "gen_ai.tool.call.arguments" in sent_tool.attributes, "content is captured; only the OTLP sink strips it"
    for span_id, span in by_id.items():
        sent = _json_values(want[span_id].attributes)
        stripped = {k: v for k, v in sent.items() if k not in _content_keys(sent)}
        received = span["attributes"]
        assert {k: received.get(k) for k in stripped} == stripped, span["name"]
        added = {k for k in received if k not in stripped}
        assert not {k for k in added if k.startswith(OUR_NAMESPACES)}, (span["name"], added)

    # no content and no secret anywhere in what Phoenix returns
    for span in got:
        assert not _content_keys(span["attributes"]), (span["name"], _content_keys(span["attributes"]))
        for event in span["events"]:
            assert not _content_keys(event["attributes"]), (span["name"], event)
    assert "gen_ai.tool.call.arguments" not in tool["attributes"]
    everything = json.dumps(got)
    assert FAKE_KEY not in everything
    for content in CONTENT_TEXTS:  # not under any key, ours or one Phoenix derives (input.value, llm.*_messages)
        assert content not in everything, content
    assert FAKE_KEY not in json.dumps(phoenix.spans(project or "default"))
    if project is not None:  # filed under the project named by the resource, not under "default"
        assert not [s for s in phoenix.spans("default") if s["context"]["trace_id"] in trace_ids]

