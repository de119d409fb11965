"""A run follows its work into other processes: real process pools, ``multiprocessing.Process``,
``loop.run_in_executor`` and killed workers, on SQLite and PostgreSQL, with fork, spawn and forkserver.

Each test reads the run back from the table: every row in the run's trace, parents one level up, and one
gapless ``execution_order`` across all processes of the run.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest
import sqlalchemy as sa

import otel_cmbagent as oc
from otel_cmbagent.table import store
from otel_cmbagent.pipeline.context import OrderSequence, sequence_for_run
from otel_cmbagent.table.schema import is_message
from otel_cmbagent.pipeline.order_source import FileCounter, ORDERS_TABLE, SHARED_ORDER_ENV
from otel_cmbagent.testing import ScriptedLLM, text
import process_work


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def tracing(sql_url):
    tracing = oc.setup_tracing(sql_url=sql_url, otlp=False, set_global=False, handle_sigterm=False)
    yield tracing
    tracing.shutdown()


def run_rows(tracing, run) -> list[dict]:
    """The run's rows, by order (after flushing this process)."""
    assert tracing.force_flush()
    table = tracing.sql.table
    with tracing.sql.engine.connect() as connection:
        query = sa.select(table).where(table.c.run_id == run.run_id).order_by(table.c.execution_order)
        return [dict(row._mapping) for row in connection.execute(query)]


def assert_one_run(rows: list[dict], run) -> None:
    """One trace, one root, parents one level up, orders 1..N without a gap or a repeat."""
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["trace_id"] for r in rows} == {run.trace_id}
    by_id = {r["id"]: r for r in rows}
    assert [r["event_type"] for r in rows if r["parent_event_id"] is None] == ["run"]
    for row in rows:
        if row["parent_event_id"] is not None:
            assert row["depth"] == by_id[row["parent_event_id"]]["depth"] + 1, row


def assert_steps_in_run(rows: list[dict], nodes: list[str]) -> None:
    """Each node's step row hangs under the run row; its spans carry the node and step ids."""
    (run_row,) = [r for r in rows if r["event_type"] == "run"]
    for node in nodes:
        (step,) = [r for r in rows if r["event_type"] == "step" and r["step_id"] == node]
        assert step["parent_event_id"] == run_row["id"] and step["status"] == "completed"
        inside = [r for r in rows if r["step_id"] == node and r["event_type"] != "step"]
        assert inside and {r["node_id"] for r in inside} == {f"node-{node}"}


@pytest.mark.parametrize(
    "start_method, backend",
    [("spawn", "sqlite"), ("fork", "sqlite"), ("forkserver", "sqlite"), ("spawn", "postgresql"),
     ("fork", "postgresql")],
)
def test_a_process_pool_dag_step_lands_in_the_run(start_method, backend, request, tmp_path):
    """cmbagent's ParallelExecutor(use_processes=True) shape: DAG nodes with real AG2 agents in a pool."""
    url = f"sqlite:///{tmp_path / 'events.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    tracing = oc.setup_tracing(sql_url=url, otlp=False, set_global=False, handle_sigterm=False)
    nodes = ["fit", "plot", "summary"]
    try:
        with ScriptedLLM(default=text("Done. TERMINATE")) as llm, oc.run(name="dag") as run:
            config = llm.llm_config(price=[0, 0])
            process_work.dag_step("plan", config, "Plan the fit.")  # in this process first
            pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(start_method))
            with pool:
                pids = list(pool.map(process_work.dag_step, nodes, [config] * 3, [f"Do {n}." for n in nodes]))
            with oc.step(step_id="report"):
                pass
        rows = run_rows(tracing, run)
    finally:
        tracing.shutdown()
    assert os.getpid() not in pids
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["plan", *nodes])
    for node in nodes:  # the worker's AG2 spans and messages, in the run's one order
        kinds = {("message" if is_message(r) else r["event_type"]) for r in rows if r["step_id"] == node}
        assert {"conversation", "agent_call", "llm_call", "message"} <= kinds, (node, kinds)
    report = next(r for r in rows if r["step_id"] == "report")
    assert report["execution_order"] == len(rows), "the parent goes on after every number the workers took"


