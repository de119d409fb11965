"""run()/step() scopes: names, ids, propagation into tasks and threads, isolation of concurrent runs, errors."""

from __future__ import annotations

import asyncio
import inspect
import threading
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import otel_cmbagent as oc
import otel_cmbagent.pipeline.context as oc_context
from spans_util import everything_recorded

FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdefXYZ"

ORDER = "cmbagent.execution_order"
RUN_ID = "cmbagent.run_id"
SESSION_ID = "cmbagent.session_id"
EVENT_TYPE = "cmbagent.event_type"


def _by_name(memory_exporter):
    return {s.name: s for s in memory_exporter.get_finished_spans()}


def _current_run_id():
    identity = oc.current_identity()
    return identity.run_id if identity is not None else None


# --- names, event types, ids ---------------------------------------------------------------------


def test_run_span_name_and_event_type(tracer, memory_exporter):
    """run(name=...) opens `invoke_workflow {name}` (plain `invoke_workflow` unnamed), event_type run."""
    with oc.run(name="analysis"):
        pass
    with oc.run():
        pass
    spans = _by_name(memory_exporter)
    assert set(spans) == {"invoke_workflow analysis", "invoke_workflow"}
    named = spans["invoke_workflow analysis"].attributes
    assert named[EVENT_TYPE] == "run"
    assert named["gen_ai.operation.name"] == "invoke_workflow"
    assert named["gen_ai.workflow.name"] == "analysis"
    assert spans["invoke_workflow"].attributes[EVENT_TYPE] == "run"


def test_step_span_name_prefers_step_id_over_name(tracer, memory_exporter):
    """step() is named `step {step_id}`, else `step {name}`, else `step`; event_type step."""
    with oc.run():
        with oc.step(step_id="s2", name="plan"):
            pass
        with oc.step(name="review"):
            pass
        with oc.step(node_id="n9"):
            pass
    spans = _by_name(memory_exporter)
    assert {"step s2", "step review", "step"} <= set(spans)
    for name in ("step s2", "step review", "step"):
        assert spans[name].attributes[EVENT_TYPE] == "step"
    assert spans["step s2"].attributes["cmbagent.step.name"] == "plan"
    assert spans["step"].attributes["cmbagent.node_id"] == "n9"


def test_generated_ids_are_uuid_strings(tracer, memory_exporter):
    """Without ids, run_id and session_id are fresh canonical UUID strings, different per run."""
    with oc.run() as first:
        pass
    with oc.run() as second:
        pass
    for value in (first.run_id, first.session_id, second.run_id, second.session_id):
        assert isinstance(value, str)
        assert str(uuid.UUID(value)) == value
    assert first.run_id != second.run_id
    assert first.session_id != second.session_id
    recorded = {s.attributes[RUN_ID]: s.attributes[SESSION_ID] for s in memory_exporter.get_finished_spans()}
    assert recorded == {first.run_id: first.session_id, second.run_id: second.session_id}


def test_given_ids_are_used(tracer, memory_exporter):
    """Explicit run_id/session_id are used as given (non-strings as their str())."""
    given = uuid.UUID("12345678-1234-5678-1234-567812345678")
    with oc.run(run_id="run-42", session_id="sess-7") as named:
        with tracer.start_as_current_span("child"):
            pass
    with oc.run(run_id=given, session_id=7) as converted:
        pass
    assert (named.run_id, named.session_id) == ("run-42", "sess-7")
    assert (converted.run_id, converted.session_id) == (str(given), "7")
    spans = memory_exporter.get_finished_spans()
    assert {(s.name, s.attributes[RUN_ID], s.attributes[SESSION_ID]) for s in spans} == {
        ("invoke_workflow", "run-42", "sess-7"),
        ("child", "run-42", "sess-7"),
        ("invoke_workflow", str(given), "7"),
    }


