"""Drop-in for cmbagent's ``cmbagent.execution.ag2_hooks``: the same calls, done by :class:`AG2Instrumentor`.

Every patch is class-level and exactly undoable (cmbagent's ``uninstall_ag2_hooks`` only logged).
"""

from __future__ import annotations

from typing import Any

from ..instrumentation.instrumentor import AG2Instrumentor
from ..pipeline.values import log_internal_error
from .pipeline import tracer_provider


def install_ag2_hooks(**options: Any) -> bool:
    """Trace AG2 (cmbagent's ``ag2_hooks.install_ag2_hooks``); idempotent: True, also when already installed."""
    instrumentor = AG2Instrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider(), **options)
    return instrumentor.is_instrumented_by_opentelemetry


def uninstall_ag2_hooks() -> None:
    """Undo ``install_ag2_hooks`` (every patched attribute restored exactly; cmbagent's only logged)."""
    instrumentor = AG2Instrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def patch_conversable_agent() -> bool:
    """cmbagent's ``patch_conversable_agent()``: agent turns and messages (part of ``install_ag2_hooks``)."""
    return install_ag2_hooks()


def patch_group_chat() -> bool:
    """cmbagent's ``patch_group_chat()``: speaker selection as handoffs (part of ``install_ag2_hooks``)."""
    return install_ag2_hooks()


def patch_code_executor(executor_class: type | None = None) -> bool:
    """Trace an executor class's ``execute_code_blocks``; no argument: ``LocalCommandLineCodeExecutor`` (as cmbagent).

    True when that class is traced (now or already).
    """
    if not install_ag2_hooks():
        return False
    if executor_class is None:
        try:
            from autogen.coding import LocalCommandLineCodeExecutor as executor_class
        except ImportError as exc:
            log_internal_error("patch_code_executor", exc)
            return False
    instrumentor = AG2Instrumentor()
    if instrumentor.patch_code_executor(executor_class):
        return True
    return any(owner is executor_class and name == "execute_code_blocks" for owner, name, _ in instrumentor.patched_attributes)
