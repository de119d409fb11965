"""The demo: a traced cmbagent-style research run with real AG2 agents (``otel-cmbagent demo``)."""

from .workflow import *  # noqa: F401,F403
from .workflow import __all__  # noqa: F401
