"""A large run for the scale tests (viewer, CLI): real spans through setup_tracing's SQL sink, flushed every
few hundred spans so none is dropped, with nesting, messages, LLM usage and failed tool calls."""

from __future__ import annotations

import json

import otel_cmbagent as oc
from otel_cmbagent.instrumentation.spans import add_ordered_event

AGENTS = ("planner", "engineer", "executor", "reviewer")
ROWS_PER_UNIT = 5  # agent span, message, LLM span, tool span, message
UNITS_PER_STEP = 20


def _unit(tracer, i: int) -> None:
    agent = AGENTS[i % len(AGENTS)]
    with tracer.start_as_current_span(f"invoke_agent {agent}", attributes={
            "cmbagent.event_type": "agent_call", "gen_ai.agent.name": agent}) as span:
        add_ordered_event(span, "cmbagent.message", {
            "cmbagent.message.sender": "chat_manager", "cmbagent.message.recipient": agent,
            "cmbagent.message.content": json.dumps([{"type": "text", "content": f"turn {i}"}])})
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes={
                "cmbagent.event_type": "llm_call", "gen_ai.agent.name": agent, "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.usage.input_tokens": 100 + i % 7, "gen_ai.usage.output_tokens": 10 + i % 3}):
            pass
        try:
            with tracer.start_as_current_span("execute_tool compute", attributes={
                    "cmbagent.event_type": "tool_call", "gen_ai.agent.name": agent, "gen_ai.tool.name": "compute",
                    "gen_ai.tool.call.arguments": json.dumps({"unit": i})}):
                if i % 97 == 0:
                    raise ValueError(f"unit {i} failed")
        except ValueError:
            pass
        add_ordered_event(span, "cmbagent.message", {
            "cmbagent.message.sender": agent, "cmbagent.message.recipient": "chat_manager",
            "cmbagent.message.content": json.dumps([{"type": "text", "content": f"done {i}"}])})


def write_big_run(db_path, run_id: str, units: int) -> int:
    """Write one run of ``units`` units (``units // 20`` steps) into ``db_path``; returns how many rows it has
    (the run row, the steps, ``ROWS_PER_UNIT`` per unit)."""
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{db_path}", otlp=False, set_global=False,
                               handle_sigterm=False)
    tracer = tracing.tracer_provider.get_tracer("big-run")
    try:
        with oc.run(name=f"big run {units}", run_id=run_id):
            for first in range(0, units, UNITS_PER_STEP):
                with oc.step(step_id=f"step-{first // UNITS_PER_STEP}"):
                    for i in range(first, min(units, first + UNITS_PER_STEP)):
                        _unit(tracer, i)
                tracing.force_flush()
    finally:
        tracing.shutdown()
    return 1 + -(-units // UNITS_PER_STEP) + ROWS_PER_UNIT * units
