"""The child process of a code run: it gets the W3C context, and what it cost is measured.

A ``subprocess.Popen`` started while an ``execute_code`` span is current (``LocalCommandLineCodeExecutor``,
the legacy ``execute_code``) gets, in its own environment only - ``os.environ`` of the host, which
concurrent runs share, is never touched - ``TRACEPARENT``/``TRACESTATE`` (the span as parent), ``BAGGAGE``
and ``OTEL_RESOURCE_ATTRIBUTES`` with the run identity (``cmbagent.run_id`` ...), so a script that uses
OpenTelemetry itself shows up under that span. When the child is reaped, ``os.wait4`` gives that child's
own rusage (not ``RUSAGE_CHILDREN``, which mixes concurrent runs): its CPU user/system seconds are added to
the span, and its own peak RSS (see :func:`own_peak_rss`; summed CPU and the largest peak over the run's
children).
"""

from __future__ import annotations

import inspect
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.parse
import weakref
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..pipeline import semconv
from ..pipeline.context import current_identity
from .patching import PatchSet
from ..pipeline.values import log_internal_error

# The environment variables of OpenTelemetry's "environment variables as context carriers".
TRACEPARENT, TRACESTATE, BAGGAGE = "TRACEPARENT", "TRACESTATE", "BAGGAGE"
RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
# ru_maxrss is in kilobytes on Linux, in bytes on macOS.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024

_tracecontext = TraceContextTextMapPropagator()
_baggage = W3CBaggagePropagator()
_usage_lock = threading.Lock()
_MAX_SAMPLE_SECONDS = 0.02
_PROC_STATUS = os.path.exists(f"/proc/{os.getpid()}/status")
# Where ``env`` sits among Popen's positional arguments (after ``self``); None: no such parameter.
_POPEN_PARAMETERS = list(inspect.signature(subprocess.Popen.__init__).parameters)
_ENV_INDEX = _POPEN_PARAMETERS.index("env") - 1 if "env" in _POPEN_PARAMETERS else None


def _code_span() -> trace.Span | None:
    span = trace.get_current_span()
    attributes = getattr(span, "attributes", None)
    if attributes is None or attributes.get(semconv.EVENT_TYPE) != semconv.EVENT_CODE_EXEC:
        return None
    return span if span.get_span_context().is_valid else None


def child_environment(base: Any) -> dict[Any, Any]:
    """``base`` (an env mapping, or None for this process's) plus the current span's W3C context and the
    run identity: the environment of a child process started here."""
    env = dict(os.environ if base is None else base)
    identity = current_identity()
    ids = {key: value for key, value in (identity.attributes.items() if identity is not None else ())}
    ctx = None
    for key, value in ids.items():
        ctx = baggage.set_baggage(key, value, ctx)
    headers: dict[str, str] = {}
    _tracecontext.inject(headers)
    _baggage.inject(headers, context=ctx)
    extra = {name.upper(): value for name, value in headers.items()}
    if ids:
        own = ",".join(f"{key}={urllib.parse.quote(value, safe='')}" for key, value in ids.items())
        inherited = _get(env, RESOURCE_ATTRIBUTES)
        extra[RESOURCE_ATTRIBUTES] = f"{inherited},{own}" if inherited else own
    for name in (TRACESTATE, BAGGAGE):
        if name not in extra:
            _pop(env, name)  # an outer process's values do not belong to this span
    for name, value in extra.items():
        _set(env, name, value)
    return env


def _bytes_keys(env: dict[Any, Any]) -> bool:
    return any(isinstance(key, bytes) for key in env)


def _get(env: dict[Any, Any], name: str) -> str | None:
    value = env.get(name.encode() if _bytes_keys(env) else name)
    return value.decode() if isinstance(value, bytes) else value


def _set(env: dict[Any, Any], name: str, value: str) -> None:
    if _bytes_keys(env):
        env[name.encode()] = value.encode()
    else:
        env[name] = value


def _pop(env: dict[Any, Any], name: str) -> None:
    env.pop(name.encode() if _bytes_keys(env) else name, None)