@pytest.mark.parametrize("how", ["spawn-target", "spawn-subclass", "fork-target"])
def test_a_multiprocessing_process_lands_in_the_run(how, tracing):
    with oc.run(name="processes") as run:
        with oc.step(step_id="outer"):
            if how == "spawn-subclass":
                child = process_work.StepProcess("child")
            else:
                context = multiprocessing.get_context(how.split("-")[0])
                child = context.Process(target=process_work.spans_in_step, args=("child",))
            child.start()
            child.join(120)
        process_work.spans_in_step("after")
    assert child.exitcode == 0
    rows = run_rows(tracing, run)
    assert_one_run(rows, run)
    (outer,) = [r for r in rows if r["step_id"] == "outer" and r["event_type"] == "step"]
    (inner,) = [r for r in rows if r["step_id"] == "child" and r["event_type"] == "step"]
    assert inner["parent_event_id"] == outer["id"] and inner["depth"] == 2
    assert len([r for r in rows if r["step_id"] == "child"]) == 4


def test_run_in_executor_with_a_process_pool(tracing):
    async def main():
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            async with oc.run(name="async") as run:
                await asyncio.gather(*(loop.run_in_executor(pool, process_work.spans_in_step, n) for n in ("a", "b")))
                await loop.run_in_executor(pool, process_work.spans_in_step, "c")
        return run

    run = asyncio.run(main())
    rows = run_rows(tracing, run)
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["a", "b", "c"])


def test_carry_takes_the_run_into_a_multiprocessing_pool(tracing):
    """``multiprocessing.Pool`` is not wrapped (its worker loop outlives any one run): ``oc.carry(fn)`` is."""
    with oc.run(name="pool") as run:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(oc.carry(process_work.spans_in_step), ("pooled",))
            pool.apply(process_work.spans_in_step, ("not carried",))
    rows = run_rows(tracing, run)
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["pooled"])
    assert not [r for r in rows if r["step_id"] == "not carried"]


def test_a_worker_with_its_own_provider_keeps_it(tracing, sql_url):
    """A pool whose initializer sets up a provider: the worker's spans go there, in the run's trace and order."""
    spawn = multiprocessing.get_context("spawn")
    with oc.run(name="initializer") as run:
        pool = ProcessPoolExecutor(1, mp_context=spawn, initializer=process_work.own_provider, initargs=(sql_url,))
        with pool:
            pool.submit(process_work.spans_in_step, "own").result(120)
        process_work.spans_in_step("after")
    rows = run_rows(tracing, run)
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["own", "after"])


def test_forked_workers_export_over_otlp_and_leave_the_websocket_to_the_parent(tmp_path, monkeypatch):
    """A fork inherits the sinks: OTLP gets an exporter of its own in the worker (its spans reach the receiver
    under the run); the websocket callback and its event loop live in the parent, so the worker queues nothing
    for it (it would wait on a loop that does not run there) and only the parent's events reach it."""
    from services.otlp_receiver import OTLPHTTPReceiver

    received: list[dict] = []

    async def callback(_event_type, data):
        received.append(data)

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    with OTLPHTTPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.removesuffix("/v1/traces"))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        tracing = oc.setup_tracing(sql_url=f"sqlite:///{tmp_path / 'e.db'}", ws_callback=callback, ws_loop=loop,
                                   set_global=False, handle_sigterm=False)
        try:
            with oc.run(name="forked") as run:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                    worker_stats = pool.submit(process_work.spans_then_websocket_stats, "forked").result(120)
                process_work.spans_in_step("parent")
            rows = run_rows(tracing, run)
        finally:
            tracing.shutdown()
            loop.call_soon_threadsafe(loop.stop)
        spans = receiver.spans
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["forked", "parent"])
    (run_span,) = [s for s in spans if s["name"] == "invoke_workflow forked"]
    (step,) = [s for s in spans if s["name"] == "step forked"]
    assert step["trace_id"] == run.trace_id and step["parent_span_id"] == run_span["span_id"]
    assert len([s for s in spans if s["trace_id"] == run.trace_id]) == len([r for r in rows if not is_message(r)])
    before, after = worker_stats
    assert after == before, "the worker queued nothing for the parent's callback"
    nodes_seen = {d.get("node_id") for d in received}
    assert "node-parent" in nodes_seen and "node-forked" not in nodes_seen


def test_a_fork_waits_for_the_sql_batch_in_hand(tmp_path):
    """Forked while the parent's SQL writer is inside a SQLite transaction, a child would find the file locked by
    its own copy of SQLite's lock state (30 s busy, its rows never written): the fork waits for the batch."""
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{tmp_path / 'e.db'}", otlp=False, set_global=False,
                               handle_sigterm=False)
    parent, inside = os.getpid(), threading.Event()

    def hold_the_transaction(connection, cursor, statement, *args) -> None:
        if os.getpid() == parent and statement.startswith("INSERT INTO execution_events") and not inside.is_set():
            inside.set()  # the INSERT ran: the write lock is held until the commit, after this pause
            threading.Event().wait(0.5)

    sa.event.listen(tracing.sql.engine, "after_cursor_execute", hold_the_transaction)
    try:
        with oc.run(name="fork-mid-write") as run:
            threading.Thread(target=tracing.force_flush, daemon=True).start()
            assert inside.wait(30)
            child = multiprocessing.get_context("fork").Process(target=process_work.spans_in_step, args=("child",))
            child.start()
            child.join(120)
        rows = run_rows(tracing, run)
    finally:
        tracing.shutdown()
    assert child.exitcode == 0
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["child"])


