"""OTLP: send a traced AG2 chat to an OpenTelemetry Collector (then Jaeger/Tempo) and print the trace's Jaeger URL.

Start the collector + Jaeger + Tempo first: ``docker compose -f examples/docker-compose.yaml up -d``.
OTLP/HTTP (protobuf) to ``--endpoint`` (default http://localhost:4318); ``--grpc`` for OTLP/gRPC (default :4317).
Message text, tool arguments/results and code are stripped from OTLP unless
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true. Offline LLM by default (embedded scripted server);
``--llm-url URL --model NAME`` (key from OPENAI_API_KEY) use a real endpoint.
"""

import argparse
import contextlib
import io
import os

from autogen import ConversableAgent, register_function

import otel_cmbagent as oc
from otel_cmbagent.testing import ScriptedLLM, text, tool_call

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--endpoint", help="collector base URL (default http://localhost:4318, or :4317 with --grpc)")
parser.add_argument("--grpc", action="store_true", help="OTLP/gRPC instead of OTLP/HTTP (protobuf)")
parser.add_argument("--jaeger", default="http://localhost:16686", help="Jaeger UI base URL, for the printed link")
parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: the embedded scripted LLM)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name at --llm-url")
args = parser.parse_args()

# The standard variables, as you would export them in a shell (see README, "View traces in Jaeger/Tempo").
endpoint = args.endpoint or ("http://localhost:4317" if args.grpc else "http://localhost:4318")
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc" if args.grpc else "http/protobuf"
tracing = oc.setup_tracing(service_name="cmbagent", sql_url=None, otlp=True)  # OTLP only, no SQL file

llm = ScriptedLLM([tool_call("lookup_h0", {"survey": "planck"}), text("H0 = 67.4 km/s/Mpc. TERMINATE")])
if args.llm_url:  # a real OpenAI-compatible endpoint
    api_key = os.environ.get("OPENAI_API_KEY", "none")
    config = {"config_list": [{"model": args.model, "base_url": args.llm_url, "api_key": api_key}]}
else:  # the embedded scripted LLM: offline, no key
    config = llm.start().llm_config(price=[0, 0])


def lookup_h0(survey: str) -> str:
    return {"planck": "67.4 km/s/Mpc"}.get(survey.lower(), "unknown")


assistant = ConversableAgent("assistant", llm_config=config, system_message="Use the lookup tool; end with TERMINATE.")
user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False,
                        is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""))
register_function(lookup_h0, caller=assistant, executor=user, description="Hubble constant measured by a survey.")
with oc.run(name="otlp-demo") as run, contextlib.redirect_stdout(io.StringIO()):  # AG2's transcript off
    user.initiate_chat(assistant, message="What is H0 according to Planck?", max_turns=3, silent=True)
llm.stop()
tracing.force_flush()
stats = tracing.stats["otlp"]
tracing.shutdown()

print(f"sent {stats['exported']} spans over OTLP/{'gRPC' if args.grpc else 'HTTP'} to {endpoint} "
      f"(failed {stats['failed']}, dropped {stats['dropped']})")
if stats["failed"] or not stats["exported"]:
    print("nothing reached the collector: is it running? docker compose -f examples/docker-compose.yaml up -d")
print(f"trace {run.trace_id} (run {run.run_id}); open it in Jaeger:")
print(f"{args.jaeger.rstrip('/')}/trace/{run.trace_id}")
