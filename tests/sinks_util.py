"""A scripted AG2 run used by the sink tests, and helpers to read the event table."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from autogen import ConversableAgent, register_function

import otel_cmbagent as oc
from otel_cmbagent.testing import text, tool_call

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
