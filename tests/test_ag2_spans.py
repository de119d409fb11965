"""Real AG2 agents, real OpenAIWrapper/openai SDK, a scripted OpenAI-compatible server on 127.0.0.1.

Every row of the span model is produced here by a real AG2 code path, sync and async.
"""

from __future__ import annotations

import asyncio
import json
import os

import openai
import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager, register_function
from autogen.coding import LocalCommandLineCodeExecutor

import otel_cmbagent as oc
from otel_cmbagent.testing import code, error, text, tool_call
from spans_util import all_orders, by_event_type, everything_recorded, ordered, parent_of

from conftest import FAKE_KEY

pytestmark = pytest.mark.usefixtures("chats_cwd")


def add(a: int, b: int) -> int:
    return a + b


async def a_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def make_pair(llm, work_dir=None, tool=add, **user_options):
    assistant = ConversableAgent(
        "assistant", system_message="You add numbers.", llm_config=llm.llm_config(api_key=FAKE_KEY)
    )
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    code_config = {"executor": LocalCommandLineCodeExecutor(work_dir=work_dir)} if work_dir else False
    options = {"human_input_mode": "NEVER", "max_consecutive_auto_reply": 6, **user_options}
    user = ConversableAgent("user", llm_config=False, code_execution_config=code_config, **options)
    register_function(tool, caller=assistant, executor=user, name="add", description="Add two integers.")
    return assistant, user


WRITE_FILES = (
    "import json\n"
    "open('data.csv', 'w').write('x,y\\n1,2\\n')\n"
    "open('plot.png', 'wb').write(b'\\x89PNG fake')\n"
    "print('wrote files')\n"
)


def test_two_agent_chat_tree(instrument_with_content, memory_exporter, scripted_llm, tmp_path):
    """A tool call, a code run writing two files and a final answer produce the documented span tree."""
    scripted_llm.push(tool_call("add", {"a": 2, "b": 3}), code(WRITE_FILES), text("5. TERMINATE"))
    assistant, user = make_pair(scripted_llm, work_dir=tmp_path / "work")
    with oc.run(name="analysis", run_id="run-1", session_id="sess-1") as run:
        result = user.initiate_chat(assistant, message="What is 2+3?", max_turns=4, silent=True)
    assert any("5. TERMINATE" == m.get("content") for m in result.chat_history)

    spans = memory_exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {run.span.get_span_context().trace_id}
    names = [s.name for s in ordered(spans)]
    assert names[0] == "invoke_workflow analysis"
    assert names[1] == "conversation user"
    assert "execute_tool add" in names and "execute_code user" in names
    assert {"file data.csv", "file plot.png"} <= set(names)

    (conversation,) = by_event_type(spans, "conversation")
    assert parent_of(conversation, spans).name == "invoke_workflow analysis"
    for agent_call in by_event_type(spans, "agent_call"):
        assert parent_of(agent_call, spans) is conversation
        assert agent_call.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert agent_call.name == f"invoke_agent {agent_call.attributes['gen_ai.agent.name']}"
    llm_calls = by_event_type(spans, "llm_call")
    assert len(llm_calls) == len(scripted_llm.requests) >= 3
    for llm_call in llm_calls:
        assert parent_of(llm_call, spans).name == "invoke_agent assistant"
        assert llm_call.name == "chat scripted-model"
        assert llm_call.attributes["gen_ai.request.model"] == "scripted-model"
        assert llm_call.attributes["gen_ai.response.model"] == "scripted-model"
        assert llm_call.attributes["gen_ai.provider.name"] == "openai"
        assert isinstance(llm_call.attributes["gen_ai.usage.input_tokens"], int)
        assert llm_call.attributes["gen_ai.usage.output_tokens"] > 0
    (tool,) = by_event_type(spans, "tool_call")
    assert parent_of(tool, spans).name == "invoke_agent user"
    assert tool.attributes["gen_ai.tool.name"] == "add"
    assert tool.attributes["gen_ai.tool.call.id"]
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"a": 2, "b": 3}
    assert tool.attributes["gen_ai.tool.call.result"] == "5"
    (code_span,) = by_event_type(spans, "code_exec")
    assert code_span.attributes["ag2.code_execution.exit_code"] == 0
    assert "wrote files" in code_span.attributes["ag2.code_execution.output"]
    assert code_span.attributes["cmbagent.code.language"] == "python"
    files = by_event_type(spans, "file_gen")
    assert sorted(f.attributes["cmbagent.file.type"] for f in files) == ["data", "plot"]
    for file_span in files:
        assert parent_of(file_span, spans) is code_span
        assert os.path.isfile(file_span.attributes["cmbagent.file.path"])
        assert file_span.attributes["cmbagent.file.size_bytes"] > 0
        assert file_span.attributes["cmbagent.depth"] == code_span.attributes["cmbagent.depth"] + 1

    # identity and ordering: every span carries the run, orders (spans + messages) are 1..N
    for span in spans:
        assert span.attributes["cmbagent.run_id"] == "run-1"
        assert span.attributes["cmbagent.session_id"] == "sess-1"
    orders = all_orders(spans)
    assert orders == list(range(1, len(orders) + 1))
    starts = [s.start_time for s in ordered(spans)]
    assert starts == sorted(starts)

    # messages are events on the conversation span, not spans
    messages = [e for e in conversation.events if e.name == "cmbagent.message"]
    assert len(messages) == len(result.chat_history)
    assert messages[0].attributes["cmbagent.message.sender"] == "user"
    assert messages[0].attributes["cmbagent.message.recipient"] == "assistant"
    assert "What is 2+3?" in messages[0].attributes["cmbagent.message.content"]
    # totals of the conversation and the run are per call (never cumulative client totals)
    total_in = sum(s.attributes["gen_ai.usage.input_tokens"] for s in llm_calls)
    assert conversation.attributes["gen_ai.usage.input_tokens"] == total_in
    assert run.span.attributes["gen_ai.usage.input_tokens"] == total_in
    assert FAKE_KEY not in everything_recorded(spans)


