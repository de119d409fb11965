"""OTLP trace requests built in place, the same bytes as the SDK's ``encode_spans`` at a third of its cost.

Why: the SDK builds every attribute as a ``KeyValue`` message, then copies it into its span; the span is copied
into its scope, the scope into its resource, the resource into the request (upb copies a message handed to a
constructor). Our spans carry ~25 attributes each (GenAI, OpenInference for Phoenix, cmbagent's order and
identity), so the encoder was most of the OTLP sink's CPU: 200 spans of a 50-turn chat took ~25 ms, ~14 of them
for attributes (measured here). Here each value is written once, into the one request tree.

Safe by construction of the check, not by trust: before its first use, :func:`encode_request` encodes a probe
batch (every value type, events, links, remote parents, trace state, statuses, several resources and scopes)
both ways and uses the in-place path only if the serialised bytes are identical; a batch holding a value the
in-place path does not take (bytes, mappings, None, subclasses of str/int, an int beyond 64 bits) is handed to
the SDK's encoder whole, so its handling (and logging) of odd values is unchanged.

:func:`use_in_place_encoding` gives one SDK exporter this encoder: the method of the exporter that calls the
SDK's ``encode_spans`` (HTTP: ``export``; gRPC: ``_translate_data``) is re-created from its own code with
``encode_spans`` resolved to :func:`encode_request`, and set on that instance only: the SDK's export logic
(retries, metrics, size limits) runs unchanged, no module is patched, other exporters in the process (AG2's own,
a user's) keep the SDK's encoder. An exporter whose methods do not call ``encode_spans`` by that name is left as
it is.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

_logger = logging.getLogger("otel_cmbagent.exporters")

_KINDS = {
    SpanKind.INTERNAL: ProtoSpan.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: ProtoSpan.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: ProtoSpan.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: ProtoSpan.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: ProtoSpan.SpanKind.SPAN_KIND_CONSUMER,
}
_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
# The SDK exporter methods that encode (by the name ``encode_spans``): HTTP's ``export``, gRPC's ``_translate_data``.
_ENCODING_METHODS = ("export", "_translate_data")


class _NotInPlace(Exception):
    """A value the in-place path leaves to the SDK's encoder."""


def encode_request(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The ``ExportTraceServiceRequest`` of ``spans``: the SDK's ``encode_spans``, built in place when that was
    checked to give the same bytes (and the batch holds only values the in-place path takes)."""
    if in_place_matches_sdk():
        try:
            return _encode_in_place(spans)
        except Exception:  # noqa: BLE001 - _NotInPlace, or a value protobuf refuses: the SDK's way, as before
            pass
    return encode_spans(spans)


@functools.lru_cache(maxsize=1)
def in_place_matches_sdk() -> bool:
    """True when the in-place encoder serialises the probe batch to the SDK encoder's exact bytes (checked once)."""
    try:
        probe = _probe_spans()
        same = _encode_in_place(probe).SerializeToString() == encode_spans(probe).SerializeToString()
    except Exception as exc:  # noqa: BLE001 - an SDK or protobuf this was not written for
        _logger.debug("otel-cmbagent: in-place OTLP encoding unavailable (%s); the SDK's encoder is used", exc)
        return False
    if not same:
        _logger.debug("otel-cmbagent: in-place OTLP encoding differs from this SDK's; the SDK's encoder is used")
    return same


def use_in_place_encoding(exporter: SpanExporter) -> bool:
    """Give this SDK OTLP exporter instance :func:`encode_request` (see the module's docstring); True if done."""
    done = False
    for name in _ENCODING_METHODS:
        method = getattr(type(exporter), name, None)
        code = getattr(method, "__code__", None)
        if (code is None or "encode_spans" not in code.co_names or code.co_freevars
                or method.__globals__.get("encode_spans") is not encode_spans):
            continue
        rebuilt = types.FunctionType(code, {**method.__globals__, "encode_spans": encode_request}, method.__name__,
                                     method.__defaults__, method.__closure__)
        rebuilt.__kwdefaults__ = method.__kwdefaults__
        setattr(exporter, name, types.MethodType(rebuilt, exporter))
        done = True
    return done


# --- the in-place encoder -------------------------------------------------------------------------------
def _encode_in_place(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    # Grouped as the SDK groups them: by resource, then scope (dict keys: the same equality), in first-seen order.
    groups: dict[Any, dict[Any, list[ReadableSpan]]] = {}
    for span in spans:
        groups.setdefault(span.resource, {}).setdefault(span.instrumentation_scope or None, []).append(span)
    request = ExportTraceServiceRequest()
    for resource, scopes in groups.items():
        resource_spans = request.resource_spans.add()
        resource_spans.resource.SetInParent()
        _put_attributes(resource_spans.resource.attributes, resource.attributes)
        for scope, members in scopes.items():
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.SetInParent()
            if scope is not None:
                _put_scope(scope_spans, scope)
            add = scope_spans.spans.add
            for span in members:
                _put_span(add(), span)
        if resource.schema_url:
            resource_spans.schema_url = resource.schema_url
    return request


def _put_scope(scope_spans: Any, scope: Any) -> None:
    target = scope_spans.scope
    if scope.name:
        target.name = scope.name
    if scope.version:
        target.version = scope.version
    _put_attributes(target.attributes, scope.attributes)
    if scope.schema_url:
        scope_spans.schema_url = scope.schema_url


def _put_span(target: Any, span: ReadableSpan) -> None:
    context = span.get_span_context()
    target.trace_id = context.trace_id.to_bytes(16, "big")
    target.span_id = context.span_id.to_bytes(8, "big")
    if context.trace_state:
        target.trace_state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
    parent = span.parent
    if parent:
        target.parent_span_id = parent.span_id.to_bytes(8, "big")
    target.name = span.name
    target.kind = _KINDS[span.kind]
    if span.start_time is not None:
        target.start_time_unix_nano = span.start_time
    if span.end_time is not None:
        target.end_time_unix_nano = span.end_time
    _put_attributes(target.attributes, span.attributes)
    for event in span.events:
        encoded = target.events.add()
        encoded.name = event.name
        encoded.time_unix_nano = event.timestamp
        _put_attributes(encoded.attributes, event.attributes)
        encoded.dropped_attributes_count = event.dropped_attributes
    for link in span.links:
        encoded = target.links.add()
        encoded.trace_id = link.context.trace_id.to_bytes(16, "big")
        encoded.span_id = link.context.span_id.to_bytes(8, "big")
        _put_attributes(encoded.attributes, link.attributes)
        encoded.dropped_attributes_count = link.dropped_attributes
        encoded.flags = _HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0)
    status = span.status
    if status is not None:
        target.status.SetInParent()
        target.status.code = status.status_code.value
        if status.description:
            target.status.message = status.description
    target.dropped_attributes_count = span.dropped_attributes
    target.dropped_events_count = span.dropped_events
    target.dropped_links_count = span.dropped_links
    target.flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent and parent.is_remote else 0)


