"""The ended-span record the SQL sink and the OTLP processor queue (issue 14 item 3): rows and OTLP bytes built
from it equal those built from the SDK's own ``ReadableSpan``; a queued span costs the collector one object.

Spans come from a real SDK provider with the sequencer (failed, interrupted, with events, links, a trace state,
AG2 1.x's scope); OTLP goes to a real receiver on loopback.
"""

from __future__ import annotations

import copy

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider

import otel_cmbagent as oc
from otel_cmbagent.exporters.otlp import otlp_span_processor
from otel_cmbagent.pipeline import semconv
from otel_cmbagent.pipeline import sdk_fields
from otel_cmbagent.table import rows
from otel_cmbagent.table.rows import SpanAtEnd, SpanAtStart, span_row
from services.otlp_receiver import OTLPHTTPReceiver
from sinks_util import tracked_objects_per_span
from spans_util import TOOL, ended_spans


@pytest.mark.parametrize("capture_content", [True, False])
def test_rows_from_the_end_record_equal_the_spans_own(capture_content):
    spans = ended_spans()
    assert len(spans) == 5
    for span in spans:
        record = SpanAtEnd(span)
        assert span_row(record, ended=True, capture_content=capture_content) == span_row(
            span, ended=True, capture_content=capture_content), span.name


def test_the_otlp_bytes_of_the_end_record_equal_the_spans_own():
    spans = ended_spans()
    for span in spans:
        record = SpanAtEnd(span)
        assert not record.dropped
        assert encode_spans([record.readable()]).SerializeToString() == encode_spans([span]).SerializeToString()
    limited = [span for span in ended_spans(SpanLimits(max_attributes=3)) if span.dropped_attributes]
    assert limited and all(SpanAtEnd(span).dropped for span in limited)  # these are exported as the SDK's own


def _read_through_properties(span):
    """The same span as an object of another class: the records read it through the public properties."""
    other = copy.copy(span)
    other.__class__ = type("Other" + type(span).__name__, (type(span),), {})
    return other


def _fields(record) -> dict:
    return {name: getattr(record, name) for cls in type(record).__mro__ for name in getattr(cls, "__slots__", ())}


def test_the_sdks_spans_read_directly_give_the_records_the_public_properties_give():
    """The SDK's spans are read through their private fields (fast); any other span through its properties."""
    for span in ended_spans() + [span for span in ended_spans(SpanLimits(max_attributes=3))]:
        assert _fields(SpanAtEnd(span)) == _fields(SpanAtEnd(_read_through_properties(span))), span.name
    started = []

    class Snapshots(SpanProcessor):
        def on_start(self, span, parent_context=None):
            started.append((SpanAtStart(span), SpanAtStart(_read_through_properties(span))))

    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(Snapshots())
    tracer = provider.get_tracer("snapshots")
    with tracer.start_as_current_span("run", attributes={"cmbagent.event_type": "run"}):
        tracer.start_span("execute_tool add", attributes=TOOL, kind=trace.SpanKind.CLIENT).end()
    assert len(started) == 2
    for fast, public in started:
        assert _fields(fast) == _fields(public)
    assert started[1][0].attributes[semconv.DEPTH] == 1 and started[1][0].parent is not None


def test_an_sdk_whose_spans_keep_other_fields_gets_the_public_path(monkeypatch):
    """The fields are checked once on a probe span; a class without them (or one that cannot be made) is read
    through its properties, with the same records."""
    assert sdk_fields.SDK_READABLE_SPAN is not None and sdk_fields.SDK_LIVE_SPAN is not None  # this SDK: fast path
    assert not sdk_fields.keeps_fields(lambda: ReadableSpanWithout())
    assert not sdk_fields.keeps_fields(lambda: 1 / 0)
    spans = ended_spans()
    fast = [_fields(SpanAtEnd(span)) for span in spans]
    monkeypatch.setattr(rows, "SDK_READABLE_SPAN", None)
    assert [_fields(SpanAtEnd(span)) for span in spans] == fast


class ReadableSpanWithout:
    """A span class of another SDK: its fields have other names."""

    def __init__(self) -> None:
        self.name, self._context = "probe", None


def test_queued_otlp_spans_hold_one_object_each_and_all_arrive_complete():
    """The OTLP queue holds the end records (the SDK's ``ReadableSpan``: ~12 tracked objects each), and every
    span reaches a real receiver with its attributes, events, links and status."""
    count = 1_000
    with OTLPHTTPReceiver() as receiver:
        provider = TracerProvider()
        provider.add_span_processor(oc.SequencingSpanProcessor())
        processor = otlp_span_processor(endpoint=receiver.endpoint, capture_content=True,
                                        schedule_delay_millis=600_000)  # nothing leaves before force_flush
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("queued")
        with tracer.start_as_current_span("run"):
            tracer.start_span("first", attributes=TOOL).end()
            tracked_per_span = tracked_objects_per_span(tracer, count, TOOL)
            expected = ended_spans()
            for span in expected:
                processor.on_end(span)
        assert provider.force_flush(60_000)
        received = receiver.wait_for(count + 2 + len(expected))
        provider.shutdown()
    assert tracked_per_span <= 1.5, tracked_per_span
    assert processor.stats == {"dropped": 0, "exported": count + 2 + len(expected), "failed": 0, "rejected": 0}
    by_id = {span["span_id"]: span for span in received}
    for span in expected:
        got = by_id[f"{span.context.span_id:016x}"]
        assert got["attributes"] == {key: list(v) if isinstance(v, tuple) else v for key, v in span.attributes.items()}
        assert [(e["name"], e["attributes"]) for e in got["events"]] == [(e.name, dict(e.attributes)) for e in span.events]
        assert [(link["span_id"], link["attributes"]) for link in got["links"]] == [
            (f"{link.context.span_id:016x}", dict(link.attributes)) for link in span.links]
        assert (got["status_code"], got["status_message"] or None) == (span.status.status_code.name, span.status.description)
