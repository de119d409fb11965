"""A scripted AG2 run used by the sink tests, and helpers to read the event table."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from autogen import ConversableAgent, register_function

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, text, tool_call

from conftest import FAKE_KEY


def scripted_run(
    llm,
    *,
    name="sinks",
    gate: threading.Event | None = None,
    reached: threading.Event | None = None,
    run_id: str | None = None,
    session_id: str | None = None,
):
    """A traced two-agent chat with a tool call; with ``gate`` the tool waits for it (the run stays live)."""
    llm.push(tool_call("add", {"a": 20, "b": 22, "token": FAKE_KEY}), text(f"42 {FAKE_KEY}"), text("TERMINATE"))

    def add(a: int, b: int, token: str = "") -> int:
        if reached is not None:
            reached.set()
        if gate is not None:
            gate.wait(30)
        return a + b

    assistant = ConversableAgent("assistant", llm_config=llm.llm_config(api_key=FAKE_KEY))
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    register_function(add, caller=assistant, executor=user, description="Add.")
    with oc.run(name=name, run_id=run_id, session_id=session_id) as run:
        user.initiate_chat(assistant, message=f"add 20 and 22, key {FAKE_KEY}", max_turns=3, silent=True)
    return run


# What the LLM sends: JSON escapes that decode to NUL and a lone surrogate.
POISON_ARGUMENTS = '{"value": "bad\\u0000value\\udcff"}'


def lookup_tool(tracer=None):
    """A tool that fails with its argument in the message. With ``tracer`` it works as code instrumented with
    OpenTelemetry does (an HTTP client, a database driver): in a span of its own, named and attributed with
    the raw value, which records the exception as the span's status."""

    def lookup(value: str) -> str:
        if tracer is None:
            raise ValueError(f"cannot look up {value!r}: {value}")
        with tracer.start_as_current_span(f"GET /lookup/{value}") as span:
            span.set_attribute("url.path", f"/lookup/{value}")
            raise ValueError(f"cannot look up {value!r}: {value}")

    return lookup


def agent_run(llm: ScriptedLLM, name: str, arguments: str, started: threading.Barrier, ran: dict, *, tracer=None,
              **run_options) -> None:
    """A traced two-agent chat whose assistant calls ``lookup`` with ``arguments``.

    With the poison, the openai SDK itself then fails to send the tool's error back to the LLM
    (UnicodeEncodeError in the host, not ours): that exception ends the run and is recorded on its spans.
    """
    llm.push(tool_call("lookup", arguments), text("done"), text("TERMINATE"))
    assistant = ConversableAgent("assistant", llm_config=llm.llm_config(), human_input_mode="NEVER")
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    register_function(lookup_tool(tracer), name="lookup", caller=assistant, executor=user,
                      description="Look up a value.")
    started.wait(30)
    try:
        with oc.run(name=name, **run_options) as run:
            ran[name] = run.run_id
            user.initiate_chat(assistant, message=f"{name}: look it up", max_turns=3, silent=True)
    except UnicodeEncodeError as exc:
        ran[f"{name} raised"] = exc


def poisoned_and_innocent_runs(poisoned_llm: ScriptedLLM, innocent_llm: ScriptedLLM, *, tracer=None) -> dict:
    """Two concurrent traced runs (threads): ``poisoned`` (its LLM sends :data:`POISON_ARGUMENTS`, the tool
    raises with them; with ``tracer`` inside an instrumented call, see :func:`lookup_tool`) and ``innocent``.
    Returns ``{"poisoned": run id, "innocent": run id, ...}``."""
    run_ids: dict = {}
    started = threading.Barrier(2)
    threads = [
        threading.Thread(target=agent_run, args=(llm, name, arguments, started, run_ids), kwargs={"tracer": tracer})
        for name, llm, arguments in (
            ("poisoned", poisoned_llm, POISON_ARGUMENTS), ("innocent", innocent_llm, '{"value": "ok"}')
        )
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {"poisoned", "innocent"} <= set(run_ids), run_ids
    return run_ids


class PausedRun:
    """``scripted_run`` (or another run with ``gate``/``reached``) in a thread, held inside its tool call.

    Entering waits until the tool is reached (the run is live); ``release()`` lets it finish;
    leaving releases it (if still held) and joins the thread.
    """

    def __init__(self, llm, run=None, **kwargs) -> None:
        self.gate, self.reached = threading.Event(), threading.Event()
        self.result = None
        target = run or scripted_run

        def go() -> None:
            self.result = target(llm, gate=self.gate, reached=self.reached, **kwargs)

        self.thread = threading.Thread(target=go)

    def __enter__(self) -> PausedRun:
        self.thread.start()
        assert self.reached.wait(30), "the run never reached its tool call"
        return self

    def release(self, timeout: float = 60) -> None:
        self.gate.set()
        self.thread.join(timeout)

    def __exit__(self, *exc_info) -> None:
        self.release()


def table_rows(engine, table="execution_events", where="") -> list[dict]:
    with engine.connect() as connection:
        result = connection.execute(sa.text(f"select * from {table} {where} order by execution_order"))
        return [dict(row._mapping) for row in result]


def tracked_objects_per_span(tracer, count: int, attributes: dict) -> float:
    """How many more objects the garbage collector tracks per span started and ended with ``tracer`` (what the
    sinks still hold of them: their queues' items), counted with ``gc.get_objects()``."""
    import gc

    gc.collect()
    before = len(gc.get_objects())
    for _ in range(count):
        tracer.start_span("execute_tool add", attributes=attributes).end()
    gc.collect()
    return (len(gc.get_objects()) - before) / count
