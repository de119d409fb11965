"""Sinks for otel-cmbagent spans (installed as ``otel_cmbagent.exporters``)."""

__all__: list[str] = []
