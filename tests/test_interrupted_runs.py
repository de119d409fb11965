"""Runs whose process was stopped while they ran (issue 10 item 6), with real processes running real AG2 agents.

Before, the open spans' rows stayed ``running`` after SIGKILL or SIGTERM, and the CLI and the viewer showed
the run live, its duration growing, forever. Now SIGTERM ends every open span as ``interrupted`` (the rows
are final), and after SIGKILL the readers see that the process that wrote the running rows is gone and show
the run as ``interrupted``, its duration fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import sqlalchemy as sa

from otel_cmbagent.table import store
from otel_cmbagent.exporters.sql import make_engine
from otel_cmbagent.table.writers import HEARTBEAT_TABLE
from otel_cmbagent.apps.viewer import ViewerServer
from sinks_util import table_rows
from test_cli import run_cli

pytestmark = pytest.mark.slow  # real processes killed and stopped: not in make test-fast

CHILD = """
import pathlib, sys, time
import otel_cmbagent as oc
from autogen import ConversableAgent, register_function
from otel_cmbagent.testing import ScriptedLLM, text, tool_call

db, reached = sys.argv[1], pathlib.Path(sys.argv[2])
tracing = oc.setup_tracing(sql_url=f"sqlite:///{db}", otlp=False)


def fit(points: int) -> str:
    reached.touch()
    time.sleep(120)  # stopped here
    return "fitted"


with ScriptedLLM() as llm:
    llm.push(tool_call("fit", {"points": 3}), text("TERMINATE"))
    assistant = ConversableAgent("analyst", llm_config=llm.llm_config(), human_input_mode="NEVER")
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    register_function(fit, caller=assistant, executor=user, description="Fit the data.")
    with oc.run(name="stopped", run_id=sys.argv[3]):
        user.initiate_chat(assistant, message="fit it", max_turns=2, silent=True)
