"""Metrics and logs, the other two signals: a real AG2 run on the scripted LLM, exported by setup_tracing() over
OTLP/HTTP to a real receiver; the metric values are checked against the spans the same run exported."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from autogen import ConversableAgent, register_function
from opentelemetry.sdk.trace import SpanProcessor

import otel_cmbagent as oc
from otel_cmbagent.exporters import otlp_signals
from otel_cmbagent.pipeline import logs as log_correlation
from otel_cmbagent.pipeline.metrics import DURATION_BUCKETS, TOKEN_BUCKETS
from otel_cmbagent.testing import code, error, text, tool_call
from services.otlp_receiver import OTLPHTTPReceiver
from services.otlp_signals import latest_points

from conftest import FAKE_KEY

PRICE = [0.5, 1.5]  # USD per 1k input / output tokens: every call costs something
IDENTITY_KEYS = {"cmbagent.run_id", "cmbagent.session_id", "cmbagent.node_id", "cmbagent.step_id"}
tool_logger = logging.getLogger("metrics_test.tools")


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, factory = list(root.handlers), logging.getLogRecordFactory()
    yield
    log_correlation.uninstall_log_correlation()
    logging.setLogRecordFactory(factory)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)


def _otlp_env(monkeypatch, receiver: OTLPHTTPReceiver, **extra: str) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def _busy_run(llm, work_dir):
    """Two tools (one fails), a code run that exits 3, then an LLM call that fails: every kind of point."""
    llm.push(tool_call("add", {"a": 20, "b": 22}), tool_call("boom", {}), code("import sys; sys.exit(3)"),
             error(500, "scripted outage"))

    def add(a: int, b: int) -> int:
        tool_logger.warning("adding %s and %s with %s", a, b, FAKE_KEY)
        return a + b

    def boom() -> str:
        raise RuntimeError("the tool broke")

    assistant = ConversableAgent("assistant", llm_config=llm.llm_config(api_key=FAKE_KEY, price=PRICE))
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER",
                            code_execution_config={"work_dir": str(work_dir), "use_docker": False})
    register_function(add, caller=assistant, executor=user, description="Add.")
    register_function(boom, caller=assistant, executor=user, description="Fail.")
    with pytest.raises(Exception, match="scripted outage"):
        with oc.run(name="metrics") as run:
            logging.getLogger("autogen.metrics_test").warning("run started")
            user.initiate_chat(assistant, message="go", max_turns=5, silent=True)
    return run


def _of(spans, event_type):
    return [s for s in spans if s["attributes"].get("cmbagent.event_type") == event_type]


def _assert_token_usage(points, llm_spans) -> None:
    for token_type, key in (("input", "gen_ai.usage.input_tokens"), ("output", "gen_ai.usage.output_tokens")):
        typed = [p for p in points if p["attributes"]["gen_ai.token.type"] == token_type]
        with_usage = [s for s in llm_spans if key in s["attributes"]]
        assert sum(p["sum"] for p in typed) == sum(s["attributes"][key] for s in with_usage) > 0
        assert sum(p["count"] for p in typed) == len(with_usage) == 3  # the failed call has no usage
    (point, *_) = points
    assert point["unit"] == "{token}" and point["explicit_bounds"] == list(TOKEN_BUCKETS)
    assert set(point["attributes"]) == {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                                        "gen_ai.response.model", "gen_ai.token.type"}
    assert point["attributes"]["gen_ai.operation.name"] == "chat"
    assert point["attributes"]["gen_ai.request.model"] == llm_spans[0]["attributes"]["gen_ai.request.model"]


def _assert_durations(points, llm_spans) -> None:
    assert {p["unit"] for p in points} == {"s"} and points[0]["explicit_bounds"] == list(DURATION_BUCKETS)
    assert sum(p["count"] for p in points) == len(llm_spans) == 4
    seconds = sum((s["end_time_unix_nano"] - s["start_time_unix_nano"]) / 1e9 for s in llm_spans)
    assert sum(p["sum"] for p in points) == pytest.approx(seconds, abs=1e-6)
    (failed_span,) = [s for s in llm_spans if s["status_code"] == "ERROR"]
    (failed,) = [p for p in points if "error.type" in p["attributes"]]
    assert failed["attributes"]["error.type"] == failed_span["attributes"]["error.type"] and failed["count"] == 1


def _counts(points, *keys) -> dict:
    return {tuple(p["attributes"].get(k) for k in keys): p["value"] for p in points}


def test_metrics_and_logs_reach_a_real_otlp_receiver_and_match_the_spans(scripted_llm, monkeypatch, tmp_path):
    with OTLPHTTPReceiver() as receiver:
        _otlp_env(monkeypatch, receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_METRIC_EXPORT_INTERVAL="600000")
        tracing = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
        assert tracing.meter_provider is not None and tracing.logger_provider is not None
        run = _busy_run(scripted_llm, tmp_path)
        tracing.shutdown()
        spans, metrics, records = receiver.spans, receiver.metrics, receiver.logs

    llm_spans = _of(spans, "llm_call")
    _assert_token_usage(latest_points(metrics, "gen_ai.client.token.usage"), llm_spans)
    _assert_durations(latest_points(metrics, "gen_ai.client.operation.duration"), llm_spans)
    cost_points = latest_points(metrics, "cmbagent.run.cost")
    assert sum(p["value"] for p in cost_points) == pytest.approx(
        sum(s["attributes"].get("gen_ai.usage.cost", 0) for s in llm_spans)) and cost_points[0]["unit"] == "{USD}"
    assert sum(p["value"] for p in cost_points) > 0

    tools = _counts(latest_points(metrics, "cmbagent.tool.calls"), "gen_ai.tool.name", "cmbagent.outcome")
    assert tools == {("add", "success"): 1, ("boom", "error"): 1}
    (code_span,) = _of(spans, "code_exec")
    code_runs = _counts(latest_points(metrics, "cmbagent.code.runs"), "ag2.code_execution.exit_code",
                        "cmbagent.outcome")
    assert code_runs == {(code_span["attributes"]["ag2.code_execution.exit_code"], "error"): 1}
    assert code_span["attributes"]["ag2.code_execution.exit_code"] == 3
    turns = Counter()
    for point in latest_points(metrics, "cmbagent.agent.turns"):
        turns[point["attributes"]["gen_ai.agent.name"], point["attributes"]["cmbagent.outcome"]] += point["value"]
    assert turns == Counter((s["attributes"]["gen_ai.agent.name"], "error" if s["status_code"] == "ERROR" else "success")
                            for s in _of(spans, "agent_call"))
    assert turns["assistant", "error"] == 1, "the turn whose LLM call failed"
    assert not any(IDENTITY_KEYS & set(p["attributes"]) for p in metrics), "no run/session ids on metrics"

    (tool_record,) = [r for r in records if str(r["body"]).startswith("adding 20 and 22")]
    (add_span,) = [s for s in spans if s["name"] == "execute_tool add"]
    assert (tool_record["trace_id"], tool_record["span_id"]) == (add_span["trace_id"], add_span["span_id"])
    assert tool_record["attributes"]["cmbagent.run_id"] == run.run_id
    assert FAKE_KEY not in str(tool_record["body"]), "secrets never leave the process in a log body"
    (ag2_record,) = [r for r in records if r["body"] == "run started"]
    (run_span,) = _of(spans, "run")
    assert (ag2_record["trace_id"], ag2_record["span_id"]) == (run_span["trace_id"], run_span["span_id"])


def test_plain_logging_output_carries_the_trace_span_and_run_ids(scripted_llm, capsys, tmp_path):
    handler = logging.StreamHandler()  # stderr as capsys set it
    handler.setFormatter(logging.Formatter(log_correlation.LOG_FORMAT))
    tool_logger.addHandler(handler)
    try:
        tracing = oc.setup_tracing(sql_url=None, metrics=False, logs=False, set_global=False, handle_sigterm=False)
        scripted_llm.push(tool_call("add", {"a": 1, "b": 2}), text("TERMINATE"))
        spans: list = []
        tracing.tracer_provider.add_span_processor(_Collect(spans))

        def add(a: int, b: int) -> int:
            tool_logger.warning("adding %s and %s", a, b)
            return a + b

        assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        register_function(add, caller=assistant, executor=user, description="Add.")
        with oc.run(name="plain") as run:
            user.initiate_chat(assistant, message="go", max_turns=2, silent=True)
        tool_logger.warning("after the run")
        tracing.shutdown()
    finally:
        tool_logger.removeHandler(handler)
    (tool_span,) = [s for s in spans if s.name == "execute_tool add"]
    context = tool_span.get_span_context()
    lines = capsys.readouterr().err.splitlines()
    (line,) = [line for line in lines if "adding 1 and 2" in line]
    assert f"trace_id={context.trace_id:032x} span_id={context.span_id:016x} run_id={run.run_id}]" in line
    (after,) = [line for line in lines if "after the run" in line]
    assert "trace_id=0 span_id=0 run_id=]" in after


class _Collect(SpanProcessor):
    """Keeps the ended spans."""

    def __init__(self, into: list) -> None:
        self.into = into

    def on_end(self, span) -> None:
        self.into.append(span)


def test_repeated_setup_adds_no_duplicate_handler_reader_or_factory(scripted_llm, monkeypatch):
    """Two setups: one OTLP log handler on the root logger, one correlating factory, each record and each
    token exported once (the first setup's pipeline no longer sees the run)."""
    with OTLPHTTPReceiver() as receiver:
        _otlp_env(monkeypatch, receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_METRIC_EXPORT_INTERVAL="600000")
        first = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
        second = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
        ours = [h for h in logging.getLogger().handlers if getattr(h, "_otel_cmbagent_handler", False)]
        assert ours == [second.log_handler]
        factory = logging.getLogRecordFactory()
        assert isinstance(factory, log_correlation._CorrelatingFactory)
        assert not isinstance(factory.wrapped, log_correlation._CorrelatingFactory)
        scripted_llm.push(text("hello", prompt_tokens=7, completion_tokens=3))
        assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
        user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
        with oc.run(name="twice"):
            tool_logger.warning("logged once")
            user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
        second.shutdown()
        first.shutdown()
        assert not [h for h in logging.getLogger().handlers if getattr(h, "_otel_cmbagent_handler", False)]
        records, metrics = receiver.logs, receiver.metrics
    assert [r["body"] for r in records].count("logged once") == 1
    usage = [p for p in metrics if p["name"] == "gen_ai.client.token.usage"]
    assert sorted((p["attributes"]["gen_ai.token.type"], p["sum"]) for p in usage) == [("input", 7), ("output", 3)]


@pytest.mark.parametrize(("variables", "metrics", "logs"), [
    ({}, False, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True, False),  # logs need to be asked for
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXPORTER": "none"}, False, False),
    ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://127.0.0.1:9/v1/logs"}, False, True),
    ({"OTEL_METRICS_EXPORTER": "console", "OTEL_LOGS_EXPORTER": "otlp"}, True, True),
    ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:9/v1/metrics", "OTEL_LOGS_EXPORTER": "none"},
     True, False),
])
def test_defaults_follow_the_standard_variables(monkeypatch, variables, metrics, logs):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert (otlp_signals.signal_configured("METRICS"), otlp_signals.signal_configured("LOGS")) == (metrics, logs)
    tracing = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False, instrument=False)
    try:
        assert (tracing.meter_provider is not None, tracing.logger_provider is not None) == (metrics, logs)
        assert (tracing.metrics is not None) == metrics
    finally:
        tracing.shutdown()


