"""The built-in stand-ins for the optional contrib packages (base instrumentor, thread context propagation).

Both dev virtualenvs run this: the ag2 line has ``opentelemetry-instrumentation`` (extra [contrib]),
the fork line has neither contrib package, so ``AG2Instrumentor`` stands on each base in turn.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import wrapt
from opentelemetry import context as otel_context
from opentelemetry import trace

import otel_cmbagent as oc
from otel_cmbagent.instrumentation import contrib
from otel_cmbagent.instrumentation.threads import BuiltinThreadContext, builtin_thread_context

PATCH_POINTS = (
    (threading.Thread, "start"),
    (threading.Thread, "run"),
    (threading.Timer, "run"),
    (ThreadPoolExecutor, "submit"),
)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _originals() -> list[Any]:
    return [owner.__dict__[name] for owner, name in PATCH_POINTS]


@pytest.fixture
def builtin_threads() -> Iterator[BuiltinThreadContext]:
    originals = _originals()
    assert builtin_thread_context.instrument()
    try:
        yield builtin_thread_context
    finally:
        builtin_thread_context.uninstrument()
    assert _originals() == originals


def _parents_seen_in_threads(tracer: trace.Tracer, memory_exporter: Any) -> dict[str, Any]:
    """Start a span in a Thread, a Timer, a ThreadPoolExecutor task and run_in_executor, inside a parent span."""

    def work(label: str) -> None:
        with tracer.start_as_current_span(label):
            pass

    with tracer.start_as_current_span("parent"):
        thread = threading.Thread(target=work, args=("thread",))
        timer = threading.Timer(0.0, work, args=("timer",))
        thread.start()
        timer.start()
        with ThreadPoolExecutor(max_workers=2) as pool:
            pool.submit(work, "pool").result()

            async def in_executor() -> None:
                await asyncio.get_running_loop().run_in_executor(pool, work, "run_in_executor")

            asyncio.run(in_executor())
        thread.join()
        timer.join()
    spans = {span.name: span for span in memory_exporter.get_finished_spans()}
    parent_id = spans["parent"].context.span_id
    return {label: spans[label].parent is not None and spans[label].parent.span_id == parent_id
            for label in ("thread", "timer", "pool", "run_in_executor")}


def test_builtin_thread_context_nests_thread_work_under_the_caller(builtin_threads, tracer_provider, memory_exporter):
    """Thread, Timer, ThreadPoolExecutor and run_in_executor work inherits the context it was started in."""
    tracer = tracer_provider.get_tracer("test")
    assert _parents_seen_in_threads(tracer, memory_exporter) == dict.fromkeys(
        ("thread", "timer", "pool", "run_in_executor"), True
    )


def test_without_propagation_thread_work_starts_new_traces(tracer_provider, memory_exporter):
    """The control: unpatched, none of them sees the parent (so the test above measures the patch)."""
    if builtin_thread_context.active or any(hasattr(value, "__wrapped__") for value in _originals()):
        pytest.fail("thread propagation is on outside an instrument() call")
    tracer = tracer_provider.get_tracer("test")
    assert _parents_seen_in_threads(tracer, memory_exporter) == dict.fromkeys(
        ("thread", "timer", "pool", "run_in_executor"), False
    )


def test_builtin_thread_context_never_wraps_twice_and_restores_exact_originals():
    originals = _originals()
    assert builtin_thread_context.instrument()
    try:
        assert not builtin_thread_context.instrument()  # already on: no second layer
        for (owner, name), original in zip(PATCH_POINTS, originals):
            patched = owner.__dict__[name]
            assert isinstance(patched, wrapt.FunctionWrapper) and patched.__wrapped__ is original
    finally:
        builtin_thread_context.uninstrument()
    assert all(now is before for now, before in zip(_originals(), originals))
    assert not builtin_thread_context.active


def test_instrument_turns_thread_propagation_on_and_uninstrument_off(tracer_provider):
    """AG2Instrumentor uses the contrib threading instrumentor when installed, else the built-in one."""
    originals = _originals()
    contrib_threading = _importable("opentelemetry.instrumentation.threading")
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        assert builtin_thread_context.active is not contrib_threading
        assert all(hasattr(value, "__wrapped__") for value in _originals())
    finally:
        instrumentor.uninstrument()
    assert all(now is before for now, before in zip(_originals(), originals))


def test_ag2_instrumentor_stands_on_contrib_base_when_installed():
    """With opentelemetry-instrumentation installed the contrib BaseInstrumentor is the base, else the built-in."""
    if _importable("opentelemetry.instrumentation.instrumentor"):
        from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

        assert contrib.CONTRIB_BASE and issubclass(oc.AG2Instrumentor, BaseInstrumentor)
    else:
        assert not contrib.CONTRIB_BASE and issubclass(oc.AG2Instrumentor, contrib.BuiltinBaseInstrumentor)
    assert oc.AG2Instrumentor() is oc.AG2Instrumentor()


# --- the built-in base instrumentor ----------------------------------------------------------------


def _instrumentor_class(requirement: str) -> type[contrib.BuiltinBaseInstrumentor]:
    class Probe(contrib.BuiltinBaseInstrumentor):
        calls: list[tuple[str, dict]] = []

        def instrumentation_dependencies(self) -> Collection[str]:
            return (requirement,)

        def _instrument(self, **kwargs: Any) -> None:
            self.calls.append(("instrument", kwargs))

        def _uninstrument(self, **kwargs: Any) -> None:
            self.calls.append(("uninstrument", kwargs))

    return Probe


def test_builtin_base_is_a_singleton_that_instruments_once(caplog):
    probe_class = _instrumentor_class("pytest >= 1")
    probe = probe_class()
    assert probe_class() is probe and not probe.is_instrumented_by_opentelemetry
    with caplog.at_level(logging.WARNING, logger=contrib.__name__):
        probe.instrument(option=1, skip_dep_check=False, raise_exception_on_conflict=False)
        probe.instrument(option=2)
        assert probe.is_instrumented_by_opentelemetry
        probe.uninstrument()
        probe.uninstrument()
    assert probe.calls == [("instrument", {"option": 1}), ("uninstrument", {})]
    assert [r.getMessage() for r in caplog.records] == [
        "Attempting to instrument while already instrumented",
        "Attempting to uninstrument while already uninstrumented",
    ]


@pytest.mark.parametrize(
    ("requirement", "found"),
    [("pytest < 1", '"pytest '), ("otel-cmbagent-no-such-distribution >= 1", "found none")],
)
def test_builtin_base_refuses_unsatisfied_dependencies(caplog, requirement, found):
    """A missing or out-of-range instrumented library: one error line naming it, no patching."""
    probe_class = _instrumentor_class(requirement)
    with caplog.at_level(logging.ERROR, logger=contrib.__name__):
        assert probe_class().instrument() is None
    assert probe_class.calls == [] and not probe_class().is_instrumented_by_opentelemetry
    (record,) = caplog.records
    assert "DependencyConflict" in record.getMessage() and requirement in record.getMessage()
    assert found in record.getMessage()
    probe_class().instrument(skip_dep_check=True)
    assert probe_class.calls == [("instrument", {})]


@pytest.mark.parametrize("key", [contrib.SUPPRESS_INSTRUMENTATION_KEY, "suppress_instrumentation"])
def test_suppression_keys_turn_instrumentation_off(key):
    """The API's key and contrib's plain-string key both suppress, as contrib's own check does."""
    assert contrib.is_instrumentation_enabled()
    token = otel_context.attach(otel_context.set_value(key, True))
    try:
        assert not contrib.is_instrumentation_enabled()
    finally:
        otel_context.detach(token)
