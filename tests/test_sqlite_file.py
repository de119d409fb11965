"""The SQLite file under a live sink (issue 10 item 5): deleted, replaced, or its WAL index cut short.

Deleted mid-run, every row went into the unlinked file while the counters said written, and no line was
logged; a WAL index (``-shm``) truncated under SQLite's mapping killed the host with SIGBUS. The crash cases
run in a child process: the test asserts the host survives (exit code 0, also at exit) and every row is
written or spilled and counted.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys

import pytest

import otel_cmbagent as oc
from otel_cmbagent.exporters.sql import make_engine, replay
from sinks_util import PausedRun, table_rows


def sqlite_tracing(db, spill):
    return oc.setup_tracing(sql_url=f"sqlite:///{db}", spill_path=spill, otlp=False, set_global=False,
                            handle_sigterm=False)


def test_a_file_deleted_mid_run_is_noticed_and_the_rest_of_the_run_spilled(tmp_path, scripted_llm, caplog):
    """`rm events.db*` while a real run is live: the rows from then on are spilled and counted (not counted as
    written into the unlinked file), one line says so, and replaying the spill file puts the run's end into a
    new database."""
    db, spill = tmp_path / "events.db", tmp_path / "events.spill.jsonl"
    tracing = sqlite_tracing(db, spill)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"), PausedRun(scripted_llm) as run:
            assert tracing.force_flush()
            written = tracing.stats["sql"]["rows_written"]
            for path in tmp_path.glob("events.db*"):
                path.unlink()
            run.release()
            assert tracing.force_flush()
        stats = tracing.stats["sql"]
    finally:
        tracing.shutdown()
    assert stats["rows_written"] == written and stats["rows_spilled"] > 0, stats
    assert not db.exists(), "the file is not recreated"
    logged = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert len(logged) == 1 and str(spill) in logged[0], logged
    target = tmp_path / "new.db"
    assert replay(spill, f"sqlite:///{target}") == stats["rows_spilled"]
    (root,) = [r for r in table_rows(make_engine(f"sqlite:///{target}")) if r["event_type"] == "run"]
    assert root["run_id"] == run.result.run_id and root["status"] == "completed"


def test_a_file_replaced_mid_run_gets_the_rest_of_the_run(tmp_path, scripted_llm, caplog):
    """Another SQLite file moved over the path while a run is live (a restored copy, say): the sink reconnects
    to it, creates its table and writes the rest of the run there (before, those rows went into the old file's
    unlinked inode)."""
    db, spill = tmp_path / "events.db", tmp_path / "events.spill.jsonl"
    tracing = sqlite_tracing(db, spill)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_cmbagent"), PausedRun(scripted_llm) as run:
            assert tracing.force_flush()
            other = tmp_path / "other.db"
            sqlite3.connect(other).execute("create table notes (text)").connection.close()
            os.replace(other, db)
            run.release()
            assert tracing.force_flush()
        stats = tracing.stats["sql"]
    finally:
        tracing.shutdown()
    rows = table_rows(make_engine(f"sqlite:///{db}"))
    assert [r["status"] for r in rows if r["event_type"] == "run"] == ["completed"]
    assert {r["run_id"] for r in rows} == {run.result.run_id}
    assert stats["rows_spilled"] == 0, stats
    assert len([r for r in caplog.records if "was replaced" in r.getMessage()]) == 1


CHILD = """
import json, os, resource, sys
import otel_cmbagent as oc

db, spill, mode = sys.argv[1:4]
tracing = oc.setup_tracing(sql_url=f"sqlite:///{db}", spill_path=spill, otlp=False, set_global=False,
                           instrument=False)
oc.context._TracerSource.provider = tracing.tracer_provider
tracer = tracing.tracer_provider.get_tracer("child")


def run(run_id):
    with oc.run(run_id=run_id):
        for index in range(20):
            with tracer.start_as_current_span(f"span {index}"):
                pass
    tracing.force_flush()


run("before")
shm = db + "-shm"
if mode == "no-room":  # the disk is full: nothing may grow the WAL index back
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.stat(shm).st_size - 1, resource.RLIM_INFINITY))
os.truncate(shm, 0)  # cut short under SQLite's mapping
run("after")
print(json.dumps(tracing.stats["sql"]), flush=True)
tracing.shutdown()
"""


@pytest.mark.parametrize("mode", ["room", "no-room"])
def test_a_wal_index_cut_short_never_takes_the_host_down(tmp_path, mode):
    """The child's WAL index is truncated to 0 bytes while its sink has it mapped (it died with SIGBUS,
    exit code -7). With room on the disk it is re-extended and every row is written; without (no file may
    grow), the database is left alone: the later rows are spilled and counted, and the process exits 0."""
    db, spill = tmp_path / "events.db", tmp_path / "events.spill.jsonl"
    child = subprocess.run([sys.executable, "-c", CHILD, str(db), str(spill), mode], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    stats = json.loads(child.stdout.splitlines()[-1])
    written = {run_id: count for run_id, count in sqlite3.connect(db).execute(
        "select run_id, count(*) from execution_events group by run_id")}
    if mode == "room":
        assert written == {"before": 21, "after": 21} and stats["rows_spilled"] == 0, (written, stats)
        assert child.stderr.count("re-extended") == 1, child.stderr
    else:
        assert written == {"before": 21} and stats["rows_spilled"] == 21, (written, stats)
        assert {json.loads(line)["run_id"] for line in spill.read_text().splitlines()} == {"after"}
        assert child.stderr.count("cannot be re-extended") == 1, child.stderr
    assert "Traceback" not in child.stderr