def _put_attributes(target: Any, attributes: Any) -> None:
    if not attributes:
        return
    add = target.add
    for key, value in attributes.items():
        pair = add()
        pair.key = key
        _put_value(pair.value, value)


def _put_value(target: Any, value: Any) -> None:
    kind = type(value)
    if kind is str:
        target.string_value = value
    elif kind is bool:
        target.bool_value = value
    elif kind is int:
        target.int_value = value
    elif kind is float:
        target.double_value = value
    elif kind is tuple or kind is list:
        array = target.array_value
        array.SetInParent()
        add = array.values.add
        for item in value:
            _put_value(add(), item)
    else:
        raise _NotInPlace(kind.__name__)


# --- the probe ------------------------------------------------------------------------------------------
def _probe_spans() -> list[ReadableSpan]:
    """Spans that use every field the encoder writes, in two resources and three scopes."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags, TraceState

    values = {"s": "text ü", "empty": "", "t": True, "f": False, "i": -(2**63), "zero": 0, "x": 2.5, "nan": float("nan"),
              "strs": ("a", ""), "ints": [1, 2**40], "floats": (0.0, -1.5), "bools": (True,), "none": ()}
    resources = [Resource({"service.name": "probe", "n": 1}), Resource({"service.name": "other"}, "https://schema/r")]
    scopes = [InstrumentationScope("probe", "1.0", "https://schema/s", {"a": "b"}), InstrumentationScope("bare"), None]
    state = TraceState([("vendor", "v1"), ("k@tenant", "x.y-z")])  # valid pairs: an invalid one logs a warning

    def context(n: int, remote: bool = False, trace_state: TraceState | None = None) -> SpanContext:
        return SpanContext(0x1234 + n, 0x99 + n, is_remote=remote, trace_flags=TraceFlags(1), trace_state=trace_state)

    spans = []
    for n, (kind, status) in enumerate([
        (SpanKind.INTERNAL, Status(StatusCode.UNSET)), (SpanKind.CLIENT, Status(StatusCode.OK)),
        (SpanKind.SERVER, Status(StatusCode.ERROR, "failed: ü")), (SpanKind.PRODUCER, Status(StatusCode.ERROR)),
        (SpanKind.CONSUMER, Status(StatusCode.UNSET)),
    ]):
        spans.append(ReadableSpan(
            name=f"span {n}", context=context(n, trace_state=state if n % 2 else None),
            parent=None if n == 0 else context(100 + n, remote=n == 3), resource=resources[n % 2],
            attributes=values if n < 3 else {"only": n}, kind=kind, status=status,
            events=[Event("e", {"k": "v", "n": [1, 2]}, 1_000 + n), Event("bare", None, 2_000 + n)] if n != 4 else [],
            links=[Link(context(200 + n, remote=True), {"l": 1.0}), Link(context(300 + n))] if n != 2 else [],
            start_time=10 + n, end_time=None if n == 4 else 20 + n, instrumentation_scope=scopes[n % 3],
        ))
    return spans
