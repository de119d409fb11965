"""GenAI metrics from ended spans: one SpanProcessor turns LLM, agent, tool and code spans into metric points.

Why a processor and not calls in the patches: it sees every span the pipeline sees (our patches, the
compat captures, AG2's own instrumentation on the same provider), each span exactly once, at its end,
when tokens, duration and outcome are known; the patches stay about spans. Run totals on run and
conversation spans are never counted (only the LLM calls themselves), so nothing is counted twice.
Spans of other instrumentations (e.g. an OpenAI SDK instrumentation, which records its own GenAI
metrics) are left alone. ``cmbagent.run_id`` and the other identity keys never become metric
attributes: one time series per run would grow without bound.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

from ..version import __version__
from . import semconv
from .processor import _raw_attributes
from .values import log_internal_error

METER_NAME = "otel_cmbagent"

# Explicit bucket boundaries from the GenAI semantic conventions (gen-ai-metrics.md).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

# The kind of a span without our event type, from AG2's own instrumentation (``ag2.span.type``).
_AG2_SPAN_TYPES = {
    "llm": semconv.EVENT_LLM_CALL,
    "agent": semconv.EVENT_AGENT_CALL,
    "tool": semconv.EVENT_TOOL_CALL,
    "code_execution": semconv.EVENT_CODE_EXEC,
}
_MODEL_KEYS = (semconv.GEN_AI_OPERATION_NAME, semconv.GEN_AI_PROVIDER_NAME, semconv.GEN_AI_REQUEST_MODEL,
               semconv.GEN_AI_RESPONSE_MODEL)
_TOKEN_TYPES = ((semconv.GEN_AI_USAGE_INPUT_TOKENS, semconv.TOKEN_TYPE_INPUT),
                (semconv.GEN_AI_USAGE_OUTPUT_TOKENS, semconv.TOKEN_TYPE_OUTPUT))
_NUMBER = (int, float)


def _number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _picked(attributes: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: attributes[key] for key in keys if attributes.get(key) is not None}


def _error_type(span: ReadableSpan, attributes: Any) -> str | None:
    """``error.type`` of a failed span (``_OTHER`` when it failed without one), None when it did not fail."""
    if span.status.status_code is not StatusCode.ERROR:
        return None
    error_type = attributes.get(semconv.ERROR_TYPE)
    return str(error_type) if error_type else "_OTHER"


def _outcome(attributes: dict[str, Any], error_type: str | None) -> dict[str, Any]:
    if error_type is None:
        attributes[semconv.OUTCOME] = semconv.OUTCOME_SUCCESS
    else:
        attributes[semconv.OUTCOME] = semconv.OUTCOME_ERROR
        attributes[semconv.ERROR_TYPE] = error_type
    return attributes


class GenAIMetrics:
    """The instruments (names, units and buckets from the spec; ``cmbagent.*`` ours)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter(METER_NAME, __version__, meter_provider=meter_provider)
        self.token_usage = meter.create_histogram(
            semconv.METRIC_TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.operation_duration = meter.create_histogram(
            semconv.METRIC_OPERATION_DURATION, unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.agent_turns = meter.create_counter(
            semconv.METRIC_AGENT_TURNS, unit="{turn}", description="Agent turns (generate_reply calls).")
        self.tool_calls = meter.create_counter(
            semconv.METRIC_TOOL_CALLS, unit="{call}", description="Tool calls, by tool and outcome.")
        self.code_runs = meter.create_counter(
            semconv.METRIC_CODE_RUNS, unit="{run}", description="Code executions, by exit code.")
        self.cost = meter.create_counter(
            semconv.METRIC_COST, unit="{USD}", description="Cost of the LLM calls of runs, added per call.")


class MetricsSpanProcessor(SpanProcessor):
    """Record GenAI and ``cmbagent.*`` metrics for each ended span; no I/O (the meter provider's reader exports).

    Add it to any ``TracerProvider`` (``setup_tracing(metrics=True)`` does); spans are read after the
    sequencer and the patches set their attributes. No exception ever escapes a hook.
    """

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self.rebind(meter_provider)
        self._record = {
            semconv.EVENT_LLM_CALL: self._llm_call,
            semconv.EVENT_AGENT_CALL: self._agent_turn,
            semconv.EVENT_TOOL_CALL: self._tool_call,
            semconv.EVENT_CODE_EXEC: self._code_run,
        }

    def rebind(self, meter_provider: metrics.MeterProvider | None) -> None:
        """Record into ``meter_provider`` from now on (a forked child's own, see ``setup_tracing``)."""
        self.instruments = GenAIMetrics(meter_provider)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            attributes = _raw_attributes(span)
            if not attributes:
                return
            kind = attributes.get(semconv.EVENT_TYPE)
            if kind is None:
                kind = _AG2_SPAN_TYPES.get(attributes.get(semconv.AG2_SPAN_TYPE))  # type: ignore[arg-type]
            record = self._record.get(kind)  # type: ignore[arg-type]
            if record is not None:
                record(span, attributes)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("MetricsSpanProcessor.on_end", exc)

    def _llm_call(self, span: ReadableSpan, attributes: Any) -> None:
        instruments = self.instruments
        model = _picked(attributes, _MODEL_KEYS)
        model.setdefault(semconv.GEN_AI_OPERATION_NAME, semconv.OP_CHAT)
        for key, token_type in _TOKEN_TYPES:
            tokens = attributes.get(key)
            if _number(tokens):
                instruments.token_usage.record(tokens, {**model, semconv.GEN_AI_TOKEN_TYPE: token_type})
        cost = attributes.get(semconv.GEN_AI_USAGE_COST)
        if _number(cost) and cost > 0:
            instruments.cost.add(cost, model)
        error_type = _error_type(span, attributes)
        if error_type is not None:
            model[semconv.ERROR_TYPE] = error_type
        if span.start_time is not None and span.end_time is not None:
            instruments.operation_duration.record((span.end_time - span.start_time) / 1e9, model)

    def _agent_turn(self, span: ReadableSpan, attributes: Any) -> None:
        self.instruments.agent_turns.add(
            1, _outcome(_picked(attributes, (semconv.GEN_AI_AGENT_NAME,)), _error_type(span, attributes)))

    def _tool_call(self, span: ReadableSpan, attributes: Any) -> None:
        self.instruments.tool_calls.add(
            1, _outcome(_picked(attributes, (semconv.GEN_AI_TOOL_NAME,)), _error_type(span, attributes)))

    def _code_run(self, span: ReadableSpan, attributes: Any) -> None:
        picked = _picked(attributes, (semconv.CODE_EXIT_CODE, semconv.CODE_LANGUAGE))
        self.instruments.code_runs.add(1, _outcome(picked, _error_type(span, attributes)))

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