# --- which spans count: ours, the compat captures', AG2's own; never totals or other instrumentations' ------
def _points(reader) -> dict:
    """{metric name: {frozenset(attributes): value or (count, sum)}} from a real in-memory reader."""
    found: dict = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    value = (point.count, point.sum) if hasattr(point, "bucket_counts") else point.value
                    found.setdefault(metric.name, {})[frozenset(point.attributes.items())] = value
    return found


@pytest.fixture
def metrics_reader():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    yield reader, MeterProvider(metric_readers=[reader])


def test_ag2_own_spans_count_and_totals_or_other_instrumentations_do_not(metrics_reader):
    from opentelemetry.sdk.trace import TracerProvider

    reader, meter_provider = metrics_reader
    provider = TracerProvider()
    provider.add_span_processor(oc.MetricsSpanProcessor(meter_provider))
    ag2 = provider.get_tracer("opentelemetry.instrumentation.ag2")  # as autogen.opentelemetry names its spans
    usage = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 11,
             "gen_ai.usage.output_tokens": 5}
    ag2.start_span("chat m", attributes={**usage, "ag2.span.type": "llm"}).end()
    ag2.start_span("execute_tool fit", attributes={"ag2.span.type": "tool", "gen_ai.tool.name": "fit"}).end()
    provider.get_tracer("opentelemetry.instrumentation.openai_v2").start_span("chat m", attributes=usage).end()
    ours = provider.get_tracer("otel_cmbagent")
    ours.start_span("conversation a", attributes={**usage, "cmbagent.event_type": "conversation"}).end()
    ours.start_span("invoke_workflow r", attributes={**usage, "cmbagent.event_type": "run",
                                                     "gen_ai.usage.cost": 2.0}).end()
    points = _points(reader)
    tokens = {dict(k)["gen_ai.token.type"]: v for k, v in points["gen_ai.client.token.usage"].items()}
    assert tokens == {"input": (1, 11), "output": (1, 5)}, "AG2's LLM span once; totals and openai-v2's never"
    assert list(points["cmbagent.tool.calls"].values()) == [1]
    assert "cmbagent.run.cost" not in points