def test_user_data_not_mutated(instrument_with_content, scripted_llm):
    """ChatResult.cost keeps total_cost (AG2's own tracing pops it)."""
    scripted_llm.push(text("hi"), text("TERMINATE"))
    assistant, user = make_pair(scripted_llm)
    result = user.initiate_chat(assistant, message="hello", max_turns=1, silent=True)
    assert "total_cost" in result.cost["usage_including_cached_inference"]


async def test_async_chat_tree(instrument_with_content, memory_exporter, scripted_llm):
    """a_initiate_chat, a_generate_reply, a_execute_function (async tool) and the LLM call nest correctly."""
    scripted_llm.push(tool_call("add", {"a": 4, "b": 4}), text("8 TERMINATE"))
    assistant, user = make_pair(scripted_llm, tool=a_add)
    async with oc.run(name="async-run") as run:
        await user.a_initiate_chat(assistant, message="4+4?", max_turns=3, silent=True)
    spans = memory_exporter.get_finished_spans()
    assert {s.attributes["cmbagent.run_id"] for s in spans} == {run.run_id}
    (conversation,) = by_event_type(spans, "conversation")
    assert parent_of(conversation, spans).attributes["cmbagent.event_type"] == "run"
    (tool,) = by_event_type(spans, "tool_call")
    assert tool.attributes["gen_ai.tool.call.result"] == "8"
    assert parent_of(tool, spans).name == "invoke_agent user"
    for llm_call in by_event_type(spans, "llm_call"):
        # the sync client call runs in an executor thread: it must still be a child of the agent turn
        assert parent_of(llm_call, spans).name == "invoke_agent assistant"
    orders = all_orders(spans)
    assert orders == list(range(1, len(orders) + 1))


def test_legacy_code_execution_path(instrument_with_content, memory_exporter, scripted_llm, tmp_path):
    """code_execution_config without an executor runs AG2's legacy execute_code path: traced the same way."""
    scripted_llm.push(code(WRITE_FILES), text("TERMINATE"))
    work = tmp_path / "legacy"
    work.mkdir()
    assistant = ConversableAgent("coder", llm_config=scripted_llm.llm_config())
    user = ConversableAgent(
        "runner",
        llm_config=False,
        human_input_mode="NEVER",
        code_execution_config={"work_dir": str(work), "use_docker": False},
    )
    user.initiate_chat(assistant, message="write files", max_turns=2, silent=True)
    spans = memory_exporter.get_finished_spans()
    (code_span,) = by_event_type(spans, "code_exec")
    assert code_span.name == "execute_code runner"
    assert code_span.attributes["cmbagent.code.executor"] == "legacy"
    assert code_span.attributes["ag2.code_execution.exit_code"] == 0
    assert {f.name for f in by_event_type(spans, "file_gen")} == {"file data.csv", "file plot.png"}


