"""``otel-cmbagent export``: a stored run backfilled to an OTLP endpoint as its original trace."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ...table import store
from ...table.to_spans import spans_from_rows
from .terminal import first_line


class ExportError(Exception):
    """An OTLP export that did not go through (one line for a person)."""


def otlp_endpoint(endpoint: str, protocol: str) -> str:
    """Check an OTLP endpoint URL; for http/protobuf append ``/v1/traces`` when it is missing."""
    text = (endpoint or "").strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: it must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: no host")
    if protocol != "http/protobuf":
        return text
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _protocol_hint(url: str, protocol: str) -> str:
    port = urlsplit(url).port
    if protocol == "http/protobuf" and port == 4317:
        return " (port 4317 is usually OTLP/gRPC: try --protocol grpc)"
    if protocol == "grpc" and port == 4318:
        return " (port 4318 is usually OTLP/HTTP: try --protocol http/protobuf)"
    return ""


def _send(exporter: Any, spans: list[Any], url: str, protocol: str, batch_size: int) -> None:
    from opentelemetry.sdk.trace.export import SpanExportResult

    for offset in range(0, len(spans), batch_size):
        try:
            result = exporter.export(spans[offset:offset + batch_size])
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise ExportError(f"OTLP export to {url} ({protocol}) failed: {type(exc).__name__}: "
                              f"{first_line(str(exc))}") from None
        if result is not SpanExportResult.SUCCESS:
            raise ExportError(
                f"OTLP export to {url} ({protocol}) failed: the endpoint is unreachable or refused the spans"
                f"{_protocol_hint(url, protocol)}" + (f"; {offset} of {len(spans)} spans were sent" if offset else "")
            )


def export_run(
    engine: Any,
    run_id: str,
    endpoint: str,
    *,
    protocol: str | None = None,
    timeout: float = 10.0,
    content: bool = False,
    service_name: str = "cmbagent",
    batch_size: int = 512,
) -> dict[str, Any]:
    """Export a stored run over OTLP; returns ``{"spans", "message_events", "trace_ids", "endpoint", "protocol"}``.

    Raises :class:`ExportError` (or ValueError for a bad endpoint/protocol) when it does not go through.
    """
    from otel_cmbagent.exporters.otlp import make_otlp_exporter, otlp_protocol

    chosen = otlp_protocol(protocol)
    url = otlp_endpoint(endpoint, chosen)
    rows = store.run_events(engine, run_id)
    spans, message_events = spans_from_rows(rows, service_name=service_name, content=content)
    if not spans:
        raise ExportError(f"run {run_id} has no spans to export")
    exporter = make_otlp_exporter(chosen, url, timeout=timeout)
    try:
        _send(exporter, spans, url, chosen, batch_size)
    finally:
        try:
            exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass
    trace_ids = sorted({f"{span.context.trace_id:032x}" for span in spans})
    return {"spans": len(spans), "message_events": message_events, "trace_ids": trace_ids, "endpoint": url,
            "protocol": chosen}