SIGTERM_SCRIPT = """
import json, multiprocessing, os, signal, sqlite3, sys, time
import otel_cmbagent as oc

def worker(ready):
    open(ready, "w").close()
    time.sleep(60)

if __name__ == "__main__":
    db, ready = sys.argv[1], sys.argv[2]
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{db}", otlp=False)  # its SIGTERM handler, as an app has it
    with oc.run(name="parent") as run, oc.step(step_id="outer"):
        child = multiprocessing.get_context("fork").Process(target=worker, args=(ready,))
        child.start()
        while not os.path.exists(ready):
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGTERM)
        child.join(60)
        tracing.force_flush()
        rows = sqlite3.connect(db).execute("select event_type, status from execution_events where run_id = ?",
                                           (run.run_id,)).fetchall()
    print(json.dumps({"exitcode": child.exitcode, "while_open": sorted(rows)}))
"""


def test_sigterm_in_a_forked_worker_leaves_the_parents_run_open(tmp_path):
    """A forked worker inherits the SIGTERM handler that ends open spans as interrupted: it must end its own,
    never the parent's (the run and step still open in the parent)."""
    import subprocess
    import sys

    script = tmp_path / "app.py"
    script.write_text(SIGTERM_SCRIPT)
    completed = subprocess.run([sys.executable, str(script), str(tmp_path / "e.db"), str(tmp_path / "ready")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["exitcode"] == -15, "the worker still dies of SIGTERM"
    assert result["while_open"] == [["run", "running"], ["step", "running"]]


def test_a_killed_worker_leaves_only_its_unwritten_number_and_blocks_nothing(tracing, tmp_path):
    """SIGKILL mid-task: the parent goes on numbering and writing; the one gap is the number the dead worker
    took for a row it never wrote; what it wrote stays ``running``; an ``error`` row says the worker died."""
    marker = tmp_path / "lost.json"
    with oc.run(name="killed") as run:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            with pytest.raises(BrokenProcessPool):
                pool.submit(process_work.die_after_taking_a_number, str(marker)).result(120)
        process_work.spans_in_step("after")
    rows = run_rows(tracing, run)
    lost = json.loads(marker.read_text())["lost_order"]
    orders = [r["execution_order"] for r in rows]
    assert len(orders) == len(set(orders))
    assert set(range(1, max(orders) + 1)) - set(orders) == {lost}
    doomed = next(r for r in rows if r["step_id"] == "doomed" and r["event_type"] == "step")
    assert doomed["status"] == "running"  # in the table; readers see its writer (the worker) is gone:
    shown = {r["id"]: r for r in store.run_events(tracing.sql.engine, run.run_id)}
    assert shown[doomed["id"]]["status"] == "interrupted"
    assert store.run_summary(tracing.sql.engine, run.run_id)["status"] == "completed"
    (died,) = [r for r in rows if r["event_type"] == "error"]
    assert died["status"] == "failed" and died["execution_order"] > lost
    assert min(r["execution_order"] for r in rows if r["step_id"] == "after") > lost


def test_a_worker_killed_holding_the_order_lock_blocks_nobody(tracing):
    """The kernel releases a dead holder's flock: the parent and a new worker still get numbers."""
    with oc.run(name="killed-holding") as run:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            with pytest.raises(BrokenProcessPool):
                pool.submit(process_work.die_holding_the_order_lock).result(120)
        done = threading.Event()

        def go_on() -> None:  # in a thread: a blocked counter shows as a thread that never finishes
            process_work.spans_in_step("after")
            with ProcessPoolExecutor(1, mp_context=context) as fresh:
                fresh.submit(process_work.spans_in_step, "fresh-worker").result(120)
            done.set()

        worker = threading.Thread(target=go_on, daemon=True)
        worker.start()
        worker.join(120)
        assert done.is_set(), "numbering blocked after a worker died holding the order lock"
    rows = run_rows(tracing, run)
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["after", "fresh-worker"])


def test_the_order_can_live_in_the_database(tracing, monkeypatch):
    """``OTEL_CMBAGENT_SHARED_ORDER=database``: the run's counter is a row of its SQL database (works across
    machines); spawned workers and the parent number from it."""
    monkeypatch.setenv(SHARED_ORDER_ENV, "database")
    with oc.run(name="db-order") as run:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(process_work.spans_in_step, ["a", "b"]))
        process_work.spans_in_step("after")
    rows = run_rows(tracing, run)
    assert_one_run(rows, run)
    assert_steps_in_run(rows, ["a", "b", "after"])
    with tracing.sql.engine.connect() as connection:
        query = sa.text(f"select last from {ORDERS_TABLE} where key = :k")
        last = connection.execute(query, {"k": f"run:{run.run_id}"})
        assert last.scalar_one() == len(rows)
    assert not isinstance(sequence_for_run(run.run_id).shared, FileCounter)