def test_failing_code_marks_span_failed(instrument_with_content, memory_exporter, scripted_llm, tmp_path):
    """A non-zero exit code is an ERROR span with error.type, and the chat goes on."""
    scripted_llm.push(code("raise SystemExit(3)"), text("TERMINATE"))
    assistant, user = make_pair(scripted_llm, work_dir=tmp_path / "w")
    user.initiate_chat(assistant, message="fail please", max_turns=2, silent=True)
    (code_span,) = by_event_type(memory_exporter.get_finished_spans(), "code_exec")
    assert code_span.attributes["ag2.code_execution.exit_code"] == 3
    assert code_span.status.status_code.name == "ERROR"
    assert code_span.attributes["error.type"] == "code_execution_error"


def test_tool_error_is_recorded(instrument_with_content, memory_exporter, scripted_llm):
    """A tool that raises: AG2 catches it; the span is ERROR with the message, the run continues."""

    def broken(a: int, b: int) -> int:
        raise RuntimeError("disk full")

    scripted_llm.push(tool_call("add", {"a": 1, "b": 1}), text("TERMINATE"))
    assistant, user = make_pair(scripted_llm, tool=broken)
    user.initiate_chat(assistant, message="go", max_turns=3, silent=True)
    (tool,) = by_event_type(memory_exporter.get_finished_spans(), "tool_call")
    assert tool.status.status_code.name == "ERROR"
    assert tool.attributes["cmbagent.tool.success"] is False
    assert "disk full" in tool.attributes["gen_ai.tool.call.result"]


def test_failing_llm_call(instrument_with_content, memory_exporter, scripted_llm):
    """An LLM error is recorded on the chat span and reaches the caller unchanged."""
    scripted_llm.push(error(500, "model overloaded"))
    assistant, user = make_pair(scripted_llm)
    with pytest.raises(openai.InternalServerError):
        user.initiate_chat(assistant, message="hi", max_turns=2, silent=True)
    spans = memory_exporter.get_finished_spans()
    (llm_call,) = by_event_type(spans, "llm_call")
    assert llm_call.status.status_code.name == "ERROR"
    assert llm_call.attributes["error.type"] == "openai.InternalServerError"
    assert any(e.name == "exception" for e in llm_call.events)
    for span in by_event_type(spans, "agent_call") + by_event_type(spans, "conversation"):
        assert span.status.status_code.name == "ERROR"


def test_user_exception_passes_through_unchanged(instrument_with_content, memory_exporter, scripted_llm):
    """The very exception object raised in a reply function reaches the caller."""
    boom = ValueError("boom from the user's code")

    def failing_reply(recipient, messages=None, sender=None, config=None):
        raise boom

    assistant, user = make_pair(scripted_llm)
    assistant.register_reply([ConversableAgent, None], failing_reply)
    with pytest.raises(ValueError) as excinfo:
        user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
    assert excinfo.value is boom
    (agent_call,) = by_event_type(memory_exporter.get_finished_spans(), "agent_call")
    assert agent_call.attributes["error.type"] == "ValueError"


def _group(llm, names=("planner", "engineer", "reviewer")):
    agents = [ConversableAgent(n, llm_config=llm.llm_config(), human_input_mode="NEVER") for n in names]
    groupchat = GroupChat(agents=agents, messages=[], max_round=4, speaker_selection_method="round_robin")
    manager = GroupChatManager(groupchat=groupchat, llm_config=False)
    return agents, groupchat, manager


def _check_group(spans, manager_name="chat_manager"):
    conversations = by_event_type(spans, "conversation")
    group = [c for c in conversations if c.attributes["cmbagent.conversation.kind"] == "group_chat"]
    assert len(group) == 1 and group[0].name == f"conversation {manager_name}"
    handoffs = by_event_type(spans, "handoff")
    assert [h.name for h in handoffs][:2] == ["handoff planner -> engineer", "handoff engineer -> reviewer"]
    for handoff in handoffs:
        assert parent_of(handoff, spans) is group[0]
        assert handoff.attributes["cmbagent.handoff.method"] == "round_robin"
        assert handoff.attributes["cmbagent.handoff.to"] == handoff.name.split(" -> ")[1]
    messages = [e for e in group[0].events if e.name == "cmbagent.message"]
    assert messages, "group chat broadcasts are message events on the group conversation"
    orders = all_orders(spans)
    assert orders == list(range(1, len(orders) + 1))


