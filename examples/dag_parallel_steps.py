"""DAG steps: ``oc.run`` + ``oc.step`` scopes, two steps in parallel threads; shows they share the run and the trace.

Offline by default (an embedded scripted OpenAI-compatible server on 127.0.0.1, no API key);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint; ``--db PATH`` keeps the database.
"""

import argparse
import contextlib
import io
import os
import sqlite3
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from autogen import ConversableAgent

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
parser.add_argument("--db", help="SQLite file to write (default: in a temp dir)")
args = parser.parse_args()

db = os.path.abspath(args.db or os.path.join(tempfile.mkdtemp(prefix="otel-cmbagent-"), "events.db"))
tracing = oc.setup_tracing(service_name="dag", sql_url=f"sqlite:///{db}")
llm = ScriptedLLM(default=text("Done. TERMINATE", delay=0.3))  # slow enough for the steps to overlap
if args.llm_url:  # a real OpenAI-compatible endpoint
    api_key = os.environ.get("OPENAI_API_KEY", "none")
    config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
else:  # the embedded scripted LLM: offline, no key
    config = llm.start().llm_config(price=[0, 0])


def run_step(step_id: str, task: str) -> None:
    """One DAG node: its own agents (AG2 agents are not thread-safe), inside an ``oc.step`` scope."""
    with oc.step(node_id=f"node-{step_id}", step_id=step_id):
        agent = ConversableAgent(step_id, llm_config=config, system_message="Do the task briefly, then say TERMINATE.")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
        user.initiate_chat(agent, message=task, max_turns=1, silent=True)


with oc.run(name="dag") as run, contextlib.redirect_stdout(io.StringIO()):  # AG2's transcript off
    run_step("plan", "Plan a power-spectrum fit and a plot.")
    with ThreadPoolExecutor(max_workers=2) as pool:  # threads inherit the run (threading instrumentation)
        list(pool.map(run_step, ["fit", "plot"], ["Fit the power spectrum.", "Plot the spectrum."]))
llm.stop()
tracing.shutdown()

connection = sqlite3.connect(db)
steps = connection.execute(
    "select step_id, run_id, trace_id, started_at, completed_at from execution_events"
    " where run_id = ? and event_type = 'step' order by execution_order", (run.run_id,)).fetchall()
orders = [o for (o,) in connection.execute(
    "select execution_order from execution_events where run_id = ? order by execution_order", (run.run_id,))]
connection.close()
print(f"run {run.run_id}  trace {run.trace_id}  db {db}\n")
times = {}
for step_id, run_id, trace_id, started, completed in steps:
    times[step_id] = (datetime.fromisoformat(started), datetime.fromisoformat(completed))
    print(f"step {step_id:<5} run {run_id}  trace {trace_id}  {times[step_id][0]:%H:%M:%S.%f} -> "
          f"{times[step_id][1]:%H:%M:%S.%f}")
(fit_start, fit_end), (plot_start, plot_end) = times["fit"], times["plot"]
overlap = (min(fit_end, plot_end) - max(fit_start, plot_start)).total_seconds()
same = {(r, t) for s, r, t, _, _ in steps if s in ("fit", "plot")} == {(run.run_id, run.trace_id)}
print(f"\nparallel steps fit and plot: same run and trace: {same}; overlapping: {overlap > 0} ({overlap:.3f} s)")
print(f"{len(orders)} rows, orders 1..{orders[-1]} gapless: {orders == list(range(1, len(orders) + 1))}")
