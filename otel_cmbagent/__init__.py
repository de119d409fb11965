"""OpenTelemetry tracing for cmbagent's multi-agent runs on AG2 (classic ``autogen`` API).

    import otel_cmbagent as oc
    oc.instrument(tracer_provider=provider)   # provider has oc.SequencingSpanProcessor() first
    with oc.run(name="analysis"):
        user.initiate_chat(assistant, message="...")
"""

from .instrumentation import ag2x
from .instrumentation.instrumentor import AG2Instrumentor, instrument, uninstrument
from .pipeline.config import InstrumentationConfig
from .pipeline.context import RunIdentity, current_identity, propagate_context, run, step
from .pipeline.logs import LOG_FORMAT
from .pipeline.metrics import MetricsSpanProcessor
from .pipeline.processor import SequencingSpanProcessor
from .tracing import Tracing, setup_tracing
from .instrumentation.processes import carry
from .version import __version__

__all__ = [
    "AG2Instrumentor",
    "InstrumentationConfig",
    "LOG_FORMAT",
    "MetricsSpanProcessor",
    "RunIdentity",
    "SequencingSpanProcessor",
    "Tracing",
    "__version__",
    "ag2x",
    "carry",
    "current_identity",
    "instrument",
    "propagate_context",
    "run",
    "setup_tracing",
    "step",
    "uninstrument",
]
