"""The pytest plugin (entry point ``otel_cmbagent``), as a user's test suite sees it.

The plugin is exercised through ``pytester`` in a subprocess: a fresh pytest, as a user's suite, that loads
the installed entry point, with real AG2 chats (our conftest.py reuses none of the plugin's fixture names).
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = r'''
import socket

import pytest
from autogen import ConversableAgent, register_function

import otel_cmbagent as oc
from otel_cmbagent.testing import text, tool_call

SEEN = {}


def multiply(a: int, b: int) -> int:
    return a * b


def ordered(exporter):
    return sorted(exporter.get_finished_spans(), key=lambda s: s.attributes["cmbagent.execution_order"])


def test_chat_with_a_tool_is_traced(span_exporter, scripted_llm, otel_tracer_provider):
    assert oc.AG2Instrumentor().is_instrumented_by_opentelemetry
    scripted_llm.push(tool_call("multiply", {"a": 6, "b": 7}), text("42. TERMINATE"))
    assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False,
                            is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""))
    register_function(multiply, caller=assistant, executor=user, description="Multiply two integers.")
    with oc.run(name="plugin-test") as run:
        user.initiate_chat(assistant, message="6 x 7?", max_turns=3, silent=True)
    spans = ordered(span_exporter)
    assert [s.attributes["cmbagent.execution_order"] for s in spans][0] == 1
    assert spans[0].name == "invoke_workflow plugin-test" and spans[0].parent is None
    assert {s.context.trace_id for s in spans} == {run.span.get_span_context().trace_id}
    assert {s.attributes["cmbagent.run_id"] for s in spans} == {run.run_id}
    names = [s.name for s in spans]
    assert "conversation user" in names and "chat scripted-model" in names and "execute_tool multiply" in names
    tool = next(s for s in spans if s.name == "execute_tool multiply")
    assert tool.attributes["gen_ai.tool.call.result"] == "42"  # content is captured
    assert len(scripted_llm.requests) == 2
    SEEN["provider"] = otel_tracer_provider
    SEEN["port"] = scripted_llm.port


def test_fixtures_are_fresh_for_each_test(span_exporter, scripted_llm, otel_tracer_provider):
    assert span_exporter.get_finished_spans() == ()
    assert otel_tracer_provider is not SEEN["provider"]
    assert scripted_llm.requests == []
    if scripted_llm.port != SEEN["port"]:
        with pytest.raises(OSError):  # the previous test's server was stopped
            socket.create_connection(("127.0.0.1", SEEN["port"]), timeout=1).close()
    assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)  # no oc.run: still traced
    spans = ordered(span_exporter)
    assert spans[0].name == "conversation user"
    assert [s.attributes["cmbagent.execution_order"] for s in spans] == [1, 3, 4]  # 2 is the message event


def test_ag2_is_uninstrumented_after_the_test():
    assert not oc.AG2Instrumentor().is_instrumented_by_opentelemetry
    assert oc.AG2Instrumentor().patched_attributes == []

'''

TAKEOVER_TESTS = r'''
import otel_cmbagent as oc
from autogen import ConversableAgent

stray = oc.setup_tracing(sql_url=None, otlp=False, set_global=False, handle_sigterm=False)  # module level, never shut down


def test_spans_reach_the_fixture_exporter(span_exporter, scripted_llm):
    assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    with oc.run(name="takeover"):
        user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
    assert "chat scripted-model" in [s.name for s in span_exporter.get_finished_spans()]


def test_then_ag2_is_uninstrumented():
    assert not oc.AG2Instrumentor().is_instrumented_by_opentelemetry
'''


def _run(pytester, source: str, *args: str):
    pytester.makepyfile(test_user=source)
    pytester.mkdir("chats")  # cmbagent's AG2 fork writes group chats under ./chats
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args, timeout=240)


@pytest.mark.slow
def test_plugin_fixtures_trace_a_real_chat(pytester):
    """The entry point's span_exporter/scripted_llm/otel_tracer_provider: traced, fresh per test, undone after."""
    result = _run(pytester, USER_TESTS)
    result.assert_outcomes(passed=3)


@pytest.mark.slow
def test_plugin_takes_over_a_leftover_instrumentation(pytester):
    """AG2 instrumented at import time by other code: the fixture still gets the spans, and cleans up."""
    result = _run(pytester, TAKEOVER_TESTS)
    result.assert_outcomes(passed=2)


def test_plugin_fixtures_are_listed_and_can_be_disabled(pytester):
    """`pytest --fixtures` shows the plugin's fixtures; `-p no:otel_cmbagent` removes them."""
    pytester.makepyfile(test_empty="def test_nothing():\n    pass\n")
    listed = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider", timeout=120)
    text = listed.stdout.str()
    assert "otel_cmbagent/testing/pytest_plugin.py" in text
    for name in ("span_exporter", "scripted_llm", "otel_tracer_provider"):
        assert f"\n{name}" in text, name
    pytester.makepyfile(test_uses="def test_uses(span_exporter):\n    pass\n")
    disabled = pytester.runpytest_subprocess("-p", "no:otel_cmbagent", "-p", "no:cacheprovider", "test_uses.py",
                                             timeout=120)
    disabled.assert_outcomes(errors=1)
    assert "fixture 'span_exporter' not found" in disabled.stdout.str()