def test_nested_run_inherits_session_but_not_run_id(tracer, memory_exporter):
    """A run opened inside another run keeps the outer session_id, gets its own run_id and sequence."""
    with oc.run(name="outer", session_id="sess-outer") as outer:
        with oc.run(name="inner") as inner:
            with tracer.start_as_current_span("inner child"):
                assert _current_run_id() == inner.run_id
        with oc.run(name="explicit", session_id="sess-other") as explicit:
            pass
        assert _current_run_id() == outer.run_id
    assert inner.session_id == "sess-outer"
    assert inner.run_id != outer.run_id
    assert explicit.session_id == "sess-other"
    spans = _by_name(memory_exporter)
    assert spans["inner child"].attributes[RUN_ID] == inner.run_id
    assert spans["inner child"].attributes[SESSION_ID] == "sess-outer"
    assert spans["invoke_workflow inner"].attributes[ORDER] == 1
    assert spans["inner child"].attributes[ORDER] == 2


# --- async ---------------------------------------------------------------------------------------


async def test_async_run_is_inherited_by_gathered_tasks(tracer, memory_exporter):
    """`async with oc.run()` works; coroutines gathered inside it carry its run_id and parent span."""

    async def work(index: int) -> str | None:
        await asyncio.sleep(0)
        with tracer.start_as_current_span(f"task {index}"):
            await asyncio.sleep(0)
            return _current_run_id()

    async with oc.run(name="async") as run:
        seen = await asyncio.gather(*(work(i) for i in range(5)))
        created = await asyncio.create_task(work(5))
    assert oc.current_identity() is None
    assert seen == [run.run_id] * 5
    assert created == run.run_id

    spans = _by_name(memory_exporter)
    run_span = spans["invoke_workflow async"]
    for index in range(6):
        child = spans[f"task {index}"]
        assert child.attributes[RUN_ID] == run.run_id
        assert child.parent is not None and child.parent.span_id == run_span.context.span_id
    assert sorted(s.attributes[ORDER] for s in spans.values()) == list(range(1, 8))


# --- threads -------------------------------------------------------------------------------------


def test_thread_pool_inside_a_run_inherits_it(instrument_with_content, tracer_provider, memory_exporter):
    """With instrumentation on, ThreadPoolExecutor work submitted inside a run joins that run."""
    tracer = tracer_provider.get_tracer("test")

    def work(index: int) -> str | None:
        with tracer.start_as_current_span(f"pooled {index}"):
            return _current_run_id()

    with oc.run(name="pool") as run:
        with ThreadPoolExecutor(max_workers=4) as pool:
            seen = list(pool.map(work, range(8)))
    assert seen == [run.run_id] * 8
    spans = _by_name(memory_exporter)
    run_span = spans["invoke_workflow pool"]
    for index in range(8):
        child = spans[f"pooled {index}"]
        assert child.attributes[RUN_ID] == run.run_id
        assert child.parent is not None and child.parent.span_id == run_span.context.span_id
    assert sorted(s.attributes[ORDER] for s in spans.values()) == list(range(1, 10))


