"""pytest plugin: trace real AG2 agents in your tests, offline, and assert on the spans.

Installed with the package (``pytest11`` entry point ``otel_cmbagent``), so the fixtures are available
in every test with no ``conftest.py`` change (``-p no:otel_cmbagent`` turns the plugin off):

``otel_tracer_provider``
    A fresh SDK ``TracerProvider`` with :class:`otel_cmbagent.SequencingSpanProcessor` first (every span
    gets ``cmbagent.execution_order``/``depth``/run identity). Shut down after the test. Add your own
    processors to it (a SQL sink, a websocket callback processor, ...).

``span_exporter``
    An ``InMemorySpanExporter`` behind ``otel_tracer_provider`` (``SimpleSpanProcessor``: a span is in
    ``span_exporter.get_finished_spans()`` as soon as it ends), with AG2 instrumented on that provider
    for the duration of the test (``AG2Instrumentor().instrument(tracer_provider=..., capture_content=True)``),
    so ``oc.run()``/``oc.step()`` and every AG2 agent, LLM call, tool, code run and handoff land in it.
    After the test AG2 is uninstrumented (every patch restored) and the exporter cleared. If AG2 was
    already instrumented when the test started (say by a ``setup_tracing()`` that was never shut down),
    that instrumentation is removed first, so spans always reach this exporter.

``scripted_llm``
    A started :class:`otel_cmbagent.testing.ScriptedLLM`: an OpenAI-compatible server on 127.0.0.1 that
    answers from a script (``scripted_llm.push(text(...), tool_call(...), code(...), error(...))``; when the
    script is exhausted it answers ``"TERMINATE"``). ``scripted_llm.llm_config()`` is an AG2 ``llm_config``
    pointing at it (no cache, fake key); ``scripted_llm.requests`` holds the requests it got. Stopped after
    the test.

Example::

    from autogen import ConversableAgent
    import otel_cmbagent as oc
    from otel_cmbagent.testing import text

    def test_reply_is_traced(span_exporter, scripted_llm):
        scripted_llm.push(text("hello"))
        assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        with oc.run(name="t"):
            user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
        spans = sorted(span_exporter.get_finished_spans(), key=lambda s: s.attributes["cmbagent.execution_order"])
        assert spans[0].name == "invoke_workflow t"
        assert "chat scripted-model" in [s.name for s in spans]

Inside a project whose own ``conftest.py`` defines fixtures with these names, the conftest ones win.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily: loading the plugin must stay cheap for every pytest run
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_cmbagent.testing.scripted_llm import ScriptedLLM

__all__ = ["otel_tracer_provider", "scripted_llm", "span_exporter"]


@pytest.fixture
def otel_tracer_provider() -> Iterator[TracerProvider]:
    """A fresh TracerProvider with ``SequencingSpanProcessor`` first; shut down after the test."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_cmbagent.pipeline.processor import SequencingSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SequencingSpanProcessor())
    yield provider
    provider.shutdown()


@pytest.fixture
def span_exporter(otel_tracer_provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """Every span of the test (AG2 instrumented on ``otel_tracer_provider``, content captured); reset after."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_cmbagent.instrumentation.instrumentor import AG2Instrumentor

    exporter = InMemorySpanExporter()
    otel_tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AG2Instrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:  # left on by earlier code: take it over for this test
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=otel_tracer_provider, capture_content=True)
    try:
        yield exporter
    finally:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        exporter.clear()


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    """A started ScriptedLLM on 127.0.0.1 (``.push(...)`` replies, ``.llm_config()``); stopped after the test."""
    from otel_cmbagent.testing.scripted_llm import ScriptedLLM

    llm = ScriptedLLM().start()
    try:
        yield llm
    finally:
        llm.stop()