def test_round_robin_group_chat(instrument_with_content, memory_exporter, scripted_llm):
    """GroupChatManager.run_chat -> conversation; select_speaker -> handoff spans from -> to."""
    scripted_llm.push(text("plan"), text("code"), text("review"))
    agents, _, manager = _group(scripted_llm)
    with oc.run(name="group"):
        agents[0].initiate_chat(manager, message="start", max_turns=1, silent=True)
    _check_group(memory_exporter.get_finished_spans())


async def test_async_round_robin_group_chat(instrument_with_content, memory_exporter, scripted_llm):
    """a_run_chat and a_select_speaker are traced like their sync twins."""
    scripted_llm.push(text("plan"), text("code"), text("review"))
    agents, _, manager = _group(scripted_llm)
    async with oc.run(name="group"):
        await agents[0].a_initiate_chat(manager, message="start", max_turns=1, silent=True)
    _check_group(memory_exporter.get_finished_spans())


def test_group_chat_resume(instrument_with_content, memory_exporter, scripted_llm):
    """GroupChatManager.resume opens a resumed conversation span."""
    scripted_llm.push(text("code"), text("review"), text("TERMINATE"))
    agents, _, manager = _group(scripted_llm)
    previous = [{"content": "start", "role": "user", "name": "planner"}, {"content": "plan", "role": "user", "name": "planner"}]
    manager.resume(messages=previous, silent=True)
    resumed = [c for c in by_event_type(memory_exporter.get_finished_spans(), "conversation")
               if c.attributes.get("gen_ai.conversation.resumed")]
    assert resumed and resumed[0].name == "conversation chat_manager"


def test_pattern_group_chat(instrument_with_content, memory_exporter, scripted_llm):
    """A group pattern (initiate_group_chat + RoundRobinPattern) yields conversation and handoff spans."""
    from autogen.agentchat import initiate_group_chat
    from autogen.agentchat.group.patterns import RoundRobinPattern

    scripted_llm.push(text("plan"), text("code"), text("review"))
    agents = [ConversableAgent(n, llm_config=scripted_llm.llm_config()) for n in ("planner", "engineer", "reviewer")]
    pattern = RoundRobinPattern(initial_agent=agents[0], agents=agents, group_manager_args={"llm_config": scripted_llm.llm_config()})
    with oc.run(name="pattern"):
        initiate_group_chat(pattern=pattern, messages="start", max_rounds=3)
    spans = memory_exporter.get_finished_spans()
    assert by_event_type(spans, "conversation")
    handoffs = by_event_type(spans, "handoff")
    assert handoffs and all(" -> " in h.name for h in handoffs)
    assert len({s.attributes["cmbagent.run_id"] for s in spans}) == 1


def test_initiate_chats_nests_conversations(instrument_with_content, memory_exporter, scripted_llm):
    """initiate_chats: one conversation span holding one nested conversation per chat."""
    scripted_llm.push(text("first"), text("second"))
    assistant, user = make_pair(scripted_llm)
    other = ConversableAgent("other", llm_config=scripted_llm.llm_config())
    user.initiate_chats(
        [
            {"recipient": assistant, "message": "one", "max_turns": 1, "silent": True},
            {"recipient": other, "message": "two", "max_turns": 1, "silent": True},
        ]
    )
    spans = memory_exporter.get_finished_spans()
    conversations = by_event_type(spans, "conversation")
    (outer,) = [c for c in conversations if c.attributes["cmbagent.conversation.kind"] == "initiate_chats"]
    inner = [c for c in conversations if c is not outer]
    assert len(inner) == 2 and all(parent_of(c, spans) is outer for c in inner)
    assert outer.attributes["cmbagent.conversation.chats"] == 2


