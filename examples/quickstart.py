"""Quickstart: trace a two-agent AG2 chat with a tool call and a code run, then print the run's span tree.

Runs offline against an embedded scripted OpenAI-compatible server on 127.0.0.1 (no API key);
``--llm-url URL --model NAME`` (and OPENAI_API_KEY) point it at a real endpoint instead.
"""

import argparse
import os
import tempfile

from autogen import ConversableAgent, register_function
from autogen.coding import LocalCommandLineCodeExecutor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, code, text, tool_call

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: embedded scripted server)")
parser.add_argument("--model", default="gpt-4o-mini")
args = parser.parse_args()

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(oc.SequencingSpanProcessor())  # first: order, depth, run identity
provider.add_span_processor(SimpleSpanProcessor(exporter))
oc.instrument(tracer_provider=provider)

script = [
    tool_call("multiply", {"a": 6, "b": 7}),
    code("import json\njson.dump({'answer': 42}, open('result.json', 'w'))\nprint('saved result.json')"),
    text("The answer is 42, saved to result.json. TERMINATE"),
]
with ScriptedLLM(script) as llm:
    if args.llm_url:
        config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": os.environ.get("OPENAI_API_KEY", "none")}]}
    else:
        config = llm.llm_config(price=[0, 0])

    def multiply(a: int, b: int) -> int:
        return a * b

    work_dir = tempfile.mkdtemp(prefix="otel-cmbagent-")
    assistant = ConversableAgent("assistant", llm_config=config, system_message="Use tools, then write Python.")
    user = ConversableAgent(
        "user", llm_config=False, human_input_mode="NEVER",
        code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=work_dir)},
        is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""),
    )
    register_function(multiply, caller=assistant, executor=user, description="Multiply two integers.")
    with oc.run(name="quickstart") as run:
        user.initiate_chat(assistant, message="What is 6 x 7? Save it to a file.", max_turns=4, silent=True)

provider.force_flush()
spans = sorted(exporter.get_finished_spans(), key=lambda s: s.attributes["cmbagent.execution_order"])
print(f"\nrun {run.run_id}  trace {run.trace_id}\n")
rows = []  # spans and message events share one gapless order
for span in spans:
    a = span.attributes
    failed = "  FAILED" if span.status.status_code.name == "ERROR" else ""
    ms = f"{(span.end_time - span.start_time) / 1e6:8.1f}"
    rows.append((a["cmbagent.execution_order"], a["cmbagent.event_type"], ms, a["cmbagent.depth"], span.name + failed))
    for e in (ev.attributes for ev in span.events if ev.name == "cmbagent.message"):
        who = f"{e['cmbagent.message.sender']} -> {e['cmbagent.message.recipient']}"
        rows.append((e["cmbagent.execution_order"], "message", "", e["cmbagent.depth"], who))
print(f"{'order':>5}  {'type':<12} {'ms':>8}  span")
for order, kind, ms, depth, label in sorted(rows):
    print(f"{order:>5}  {kind:<12} {ms:>8}  {'  ' * depth}{label}")
usage = run.span.attributes
print(f"\n{len(spans)} spans; tokens in/out {usage.get('gen_ai.usage.input_tokens', 0)}/"
      f"{usage.get('gen_ai.usage.output_tokens', 0)}; work dir {work_dir}")