def test_propagate_context_carries_the_run_into_a_raw_thread(tracer, memory_exporter):
    """A threading.Thread target wrapped by propagate_context joins the run; an unwrapped one does not."""
    seen: dict[str, str | None] = {}

    def work(label: str) -> None:
        seen[label] = _current_run_id()
        with tracer.start_as_current_span(label):
            pass

    with oc.run(name="threads") as run:
        threads = [
            threading.Thread(target=oc.propagate_context(work), args=("wrapped",)),
            threading.Thread(target=work, args=("bare",)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert seen == {"wrapped": run.run_id, "bare": None}
    spans = _by_name(memory_exporter)
    run_span = spans["invoke_workflow threads"]
    assert spans["wrapped"].attributes[RUN_ID] == run.run_id
    assert spans["wrapped"].parent.span_id == run_span.context.span_id
    assert RUN_ID not in spans["bare"].attributes
    assert spans["bare"].parent is None


async def test_propagate_context_wraps_an_async_function(tracer, memory_exporter):
    """An async function wrapped inside run A runs in A's context even when awaited inside run B."""

    async def work() -> str | None:
        await asyncio.sleep(0)
        with tracer.start_as_current_span("async work"):
            return _current_run_id()

    with oc.run(name="first") as first:
        wrapped = oc.propagate_context(work)
    assert inspect.iscoroutinefunction(wrapped)
    with oc.run(name="second") as second:
        result = await wrapped()
        assert _current_run_id() == second.run_id  # the caller's context is restored afterwards
    assert result == first.run_id
    spans = _by_name(memory_exporter)
    assert spans["async work"].attributes[RUN_ID] == first.run_id
    assert spans["async work"].parent.span_id == spans["invoke_workflow first"].context.span_id
    assert spans["async work"].attributes[ORDER] == 2


# --- concurrent runs -----------------------------------------------------------------------------


async def test_fifty_concurrent_runs_stay_separate(instrument_with_content, tracer_provider, memory_exporter):
    """25 runs in pool threads + 25 in asyncio tasks, all at once: own trace, own run_id, orders 1..21 each."""
    tracer = tracer_provider.get_tracer("test")
    spans_per_run = 20
    barrier = threading.Barrier(25)

    def thread_run(index: int) -> str:
        barrier.wait(timeout=60)
        with oc.run(name=f"thread-{index}") as run:
            for j in range(spans_per_run):
                with tracer.start_as_current_span(f"thread-{index}.{j}"):
                    pass
        return run.run_id

    async def task_run(index: int) -> str:
        async with oc.run(name=f"task-{index}") as run:
            for j in range(spans_per_run):
                with tracer.start_as_current_span(f"task-{index}.{j}"):
                    await asyncio.sleep(0)
        return run.run_id

    with ThreadPoolExecutor(max_workers=25) as pool:  # submitted outside any run
        futures = [pool.submit(thread_run, i) for i in range(25)]
        task_ids = await asyncio.gather(*(task_run(i) for i in range(25)))
        thread_ids = [f.result(timeout=120) for f in futures]

    run_ids = list(task_ids) + thread_ids
    assert len(set(run_ids)) == 50
    spans = memory_exporter.get_finished_spans()
    assert len(spans) == 50 * (spans_per_run + 1)

    by_run: dict[str, list] = defaultdict(list)
    for span in spans:
        by_run[span.attributes[RUN_ID]].append(span)
    assert set(by_run) == set(run_ids)
    trace_owner: dict[int, str] = {}
    for run_id, run_spans in by_run.items():
        assert sorted(s.attributes[ORDER] for s in run_spans) == list(range(1, spans_per_run + 2))
        prefixes = {s.name.split(".")[0] for s in run_spans if not s.name.startswith("invoke_workflow")}
        assert len(prefixes) == 1, f"run {run_id} collected spans of several workers: {prefixes}"
        for span in run_spans:
            assert trace_owner.setdefault(span.context.trace_id, run_id) == run_id
    assert len(trace_owner) == 50


# --- errors --------------------------------------------------------------------------------------


class BoomError(Exception):
    """A user exception defined outside builtins (its error.type carries the module)."""


def test_user_exception_passes_through_and_marks_the_run(tracer, memory_exporter):
    """The same exception object escapes `with oc.run()`; the run span gets ERROR, error.type, an exception event."""
    err = ValueError(f"provider rejected key {FAKE_KEY}")
    with pytest.raises(ValueError) as excinfo:
        with oc.run(name="failing"):
            raise err
    assert excinfo.value is err
    assert oc.current_identity() is None

    (span,) = memory_exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "ValueError"
    assert "provider rejected key" in event.attributes["exception.message"]
    assert "ValueError" in event.attributes["exception.stacktrace"]
    assert FAKE_KEY not in everything_recorded([span])
    assert FAKE_KEY not in (span.status.description or "")


async def test_user_exception_passes_through_async_run_and_step(tracer, memory_exporter):
    """In `async with` run and step, the same exception escapes and both spans are marked with its qualified type."""
    err = BoomError(f"Authorization: Bearer {FAKE_KEY}")
    with pytest.raises(BoomError) as excinfo:
        async with oc.run(name="failing"):
            async with oc.step(step_id="s1"):
                raise err
    assert excinfo.value is err
    spans = _by_name(memory_exporter)
    expected_type = f"{BoomError.__module__}.{BoomError.__qualname__}"
    for name in ("invoke_workflow failing", "step s1"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert spans[name].attributes["error.type"] == expected_type
        assert [e.name for e in spans[name].events] == ["exception"]
    assert FAKE_KEY not in everything_recorded(list(spans.values()))


# --- regression: tracer cache keyed by id(provider) ---------------------------------------------


def test_run_follows_a_new_provider_at_a_reused_address(monkeypatch):
    """Each of many short-lived providers receives its own run span (CPython reuses freed addresses)."""
    monkeypatch.setattr(oc_context._TracerSource, "_cached", None)
    monkeypatch.setattr(oc_context._TracerSource, "provider", None)  # restored after the test
    source = oc_context._TracerSource  # assigned directly below: monkeypatch would keep every provider alive
    lost = 0
    for _ in range(50):  # create, use, shut down, drop
        provider = TracerProvider(shutdown_on_exit=False)  # no atexit self-cycle: freed as soon as dropped
        exporter = InMemorySpanExporter()
        provider.add_span_processor(oc.SequencingSpanProcessor())
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        source.provider = provider
        with oc.run():
            pass
        lost += len(exporter.get_finished_spans()) != 1
        source.provider = None
        provider.shutdown()
        del provider, exporter
    assert lost == 0, f"{lost} of 50 providers never received their run span (it went to a shut-down one)"


# --- issue 10 item 7: values whose __str__ raises never reach the host ------------------------------


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __format__ = object.__format__  # f"{value}" calls __str__ too


def test_values_whose_str_raises_become_a_marked_placeholder(tracer, memory_exporter, caplog):
    """run()/step() ids, names and attributes whose __str__ raises: the block runs, the span is recorded
    with a marked placeholder, and the failure is logged once (not raised into the host)."""
    entered = []
    for _ in range(2):
        with oc.run(run_id=_Unprintable(), session_id=_Unprintable(), name=_Unprintable(), note=_Unprintable()):
            with oc.step(node_id=_Unprintable(), step_id=_Unprintable(), name=_Unprintable(), extra=[_Unprintable()]):
                entered.append(True)
    assert entered == [True, True]
    spans = memory_exporter.get_finished_spans()
    assert len(spans) == 4
    run_span = next(s for s in spans if s.attributes[EVENT_TYPE] == "run")
    assert run_span.attributes[RUN_ID].startswith("<unprintable _Unprintable")
    assert run_span.name.startswith("invoke_workflow <unprintable _Unprintable")
    assert "_Unprintable" in run_span.attributes["note"]  # kept as text (repr), not dropped
    step_span = next(s for s in spans if s.attributes[EVENT_TYPE] == "step")
    assert step_span.attributes["cmbagent.step_id"].startswith("<unprintable")
    logged = [r for r in caplog.records if "_Unprintable" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]


def test_ids_and_attributes_are_storable_and_scrubbed(tracer, memory_exporter):
    """NUL and lone surrogates in ids, names and attributes are replaced; a secret in an attribute is scrubbed."""
    with oc.run(run_id="run\x00id\udcff", name="n\x00", note=f"key {FAKE_KEY}", tags=["a\udcff", "b"]):
        pass
    (span,) = memory_exporter.get_finished_spans()
    assert span.attributes[RUN_ID] == "run\ufffdid\ufffd" and span.name == "invoke_workflow n\ufffd"
    assert span.attributes["tags"] == ("a\ufffd", "b")
    assert FAKE_KEY not in everything_recorded([span])
