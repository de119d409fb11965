"""Group chat: a round-robin AG2 GroupChat of four agents traced into SQLite; prints its handoffs and message counts.

Offline by default (an embedded scripted OpenAI-compatible server on 127.0.0.1, no API key);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint; ``--db PATH`` keeps the database.
"""

import argparse
import contextlib
import io
import os
import sqlite3
import tempfile

from autogen import ConversableAgent, GroupChat, GroupChatManager

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
parser.add_argument("--db", help="SQLite file to write (default: in a temp dir)")
args = parser.parse_args()

out_dir = tempfile.mkdtemp(prefix="otel-cmbagent-")
db = os.path.abspath(args.db or os.path.join(out_dir, "events.db"))
os.makedirs(os.path.join(out_dir, "chats"))
os.chdir(out_dir)  # cmbagent's AG2 fork saves group chats under ./chats
tracing = oc.setup_tracing(service_name="group-chat", sql_url=f"sqlite:///{db}")

llm = ScriptedLLM([
    text("Plan: 1) fit the power spectrum, 2) review the fit."),
    text("Fitted: A_s = 2.1e-9, n_s = 0.965."),
    text("The fit looks right. TERMINATE"),
])
if args.llm_url:  # a real OpenAI-compatible endpoint
    api_key = os.environ.get("OPENAI_API_KEY", "none")
    config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
else:  # the embedded scripted LLM: offline, no key
    config = llm.start().llm_config(price=[0, 0])

user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", default_auto_reply="Go on.")
planner = ConversableAgent("planner", llm_config=config, system_message="Plan the analysis in two steps.")
engineer = ConversableAgent("engineer", llm_config=config, system_message="Carry out the plan; report numbers.")
reviewer = ConversableAgent("reviewer", llm_config=config, system_message="Review the result; end with TERMINATE.")
groupchat = GroupChat(agents=[user, planner, engineer, reviewer], messages=[], max_round=4,
                      speaker_selection_method="round_robin")
manager = GroupChatManager(groupchat=groupchat, llm_config=False,  # created after setup_tracing(): fully traced
                           is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""))
with oc.run(name="group-chat") as run, contextlib.redirect_stdout(io.StringIO()):  # AG2's transcript off
    user.initiate_chat(manager, message="Fit the CMB power spectrum.", max_turns=1, silent=True)
llm.stop()
tracing.shutdown()

connection = sqlite3.connect(db)
handoffs = connection.execute(
    "select execution_order, json_extract(inputs, '$.from_agent'), json_extract(inputs, '$.to_agent') from execution_events"
    " where run_id = ? and event_type = 'handoff' order by execution_order", (run.run_id,)).fetchall()
counts = connection.execute(
    "select json_extract(inputs, '$.sender') as sender, count(*) from execution_events where run_id = ?"
    " and event_type = 'agent_call' and event_subtype = 'message'"  # cmbagent's message rows
    " group by sender order by sender", (run.run_id,)).fetchall()
connection.close()
print(f"run {run.run_id}  trace {run.trace_id}  db {db}\n\nhandoffs:")
for order, source, target in handoffs:
    print(f"  {order:>4}  {source} -> {target}")
print("\nmessages sent:")
for agent, count in counts:
    print(f"  {agent:<10} {count}")
