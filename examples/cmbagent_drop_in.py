"""cmbagent drop-in: the ``event_capture``/``ag2_hooks`` API on spans, writing cmbagent's ``execution_events`` rows.

cmbagent's own calls keep working, in the shapes its ``PhaseExecutionManager`` and ``ag2_hooks`` make them
(``EventCaptureManager(db_session=, run_id=, session_id=, enabled=True, websocket=None)``, ``set_event_captor``,
``install_ag2_hooks``, ``set_context``, ``capture_*``); the rows read as cmbagent's own capture writes them
(a message is an ``agent_call``/``message`` row), and AG2 spans and captures share one gapless order per run.
Offline by default (an embedded scripted OpenAI-compatible server on 127.0.0.1, no API key);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint; ``--db PATH`` keeps the database.
"""

import argparse
import contextlib
import io
import json
import os
import tempfile
import uuid

import sqlalchemy as sa
from autogen import ConversableAgent, register_function
from sqlalchemy.orm import Session

from otel_cmbagent.compat import EventCaptureManager, install_ag2_hooks, set_event_captor, uninstall_ag2_hooks
from otel_cmbagent.testing import ScriptedLLM, text, tool_call

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
parser.add_argument("--db", help="SQLite file to write (default: in a temp dir)")
args = parser.parse_args()

db = os.path.abspath(args.db or os.path.join(tempfile.mkdtemp(prefix="otel-cmbagent-"), "cmbagent.db"))
engine = sa.create_engine(f"sqlite:///{db}")  # cmbagent's database (its execution_events table is used if present)
llm = ScriptedLLM([tool_call("get_ell_max", {"experiment": "planck"}), text("Use ell_max = 2500. TERMINATE")])
if args.llm_url:  # a real OpenAI-compatible endpoint
    api_key = os.environ.get("OPENAI_API_KEY", "none")
    config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
else:  # the embedded scripted LLM: offline, no key
    config = llm.start().llm_config(price=[0, 0])


def get_ell_max(experiment: str) -> int:
    return {"planck": 2500, "act": 4000}.get(experiment.lower(), 2000)


run_id, session_id = str(uuid.uuid4()), str(uuid.uuid4())
with Session(engine) as db_session:
    # as cmbagent's PhaseExecutionManager._setup_event_capture() (was: cmbagent.execution.event_capture)
    captor = EventCaptureManager(db_session=db_session, run_id=run_id, session_id=session_id, enabled=True,
                                 websocket=None)
    captor.set_context(node_id=None, step_id=None)
    set_event_captor(captor)
    install_ag2_hooks()  # was: cmbagent.execution.ag2_hooks.install_ag2_hooks()
    captor.set_context(node_id="node-1", step_id="planning")
    call = captor.capture_agent_call(agent_name="planner", message="Plan the power-spectrum analysis",
                                     metadata={"sender": "user"})
    assistant = ConversableAgent("engineer", llm_config=config, system_message="Use the tool, then TERMINATE.")
    user = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER", code_execution_config=False,
                            is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""))
    register_function(get_ell_max, caller=assistant, executor=user, description="Maximum multipole of an experiment.")
    with contextlib.redirect_stdout(io.StringIO()):  # AG2's transcript off
        user.initiate_chat(assistant, message="Which ell_max for Planck?", max_turns=3, silent=True)
    captor.capture_agent_response(agent_name="planner", response="Plan: fit up to ell_max = 2500", event_id=call,
                                  metadata={"duration_ms": 40})
    captor.set_context(node_id="node-2", step_id="fit")
    captor.capture_handoff(from_agent="planner", to_agent="engineer", reason="plan ready")
    captor.capture_code_execution(agent_name="engineer", code="fit(ell_max=2500)", language="python",
                                  result="chi2 = 1.02", exit_code=0, duration_ms=12)
    captor.capture_file_generation("engineer", "plots/cl_fit.png", "plot", size_bytes=20480)
    captor.capture_message(sender="engineer", recipient="planner", content="Fit done, plot saved.", tokens=6)
    captor.flush()
    captor.close()  # ends the run and writes every row (as PhaseExecutionManager._flush_event_capture())
    set_event_captor(None)
    rows = db_session.execute(sa.text(
        "select execution_order, event_type, event_subtype, agent_name, step_id, depth, meta"
        " from execution_events where run_id = :run order by execution_order"), {"run": run_id}).all()
uninstall_ag2_hooks()
llm.stop()

print(f"run {run_id}  db {db}\n")
print(f"{'order':>5}  {'type':<12} {'subtype':<9} {'agent':<10} {'step':<9} name")
for order, kind, subtype, agent, step, depth, meta in rows:
    meta = json.loads(meta or "{}")
    name = meta.get("span_name") or "message"  # a message row (agent_call/message; agent = the recipient)
    print(f"{order:>5}  {kind:<12} {subtype or '-':<9} {agent or '-':<10} {step or '-':<9} {'  ' * depth}{name}")
orders = [row[0] for row in rows]
print(f"\n{len(rows)} rows; one gapless order 1..{orders[-1]}: {orders == list(range(1, len(orders) + 1))}")
