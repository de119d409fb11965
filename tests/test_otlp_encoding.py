"""The OTLP sink's in-place encoder: the SDK encoder's exact bytes, the SDK's own way for anything else, and only
on the sink's own exporter (AG2's or a user's exporter in the same process keeps the SDK's encoder)."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

import otel_cmbagent as oc
from otel_cmbagent.exporters import otlp_encoding
from otel_cmbagent.exporters.otlp import make_otlp_exporter, otlp_span_processor
from otel_cmbagent.exporters.otlp_encoding import encode_request, in_place_matches_sdk, use_in_place_encoding
from otel_cmbagent.testing import ScriptedLLM
from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver, decode_request
from sinks_util import scripted_run
from spans_util import ended_spans

pytestmark = pytest.mark.usefixtures("chats_cwd")


def traced_chat(*processors) -> tuple[TracerProvider, list[ReadableSpan]]:
    """A real traced AG2 chat (tool call, content on) through ``processors``: the provider and the chat's spans."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    for processor in (oc.SequencingSpanProcessor(), *processors, SimpleSpanProcessor(memory)):
        provider.add_span_processor(processor)
    instrumentor = oc.instrument(tracer_provider=provider, capture_content=True)
    try:
        with ScriptedLLM() as llm:
            scripted_run(llm)
    finally:
        instrumentor.uninstrument()
    return provider, list(memory.get_finished_spans())


def chat_spans() -> list[ReadableSpan]:
    """A real traced AG2 chat plus every kind of ended span the sinks meet."""
    return [*traced_chat()[1], *ended_spans()]


def serialised(request) -> bytes:
    return request.SerializeToString()


def test_the_in_place_encoder_gives_the_sdk_encoders_bytes():
    spans = chat_spans()
    assert in_place_matches_sdk(), "the probe batch should encode identically on the SDK CI runs"
    in_place = otlp_encoding._encode_in_place(spans)  # the in-place path itself, no fallback
    assert serialised(in_place) == serialised(encode_spans(spans))
    assert serialised(encode_request(spans)) == serialised(encode_spans(spans))
    assert len(decode_request(in_place)) == len(spans)


def _span(attributes, events=()) -> ReadableSpan:
    context = SpanContext(7, 8, is_remote=False, trace_flags=TraceFlags(1))
    return ReadableSpan(name="odd", context=context, attributes=attributes, events=list(events), start_time=1,
                        end_time=2)


class Label(str):
    pass


@pytest.mark.parametrize("attributes, events", [
    ({"blob": b"\x00\xff", "ok": 1}, ()),
    ({"ok": 1}, [Event("e", {"nested": {"a": 1}}, 5)]),
    ({"huge": 2**70, "ok": "kept"}, ()),  # the SDK logs it and leaves the key out
    ({"label": Label("x")}, ()),
    ({"mixed": ("a", None)}, ()),
])
def test_a_value_the_in_place_path_leaves_is_encoded_by_the_sdk_whole_batch(attributes, events, caplog):
    spans = [*ended_spans(), _span(attributes, events)]
    with pytest.raises(Exception):
        otlp_encoding._encode_in_place(spans)
    with caplog.at_level(logging.ERROR):
        assert serialised(encode_request(spans)) == serialised(encode_spans(spans))


def test_the_probe_logs_nothing(caplog):
    """The probe runs inside a user's first export: it must not put a line in their logs."""
    in_place_matches_sdk.cache_clear()
    with caplog.at_level(logging.DEBUG):
        assert in_place_matches_sdk()
    assert caplog.records == []


def test_an_encoder_that_differs_from_the_sdks_is_never_used(monkeypatch):
    """Checked on the probe batch: a difference (here a span name left out) and the SDK's encoder is used."""
    put_span = otlp_encoding._put_span

    def without_name(target, span):
        put_span(target, span)
        target.ClearField("name")

    spans = ended_spans()
    monkeypatch.setattr(otlp_encoding, "_put_span", without_name)
    in_place_matches_sdk.cache_clear()
    try:
        assert not in_place_matches_sdk()
        assert serialised(encode_request(spans)) == serialised(encode_spans(spans))
    finally:
        in_place_matches_sdk.cache_clear()


@pytest.mark.parametrize("receiver_cls, protocol", [(OTLPHTTPReceiver, "http/protobuf"), (OTLPGRPCReceiver, "grpc")])
def test_the_sinks_exporter_encodes_in_place_and_the_receiver_gets_the_sdks_spans(monkeypatch, receiver_cls,
                                                                                   protocol):
    calls = []
    in_place = otlp_encoding._encode_in_place
    monkeypatch.setattr(otlp_encoding, "_encode_in_place", lambda spans: calls.append(len(spans)) or in_place(spans))
    with receiver_cls() as receiver:
        processor = otlp_span_processor(endpoint=receiver.endpoint, protocol=protocol, capture_content=True)
        provider, expected = traced_chat(processor)
        provider.force_flush()
        received = receiver.wait_for(len(expected))
        provider.shutdown()
    assert sum(calls) >= len(expected), "the sink's exporter did not encode in place"
    assert processor.stats == {"dropped": 0, "exported": len(expected), "failed": 0, "rejected": 0}

    def key(span: dict) -> str:
        return span["span_id"]

    assert sorted(received, key=key) == sorted(decode_request(encode_spans(expected)), key=key)


def test_other_exporters_keep_the_sdks_encoder():
    ours = otlp_span_processor(endpoint="http://127.0.0.1:9/v1/traces", capture_content=True)
    try:
        assert "export" in vars(ours.span_exporter.exporter)  # this instance only
        assert "export" not in vars(make_otlp_exporter("http/protobuf", "http://127.0.0.1:9/v1/traces"))
        assert HTTPExporter.export.__globals__["encode_spans"] is encode_spans  # the SDK's module untouched
        assert use_in_place_encoding(InMemorySpanExporter()) is False  # nothing there encodes OTLP
    finally:
        ours.shutdown()
