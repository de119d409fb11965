"""DAG steps in a process pool (cmbagent's ``ParallelExecutor(use_processes=True)``): one run, one trace, one order.

The ``fit`` and ``plot`` steps run in two spawned worker processes, each with its own AG2 agents; ``fit``'s
engineer writes code that runs in a child of the worker. Every span of every process lands in the run's
trace and table with one gapless ``execution_order``; the code run records its child's CPU time and peak RSS.

Offline by default (an embedded scripted OpenAI-compatible server on 127.0.0.1, no API key);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint; ``--db PATH`` keeps the database.
"""

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sqlite3
import tempfile
from concurrent.futures import ProcessPoolExecutor

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, code, text

FIT = """
import os
chi2 = sum((i % 7 - 3) ** 2 for i in range(2_000_000))
print(f"chi2 = {chi2}")
print("parent span", os.environ["TRACEPARENT"].split("-")[2])
"""


def scripted(body: dict):
    """The embedded LLM: code for the fit step, then TERMINATE; a short answer for the other steps."""
    said = " ".join(str(message.get("content")) for message in body["messages"])
    if "exitcode" in said or "Fit" not in said:
        return text("Done. TERMINATE")
    return code(FIT)


def run_step(step_id: str, task: str, config: dict, work_dir: str) -> int:
    """One DAG node, in a worker process: its own agents (and code executor) inside an ``oc.step`` scope."""
    from autogen import ConversableAgent
    from autogen.coding import LocalCommandLineCodeExecutor

    with oc.step(node_id=f"node-{step_id}", step_id=step_id), contextlib.redirect_stdout(io.StringIO()):
        os.makedirs(os.path.join(work_dir, step_id), exist_ok=True)  # cmbagent's AG2 fork does not create it
        executor = LocalCommandLineCodeExecutor(work_dir=os.path.join(work_dir, step_id))
        engineer = ConversableAgent(step_id, llm_config=config, system_message="Do the task, then say TERMINATE.")
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER",
                                code_execution_config={"executor": executor})
        user.initiate_chat(engineer, message=task, max_turns=2, silent=True)
    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
    parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
    parser.add_argument("--db", help="SQLite file to write (default: in a temp dir)")
    args = parser.parse_args()

    out_dir = tempfile.mkdtemp(prefix="otel-cmbagent-")
    db = os.path.abspath(args.db or os.path.join(out_dir, "events.db"))
    tracing = oc.setup_tracing(service_name="dag", sql_url=f"sqlite:///{db}")  # workers rebuild these sinks
    llm = ScriptedLLM(scripted)
    if args.llm_url:  # a real OpenAI-compatible endpoint
        api_key = os.environ.get("OPENAI_API_KEY", "none")
        config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
    else:  # the embedded scripted LLM: offline, no key
        config = llm.start().llm_config(price=[0, 0])

    steps = {"fit": "Fit the power spectrum.", "plot": "Plot the spectrum."}
    with oc.run(name="dag-processes") as run:
        run_step("plan", "Plan a fit and a plot.", config, out_dir)  # in this process
        spawn = multiprocessing.get_context("spawn")  # cmbagent's isolated executor spawns too
        with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:  # workers join the run
            pids = list(pool.map(run_step, steps, steps.values(), [config] * 2, [out_dir] * 2))
    llm.stop()
    tracing.shutdown()

    connection = sqlite3.connect(db)
    rows = connection.execute(
        "select execution_order, event_type, step_id, trace_id, depth, meta, outputs, span_id from execution_events"
        " where run_id = ? order by execution_order", (run.run_id,)).fetchall()
    connection.close()
    print(f"run {run.run_id}  trace {run.trace_id}  db {db}")
    print(f"this process {os.getpid()}, workers {sorted(set(pids))}\n")
    for order, kind, step_id, _, depth, meta, outputs, span_id in rows:
        if kind == "step":
            print(f"{order:>5}  step {step_id}")
        elif kind == "code_exec":
            meta, output = json.loads(meta), json.loads(outputs)["result"]
            print(f"{order:>5}  {'  ' * depth}code run in step {step_id}: cpu user "
                  f"{meta['cmbagent.code.cpu_user_s']:.2f} s, system {meta['cmbagent.code.cpu_system_s']:.2f} s, "
                  f"peak RSS {meta['cmbagent.code.max_rss_bytes'] / 2**20:.1f} MiB; "
                  f"its TRACEPARENT names this span: {f'parent span {span_id}' in output}")
    orders = [row[0] for row in rows]
    same_trace = {row[3] for row in rows} == {run.trace_id}
    print(f"\n{len(rows)} rows from {len(set(pids)) + 1} processes, one trace: {same_trace}; "
          f"orders 1..{orders[-1]} gapless: {orders == list(range(1, len(orders) + 1))}")


if __name__ == "__main__":  # spawned workers import this module: only the parent runs main()
    main()
