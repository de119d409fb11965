"""What a new user hit on a clean clone (``make demo``, then the printed commands, the CLI), each through the
console script in a subprocess, as that user runs it."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from otel_cmbagent.apps.demo import db_work_dir, run_demo
from otel_cmbagent.table import store
from test_cli import CLI, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # the demo and the printed commands in fresh shells: not in make test-fast

BARE_PATH = "/usr/bin:/bin"  # a fresh shell: the virtualenv's bin is not on it


def _last_summary(db: Path) -> dict:
    engine = store.open_store(str(db))
    return store.run_summary(engine, store.resolve_run(engine, "last"))


def _next_commands(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = lines.index("next commands to try:") + 1
    return [line.strip() for line in lines[start:] if line.startswith("  ")]


@pytest.mark.parametrize("on_path", [False, True], ids=["not-on-PATH", "on-PATH"])
def test_the_demos_next_commands_work_as_printed_in_a_fresh_shell(tmp_path, on_path):
    """They said ``otel-cmbagent runs`` (``command not found``: the tool is only in .venv/ag2/bin); the closing
    line said 136 rows for a run of 85; every run left an otel-cmbagent-demo-* folder in /tmp."""
    path = f"{CLI.parent}:{BARE_PATH}" if on_path else BARE_PATH
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"PATH": path, "TMPDIR": str(temp)}
    result = run_cli("demo", "--db", "demo.db", cwd=tmp_path, env=env, check=0, timeout=300)
    commands = _next_commands(result.stdout)
    assert len(commands) >= 5 and all(c.startswith("otel-cmbagent " if on_path else str(CLI)) for c in commands)
    for command in commands:
        if " serve" in command or " export" in command:  # a server until Ctrl-C; a collector we do not have
            continue
        done = subprocess.run(command, shell=True, cwd=tmp_path, env={"PATH": path, "COLUMNS": "160"},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert done.stdout.strip()
    rows = _last_summary(tmp_path / "demo.db")["events"]
    assert re.search(rf"; {rows} rows in .*demo\.db", result.stdout), "the closing line counts the table's rows"
    assert list(temp.iterdir()) == [], "nothing left in the temp dir"
    assert list((tmp_path / "otel_cmbagent_demo").glob("run-*/analysis/spectrum.png")), "files kept by the database"


def test_events_rejects_an_unknown_type_and_lists_the_valid_ones(tmp_path):
    """``events last --type bogus`` printed 0 events and exit 0."""
    db = tmp_path / "one.db"
    run_demo(str(db), live=False, work_dir=db_work_dir(db))
    result = run_cli("events", "last", "--db", db, "--type", "tool_call,bogus")
    assert_one_line_error(result, "'bogus'", "run, step, conversation", "tool_call", "message", code=2)


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_a_port_in_use_is_named(tmp_path):
    """``Address already in use`` did not say which address."""
    sock, port = _busy_port()
    try:
        for args in (("serve", "--db", tmp_path / "x.db", "--port", port),
                     ("demo", "--db", tmp_path / "x.db", "--no-live", "--serve", port)):
            assert_one_line_error(run_cli(*args), f"127.0.0.1:{port}", "already in use")
    finally:
        sock.close()


def test_a_dead_llm_url_is_named_at_once(tmp_path):
    """A dead ``--llm-url`` failed after ~14 s with ``unexpected APIConnectionError: Connection error.``."""
    sock, port = _busy_port()
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    result = run_cli("demo", "--db", tmp_path / "x.db", "--llm-url", url, "--model", "m")
    assert_one_line_error(result, f"cannot reach the LLM endpoint {url}")
    assert not (tmp_path / "x.db").exists()


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("first-use") / "demo.db"
    run_demo(str(db), live=False, work_dir=db_work_dir(db))
    return db


def _lines(result) -> list[str]:
    return result.stdout.splitlines()


def test_tables_fit_120_columns(demo_db):
    """At 120 columns ``events`` squeezed the name to ~13 characters while one long error took ~70, and the
    ``tree`` header was cut mid-word."""
    env = {"COLUMNS": "120"}
    events = run_cli("events", "last", "--db", demo_db, env=env, check=0)
    tree = run_cli("tree", "last", "--db", demo_db, env=env, check=0)
    runs = run_cli("runs", "--db", demo_db, env=env, check=0)
    for result in (events, tree, runs):
        assert max(len(line) for line in _lines(result)) <= 120, result.stdout
    failed = [line for line in _lines(events) if "failed" in line]
    assert len(failed) == 1 and "execute_tool fit_power_law" in failed[0] and "…" in failed[0]
    assert "execute_tool save_report" in events.stdout and "invoke_workflow cmb-demo" in events.stdout
    summary = _last_summary(demo_db)
    header = " ".join(_lines(tree)[:2])
    assert f"trace {summary['trace_id']}" in header and f"{summary['events']} events" in header
    assert "completed (1 failed)" in runs.stdout
