"""Threads inherit the caller's OpenTelemetry context (parallel DAG steps stay in their run).

``opentelemetry-instrumentation-threading`` does this when it is installed (its singleton keeps a
zero-code run from wrapping twice). It is optional - contrib releases lag the SDK and pin an exact
API - so without it an equivalent built-in does the same: the context current at ``Thread.start()``
or ``ThreadPoolExecutor.submit()`` is attached in the thread, and ``uninstrument`` puts the exact
original attributes back.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Callable

from opentelemetry import context as otel_context

from ..pipeline.context import propagate_context
from .patching import PatchSet

_CONTEXT_ATTRIBUTE = "_otel_cmbagent_context"


def _capture_at_start(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    setattr(instance, _CONTEXT_ATTRIBUTE, otel_context.get_current())
    return wrapped(*args, **kwargs)


def _attach_in_run(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    captured = getattr(instance, _CONTEXT_ATTRIBUTE, None)
    if captured is None:
        return wrapped(*args, **kwargs)
    token = otel_context.attach(captured)
    try:
        return wrapped(*args, **kwargs)
    finally:
        otel_context.detach(token)


def _submit_in_context(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not args:
        return wrapped(*args, **kwargs)
    return wrapped(propagate_context(args[0]), *args[1:], **kwargs)


class BuiltinThreadContext:
    """The contrib instrumentation's patch points: ``Thread.start``/``run``, ``Timer.run``, ``ThreadPoolExecutor.submit``."""

    def __init__(self) -> None:
        self._patches = PatchSet()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self._patches.patched)

    def instrument(self) -> bool:
        """Patch (False if already patched: never twice)."""
        with self._lock:
            if self.active:
                return False
            self._patches.wrap(threading.Thread, "start", _capture_at_start)
            self._patches.wrap(threading.Thread, "run", _attach_in_run)
            self._patches.wrap(threading.Timer, "run", _attach_in_run)
            self._patches.wrap(futures.ThreadPoolExecutor, "submit", _submit_in_context)
            return True

    def uninstrument(self) -> None:
        with self._lock:
            self._patches.restore()


builtin_thread_context = BuiltinThreadContext()


def propagate_thread_context() -> Callable[[], None] | None:
    """Turn on context propagation into threads; returns how to turn it off (None: it was already on)."""
    try:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor
    except ImportError:
        return builtin_thread_context.uninstrument if builtin_thread_context.instrument() else None
    instrumentor = ThreadingInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return None
    instrumentor.instrument()
    return instrumentor.uninstrument
