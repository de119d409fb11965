"""Run by tests/test_packaging.py with the python of a fresh virtualenv that holds the built wheel.

It uses the installed package as an application would (``import otel_cmbagent``, ``instrument()``,
a thread pool, a tiny real AG2 chat against the scripted LLM on 127.0.0.1) and prints one JSON
report on stdout for the test to assert on. Standard library, the wheel and what it installs only.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PATCH_POINTS = ((threading.Thread, "start"), (threading.Thread, "run"), (threading.Timer, "run"),
                (ThreadPoolExecutor, "submit"))


class Lines(logging.Handler):
    """Every WARNING-or-worse line any logger emits (what a host's log would show)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def thread_originals() -> list[Any]:
    return [owner.__dict__[name] for owner, name in PATCH_POINTS]


def pool_span_parent(tracer: Any, exporter: Any) -> str | None:
    """The name of the parent of a span started in a ThreadPoolExecutor task submitted under span "parent"."""
    exporter.clear()
    with tracer.start_as_current_span("parent"), ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: tracer.start_span("pooled").end()).result()
    return span_parents(exporter).get("pooled")


def span_parents(exporter: Any) -> dict[str, str | None]:
    spans = exporter.get_finished_spans()
    names = {span.context.span_id: span.name for span in spans}
    return {span.name: names.get(span.parent.span_id) if span.parent else None for span in spans}


def ag2_chat_in_pool(tracer: Any, exporter: Any) -> dict[str, str | None]:
    """A one-turn two-agent chat run in a thread pool under span "parent": every span and its parent's name."""
    from autogen import ConversableAgent

    from otel_cmbagent.testing import ScriptedLLM, text

    exporter.clear()
    with ScriptedLLM([text("hello from the pool")]) as llm:
        assistant = ConversableAgent("assistant", llm_config=llm.llm_config(), human_input_mode="NEVER")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        with tracer.start_as_current_span("parent"), ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(user.initiate_chat, assistant, message="hi", max_turns=1).result()
    return span_parents(exporter)


def zero_code_cooperation() -> dict[str, Any]:
    """Contrib's ThreadingInstrumentor installed: in either order with a zero-code run, one layer of wrappers."""
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    from otel_cmbagent.instrumentation.threads import builtin_thread_context, propagate_thread_context

    contrib = ThreadingInstrumentor()
    undo = propagate_thread_context()  # ours first (instrument() before the zero-code loader reaches threading)
    wrapped = thread_originals()
    contrib.instrument()  # what opentelemetry-instrument does next
    report = {
        "ours_used_contrib": contrib.is_instrumented_by_opentelemetry and not builtin_thread_context.active,
        "then_zero_code_added_no_layer": all(now is before for now, before in zip(thread_originals(), wrapped)),
    }
    if undo is not None:
        undo()
    contrib.instrument()  # zero-code first, then ours
    report["zero_code_first_then_ours_noop"] = (
        propagate_thread_context() is None and not builtin_thread_context.active
    )
    contrib.uninstrument()
    return report


def main() -> None:
    lines = Lines()
    logging.getLogger().addHandler(lines)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import otel_cmbagent as oc
    from otel_cmbagent.instrumentation.threads import propagate_thread_context

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("probe")
    originals = thread_originals()
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "versions": {name: installed(name) for name in ("wrapt", "opentelemetry-api", "opentelemetry-sdk",
                                                        "opentelemetry-instrumentation", "ag2", "autogen",
                                                        "cmbagent-autogen")},
        "contrib_base": importable("opentelemetry.instrumentation.instrumentor"),
        "contrib_threading": importable("opentelemetry.instrumentation.threading"),
    }
    instrumentor = oc.instrument(tracer_provider=provider)  # must never raise into the host
    report["instrument_log"] = list(lines.lines)
    report["instrumented"] = instrumentor.is_instrumented_by_opentelemetry
    report["patched"] = sorted(f"{owner.__name__}.{name}" for owner, name, _ in instrumentor.patched_attributes)
    if report["instrumented"] and not report["patched"]:  # AG2 1.x: no patches, thread propagation on
        report["pool_parent"] = pool_span_parent(tracer, exporter)
        oc.uninstrument()
    elif report["instrumented"]:
        patched = instrumentor.patched_attributes
        report["patched"] = sorted(f"{owner.__name__}.{name}" for owner, name, _ in patched)
        report["pool_parent"] = pool_span_parent(tracer, exporter)
        report["ag2_spans"] = ag2_chat_in_pool(tracer, exporter)
        oc.uninstrument()
        report["ag2_restored"] = all(owner.__dict__[name] is original for owner, name, original in patched)
    else:  # no AG2 to patch: thread propagation on its own, as instrument() turns it on
        undo = propagate_thread_context()
        report["pool_parent"] = pool_span_parent(tracer, exporter)
        if undo is not None:
            undo()
    report["threads_restored"] = all(now is before for now, before in zip(thread_originals(), originals))
    if report["contrib_threading"]:
        report["zero_code"] = zero_code_cooperation()
    report["log"] = list(lines.lines)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