def test_compat_captures_count(metrics_reader):
    from otel_cmbagent.compat import EventCaptureManager

    reader, meter_provider = metrics_reader
    captor = EventCaptureManager(None, "run-compat-metrics", "s")
    captor._sinks = (*captor._sinks, oc.MetricsSpanProcessor(meter_provider))
    event_id = captor.capture_agent_call("engineer", "fit it")
    captor.capture_tool_call("engineer", "fit_spectrum", {"n": 3}, result="ok")
    captor.capture_code_execution("engineer", "raise SystemExit(2)", exit_code=2, result="")
    captor.capture_agent_response("engineer", "done", event_id=event_id)
    captor.close()
    points = _points(reader)
    assert {dict(k)["gen_ai.tool.name"]: v for k, v in points["cmbagent.tool.calls"].items()} == {"fit_spectrum": 1}
    (code_run,) = points["cmbagent.code.runs"]
    assert dict(code_run)["ag2.code_execution.exit_code"] == 2 and dict(code_run)["cmbagent.outcome"] == "error"
    assert {dict(k)["gen_ai.agent.name"] for k in points["cmbagent.agent.turns"]} == {"engineer"}
    assert not any("cmbagent.run_id" in dict(k) for series in points.values() for k in series)


def test_a_broken_span_never_escapes_the_processor(metrics_reader):
    _, meter_provider = metrics_reader

    class Broken:
        attributes = None

        @property
        def _attributes(self):
            raise RuntimeError("not a span")

    oc.MetricsSpanProcessor(meter_provider).on_end(Broken())  # logged once, never raised


