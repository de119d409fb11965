"""Content switch, secrets that must never leave the process, bad input, and span data that grows linearly."""

from __future__ import annotations

import json

from autogen import ConversableAgent, register_function
from autogen.coding import LocalCommandLineCodeExecutor

import otel_cmbagent as oc
from otel_cmbagent.pipeline import semconv
from otel_cmbagent.testing import code, text, tool_call
from spans_util import by_event_type, everything_recorded

from conftest import FAKE_KEY

UNIQUE = {
    "message": "Please compute the zorblax coefficient",
    "argument": "quuxvalue-314159",
    "result": "resultmarker-271828",
    "code": "print('codemarker-161803')",
    "output": "codemarker-161803",
    "reply": "replymarker-141421",
}


def lookup(query: str, api_key: str = "", note: str = "") -> str:
    return f"{UNIQUE['result']} for {query} (key was {api_key}) {note}"


def run_full_chat(llm, tmp_path, message=UNIQUE["message"], extra_args=None):
    args = {"query": UNIQUE["argument"], **(extra_args or {})}
    llm.push(tool_call("lookup", args), code(UNIQUE["code"]), text(UNIQUE["reply"]), text("TERMINATE"))
    assistant = ConversableAgent("assistant", llm_config=llm.llm_config(api_key=FAKE_KEY))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    user = ConversableAgent(
        "user",
        llm_config=False,
        human_input_mode="NEVER",
        code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=work)},
    )
    register_function(lookup, caller=assistant, executor=user, description="Look something up.")
    with oc.run(name="content"):
        user.initiate_chat(assistant, message=message, max_turns=4, silent=True)


def test_content_off_records_no_content(instrument_no_content, memory_exporter, scripted_llm, tmp_path):
    """capture_content=False: no message, argument, result, code or output text anywhere."""
    run_full_chat(scripted_llm, tmp_path)
    spans = memory_exporter.get_finished_spans()
    assert by_event_type(spans, "tool_call") and by_event_type(spans, "code_exec")
    recorded = everything_recorded(spans)
    for marker in UNIQUE.values():
        assert marker not in recorded, marker
    for span in spans:
        assert not semconv.CONTENT_ATTRIBUTES & set(span.attributes)
        for event in span.events:
            assert not semconv.CONTENT_ATTRIBUTES & set(event.attributes)
    # structure is still all there
    (tool,) = by_event_type(spans, "tool_call")
    assert tool.attributes["gen_ai.tool.name"] == "lookup"
    messages = [e for s in spans for e in s.events if e.name == "cmbagent.message"]
    assert messages and all("cmbagent.message.sender" in e.attributes for e in messages)


def test_content_on_records_content(instrument_with_content, memory_exporter, scripted_llm, tmp_path):
    """The same run with content on records each marker (the switch really switches)."""
    run_full_chat(scripted_llm, tmp_path)
    recorded = everything_recorded(memory_exporter.get_finished_spans())
    for marker in UNIQUE.values():
        assert marker in recorded, marker


def test_env_switch_turns_content_off(tracer_provider, memory_exporter, scripted_llm, tmp_path, monkeypatch):
    """OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=false is honoured when no argument is given."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "false")
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        run_full_chat(scripted_llm, tmp_path)
    finally:
        instrumentor.uninstrument()
    recorded = everything_recorded(memory_exporter.get_finished_spans())
    assert UNIQUE["message"] not in recorded and UNIQUE["output"] not in recorded


def test_fake_key_never_recorded(instrument_with_content, memory_exporter, scripted_llm, tmp_path, monkeypatch):
    """The API key from llm_config, echoed in messages, tool arguments, results and errors, is nowhere."""
    run_full_chat(
        scripted_llm,
        tmp_path,
        message=f"my key is {FAKE_KEY}, and Authorization: Bearer {FAKE_KEY}",
        extra_args={"api_key": FAKE_KEY, "note": f"use {FAKE_KEY}"},
    )
    spans = memory_exporter.get_finished_spans()
    recorded = everything_recorded(spans)
    assert FAKE_KEY not in recorded
    assert "FAKEKEY" not in recorded
    (tool,) = by_event_type(spans, "tool_call")
    arguments = json.loads(tool.attributes["gen_ai.tool.call.arguments"])
    assert arguments["api_key"] == "[REDACTED]" and arguments["query"] == UNIQUE["argument"]
    assert "[REDACTED]" in tool.attributes["gen_ai.tool.call.result"]


def test_secrets_from_environment_and_patterns(tracer_provider, memory_exporter, scripted_llm, tmp_path, monkeypatch):
    """Values of *_TOKEN variables and credential-shaped strings never reach a span."""
    env_secret = "envtok-4f9d8c7b6a5e4d3c2b1a"
    monkeypatch.setenv("MY_SERVICE_TOKEN", env_secret)
    unregistered = "sk-proj-ABCDEFGHIJKLMNOPQRSTUV123456"
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        run_full_chat(scripted_llm, tmp_path, message=f"tokens: {env_secret} and {unregistered}")
    finally:
        instrumentor.uninstrument()
    recorded = everything_recorded(memory_exporter.get_finished_spans())
    assert env_secret not in recorded and unregistered not in recorded


def test_huge_and_binary_values_are_bounded(tracer_provider, memory_exporter, scripted_llm, tmp_path):
    """A 300 KB message is cut at the limit with a marker; bytes become a placeholder; the run finishes."""

    def blob() -> bytes:
        return b"\x00\x01binary" * 1000

    limit = 4096
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, max_value_length=limit)
    try:
        scripted_llm.push(tool_call("blob", {}), text("TERMINATE"))
        assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        register_function(blob, caller=assistant, executor=user, description="Binary blob.")
        huge = "x" * 300_000
        user.initiate_chat(assistant, message=huge, max_turns=2, silent=True)
    finally:
        instrumentor.uninstrument()
    spans = memory_exporter.get_finished_spans()
    first = next(e for s in spans for e in s.events if e.name == "cmbagent.message")
    content = first.attributes["cmbagent.message.content"]
    assert "truncated by otel-cmbagent" in content
    assert len(content) < limit * 2
    (tool,) = by_event_type(spans, "tool_call")
    assert tool.attributes["gen_ai.tool.call.result"].startswith("<binary") or "binary" in tool.attributes[
        "gen_ai.tool.call.result"
    ]


def _span_bytes(spans) -> int:
    total = 0
    for span in spans:
        total += len(json.dumps(dict(span.attributes), default=str))
        total += sum(len(json.dumps(dict(e.attributes), default=str)) for e in span.events)
    return total


def _chat_of(turns: int, llm, memory_exporter) -> int:
    memory_exporter.clear()
    a = ConversableAgent("a", llm_config=llm.llm_config(), human_input_mode="NEVER")
    b = ConversableAgent("b", llm_config=llm.llm_config(), human_input_mode="NEVER")
    a.initiate_chat(b, message="m" * 60, max_turns=turns, silent=True)
    return _span_bytes(memory_exporter.get_finished_spans())


def test_span_data_grows_linearly_with_conversation(instrument_with_content, memory_exporter):
    """4x the turns gives ~4x the span data (peers re-serialise the history into every span: ~16x)."""
    from otel_cmbagent.testing import ScriptedLLM

    with ScriptedLLM(lambda request: text("r" * 60)) as llm:
        small = _chat_of(10, llm, memory_exporter)
        large = _chat_of(40, llm, memory_exporter)
    assert 3.0 < large / small < 5.0, (small, large)
