"""The child process of a code run: W3C context in, measured cost out.

Real AG2 agents run real scripts through ``LocalCommandLineCodeExecutor`` (and the legacy path); a script
that uses the OpenTelemetry SDK itself, as a CAMB/CLASS pipeline's authors would, reads ``TRACEPARENT``
from its environment and exports over OTLP to the same real receiver as the run.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import pytest
import sqlalchemy as sa
from autogen import ConversableAgent
from autogen.coding import LocalCommandLineCodeExecutor

import otel_cmbagent as oc
from otel_cmbagent.pipeline import semconv
from otel_cmbagent.testing import ScriptedLLM, code, text
from services.otlp_receiver import OTLPHTTPReceiver

pytestmark = pytest.mark.usefixtures("chats_cwd")

# What a pipeline's authors write: their own provider, the parent context from the environment, OTLP out.
AUTHOR_SCRIPT = """
import os
from opentelemetry import baggage, context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

provider = TracerProvider(resource=Resource.create({{"service.name": "camb-pipeline"}}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("camb")
carrier = {{k.lower(): os.environ[k] for k in ("TRACEPARENT", "TRACESTATE", "BAGGAGE") if k in os.environ}}
context.attach(extract(carrier))
with tracer.start_as_current_span("camb.compute_spectrum {label}") as span:
    span.set_attribute("camb.run_from_baggage", baggage.get_baggage("cmbagent.run_id") or "")
    block = bytearray({megabytes} * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    total = sum(i * i for i in range({loops}))
    with tracer.start_as_current_span("camb.write_output {label}"):
        pass
provider.shutdown()
print("spectrum {label} done")
"""
BIG = AUTHOR_SCRIPT.format(label="big", megabytes=160, loops=3_000_000)
SMALL = AUTHOR_SCRIPT.format(label="small", megabytes=1, loops=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return request.getfixturevalue("postgres_url")


def test_an_executed_script_with_its_own_spans_lands_under_execute_code(sql_url, tmp_path, monkeypatch):
    with OTLPHTTPReceiver() as receiver, ScriptedLLM([code(BIG), code(SMALL), text("TERMINATE")]) as llm:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.removesuffix("/v1/traces"))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        # the executed `python` is this interpreter, which has the OTel SDK (cmbagent's fork ignores AG2's
        # virtual_env_context: it rebuilds the child's environment from os.environ)
        monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        tracing = oc.setup_tracing(sql_url=sql_url, set_global=False, handle_sigterm=False)
        try:
            (tmp_path / "work").mkdir()  # cmbagent's AG2 fork does not create it
            executor = LocalCommandLineCodeExecutor(work_dir=tmp_path / "work")
            engineer = ConversableAgent("engineer", llm_config=llm.llm_config(price=[0, 0]))
            runner = ConversableAgent(
                "executor", llm_config=False, human_input_mode="NEVER", code_execution_config={"executor": executor}
            )
            with oc.run(name="camb") as run:
                runner.initiate_chat(engineer, message="Compute the spectrum.", max_turns=3, silent=True)
            assert tracing.force_flush()
            table = tracing.sql.table
            with tracing.sql.engine.connect() as connection:
                query = sa.select(table).where(table.c.run_id == run.run_id).order_by(table.c.execution_order)
                rows = [dict(r._mapping) for r in connection.execute(query)]
        finally:
            tracing.shutdown()
        spans = receiver.spans
    assert "TRACEPARENT" not in os.environ, "the host's environment is never changed"
    by_name = {s["name"]: s for s in spans}
    code_spans = {s["span_id"]: s for s in spans if s["name"] == "execute_code executor"}
    for label in ("big", "small"):
        compute = by_name[f"camb.compute_spectrum {label}"]
        assert compute["trace_id"] == run.trace_id and compute["parent_span_id"] in code_spans
        assert by_name[f"camb.write_output {label}"]["parent_span_id"] == compute["span_id"]
        assert compute["attributes"]["camb.run_from_baggage"] == run.run_id
        assert compute["resource"]["cmbagent.run_id"] == run.run_id
        assert compute["resource"]["cmbagent.session_id"] == run.session_id
        assert compute["resource"]["service.name"] == "camb-pipeline"
    assert [r["execution_order"] for r in rows] == list(range(1, len(rows) + 1))
    big_row, small_row = [r for r in rows if r["event_type"] == "code_exec"]
    big, small = big_row["meta"], small_row["meta"]
    assert big[semconv.CODE_PROCESS_COUNT] == small[semconv.CODE_PROCESS_COUNT] == 1
    assert big[semconv.CODE_MAX_RSS] >= 160 * 1024 * 1024
    # the kernel's ru_maxrss of any child here is at least this process's peak (exec records it): not used as is
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert small[semconv.CODE_MAX_RSS] < min(100 * 1024 * 1024, parent_peak)
    assert big[semconv.CODE_CPU_USER] > small[semconv.CODE_CPU_USER] > 0
    assert big[semconv.CODE_CPU_SYSTEM] > 0
    for row in (big_row, small_row):  # the same figures on the span (OTLP) as in the row
        attributes = code_spans[row["span_id"]]["attributes"]
        assert {key: attributes[key] for key in row["meta"] if key.startswith("cmbagent.code.")} == {
            key: value for key, value in row["meta"].items() if key.startswith("cmbagent.code.")
        }


PRINT_CONTEXT = """
import os, time
time.sleep(0.5)
print("TRACEPARENT=" + os.environ["TRACEPARENT"])
print("RESOURCE=" + os.environ["OTEL_RESOURCE_ATTRIBUTES"])
"""


def _reply(body: dict):
    done = any("TRACEPARENT=" in str(message.get("content")) for message in body["messages"])
    return text("TERMINATE") if done else code(PRINT_CONTEXT)


@pytest.mark.parametrize("path", ["executor", "legacy"])
def test_concurrent_code_runs_each_give_their_child_their_own_context(
    path, instrument_with_content, span_exporter, tmp_path, monkeypatch
):
    """Two runs execute code at the same time in two threads: each child gets its own span as parent and
    its own run in the resource attributes; os.environ, which both threads share, is never touched."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    runs: dict[str, oc.run] = {}
    with ScriptedLLM(_reply) as llm:

        def one_run(name: str) -> None:
            work = tmp_path / name
            work.mkdir()
            config = (
                {"executor": LocalCommandLineCodeExecutor(work_dir=work)}
                if path == "executor"
                else {"work_dir": str(work), "use_docker": False}
            )
            engineer = ConversableAgent("engineer", llm_config=llm.llm_config(price=[0, 0]))
            runner = ConversableAgent(
                "runner", llm_config=False, human_input_mode="NEVER", code_execution_config=config
            )
            with oc.run(name=name) as run:
                runs[name] = run
                runner.initiate_chat(engineer, message=f"Show the context of {name}.", max_turns=2, silent=True)

        threads = [threading.Thread(target=one_run, args=(name,)) for name in ("one", "two")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert "TRACEPARENT" not in os.environ
    assert os.environ["OTEL_RESOURCE_ATTRIBUTES"] == "deployment.environment=test"
    code_spans = [s for s in span_exporter.get_finished_spans() if s.attributes.get(semconv.EVENT_TYPE) == "code_exec"]
    assert len(code_spans) == 2
    for span in code_spans:
        run = runs[span.attributes[semconv.RUN_ID] == runs["one"].run_id and "one" or "two"]
        output = span.attributes[semconv.CODE_OUTPUT]
        context = span.get_span_context()
        assert f"TRACEPARENT=00-{context.trace_id:032x}-{context.span_id:016x}-" in output
        assert f"RESOURCE=deployment.environment=test,cmbagent.run_id={run.run_id}," in output
        assert span.attributes[semconv.CODE_PROCESS_COUNT] == 1
