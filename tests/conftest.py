"""Shared fixtures: an in-memory span exporter behind the sequencing processor, and a scripted LLM."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM

# A recognisable fake key: it must never appear in any span, attribute or event.
FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdefXYZ"


@pytest.fixture
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(span_exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    yield provider
    provider.shutdown()


def _instrument(tracer_provider: TracerProvider, **options: object) -> Iterator[oc.AG2Instrumentor]:
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, **options)
    try:
        yield instrumentor
    finally:
        instrumentor.uninstrument()


@pytest.fixture
def instrument_with_content(tracer_provider: TracerProvider) -> Iterator[oc.AG2Instrumentor]:
    yield from _instrument(tracer_provider, capture_content=True)


@pytest.fixture
def instrument_no_content(tracer_provider: TracerProvider) -> Iterator[oc.AG2Instrumentor]:
    yield from _instrument(tracer_provider, capture_content=False)


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture
def chats_cwd(tmp_path, monkeypatch) -> str:
    """A temp cwd with ``chats/`` (cmbagent's AG2 fork writes group chats there) and ``coding/``."""
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)
    return os.fspath(tmp_path)