def test_handing_the_order_over_under_threads_loses_and_repeats_nothing(tmp_path):
    """Threads keep numbering while the sequence moves to a shared counter: every number once, no gap."""
    sequence = OrderSequence()
    taken: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(5)

    def take(out: list[int]) -> None:
        start.wait()
        out.extend(sequence.next() for _ in range(20_000))

    threads = [threading.Thread(target=take, args=(out,)) for out in taken]
    for thread in threads:
        thread.start()
    start.wait()
    while sequence.last < 10_000:
        pass
    sequence.share(FileCounter(str(tmp_path / "order"), "test"))
    for thread in threads:
        thread.join()
    numbers = sorted(n for out in taken for n in out)
    assert numbers == list(range(1, 80_001))
    assert sequence.shared.value == 80_000


def test_uninstrument_restores_the_process_patch_points(tracer_provider):
    import subprocess
    from concurrent import futures
    from multiprocessing import process

    points = [
        (futures.ProcessPoolExecutor, "submit"),
        (process.BaseProcess, "start"),
        (subprocess.Popen, "__init__"),
        (subprocess.Popen, "_try_wait"),
    ]
    originals = [owner.__dict__[name] for owner, name in points]
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        assert all(owner.__dict__[name] is not original for (owner, name), original in zip(points, originals))
    finally:
        instrumentor.uninstrument()
    assert all(owner.__dict__[name] is original for (owner, name), original in zip(points, originals))
    instrumentor.instrument(tracer_provider=tracer_provider, instrument_processes=False)
    try:
        assert all(owner.__dict__[name] is original for (owner, name), original in zip(points, originals))
    finally:
        instrumentor.uninstrument()


def test_a_captors_run_in_a_spawned_pool_writes_cmbagents_own_table(tmp_path):
    """cmbagent's shape: an ``EventCaptureManager`` on its SQLAlchemy session, DAG nodes in a spawned pool (no
    ``setup_tracing()``): the workers write into cmbagent's ``execution_events``, in the captor's one order."""
    import uuid

    from sqlalchemy.orm import Session as OrmSession

    import cmbagent_schema as cmb
    from otel_cmbagent import compat

    engine = cmb.cmbagent_engine(f"sqlite:///{tmp_path / 'cmbagent.db'}")
    run_id, session_id = str(uuid.uuid4()), str(uuid.uuid4())
    cmb.add_run(engine, run_id, session_id)
    assert compat.install_ag2_hooks()
    try:
        with OrmSession(engine) as db_session:
            captor = compat.EventCaptureManager(db_session=db_session, run_id=run_id, session_id=session_id)
            compat.set_event_captor(captor)
            captor.capture_agent_call("planner", "split the work")
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(process_work.spans_in_step, ["a", "b"]))
            captor.capture_agent_call("planner", "merge the results")
            assert captor.flush()
            captor.close()
            compat.set_event_captor(None)
    finally:
        compat.uninstall_ag2_hooks()
    rows = sorted(cmb.rows_of(engine, cmb.execution_events, run_id=run_id), key=lambda r: r["execution_order"])
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    steps = [r for r in rows if r["event_type"] == "step"]
    assert sorted(r["step_id"] for r in steps) == ["a", "b"]
    opened = next(r for r in rows if r["event_type"] == "agent_call")  # the captor's open event at submit
    for step in steps:
        assert step["parent_event_id"] == opened["id"] and step["depth"] == opened["depth"] + 1
        assert step["session_id"] == session_id
        assert len([r for r in rows if r["parent_event_id"] == step["id"]]) == 3
    assert rows[-1]["event_type"] == "agent_call", "the captor goes on after the workers' numbers"
