"""The ``otel-cmbagent`` command (console script ``otel_cmbagent.apps.cli:main``).

``commands`` (the click commands, thin), ``render`` and ``timeline`` (what they draw), ``terminal`` (console,
terminal-safe text, the shared formats), ``export`` (OTLP backfill of a stored run), ``demo_command`` (what
``demo`` adds around the demo), ``main`` (the entry point: one-line errors).
"""

from .commands import cli
from .main import main

__all__ = ["cli", "main"]