async def test_async_initiate_chats(instrument_with_content, memory_exporter, scripted_llm):
    """a_initiate_chats is traced like initiate_chats."""
    scripted_llm.push(text("first"), text("second"))
    assistant, user = make_pair(scripted_llm)
    await user.a_initiate_chats(
        [{"chat_id": 1, "recipient": assistant, "message": "one", "max_turns": 1, "silent": True}]
    )
    kinds = [c.attributes["cmbagent.conversation.kind"] for c in by_event_type(memory_exporter.get_finished_spans(), "conversation")]
    assert "initiate_chats" in kinds and "initiate_chat" in kinds


def test_human_input(instrument_with_content, memory_exporter, scripted_llm, monkeypatch):
    """get_human_input -> human_input span with prompt and reply."""
    answers = iter(["looks good", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    scripted_llm.push(text("draft 1"), text("draft 2"))
    assistant, user = make_pair(scripted_llm, human_input_mode="ALWAYS")
    user.initiate_chat(assistant, message="write", max_turns=3, silent=True)
    human = by_event_type(memory_exporter.get_finished_spans(), "human_input")
    assert human and human[0].name == "human_input user"
    assert human[0].attributes["ag2.human_input.response"] == "looks good"


async def test_async_human_input(instrument_with_content, memory_exporter, scripted_llm):
    """a_get_human_input -> human_input span (answers from an async input stream, as a UI would give them)."""
    from autogen.io import IOConsole, IOStream

    class AsyncAnswers(IOConsole):
        def __init__(self, answers):
            self.answers = iter(answers)

        async def input(self, prompt: str = "", *, password: bool = False) -> str:
            return next(self.answers)

    scripted_llm.push(text("draft 1"), text("draft 2"))
    assistant, user = make_pair(scripted_llm, human_input_mode="ALWAYS")
    with IOStream.set_default(AsyncAnswers(["fine", "exit"])):
        await user.a_initiate_chat(assistant, message="write", max_turns=3, silent=True)
    human = by_event_type(memory_exporter.get_finished_spans(), "human_input")
    assert human and human[0].attributes["ag2.human_input.response"] == "fine"


async def test_async_chat_with_code_execution(instrument_with_content, memory_exporter, scripted_llm, tmp_path):
    """In an async chat the executor's code run and its files nest under the executor's turn, in the run."""
    scripted_llm.push(code(WRITE_FILES), text("TERMINATE"))
    assistant, user = make_pair(scripted_llm, work_dir=tmp_path / "async-work")
    async with oc.run(name="async-code") as run:
        await user.a_initiate_chat(assistant, message="write files", max_turns=2, silent=True)
    spans = memory_exporter.get_finished_spans()
    (code_span,) = by_event_type(spans, "code_exec")
    assert parent_of(code_span, spans).name == "invoke_agent user"
    assert {f.name for f in by_event_type(spans, "file_gen")} == {"file data.csv", "file plot.png"}
    assert {s.attributes["cmbagent.run_id"] for s in spans} == {run.run_id}
    orders = all_orders(spans)
    assert orders == list(range(1, len(orders) + 1))


async def test_async_group_chat_resume(instrument_with_content, memory_exporter, scripted_llm):
    """GroupChatManager.a_resume opens a resumed conversation span too, and the history it replays is recorded:
    one message per ``a_send`` (the speaker's to the manager, the manager's to each other agent). cmbagent's fork
    calls ``a_send`` there without ``await``: the coroutine's "never awaited" warning must name AG2's own
    ``a_send``, not our wrapper (whose hook never ran, so the fork's replayed messages were missing)."""
    import gc
    import warnings

    scripted_llm.push(text("code"), text("review"), text("TERMINATE"))
    agents, _, manager = _group(scripted_llm)
    previous = [{"content": "start", "role": "user", "name": "planner"}, {"content": "plan", "role": "user", "name": "planner"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await manager.a_resume(messages=previous, silent=True)
        gc.collect()
    spans = memory_exporter.get_finished_spans()
    resumed = [c for c in by_event_type(spans, "conversation") if c.attributes.get("gen_ai.conversation.resumed")]
    assert resumed and resumed[0].name == "conversation chat_manager"
    replayed = [e for e in resumed[0].events if e.name == "cmbagent.message"
                and json.loads(e.attributes["cmbagent.message.content"]) == [{"type": "text", "content": "start"}]]
    assert len(replayed) == len(agents)
    ours = [str(w.message) for w in caught if "never awaited" in str(w.message) and "before_call" in str(w.message)]
    assert ours == []
