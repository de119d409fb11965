"""The ``otel-cmbagent`` command (console script ``otel_cmbagent.apps.cli:main``)."""

from .commands import cli, main

__all__ = ["cli", "main"]
