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


def _phoenix_output(span: dict) -> dict:
    """What Phoenix derives by itself for an LLM span without output.value: the response id and model as JSON."""
    value = span["attributes"].get("output.value")
    return json.loads(value) if value is not None else {}


def _content_keys_we_sent(span: dict) -> set[str]:
    """Content keys in what Phoenix returns, less the output Phoenix builds itself from an LLM span's response id."""
    keys = _content_keys(span["attributes"])
    if span["span_kind"] == "LLM" and set(_phoenix_output(span)) <= {"id", "model"}:
        keys -= {"output.value", "output.mime_type"}
    return keys


def _traced_run(monkeypatch, scripted_llm, *, protocol: str, endpoint: str, project: str | None,
                capture_content: bool | None = None):
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "cmbagent-phoenix-e2e")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    if project is not None:  # Phoenix files spans under the resource attribute openinference.project.name
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={project}")
    tracing = oc.setup_tracing(sql_url=None, otlp=True, set_global=False, handle_sigterm=False,
                               capture_content=capture_content)
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
        assert span["span_kind"] == stripped.pop("openinference.span.kind"), span["name"]  # Phoenix moves it
        received = span["attributes"]
        assert {k: received.get(k) for k in stripped} == stripped, span["name"]
        added = {k for k in received if k not in stripped}
        assert not {k for k in added if k.startswith(OUR_NAMESPACES)}, (span["name"], added)

    # no content and no secret anywhere in what Phoenix returns
    for span in got:
        assert not _content_keys_we_sent(span), (span["name"], _content_keys_we_sent(span))
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



# openinference.span.kind by span (Phoenix shows a span without one it knows as "unknown")
_KINDS = {"invoke_workflow": "CHAIN", "conversation": "AGENT", "invoke_agent": "AGENT", "chat": "LLM",
          "execute_tool": "TOOL"}


@pytest.mark.parametrize("content", [True, False], ids=["content-on", "content-off"])
def test_phoenix_reads_our_spans_first_class(phoenix, scripted_llm, monkeypatch, content):
    """Through Phoenix's API: a kind on every span, inputs and outputs (with content), finish reasons,
    the run's session, status OK, tokens and cost; with content off no input or output of ours."""
    project = f"first-class-{'on' if content else 'off'}"
    tracing, run, expected = _traced_run(monkeypatch, scripted_llm, protocol="http/protobuf",
                                         endpoint=phoenix.base_url, project=project, capture_content=content)
    got = phoenix.wait_for_spans(len(expected), project=project, timeout=60)
    assert len(got) == len(expected)
    for span in got:
        assert span["span_kind"] == _KINDS[span["name"].split()[0]], span["name"]
        assert span["status_code"] == "OK", span["name"]
        assert span["attributes"]["session.id"] == run.session_id, span["name"]
    by_kind = {kind: [s for s in got if s["span_kind"] == kind] for kind in ("CHAIN", "AGENT", "LLM", "TOOL")}
    llm_spans = by_kind["LLM"]
    assert len(llm_spans) == 3
    sent_llm = {format(s.context.span_id, "016x"): s for s in expected if s.name.startswith("chat")}
    for span in llm_spans:  # tokens as Phoenix counts them, and our cost, equal what the provider recorded
        sent = sent_llm[span["context"]["span_id"]].attributes
        attributes = span["attributes"]
        assert attributes["llm.token_count.prompt"] == sent["gen_ai.usage.input_tokens"] > 0
        assert attributes["llm.token_count.completion"] == sent["gen_ai.usage.output_tokens"] > 0
        assert attributes["gen_ai.usage.cost"] == sent["gen_ai.usage.cost"]
    if content:
        for span in got:
            assert span["attributes"].get("input.value"), span["name"]
            assert "output.value" in span["attributes"], span["name"]
        (root,) = by_kind["CHAIN"]
        assert root["attributes"]["input.value"].startswith("add 20 and 22")  # the run's first message
        assert root["attributes"]["output.value"] == "TERMINATE"  # its last top-level reply
        (tool,) = by_kind["TOOL"]
        assert json.loads(tool["attributes"]["input.value"])["a"] == 20 and tool["attributes"]["output.value"] == "42"
        replies = [s["attributes"]["output.value"] for s in llm_spans]
        assert "TERMINATE" in replies and not any(set(_phoenix_output(s)) == {"id", "model"} for s in llm_spans
                                                  if s["attributes"]["output.value"].startswith("{"))
        # every output message carries a finish_reason, so Phoenix keeps them (LLM and agent spans)
        for span in llm_spans + [s for s in by_kind["AGENT"] if s["name"].startswith("invoke_agent")]:
            assert span["attributes"].get("llm.output_messages.0.message.finish_reason"), span["name"]
    else:
        for span in got:
            assert "input.value" not in span["attributes"], span["name"]
            assert not _content_keys_we_sent(span), span["name"]
            if span["span_kind"] != "LLM":
                assert "output.value" not in span["attributes"], span["name"]
        everything = json.dumps(got)
        for text in CONTENT_TEXTS + ("TERMINATE", "42 "):
            assert text not in everything, text
