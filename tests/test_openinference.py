"""The OpenInference keys next to the GenAI ones (what Phoenix reads; test_phoenix_e2e.py checks Phoenix itself)."""

from __future__ import annotations

import json

import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager

import otel_cmbagent as oc
from otel_cmbagent.pipeline import semconv
from otel_cmbagent.testing import text
from sinks_util import scripted_run

KINDS = {"invoke_workflow": "CHAIN", "conversation": "AGENT", "invoke_agent": "AGENT", "chat": "LLM",
         "execute_tool": "TOOL", "handoff": "CHAIN"}


def _by_order(memory_exporter):
    return sorted(memory_exporter.get_finished_spans(), key=lambda s: s.attributes[semconv.EXECUTION_ORDER])


def test_every_span_has_a_kind_an_input_an_output_the_session_and_status_ok(
        instrument_with_content, memory_exporter, scripted_llm):
    run = scripted_run(scripted_llm)
    spans = _by_order(memory_exporter)
    for span in spans:
        attributes = span.attributes
        assert attributes[semconv.OPENINFERENCE_SPAN_KIND] == KINDS[span.name.split()[0]], span.name
        assert attributes[semconv.OI_SESSION_ID] == run.session_id
        assert span.status.is_ok and span.status.status_code.name == "OK", span.name
        assert attributes[semconv.INPUT_VALUE] and semconv.OUTPUT_VALUE in attributes, span.name
        if semconv.GEN_AI_AGENT_NAME in attributes:
            assert attributes[semconv.OI_AGENT_NAME] == attributes[semconv.GEN_AI_AGENT_NAME]
        for message in json.loads(attributes.get(semconv.GEN_AI_OUTPUT_MESSAGES, "[]")):
            assert message["finish_reason"], span.name  # Phoenix drops the list when one lacks it
    root, conversation = spans[0], spans[1]
    assert root.attributes[semconv.INPUT_VALUE].startswith("add 20 and 22")
    assert root.attributes[semconv.OUTPUT_VALUE] == conversation.attributes[semconv.OUTPUT_VALUE] == "TERMINATE"
    opening = json.loads(conversation.attributes[semconv.INPUT_VALUE])
    assert opening["sender"] == "user" and opening["recipient"] == "assistant"
    (tool,) = [s for s in spans if s.name == "execute_tool add"]
    assert json.loads(tool.attributes[semconv.INPUT_VALUE])["a"] == 20 and tool.attributes[semconv.OUTPUT_VALUE] == "42"
    chats = [s for s in spans if s.name.startswith("chat")]
    assert chats[-1].attributes[semconv.OUTPUT_VALUE] == "TERMINATE"  # the reply, not {"id", "model"}
    assert chats[0].attributes[semconv.INPUT_VALUE] == chats[0].attributes[semconv.GEN_AI_INPUT_MESSAGES]


def test_no_input_or_output_without_content(instrument_no_content, memory_exporter, scripted_llm):
    scripted_run(scripted_llm)
    for span in memory_exporter.get_finished_spans():
        assert span.attributes[semconv.OPENINFERENCE_SPAN_KIND] in {"CHAIN", "AGENT", "LLM", "TOOL"}
        assert not {semconv.INPUT_VALUE, semconv.OUTPUT_VALUE, semconv.INPUT_MIME_TYPE} & set(span.attributes)


def test_group_chat_turns_and_handoffs_have_inputs(
        instrument_with_content, memory_exporter, scripted_llm, chats_cwd):
    """A group chat turn gets no messages argument: its input is the newest message from its history."""
    scripted_llm.push(text("plan: one step"), text("done TERMINATE"))
    config = scripted_llm.llm_config()
    planner = ConversableAgent("planner", llm_config=config, human_input_mode="NEVER")
    coder = ConversableAgent("coder", llm_config=config, human_input_mode="NEVER")
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    group = GroupChat([user, planner, coder], messages=[], max_round=3, speaker_selection_method="round_robin")
    manager = GroupChatManager(group, llm_config=False)
    with oc.run(name="group"):
        user.initiate_chat(manager, message="make a plan", silent=True)
    spans = _by_order(memory_exporter)
    (planner_turn,) = [s for s in spans if s.name == "invoke_agent planner"]
    assert planner_turn.attributes[semconv.INPUT_VALUE] == "make a plan"
    assert planner_turn.attributes[semconv.OUTPUT_VALUE] == "plan: one step"
    handoffs = [s for s in spans if s.name.startswith("handoff")]
    assert handoffs and all(s.attributes[semconv.OPENINFERENCE_SPAN_KIND] == "CHAIN" for s in handoffs)
    first = json.loads(handoffs[0].attributes[semconv.INPUT_VALUE])
    assert first["method"] == "round_robin" and first["candidates"] == ["user", "planner", "coder"]
    assert handoffs[0].attributes[semconv.OUTPUT_VALUE] == "planner"


@pytest.mark.parametrize("content", [True, False])
def test_rows_leave_the_openinference_keys_out(content, instrument_with_content, memory_exporter, scripted_llm):
    from otel_cmbagent.table.rows import span_row

    scripted_run(scripted_llm)
    for span in memory_exporter.get_finished_spans():
        row = span_row(span, ended=True, capture_content=content)
        assert not semconv.OPENINFERENCE_KEYS & set(row["meta"]), span.name
