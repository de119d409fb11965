"""Live websocket: serve every span start/end and message of a run as cmbagent ``event_captured`` envelopes.

A websocket client in a thread prints each envelope as it arrives, while the agents are still talking.
Offline by default (an embedded scripted OpenAI-compatible server on 127.0.0.1, no API key);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint; ``--db PATH`` also writes SQLite.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import threading
import time

from autogen import ConversableAgent
from websockets.sync.client import connect

import otel_cmbagent as oc
from otel_cmbagent.exporters.websocket import serve
from otel_cmbagent.testing import ScriptedLLM, text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
parser.add_argument("--db", help="also write the events to this SQLite file")
args = parser.parse_args()

broadcaster = serve()  # ws://127.0.0.1:<free port>/ ; pass token=... to bind beyond loopback
tracing = oc.setup_tracing(service_name="live", ws_callback=broadcaster.callback,
                           sql_url=f"sqlite:///{os.path.abspath(args.db)}" if args.db else None)
console, run_over = sys.stdout, threading.Event()  # AG2's own printout is redirected away during the run


def client() -> None:
    """What a UI does: connect, then read envelopes until the run's own span has ended."""
    with connect(broadcaster.url) as websocket:
        while True:
            envelope = json.loads(websocket.recv(timeout=30))
            data = envelope["data"]
            when = "after" if run_over.is_set() else "during"
            print(f"{when:<6}  {envelope['event_type']}  order={data['execution_order']:<3} {data['event_type']:<12} "
                  f"agent={data['agent_name'] or '-':<10} {data['status']}", file=console, flush=True)
            if data["event_type"] == "run" and data["status"] != "running":
                return


reader = threading.Thread(target=client)
reader.start()
for _ in range(1000):  # subscribe before the run starts
    if broadcaster.client_count:
        break
    time.sleep(0.01)
print("arrived envelope        order type         agent            status", flush=True)
llm = ScriptedLLM(default=text("Noted. TERMINATE", delay=0.2))
if args.llm_url:  # a real OpenAI-compatible endpoint
    api_key = os.environ.get("OPENAI_API_KEY", "none")
    config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
else:  # the embedded scripted LLM: offline, no key
    config = llm.start().llm_config(price=[0, 0])
assistant = ConversableAgent("assistant", llm_config=config, system_message="Answer in one line, then TERMINATE.")
user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", default_auto_reply="Thanks.")
with oc.run(name="live") as run, contextlib.redirect_stdout(io.StringIO()):
    user.initiate_chat(assistant, message="Which multipoles carry the first acoustic peak?", max_turns=2, silent=True)
run_over.set()
tracing.force_flush()  # every event handed to the server
reader.join(timeout=30)
llm.stop()
tracing.shutdown()
print(f"run {run.run_id}: {broadcaster.stats['sent']} envelopes sent to {broadcaster.url}")
broadcaster.close()
