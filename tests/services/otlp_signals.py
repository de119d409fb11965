"""Decoding of OTLP metrics and logs export requests into plain dicts (for the receivers in otlp_receiver.py).

A metric point: ``name``, ``unit``, ``type`` ("sum", "histogram", "gauge"), ``attributes``, ``resource``,
``scope``, ``time_unix_nano``; a sum/gauge has ``value`` (and a sum ``is_monotonic``), a histogram ``count``,
``sum``, ``bucket_counts`` and ``explicit_bounds``. A log record: ``body``, ``severity_text``,
``severity_number``, ``trace_id`` / ``span_id`` (hex, "" when unset), ``attributes``, ``resource``, ``scope``,
``time_unix_nano``.
"""

from __future__ import annotations

from typing import Any, Callable

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2


def _point(metric: Any, kind: str, point: Any) -> dict[str, Any]:
    from .otlp_receiver import _attributes

    decoded: dict[str, Any] = {"name": metric.name, "unit": metric.unit, "type": kind,
                               "attributes": _attributes(point.attributes), "time_unix_nano": point.time_unix_nano}
    if kind == "histogram":
        decoded.update(count=point.count, sum=point.sum, bucket_counts=list(point.bucket_counts),
                       explicit_bounds=list(point.explicit_bounds))
    else:
        decoded["value"] = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
        if kind == "sum":
            decoded["is_monotonic"] = metric.sum.is_monotonic
    return decoded


def _walk(resources: Any, scopes: str, items: Callable[[Any], Any]) -> Any:
    """(resource attributes, scope name, item) for every item of an export request's resource/scope lists."""
    from .otlp_receiver import _attributes

    for resource_items in resources:
        resource = _attributes(resource_items.resource.attributes)
        for scope_items in getattr(resource_items, scopes):
            for item in items(scope_items):
                yield resource, scope_items.scope.name, item


def _metric_points(scope_metrics: Any) -> Any:
    for metric in scope_metrics.metrics:
        kind = metric.WhichOneof("data")
        for point in getattr(metric, kind).data_points:
            yield metric, kind, point


def decode_metrics(request: "metrics_service_pb2.ExportMetricsServiceRequest") -> list[dict[str, Any]]:
    return [{**_point(metric, kind, point), "resource": resource, "scope": scope}
            for resource, scope, (metric, kind, point) in _walk(request.resource_metrics, "scope_metrics",
                                                                _metric_points)]


def decode_logs(request: "logs_service_pb2.ExportLogsServiceRequest") -> list[dict[str, Any]]:
    from .otlp_receiver import _any_value, _attributes

    return [{
        "body": _any_value(record.body), "severity_text": record.severity_text,
        "severity_number": record.severity_number, "trace_id": record.trace_id.hex(),
        "span_id": record.span_id.hex(), "attributes": _attributes(record.attributes),
        "resource": resource, "scope": scope, "time_unix_nano": record.time_unix_nano,
    } for resource, scope, record in _walk(request.resource_logs, "scope_logs", lambda s: s.log_records)]


# path -> (request class, response class, decoder, the receiver's list it fills)
SIGNALS: dict[str, tuple[Any, Any, Callable[[Any], list[dict[str, Any]]], str]] = {
    "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest,
                    metrics_service_pb2.ExportMetricsServiceResponse, decode_metrics, "_metrics"),
    "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest,
                 logs_service_pb2.ExportLogsServiceResponse, decode_logs, "_logs"),
}


def latest_points(points: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The newest point of each series (attribute set) of metric ``name``: with cumulative temporality
    (the SDK's default), the totals."""
    latest: dict[tuple, dict[str, Any]] = {}
    for point in points:
        if point["name"] == name:
            key = tuple(sorted((k, repr(v)) for k, v in point["attributes"].items()))
            if key not in latest or point["time_unix_nano"] >= latest[key]["time_unix_nano"]:
                latest[key] = point
    return list(latest.values())
