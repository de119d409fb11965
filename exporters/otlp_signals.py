"""Metrics and logs over OTLP (or the console): the SDK's providers, readers and exporters, configured from
the standard ``OTEL_*`` variables, plus the logging handler that feeds the logger provider.

All of it is the OpenTelemetry core release train (``opentelemetry-sdk``, ``opentelemetry-exporter-otlp``);
the SDK's own machinery honours ``OTEL_METRIC_EXPORT_INTERVAL``/``_TIMEOUT``, ``OTEL_BLRP_*``,
``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` and the endpoint/header/timeout variables.
"""

from __future__ import annotations

import importlib
import logging
import os
import uuid
import warnings
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, Resource

from otel_cmbagent.pipeline.logs import ScrubbingFormatter

from .otlp import otlp_protocol

_logger = logging.getLogger("otel_cmbagent.exporters")
_SIGNALS = ("METRICS", "LOGS")
_EXPORTERS = ("otlp", "console")
# Records of the SDK and its exporters are not sent through the pipeline they report on (no feedback loop).
_OWN_LOGGERS = ("opentelemetry",)
_HANDLER_MARK = "_otel_cmbagent_handler"


def _exporter_names(signal: str) -> list[str]:
    value = os.environ.get(f"OTEL_{signal}_EXPORTER", "")
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def signal_configured(signal: str) -> bool:
    """Whether the standard variables ask for ``signal`` ("METRICS" or "LOGS") to be exported.

    ``OTEL_{signal}_EXPORTER`` naming ``otlp``/``console`` turns it on and ``none`` off; otherwise an OTLP
    endpoint for the signal does (for metrics also the generic ``OTEL_EXPORTER_OTLP_ENDPOINT``; logs carry
    whatever the app logs, so they are never sent only because traces are)."""
    if signal not in _SIGNALS:
        raise ValueError(f"signal must be one of {_SIGNALS}, not {signal!r}")
    names = _exporter_names(signal)
    if "none" in names:
        return False
    if any(name in _EXPORTERS for name in names):
        return True
    if os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"):
        return True
    return signal == "METRICS" and bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _chosen_exporters(signal: str) -> list[str]:
    chosen = []
    for name in _exporter_names(signal) or ["otlp"]:
        if name in _EXPORTERS:
            chosen.append(name)
        elif name != "none":
            _logger.warning("otel-cmbagent: OTEL_%s_EXPORTER=%r is not supported (use otlp, console or none); "
                            "ignored", signal, name)
    return chosen or ["otlp"]


def _protocol(signal: str) -> str:
    return otlp_protocol(os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
                         or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")


# Where each signal's exporters live: console, OTLP/gRPC, OTLP/HTTP (module, class).
_EXPORTER_CLASSES = {
    "METRICS": (("opentelemetry.sdk.metrics.export", "ConsoleMetricExporter"),
                ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter"),
                ("opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter")),
    "LOGS": (("opentelemetry.sdk._logs.export", "ConsoleLogExporter"),
             ("opentelemetry.exporter.otlp.proto.grpc._log_exporter", "OTLPLogExporter"),
             ("opentelemetry.exporter.otlp.proto.http._log_exporter", "OTLPLogExporter")),
}


def _exporter(signal: str, name: str) -> Any:
    """A new exporter of ``signal`` for ``name`` ("console" or "otlp", over the configured protocol)."""
    console, grpc, http = _EXPORTER_CLASSES[signal]
    module, cls = console if name == "console" else grpc if _protocol(signal) == "grpc" else http
    return getattr(importlib.import_module(module), cls)()


class _ThisProcessOnly(MetricExporter):
    """An exporter that exports only in the process that made it. A forked child's copy of the parent's
    MeterProvider holds the parent's points so far (the SDK copies them and restarts the reader's thread):
    exported from the child, under the child's ``service.instance.id``, they would be counted twice."""

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(preferred_temporality=getattr(inner, "_preferred_temporality", None),
                         preferred_aggregation=getattr(inner, "_preferred_aggregation", None))
        self.inner = inner
        self._pid = os.getpid()

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        if os.getpid() != self._pid:
            return MetricExportResult.SUCCESS
        return self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis) if os.getpid() == self._pid else True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if os.getpid() == self._pid:
            self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def this_process(resource: Resource) -> Resource:
    """``resource`` with this process's ``service.instance.id`` (the SDK's own since 1.45, else a new one):
    each process, forked children included, exports its own series."""
    detected = Resource.create({}).attributes.get(SERVICE_INSTANCE_ID)
    return resource.merge(Resource({SERVICE_INSTANCE_ID: detected or str(uuid.uuid4())}))


def meter_provider(resource: Resource) -> Any:
    """A MeterProvider with one periodic reader per exporter ``OTEL_METRICS_EXPORTER`` names (default OTLP)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    readers = [PeriodicExportingMetricReader(_ThisProcessOnly(_exporter("METRICS", name)))
               for name in _chosen_exporters("METRICS")]
    return MeterProvider(metric_readers=readers, resource=this_process(resource))


def logger_provider(resource: Resource) -> Any:
    """A LoggerProvider with a batch processor per exporter ``OTEL_LOGS_EXPORTER`` names (default OTLP)."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    provider = LoggerProvider(resource=resource)
    for name in _chosen_exporters("LOGS"):
        provider.add_log_record_processor(BatchLogRecordProcessor(_exporter("LOGS", name)))
    return provider


def _handler_class() -> Any:
    """The SDK's LoggingHandler (deprecated there in favour of contrib's, which is used when installed)."""
    try:
        from opentelemetry.instrumentation.logging.handler import LoggingHandler  # type: ignore[import-not-found]

        return LoggingHandler
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from opentelemetry.sdk._logs import LoggingHandler
    return LoggingHandler


def _not_own(record: logging.LogRecord) -> bool:
    return not record.name.startswith(_OWN_LOGGERS)


def attach_log_handler(provider: Any, logger: logging.Logger | None = None) -> logging.Handler:
    """Send ``logger``'s (default: the root logger's) records to ``provider``; any handler an earlier setup
    attached there is removed first, so repeated setups never duplicate records."""
    target = logger if logger is not None else logging.getLogger()
    detach_log_handlers(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = _handler_class()(logger_provider=provider)
    handler.setFormatter(ScrubbingFormatter())  # the body: the message, secrets removed
    handler.addFilter(_not_own)
    setattr(handler, _HANDLER_MARK, True)
    target.addHandler(handler)
    return handler


def detach_log_handlers(logger: logging.Logger | None = None, only: logging.Handler | None = None) -> None:
    """Remove the handler(s) ``attach_log_handler`` put on ``logger`` (only ``only`` when given)."""
    target = logger if logger is not None else logging.getLogger()
    for handler in list(target.handlers):
        if getattr(handler, _HANDLER_MARK, False) and (only is None or handler is only):
            target.removeHandler(handler)