def test_a_forked_worker_exports_its_own_points_once(scripted_llm, monkeypatch):
    """A fork copies the parent's MeterProvider with the points recorded so far: the worker exports only
    its own (its own service.instance.id), so the sums over every process match the spans' tokens."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import process_work

    with OTLPHTTPReceiver() as receiver:
        _otlp_env(monkeypatch, receiver, OTEL_METRIC_EXPORT_INTERVAL="600000")
        tracing = oc.setup_tracing(sql_url=None, set_global=False, handle_sigterm=False)
        scripted_llm.push(text("parent", prompt_tokens=100, completion_tokens=10),
                          text("worker", prompt_tokens=7, completion_tokens=3))
        with oc.run(name="forked-metrics"):
            assistant = ConversableAgent("assistant", llm_config=scripted_llm.llm_config())
            user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
            user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                worker_pid = pool.submit(process_work.dag_step, "w", scripted_llm.llm_config(), "go").result(120)
        tracing.shutdown()
        spans, metrics = receiver.spans, receiver.metrics
    llm_spans = _of(spans, "llm_call")
    assert len(llm_spans) == 2
    latest: dict = {}
    for point in (p for p in metrics if p["name"] == "gen_ai.client.token.usage"):
        key = (point["resource"]["service.instance.id"], point["attributes"]["gen_ai.token.type"])
        if key not in latest or point["time_unix_nano"] >= latest[key]["time_unix_nano"]:
            latest[key] = point
    assert len({instance for instance, _ in latest}) == 2 and worker_pid
    for token_type, total in (("input", 107), ("output", 10 + 3)):
        assert sum(p["sum"] for (_, t), p in latest.items() if t == token_type) == total == sum(
            s["attributes"][f"gen_ai.usage.{token_type}_tokens"] for s in llm_spans)
