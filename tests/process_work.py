"""Work the process tests hand to other processes (a module, so spawned children can import it)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import otel_cmbagent as oc
from otel_cmbagent.pipeline import semconv
from otel_cmbagent.pipeline.context import _TracerSource
from otel_cmbagent.instrumentation.processes import flush_process


def tracer():
    """The tracer ``oc.run``/``oc.step`` use: the instrumented provider (tests do not set the global one)."""
    return _TracerSource.tracer()


def dag_step(node: str, llm_config: dict, message: str) -> int:
    """A DAG node as cmbagent runs it in a process pool: a step scope with agents of its own."""
    from autogen import ConversableAgent

    with oc.step(node_id=f"node-{node}", step_id=node):
        agent = ConversableAgent(node, llm_config=llm_config, system_message="Do the task, then say TERMINATE.")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        user.initiate_chat(agent, message=message, max_turns=1, silent=True)
    return os.getpid()


def spans_in_step(node: str, count: int = 3) -> int:
    """A step with ``count`` plain spans (no AG2: quick to import in a fresh process)."""
    with oc.step(node_id=f"node-{node}", step_id=node):
        for index in range(count):
            with tracer().start_as_current_span(f"work {node}.{index}"):
                pass
    return os.getpid()


def die_after_taking_a_number(marker: str) -> None:
    """Write some rows, take one more number, then SIGKILL this process before that row is written."""
    with oc.step(step_id="doomed"):
        with tracer().start_as_current_span("written before the kill"):
            pass
        flush_process()  # the step (running) and the span above are in the table
        lost = tracer().start_span("never written")  # its row waits for the writer's batch: the kill comes first
        Path(marker).write_text(json.dumps({"lost_order": lost.attributes[semconv.EXECUTION_ORDER]}))
        os.kill(os.getpid(), signal.SIGKILL)


def die_holding_the_order_lock() -> None:
    """SIGKILL this process while it holds the run's cross-process order lock."""
    counter = oc.current_identity().sequence.shared
    with counter.holding_lock():
        os.kill(os.getpid(), signal.SIGKILL)


class StepProcess(multiprocessing.get_context("spawn").Process):
    """A (spawned) Process subclass with its own ``run()`` instead of a target."""

    def __init__(self, node: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.node = node

    def run(self) -> None:
        spans_in_step(self.node)


def own_provider(sql_url: str) -> None:
    """A pool initializer that sets up a provider of its own (the sequencer first, then a SQL sink)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from otel_cmbagent.exporters.sql import SQLEventSink

    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SQLEventSink(sql_url))
    trace.set_tracer_provider(provider)


def spans_then_websocket_stats(node: str) -> tuple[dict, dict]:
    """``spans_in_step``; the counters of the websocket sink this (forked) process inherited, before and after."""
    from otel_cmbagent.tracing import _live_tracings

    (sink,) = [t.websocket for t in list(_live_tracings) if t.websocket is not None and not t._shut_down]
    before = dict(sink.stats)
    spans_in_step(node)
    flush_process()
    return before, dict(sink.stats)
