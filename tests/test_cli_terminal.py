"""Issue 10 item 3: what an agent or an LLM writes cannot drive the terminal of the person reading the run.

A real traced AG2 run whose agent name carries ESC sequences and whose LLM replies carry OSC (window
title), clear-screen, BEL and carriage-return tricks, read through the console script: every human-readable
command shows the control characters as visible escapes; ``--json`` keeps the exact values.
"""

from __future__ import annotations

import json

import pytest
from autogen import ConversableAgent

import otel_cmbagent as oc
from otel_cmbagent.table.schema import is_message
from otel_cmbagent.testing import ScriptedLLM, text
from test_cli import run_cli

pytestmark = pytest.mark.usefixtures("chats_cwd")

EVIL_AGENT = "evil\x1b[31mred\x9b2J"  # ESC CSI colour, then a C1 CSI
TITLE = "\x1b]0;pwned\x07"  # OSC: set the window title, BEL-terminated
CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home
OVERWRITE = "all good\rSHOWN\x08\u202eevil"  # CR and BS overwrite, bidi override
CONTENT = f"{TITLE}{CLEAR}reply {OVERWRITE}"
RAW_CONTROLS = ("\x1b", "\x07", "\x08", "\x9b", "\r", "\u202e")


@pytest.fixture(scope="module")
def evil_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("terminal")
    (folder / "chats").mkdir()
    db = folder / "evil.db"
    tracing = oc.setup_tracing(sql_url=f"sqlite:///{db}", set_global=False, handle_sigterm=False)
    try:
        with ScriptedLLM() as llm:
            llm.push(text(CONTENT), text("TERMINATE"))
            agent = ConversableAgent(EVIL_AGENT, llm_config=llm.llm_config(), human_input_mode="NEVER")
            user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
            with oc.run(name=f"run {TITLE}", run_id="evil-run-1"):
                user.initiate_chat(agent, message=f"hello {CLEAR}", max_turns=2, silent=True)
    finally:
        tracing.shutdown()
    return db


@pytest.mark.parametrize(
    "args",
    [("runs",), ("tree", "last"), ("timeline", "last", "--messages"), ("events", "last"),
     ("events", "last", "--agent", EVIL_AGENT), ("tree", "evil-run-1\x1b[2J")],
    ids=["runs", "tree", "timeline", "events", "events-agent", "error-line"],
)
def test_human_readable_output_shows_control_characters_escaped(evil_db, args):
    result = run_cli(*args, "--db", evil_db)
    printed = result.stdout + result.stderr
    leaked = [c for c in RAW_CONTROLS if c in printed]
    assert not leaked, (leaked, printed)
    assert "\\x1b" in printed  # shown, not swallowed: the reader sees something odd is there


def test_tree_shows_the_escaped_agent_and_message(evil_db):
    out = run_cli("tree", "last", "--db", evil_db, check=0).stdout
    assert "evil\\x1b[31mred\\x9b2J" in out
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[Hreply all good\\rSHOWN\\x08\\u202eevil" in out


def test_json_output_keeps_the_exact_values(evil_db):
    rows = [json.loads(line) for line in run_cli("events", "last", "--db", evil_db, "--json", check=0).stdout.splitlines()]
    assert EVIL_AGENT in {row["agent_name"] for row in rows}
    message = next(row for row in rows if is_message(row) and "pwned" in json.dumps(row["inputs"]))
    assert message["inputs"]["content"] == CONTENT
    runs = [json.loads(line) for line in run_cli("runs", "--db", evil_db, "--json", check=0).stdout.splitlines()]
    assert runs[0]["name"].endswith(f"run {TITLE}")
