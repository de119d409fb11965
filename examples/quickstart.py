"""Quickstart: trace a two-agent AG2 chat (a tool call and a code run) into SQLite, then print the run's rows.

Offline by default (an embedded scripted OpenAI-compatible server on 127.0.0.1, no API key);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint; ``--db PATH`` keeps the database.
"""

import argparse
import contextlib
import io
import json
import os
import sqlite3
import tempfile

from autogen import ConversableAgent, register_function
from autogen.coding import LocalCommandLineCodeExecutor

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, code, text, tool_call

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
parser.add_argument("--db", help="SQLite file to write (default: in a temp dir)")
args = parser.parse_args()

out_dir = tempfile.mkdtemp(prefix="otel-cmbagent-")
work_dir = os.path.join(out_dir, "coding")  # the code executor's dir: files written there become file_gen rows
os.makedirs(work_dir)
db = os.path.abspath(args.db or os.path.join(out_dir, "events.db"))
tracing = oc.setup_tracing(service_name="quickstart", sql_url=f"sqlite:///{db}")  # SQL sink + instrument AG2

llm = ScriptedLLM([
    tool_call("multiply", {"a": 6, "b": 7}),
    code("import json\njson.dump({'answer': 42}, open('result.json', 'w'))\nprint('saved result.json')"),
    text("The answer is 42, saved to result.json. TERMINATE"),
])
if args.llm_url:  # a real OpenAI-compatible endpoint
    api_key = os.environ.get("OPENAI_API_KEY", "none")
    config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
else:  # the embedded scripted LLM: offline, no key
    config = llm.start().llm_config(price=[0, 0])


def multiply(a: int, b: int) -> int:
    return a * b


assistant = ConversableAgent("assistant", llm_config=config,
                             system_message="Use the multiply tool, then save the result with a Python code block.")
user = ConversableAgent(
    "user", llm_config=False, human_input_mode="NEVER",
    code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=work_dir)},
    is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""),
)
register_function(multiply, caller=assistant, executor=user, description="Multiply two integers.")
with oc.run(name="quickstart") as run, contextlib.redirect_stdout(io.StringIO()):  # AG2's transcript off
    user.initiate_chat(assistant, message="What is 6 x 7? Save it to result.json.", max_turns=4, silent=True)
llm.stop()
tracing.shutdown()  # flushes every sink

print(f"run {run.run_id}  trace {run.trace_id}  db {db}\n")
print(f"{'order':>5}  {'type':<12} {'agent':<10} {'status':<9} name")
query = ("select execution_order, event_type, event_subtype, agent_name, status, depth, inputs, meta from execution_events"
         " where run_id = ? order by execution_order")
connection = sqlite3.connect(db)
rows = connection.execute(query, (run.run_id,)).fetchall()
connection.close()
for order, kind, subtype, agent, status, depth, inputs, meta in rows:  # spans and messages share one gapless order
    meta, inputs = json.loads(meta or "{}"), json.loads(inputs or "{}")
    if subtype == "message":  # cmbagent's message rows: agent_call / message, agent = the recipient
        kind, name = "message", f"{inputs.get('sender')} -> {inputs.get('recipient')}"
    else:
        name = meta.get("span_name")
    print(f"{order:>5}  {kind:<12} {agent or '-':<10} {status:<9} {'  ' * depth}{name}")
totals = run.span.attributes
print(f"\n{len(rows)} rows; tokens in/out {totals.get('gen_ai.usage.input_tokens', 0)}/"
      f"{totals.get('gen_ai.usage.output_tokens', 0)}; work dir {work_dir}")
