"""OTLP (gRPC or HTTP/protobuf) for Jaeger/Tempo through a Collector: batched, content-stripped, values made
encodable, a span that still cannot be encoded isolated, drops counted, shutdown bounded."""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Callable

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Status, TraceFlags

from otel_cmbagent.pipeline.config import CAPTURE_CONTENT_ENV, parse_bool_env
from otel_cmbagent.pipeline.semconv import CONTENT_ATTRIBUTES
from otel_cmbagent.pipeline.values import log_internal_error, storable
from otel_cmbagent.table.rows import SpanAtEnd, span_at_end

from .otlp_encoding import use_in_place_encoding
from .worker import SHUTDOWN_TIMEOUT_ENV, shutdown_timeout

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


_INT64 = (-(2**63), 2**63 - 1)


def _clean_value(value: Any) -> Any:
    """``value`` as OTLP can encode it (the same object when it already can)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, int) and not isinstance(value, bool):  # beyond int64: the encoder drops it, noisily
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, (bytes, bytearray)):  # decoded, so every sink shows the same text
        return storable(bytes(value).decode("utf-8", errors="replace"))
    if isinstance(value, (tuple, list)) and any(isinstance(item, (str, bytes, bytearray, int)) for item in value):
        items = tuple(_clean_value(item) for item in value)
        return value if all(a is b for a, b in zip(items, value)) else items
    return value


def _clean_attributes(attributes: Any, drop: frozenset[str]) -> Any:
    """``attributes`` without the ``drop`` keys and with storable values (the same mapping when unchanged)."""
    if not attributes:
        return attributes
    cleaned = {storable(key): _clean_value(value) for key, value in attributes.items() if key not in drop}
    unchanged = len(cleaned) == len(attributes) and all(
        key in attributes and attributes[key] is value for key, value in cleaned.items()
    )
    return attributes if unchanged else cleaned


def prepare_span(span: ReadableSpan, *, strip_content: bool) -> ReadableSpan:
    """The span as it may be exported: content attributes dropped (unless allowed) and every string made
    storable (NUL and lone surrogates replaced, bytes decoded, integers beyond 64 bits as text) in its name,
    attributes, events, links and status. One bad value would otherwise fail the encoding of the whole batch (every run's spans in it).
    Returns ``span`` itself when nothing changes (the common case)."""
    drop = CONTENT_ATTRIBUTES if strip_content else frozenset()
    # Read once: the SDK's properties return a new view or tuple per access (never ``is`` the last one).
    original, original_events, original_links = span.attributes, span.events, span.links
    attributes = _clean_attributes(original, drop)
    events = [_clean_event(event, drop) for event in original_events]
    links = [_clean_link(link) for link in original_links]
    name = storable(span.name) if isinstance(span.name, str) else span.name
    status = span.status
    if isinstance(status.description, str) and storable(status.description) is not status.description:
        status = Status(status.status_code, storable(status.description))
    if (
        attributes is original
        and name is span.name
        and status is span.status
        and all(a is b for a, b in zip(events, original_events))
        and all(a is b for a, b in zip(links, original_links))
    ):
        return span
    return ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _clean_event(event: Event, drop: frozenset[str]) -> Event:
    attributes = _clean_attributes(event.attributes, drop)
    name = storable(event.name) if isinstance(event.name, str) else event.name
    if attributes is event.attributes and name is event.name:
        return event
    return Event(name, attributes, event.timestamp)


def _clean_link(link: Link) -> Link:
    attributes = _clean_attributes(link.attributes, frozenset())
    return link if attributes is link.attributes else Link(link.context, attributes)


def unencodable(spans: Sequence[ReadableSpan]) -> list[tuple[ReadableSpan, str]]:
    """The spans OTLP cannot encode, each with the reason (empty when the batch encodes: the failure was the
    endpoint's). Called only after a failed export, so a healthy export pays nothing for it."""
    try:
        encode_spans(spans).SerializePartialToString()
        return []
    except Exception:  # noqa: BLE001 - find which span(s)
        pass
    bad = []
    for span in spans:
        try:
            encode_spans([span]).SerializePartialToString()
        except Exception as exc:  # noqa: BLE001
            bad.append((span, f"{type(exc).__name__}: {exc}"))
    return bad


class ContentPolicyExporter(SpanExporter):
    """Wraps an exporter: strips content attributes (unless allowed), makes every value encodable, isolates
    a span that still cannot be encoded (the rest of its batch is sent; it is counted as ``rejected``, logged
    once and appended to ``spill_path`` when given), and counts what was exported or failed."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        capture_content: bool,
        spill_path: str | os.PathLike[str] | None = None,
        rebuild: Callable[[], SpanExporter] | None = None,
    ) -> None:
        self.exporter = exporter
        if rebuild is not None and hasattr(os, "register_at_fork"):
            # A forked child gets an exporter of its own: the parent's pooled connection (or channel) stays its own.
            os.register_at_fork(after_in_child=functools.partial(_rebuild_after_fork, weakref.ref(self), rebuild))
        self.capture_content = capture_content
        self.spill_path = os.fspath(spill_path) if spill_path is not None else None
        self.exported = 0
        self.failed = 0
        self.rejected = 0
        self._in_flight = 0
        self._abandoned = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan | SpanAtEnd]) -> SpanExportResult:
        batch = [prepare_span(span.readable() if type(span) is SpanAtEnd else span, strip_content=not self.capture_content)
                 for span in spans]
        result = SpanExportResult.FAILURE
        counted = True
        with self._lock:
            self._in_flight += len(batch)
        try:
            result = self._send(batch)
            if result is not SpanExportResult.SUCCESS:
                bad = unencodable(batch)
                if bad:
                    self._reject(bad)
                    rejected = {id(span) for span, _ in bad}
                    batch = [span for span in batch if id(span) not in rejected]
                    result = self._send(batch) if batch else SpanExportResult.SUCCESS
        finally:
            with self._lock:
                self._in_flight -= len(spans)
                counted = not self._abandoned  # shutdown gave up on this export and counted it already
                if counted and result is SpanExportResult.SUCCESS:
                    self.exported += len(batch)
                elif counted:
                    self.failed += len(batch)
        if result is not SpanExportResult.SUCCESS and counted:
            _logger.warning("otel-cmbagent: OTLP export of %d spans failed (%d so far)", len(batch), self.failed)
        return result

    def _send(self, batch: list[ReadableSpan]) -> SpanExportResult:
        try:
            return self.exporter.export(batch)
        except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the batch thread
            _logger.warning("otel-cmbagent: OTLP export raised %s", type(exc).__name__)
            return SpanExportResult.FAILURE

    def _reject(self, bad: list[tuple[ReadableSpan, str]]) -> None:
        with self._lock:
            first = self.rejected == 0
            self.rejected += len(bad)
        if first:
            span, reason = bad[0]
            _logger.warning(
                "otel-cmbagent: OTLP cannot encode span %r (%s); it is left out of its batch, the rest is sent "
                "(rejected spans are counted in stats['rejected']%s; logged once)",
                span.name, reason, f" and appended to {self.spill_path}" if self.spill_path else "",
            )
        if self.spill_path:
            try:
                with open(self.spill_path, "a", encoding="utf-8") as spill:
                    for span, _ in bad:
                        spill.write(span.to_json(indent=None) + "\n")
            except Exception as exc:  # noqa: BLE001
                log_internal_error("OTLP spill", exc)

    def abandon(self) -> int:
        """Shutdown gave up waiting: count the spans of the export still in flight as failed (returns them)."""
        with self._lock:
            if self._abandoned:
                return 0
            self._abandoned = True
            in_flight = max(0, self._in_flight)
            self.failed += in_flight
        return in_flight

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        flush = getattr(self.exporter, "force_flush", None)
        return flush(timeout_millis) if callable(flush) else True


def _rebuild_after_fork(exporter_ref: weakref.ref[ContentPolicyExporter], rebuild: Callable[[], SpanExporter]) -> None:
    exporter = exporter_ref()
    if exporter is not None:
        try:
            exporter._lock = threading.Lock()
            exporter.exporter = rebuild()
        except Exception as exc:  # noqa: BLE001 - never break the fork
            log_internal_error("OTLP exporter after fork", exc)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's BatchSpanProcessor, sized for bursts, counting the spans its full queue drops, with a
    bounded shutdown: after ``shutdown_timeout_millis`` (an endpoint that accepts and never answers) it
    returns, counting what is still queued as dropped and what is in flight as failed (logged once).

    Both read the SDK's private batch processor (``_batch_processor._queue``, ``_max_queue_size``, ``_shutdown``,
    ``_worker_thread``; tested on opentelemetry-sdk 1.45.x): the public API neither reports drops nor bounds
    shutdown. With the end record the SQL sink already built, ``on_end`` takes 0.28 µs against the SDK's own 0.57
    (measured here, warm: no ``os.getpid()`` per span). On an SDK without those internals, drops go uncounted and
    shutdown is the SDK's own.
    """

    def __init__(self, exporter: SpanExporter, *, shutdown_timeout_millis: int | None = None, **kwargs: Any) -> None:
        if "max_queue_size" not in kwargs and not os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE"):
            kwargs["max_queue_size"] = DEFAULT_MAX_QUEUE_SIZE
        if "max_export_batch_size" not in kwargs and not os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
            kwargs["max_export_batch_size"] = DEFAULT_MAX_EXPORT_BATCH_SIZE
        super().__init__(exporter, **kwargs)
        self.shutdown_timeout = shutdown_timeout(shutdown_timeout_millis)
        self.dropped = 0
        # Our exporter takes span records (SpanAtEnd: far fewer objects for the collector while queued), put on the
        # SDK's queue the way ``_batch_processor.emit`` does (opentelemetry-sdk 1.45.x; the public path otherwise)
        # minus its per-span ``os.getpid()`` system call: the SDK re-creates the queue's worker after a fork itself.
        batch = getattr(self, "_batch_processor", None)
        internals = ("_queue", "_shutdown", "_max_queue_size", "_max_export_batch_size", "_worker_awaken")
        self._batch = batch if all(hasattr(batch, name) for name in internals) else None
        self._records = self._batch is not None and isinstance(exporter, ContentPolicyExporter)

    def on_end(self, span: ReadableSpan) -> None:
        batch = self._batch
        if batch is None:
            super().on_end(span)
            return
        if batch._shutdown:
            self._count_dropped(1, "after shutdown")
            return
        queue = batch._queue
        if len(queue) >= batch._max_queue_size:
            self._count_dropped(1, "queue full")  # appendleft drops the oldest
        if not self._records:
            super().on_end(span)
            return
        record = span_at_end(span)
        if not record.trace_flags & TraceFlags.SAMPLED:
            return
        queue.appendleft(span if record.dropped else record)  # the SDK's own span knows what its limits dropped
        if len(queue) >= batch._max_export_batch_size and not batch._worker_awaken.is_set():
            batch._worker_awaken.set()

    def _count_dropped(self, count: int, why: str) -> None:
        first = self.dropped == 0
        self.dropped += count
        if first or self.dropped % 10_000 == 0:
            _logger.warning("otel-cmbagent: OTLP %s, %d spans dropped so far", why, self.dropped)

    def shutdown(self) -> None:
        """Flush and stop, waiting at most ``shutdown_timeout`` seconds (the SDK's default is unbounded here:
        its last export waits for the exporter's own timeout)."""
        batch = getattr(self, "_batch_processor", None)
        if batch is None or not hasattr(batch, "_queue"):  # SDK internals other than 1.45.x's: the SDK's shutdown
            super().shutdown()
            return
        if batch._shutdown:
            return
        batch.shutdown(timeout_millis=self.shutdown_timeout * 1000)
        left = len(batch._queue)
        batch._queue.clear()
        abandon = getattr(self.span_exporter, "abandon", None)
        in_flight = abandon() if callable(abandon) and batch._worker_thread.is_alive() else 0
        if left:
            self.dropped += left
        if left or in_flight:
            _logger.warning(
                "otel-cmbagent: OTLP shutdown gave up after %.1f s (%s): %d queued spans counted as dropped, "
                "%d in flight as failed", self.shutdown_timeout, SHUTDOWN_TIMEOUT_ENV, left, in_flight,
            )

    @property
    def stats(self) -> dict[str, int]:
        exporter = self.span_exporter
        return {
            "dropped": self.dropped,
            "exported": getattr(exporter, "exported", 0),
            "failed": getattr(exporter, "failed", 0),
            "rejected": getattr(exporter, "rejected", 0),
        }


def otlp_span_processor(
    *,
    capture_content: bool | None = None,
    protocol: str | None = None,
    endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    spill_path: str | os.PathLike[str] | None = None,
    shutdown_timeout_millis: int | None = None,
    **batch_options: Any,
) -> CountingBatchSpanProcessor:
    """The OTLP sink: ``capture_content=None`` keeps content only if the GenAI content variable says true.

    ``spill_path``: a JSON Lines file for spans OTLP cannot encode (default: none; they are counted and
    logged). ``shutdown_timeout_millis``: how long shutdown may wait for the endpoint (default
    ``$OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS`` or 5,000).
    """
    allow_content = parse_bool_env(CAPTURE_CONTENT_ENV, False) if capture_content is None else capture_content
    inner = exporter if exporter is not None else _sink_exporter(protocol, endpoint)
    rebuild = None if exporter is not None else functools.partial(_sink_exporter, protocol, endpoint)
    return CountingBatchSpanProcessor(
        ContentPolicyExporter(inner, capture_content=allow_content, spill_path=spill_path, rebuild=rebuild),
        shutdown_timeout_millis=shutdown_timeout_millis,
        **batch_options,
    )


def _sink_exporter(protocol: str | None, endpoint: str | None) -> SpanExporter:
    """The sink's own SDK exporter, encoding in place (same bytes, a third of the CPU: see ``otlp_encoding``).
    An exporter the caller passes is used as it is."""
    exporter = make_otlp_exporter(protocol, endpoint)
    use_in_place_encoding(exporter)
    return exporter