"""


class StoppedRun:
    """A child process running a traced AG2 chat, held inside its tool call with its rows written ``running``."""

    def __init__(self, tmp_path, run_id: str, *, prefix: tuple[str, ...] = (), env: dict | None = None) -> None:
        self.db, self.run_id = tmp_path / "runs.db", run_id
        (tmp_path / "chats").mkdir(exist_ok=True)
        reached = tmp_path / "reached"
        self.process = subprocess.Popen([*prefix, sys.executable, "-c", CHILD, str(self.db), str(reached), run_id],
                                        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while not (reached.exists() and self.running_rows()):
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "the run never reached its tool call"
            time.sleep(0.1)

    def running_rows(self) -> list[dict]:
        if not self.db.exists():
            return []
        try:
            rows = table_rows(make_engine(f"sqlite:///{self.db}"), where="where status = 'running'")
        except sa.exc.OperationalError:
            return []
        return rows if any(r["event_type"] == "tool_call" for r in rows) else []

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(60)

    def __enter__(self) -> StoppedRun:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def summary(db, run_id: str) -> dict:
    (run,) = [r for r in store.list_runs(store.open_store(str(db))) if r["run_id"] == run_id]
    return run


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_sigkill_run_shows_interrupted_in_store_cli_and_viewer_api(tmp_path):
    """SIGKILL mid-run: nothing of the process runs again, so its rows stay ``running`` in the table. The
    rows carry the writing process's identity; its pid is gone, so the store, the CLI (runs, tree, timeline)
    and the viewer API show the run and its open events as interrupted, ending at the run's last row, and
    the duration no longer grows. While the process lived, the same run was live."""
    with StoppedRun(tmp_path, "killed-run") as run:
        live = summary(run.db, "killed-run")
        assert live["status"] == "running" and live["live"], live
        open_ids = {r["id"] for r in run.running_rows()}
        assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    assert {r["id"] for r in run.running_rows()} == open_ids, "the table keeps what was written"
    first = summary(run.db, "killed-run")
    time.sleep(1.2)
    second = summary(run.db, "killed-run")
    assert first["status"] == second["status"] == "interrupted" and not first["live"], first
    assert first["duration_ms"] == second["duration_ms"], "an interrupted run's duration does not grow"
    events = store.run_events(store.open_store(str(run.db)), "killed-run")
    interrupted = {r["id"] for r in events if r["status"] == "interrupted"}
    assert interrupted == open_ids and all(r["completed_at"] for r in events if r["id"] in interrupted)
    assert "running" not in {r["status"] for r in events}
    runs_out = run_cli("runs", "--db", run.db, check=0).stdout
    assert "interrupted" in runs_out and "live" not in runs_out, runs_out
    tree_out = run_cli("tree", "killed-run", "--db", run.db, check=0).stdout
    assert tree_out.count("interrupted") == len(open_ids) + 1 and "live" not in tree_out, tree_out  # +1: header
    assert "live" not in run_cli("timeline", "killed-run", "--db", run.db, check=0).stdout
    with ViewerServer(str(run.db)) as server:
        (api_run,) = [r for r in get_json(server.url + "api/runs") if r["run_id"] == "killed-run"]
        api_events = get_json(server.url + "api/runs/killed-run/events")
        incremental = get_json(server.url + "api/runs/killed-run/events?after=1000&running=" + ",".join(open_ids))
        columns = get_json(server.url + "api/runs/killed-run/columns")
        details = [get_json(server.url + "api/events/" + event_id)["event"] for event_id in sorted(open_ids)]
    assert api_run["status"] == "interrupted" and not api_run["live"]
    by_id = {r["id"]: r for r in api_events}
    statuses = columns["status"]
    assert dict(zip(columns["id"], statuses)) == {r["id"]: r["status"] for r in api_events}  # the page's view too
    ends = dict(zip(columns["id"], columns["end"]))
    assert all(ends[event_id] is not None for event_id in open_ids)
    assert dict(zip(columns["id"], columns["duration"])) == {r["id"]: r["duration_ms"] for r in api_events}
    assert details == [by_id[event_id] for event_id in sorted(open_ids)]
    assert {r["id"] for r in api_events if r["status"] == "interrupted"} == open_ids
    assert {r["status"] for r in incremental} == {"interrupted"} and len(incremental) == len(open_ids)


def test_sigterm_ends_every_open_span_as_interrupted(tmp_path):
    """SIGTERM mid-run: the handler ends every open span as interrupted before flushing, so the rows are final
    in the table itself - status and event_subtype ``interrupted``, the reason in error_message - and every
    reader shows the run interrupted. The process still dies of SIGTERM."""
    with StoppedRun(tmp_path, "terminated-run") as run:
        open_ids = {r["id"] for r in run.running_rows()}
        assert run.stop(signal.SIGTERM) == -signal.SIGTERM
    rows = {r["id"]: r for r in table_rows(make_engine(f"sqlite:///{run.db}"))}
    assert not [r for r in rows.values() if r["status"] == "running"]
    for row_id in open_ids:
        row = rows[row_id]
        assert (row["status"], row["event_subtype"], row["error_message"]) == (
            "interrupted", "interrupted", "interrupted by SIGTERM"), row
        assert row["completed_at"] is not None
    assert summary(run.db, "terminated-run")["status"] == "interrupted"
    assert "interrupted" in run_cli("runs", "--db", run.db, check=0).stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a UTS namespace")
def test_a_writer_on_another_host_is_known_dead_by_its_heartbeat(tmp_path):
    """A writer whose host is not the reader's (a child in its own UTS namespace with another hostname): its
    pid means nothing here, so its heartbeat in otel_cmbagent_writers decides. While it beats (every 0.5 s
    here) the run is live; once killed, its heartbeat goes stale (3 intervals + 5 s) and the run is
    interrupted."""
    prefix = ("unshare", "--uts", "sh", "-c", 'hostname elsewhere-host && exec "$@"', "sh")
    with StoppedRun(tmp_path, "remote-run", prefix=prefix, env={"OTEL_CMBAGENT_HEARTBEAT_SECONDS": "0.5"}) as run:
        with make_engine(f"sqlite:///{run.db}").connect() as connection:
            writers = [row[0] for row in connection.execute(sa.text(f"select writer from {HEARTBEAT_TABLE}"))]
        assert [writer.split("|")[0] for writer in writers] == ["elsewhere-host"], writers
        time.sleep(1.5)
        assert summary(run.db, "remote-run")["status"] == "running"
        run.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while summary(run.db, "remote-run")["status"] == "running":
        assert time.monotonic() < deadline, "the stale heartbeat was never noticed"
        time.sleep(0.5)
    assert summary(run.db, "remote-run")["status"] == "interrupted"


EXITING_CHILD = """
import sys, threading, time
import otel_cmbagent as oc

tracing = oc.setup_tracing(sql_url=f"sqlite:///{sys.argv[1]}", otlp=False, instrument=False)
tracer = tracing.tracer_provider.get_tracer("worker")
started = threading.Event()


def work():
    with oc.run(name="daemon work", run_id="exiting-run"), tracer.start_as_current_span("long step"):
        started.set()
        time.sleep(120)


threading.Thread(target=work, daemon=True).start()
started.wait(30)
with oc.run(name="short", run_id="finished-run"), tracer.start_as_current_span("quick step"):
    pass
print(len(tracing.open_spans), flush=True)  # only the daemon thread's two spans are open
"""


def test_spans_still_open_when_the_process_exits_end_as_interrupted(tmp_path):
    """The main thread returns while a daemon thread is inside a run: at exit its open spans end as interrupted
    (their rows final), the finished run stays completed, and spans that ended are not kept by the tracker."""
    db = tmp_path / "exit.db"
    child = subprocess.run([sys.executable, "-c", EXITING_CHILD, str(db)], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["2"]
    rows = table_rows(make_engine(f"sqlite:///{db}"))
    statuses = {(r["run_id"], r["status"], r["error_message"]) for r in rows}
    assert statuses == {("exiting-run", "interrupted", "interrupted by the process exiting"),
                        ("finished-run", "completed", None)}, statuses
