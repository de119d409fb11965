"""The demo: a traced cmbagent-style research run with real AG2 agents (``otel-cmbagent demo``).

``workflow`` (run_demo: the DAG of steps inside one ``oc.run``), ``script`` (what the scripted LLM answers,
the code the agents write, the tools), ``live_view`` (one console line per event while it runs).
"""

from .live_view import LiveView
from .script import ConvergenceError, code_result, scripted_reply
from .workflow import DEMO_DIR_NAME, RUN_NAME, DemoResult, db_work_dir, run_demo

__all__ = [
    "DEMO_DIR_NAME",
    "RUN_NAME",
    "ConvergenceError",
    "DemoResult",
    "LiveView",
    "code_result",
    "db_work_dir",
    "run_demo",
    "scripted_reply",
]
