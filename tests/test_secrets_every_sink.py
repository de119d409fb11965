"""Issue 10 item 2: no form of a secret reaches any sink, the CLI output or the viewer API.

One real traced run (real AG2 agents, scripted LLM on loopback) into SQLite, a real OTLP receiver and a
websocket callback, with four kinds of secret the probe leaked: an environment variable set *after*
``setup_tracing()``, a registered key containing ``"`` and ``\\``, the ``api_key`` of an agent created
*before* ``instrument()``, and a secret that straddles the 16,384-character cut. The LLM and a tool echo
them in messages, tool arguments, a tool's exception and replies. Then the table, the receiver, the
callback's data, the viewer API (real HTTP) and the CLI (``runs``, ``tree``, ``timeline``, ``events``,
``events --json``, ``export`` to a second receiver) are searched for every spelling: 0 hits.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager, register_function

import otel_cmbagent as oc
from otel_cmbagent.pipeline.config import DEFAULT_MAX_VALUE_LENGTH
from otel_cmbagent.table.schema import row_kind
from otel_cmbagent.exporters.sql import make_engine
from otel_cmbagent.testing import text, tool_call
from services.otlp_receiver import OTLPHTTPReceiver
from otel_cmbagent.apps.viewer import ViewerServer
from sinks_util import table_rows
from test_cli import run_cli

pytestmark = pytest.mark.usefixtures("chats_cwd")

EARLY = "earlykey-Q7w9Z2k4X8v6"  # api_key of an agent created before instrument()
LATE = "lateenv-M3n8B5v1C7x2"  # PROBE_SERVICE_API_KEY, set after setup_tracing()
QUOTED = 'pw"quo\\te-K3y5150zz'  # a registered key with a quote and a backslash
STRADDLE = "strdl-H6j2L9p4R1t8ZZ"  # 20 chars, placed across the 16,384-character cut
LIMIT = DEFAULT_MAX_VALUE_LENGTH


def spellings(secret: str) -> set[str]:
    """The raw secret, its JSON and repr escapes, and (for the straddling one) every 6-character piece."""
    forms = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], json.dumps(json.dumps(secret))[1:-1]}
    if secret == STRADDLE:
        forms |= {secret[i : i + 6] for i in range(len(secret) - 5)}
    return forms


NAMES = {EARLY: "early-agent", LATE: "late-env", QUOTED: "quoted", STRADDLE: "straddling"}
FORMS = {form: NAMES[secret] for secret in NAMES for form in spellings(secret)}


def strings(value: Any) -> Iterator[str]:
    """Every string in a decoded structure (keys too), plus its JSON text."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings(item)
    elif value is not None:
        yield str(value)


def hits(where: str, value: Any) -> list[tuple[str, str]]:
    haystack = "\n".join(strings(value)) if not isinstance(value, str) else value
    return [(where, form) for form in FORMS if form in haystack]


def probe(query: str, note: str = "") -> str:
    raise ValueError(f"probe failed for {query} ({EARLY} {LATE} {QUOTED} {STRADDLE})")


def traced_run(llm, early: ConversableAgent) -> str:
    """A group chat with the early agent, then a chat whose tool call carries and raises the secrets."""
    keys = f"{EARLY} {LATE} {QUOTED}"
    at_the_cut = "x" * (LIMIT - 8) + STRADDLE + " and more"
    llm.push(
        text(f"early echoes {keys} {STRADDLE}"),  # group chat: early's reply
        tool_call("probe", {"query": keys, "note": at_the_cut}),  # quoted: a tool call carrying them
        tool_call("probe", at_the_cut),  # arguments that are not JSON: recorded as one long string
        text(f"the tool failed with {keys}"),
        text("TERMINATE"),
    )
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    quoted = ConversableAgent("quoted", llm_config=llm.llm_config(api_key=QUOTED), human_input_mode="NEVER")
    register_function(probe, caller=quoted, executor=user, description="Probe.")
    groupchat = GroupChat(agents=[user, early], messages=[], max_round=2, speaker_selection_method="round_robin")
    manager = GroupChatManager(groupchat=groupchat, llm_config=False)
    with oc.run(name=f"secrets {LATE}", note=f"set after setup: {LATE}") as run:
        user.initiate_chat(manager, message=f"group, here are {keys} {at_the_cut}", max_turns=1, silent=True)
        user.initiate_chat(quoted, message=f"call probe with {keys}", max_turns=4, silent=True)
    return run.run_id


def viewer_api(db, run_id: str) -> list[Any]:
    with ViewerServer(str(db)) as server:
        texts = []
        for path in ("api/runs", f"api/runs/{run_id}", f"api/runs/{run_id}/events"):
            with urllib.request.urlopen(server.url + path, timeout=30) as response:
                body = response.read().decode("utf-8")
            texts.extend([body, json.loads(body)])
        return texts


def cli_outputs(db, endpoint: str) -> list[str]:
    outputs = []
    for args in (("runs",), ("tree", "last"), ("timeline", "last", "--messages"), ("events", "last"),
                 ("events", "last", "--json"), ("export", "last", "--otlp", endpoint, "--content")):
        result = run_cli(*args, "--db", db, check=0)
        outputs.append(result.stdout + result.stderr)
    return outputs


@pytest.mark.slow
def test_no_form_of_any_secret_reaches_any_sink_the_cli_or_the_viewer(tmp_path, scripted_llm, monkeypatch):
    monkeypatch.delenv("PROBE_SERVICE_API_KEY", raising=False)
    monkeypatch.setenv("PROBE_STRADDLE_TOKEN", STRADDLE)  # known at setup: only the cut can leak it
    early = ConversableAgent("early", llm_config=scripted_llm.llm_config(api_key=EARLY), human_input_mode="NEVER")
    db = tmp_path / "secrets.db"
    received: list[dict] = []
    with OTLPHTTPReceiver() as receiver, OTLPHTTPReceiver() as export_receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.removesuffix("/v1/traces"))
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        tracing = oc.setup_tracing(sql_url=f"sqlite:///{db}", ws_callback=lambda _t, data: received.append(data),
                                   capture_content=True, set_global=False, handle_sigterm=False)
        try:
            monkeypatch.setenv("PROBE_SERVICE_API_KEY", LATE)  # set after setup_tracing()
            run_id = traced_run(scripted_llm, early)
        finally:
            tracing.shutdown()
        rows = table_rows(make_engine(f"sqlite:///{db}"))
        otlp_spans = receiver.spans
        api = viewer_api(db, run_id)
        cli = cli_outputs(db, export_receiver.endpoint)
        exported = export_receiver.spans

    # the run really carried the secrets everywhere it could: tool call, failure, messages, long content
    assert {row_kind(r) for r in rows} >= {"conversation", "tool_call", "message", "llm_call"}
    assert any(r["event_type"] == "tool_call" and r["status"] == "failed" for r in rows)
    assert otlp_spans and received and exported
    assert any("[REDACTED]" in str(r["inputs"]) for r in rows)
    assert any(len(str(r["inputs"])) > LIMIT for r in rows), "a value reached the cut"

    found = (
        hits("sqlite", [[str(v) for v in row.values()] for row in rows])
        + hits("otlp", otlp_spans)
        + hits("websocket", received)
        + hits("viewer api", api)
        + hits("cli", cli)
        + hits("cli export", exported)
    )
    assert found == [], "; ".join(sorted({f"{FORMS[form]} in {where}" for where, form in found}))