class _Child:
    """A code run's child process: the span it belongs to, and its peak RSS as a thread reads it from ``/proc``
    while the child runs (VmHWM: its own high-water mark, monotonic; gone once the child has exited)."""

    __slots__ = ("span", "sampled_peak", "__weakref__")

    def __init__(self, span: trace.Span, pid: int) -> None:
        self.span = span
        self.sampled_peak: int | None = None
        if _PROC_STATUS:
            threading.Thread(target=self._sample_until_exit, args=(pid,), name="otel-cmbagent-rss", daemon=True).start()

    def _sample_until_exit(self, pid: int) -> None:
        delay = 0.001
        while self._sample(pid):
            time.sleep(delay)
            delay = min(delay * 2, _MAX_SAMPLE_SECONDS)

    def _sample(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"VmHWM:"):
                        self.sampled_peak = int(line.split()[1]) * 1024
                        return True
        except (OSError, ValueError, IndexError):
            pass
        return False  # exited (a zombie has no memory lines) or reaped


# Children of code runs (weak: a Popen that is never waited for goes away with its entry).
_children: weakref.WeakKeyDictionary[subprocess.Popen, _Child] = weakref.WeakKeyDictionary()


def _popen_init(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    span = None
    try:
        span = _code_span()
        if span is not None:
            if "env" in kwargs:
                kwargs["env"] = child_environment(kwargs["env"])
            elif len(args) > _ENV_INDEX:  # type: ignore[operator]
                index: int = _ENV_INDEX  # type: ignore[assignment]
                args = (*args[:index], child_environment(args[index]), *args[index + 1 :])
            else:
                kwargs["env"] = child_environment(None)
    except Exception as exc:  # noqa: BLE001 - the code runs regardless
        log_internal_error("code child environment", exc)
    result = wrapped(*args, **kwargs)
    if span is not None:
        _children[instance] = _Child(span, instance.pid)
    return result


def _try_wait(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``Popen._try_wait`` for the children of code runs: the same result, from ``os.wait4`` (that child's
    own rusage)."""
    child = _children.get(instance)
    if child is None or not hasattr(os, "wait4"):
        return wrapped(*args, **kwargs)
    try:
        pid, status, usage = os.wait4(instance.pid, args[0] if args else kwargs["wait_flags"])
    except ChildProcessError:  # as the original: SIGCHLD ignored, the status is lost
        return (instance.pid, 0)
    if pid == instance.pid:
        _children.pop(instance, None)
        _add_usage(child, usage)
    return (pid, status)


def own_peak_rss(child_maxrss: int, sampled: int | None) -> int | None:
    """The child's own peak RSS in bytes.

    On Linux a child's ``ru_maxrss`` is at least the peak RSS of the process that started it (``exec``
    records the high-water mark of the memory it replaces - the parent's, with vfork/posix_spawn or fork),
    so it is the child's own only when it exceeds this process's peak; otherwise the VmHWM read from
    ``/proc`` while the child ran is (it misses only growth in its last 20 ms; None without ``/proc``).
    """
    if child_maxrss > resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT:
        return child_maxrss
    return sampled


def _add_usage(child: _Child, usage: Any) -> None:
    """Add one child's CPU time and peak RSS to the code span (several blocks: CPU summed, RSS the peak)."""
    try:
        peak = own_peak_rss(usage.ru_maxrss * _RSS_UNIT, child.sampled_peak)
        with _usage_lock:
            attributes = getattr(child.span, "attributes", None) or {}
            values = {
                semconv.CODE_CPU_USER: round(attributes.get(semconv.CODE_CPU_USER, 0.0) + usage.ru_utime, 6),
                semconv.CODE_CPU_SYSTEM: round(attributes.get(semconv.CODE_CPU_SYSTEM, 0.0) + usage.ru_stime, 6),
                semconv.CODE_PROCESS_COUNT: attributes.get(semconv.CODE_PROCESS_COUNT, 0) + 1,
            }
            if peak is not None:
                values[semconv.CODE_MAX_RSS] = max(attributes.get(semconv.CODE_MAX_RSS, 0), peak)
            child.span.set_attributes(values)
    except Exception as exc:  # noqa: BLE001
        log_internal_error("code child usage", exc)


def instrument_code_children(patches: PatchSet) -> None:
    """Wrap ``subprocess.Popen.__init__`` (environment) and, where it exists, ``Popen._try_wait`` (usage)."""
    if _ENV_INDEX is None:
        return
    patches.wrap(subprocess.Popen, "__init__", _popen_init)
    if "_try_wait" in vars(subprocess.Popen):  # POSIX, CPython 3.8-3.14; elsewhere: no usage figures
        patches.wrap(subprocess.Popen, "_try_wait", _try_wait)
