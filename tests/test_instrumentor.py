"""AG2Instrumentor: idempotent, exactly undoable, class-level, guarded."""

from __future__ import annotations

import inspect
import logging
import sys
from importlib.metadata import entry_points

import pytest
from autogen import ConversableAgent
from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

import otel_cmbagent as oc
from otel_cmbagent.testing import text
from spans_util import by_event_type

def class_dicts() -> dict[tuple[str, str, str], object]:
    """Every attribute of every class in every loaded autogen module."""
    out: dict[tuple[str, str, str], object] = {}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("autogen") or module is None:
            continue
        for cls in list(vars(module).values()):
            if inspect.isclass(cls) and cls.__module__ == module_name:
                for name, value in list(vars(cls).items()):
                    out[(module_name, cls.__qualname__, name)] = value
    return out


def chat(llm, **kwargs):
    llm.push(text("hello"), text("TERMINATE"))
    assistant = ConversableAgent("assistant", llm_config=llm.llm_config())
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    return user.initiate_chat(assistant, message="hi", max_turns=1, silent=True, **kwargs)


def test_uninstrument_restores_every_attribute_exactly(tracer_provider, memory_exporter, scripted_llm):
    """After uninstrument(), every class __dict__ entry is the very object it was, and no span is made."""
    before = class_dicts()
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        patched = instrumentor.patched_attributes
        assert len(patched) >= 20
        for owner, name, original in patched:
            assert vars(owner)[name] is not original  # really patched
            assert before[(owner.__module__, owner.__qualname__, name)] is original
        chat(scripted_llm)
        assert memory_exporter.get_finished_spans()
    finally:
        instrumentor.uninstrument()
    after = class_dicts()
    for key, value in before.items():
        assert after[key] is value, key
    # nothing was left behind on a patched class (a wrapper stored on a subclass, say)
    for owner, name, _ in patched:
        leftovers = {k for k in after if k[:2] == (owner.__module__, owner.__qualname__)} - set(before)
        assert not {k for k in leftovers if not k[2].startswith("__")}, leftovers
    memory_exporter.clear()
    chat(scripted_llm)
    assert memory_exporter.get_finished_spans() == ()


def test_instrument_is_idempotent(tracer_provider, memory_exporter, scripted_llm):
    """A second instrument() changes nothing and does not double the spans."""
    first = oc.instrument(tracer_provider=tracer_provider)
    try:
        patched = [(o, n) for o, n, _ in first.patched_attributes]
        dicts = class_dicts()
        second = oc.instrument(tracer_provider=tracer_provider)
        assert second is first
        assert [(o, n) for o, n, _ in second.patched_attributes] == patched
        assert class_dicts() == dicts
        chat(scripted_llm)
        spans = memory_exporter.get_finished_spans()
        assert len(by_event_type(spans, "conversation")) == 1
        assert len(by_event_type(spans, "llm_call")) == 1
    finally:
        oc.uninstrument()
    oc.uninstrument()  # a second uninstrument is harmless too


def test_agents_created_before_instrument_are_traced(tracer_provider, memory_exporter, scripted_llm):
    """Class-level patching: agents that existed before instrument() are traced."""
    scripted_llm.push(text("hello"), text("TERMINATE"))
    assistant = ConversableAgent("early", llm_config=scripted_llm.llm_config())
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
    finally:
        instrumentor.uninstrument()
    names = {s.name for s in memory_exporter.get_finished_spans()}
    assert {"conversation user", "invoke_agent early", "chat scripted-model"} <= names


def test_suppress_instrumentation_key_is_honoured(instrument_with_content, memory_exporter, scripted_llm):
    """Under OTel's suppress-instrumentation key no span is started."""
    token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        chat(scripted_llm)
    finally:
        otel_context.detach(token)
    assert memory_exporter.get_finished_spans() == ()


def test_internal_error_is_logged_once_and_swallowed(tracer_provider, memory_exporter, scripted_llm, monkeypatch, caplog):
    """A bug in our start hook never breaks the chat; it is logged once per kind; other spans still flow."""
    from otel_cmbagent.instrumentation.agent_patch import AgentWrappers

    def broken_start_hook(self, agent, args, kwargs):
        raise KeyError("bug in otel-cmbagent")

    monkeypatch.setattr(AgentWrappers, "start_generate_reply", broken_start_hook)
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"):
            for _ in range(3):
                assert chat(scripted_llm).chat_history
    finally:
        instrumentor.uninstrument()
    warnings = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(warnings) == 1 and "broken_start_hook" in warnings[0].getMessage()
    spans = memory_exporter.get_finished_spans()
    assert by_event_type(spans, "agent_call") == []
    assert len(by_event_type(spans, "conversation")) == 3


def test_entry_point_registered():
    """`opentelemetry-instrument` finds the instrumentor through the opentelemetry_instrumentor entry point."""
    found = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "ag2"]
    assert found and found[0].load() is oc.AG2Instrumentor


def test_instrumentation_dependencies_match_installed_line():
    """The dependency check names the AG2 distribution actually installed (ag2 or cmbagent-autogen)."""
    from importlib.metadata import PackageNotFoundError, version

    (requirement,) = oc.AG2Instrumentor().instrumentation_dependencies()
    name = requirement.split()[0]
    try:
        version(name)
    except PackageNotFoundError:  # pragma: no cover - the assertion below reports it
        pytest.fail(f"{requirement} is not installed")


def test_bad_options_raise_clearly(tracer_provider):
    """Bad instrument() options are a clear error at setup, not a crash later."""
    instrumentor = oc.AG2Instrumentor()
    with pytest.raises(ValueError, match="max_value_length"):
        instrumentor.instrument(tracer_provider=tracer_provider, max_value_length=-5)
    assert not instrumentor.is_instrumented_by_opentelemetry or instrumentor.uninstrument() is None
