"""The child process of a code run: it gets the W3C context, and what it cost is measured.

A ``subprocess.Popen`` started while an ``execute_code`` span is current (``LocalCommandLineCodeExecutor``,
the legacy ``execute_code``) gets, in its own environment only - ``os.environ`` of the host, which
concurrent runs share, is never touched - ``TRACEPARENT``/``TRACESTATE`` (the span as parent), ``BAGGAGE``
and ``OTEL_RESOURCE_ATTRIBUTES`` with the run identity (``cmbagent.run_id`` ...), so a script that uses
OpenTelemetry itself shows up under that span. When the child is reaped, ``os.wait4`` gives that child's
own rusage (not ``RUSAGE_CHILDREN``, which mixes concurrent runs): CPU user/system seconds and peak RSS
are added to the span (summed over the run's children; peak RSS is the largest).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import urllib.parse
import weakref
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import semconv
from .context import current_identity
from .patching import PatchSet
from .utils import log_internal_error

# The environment variables of OpenTelemetry's "environment variables as context carriers".
TRACEPARENT, TRACESTATE, BAGGAGE = "TRACEPARENT", "TRACESTATE", "BAGGAGE"
RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
# ru_maxrss is in kilobytes on Linux, in bytes on macOS.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024

_tracecontext = TraceContextTextMapPropagator()
_baggage = W3CBaggagePropagator()
# The code span each child was started under (weak: a Popen that is never waited for goes away).
_code_spans: weakref.WeakKeyDictionary[subprocess.Popen, trace.Span] = weakref.WeakKeyDictionary()
_usage_lock = threading.Lock()
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
        _code_spans[instance] = span
    return result


def _try_wait(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``Popen._try_wait`` with ``os.wait4`` for the children of code runs: same result, plus their rusage."""
    span = _code_spans.get(instance)
    if span is None or not hasattr(os, "wait4"):
        return wrapped(*args, **kwargs)
    wait_flags = args[0] if args else kwargs["wait_flags"]
    try:
        pid, status, usage = os.wait4(instance.pid, wait_flags)
    except ChildProcessError:  # as the original: SIGCHLD ignored, the status is lost
        return (instance.pid, 0)
    if pid == instance.pid:
        _code_spans.pop(instance, None)
        _add_usage(span, usage)
    return (pid, status)


def _add_usage(span: trace.Span, usage: Any) -> None:
    """Add one child's CPU time and peak RSS to the code span (several blocks: CPU summed, RSS the peak)."""
    try:
        with _usage_lock:
            attributes = getattr(span, "attributes", None) or {}
            span.set_attributes(
                {
                    semconv.CODE_CPU_USER: round(attributes.get(semconv.CODE_CPU_USER, 0.0) + usage.ru_utime, 6),
                    semconv.CODE_CPU_SYSTEM: round(attributes.get(semconv.CODE_CPU_SYSTEM, 0.0) + usage.ru_stime, 6),
                    semconv.CODE_MAX_RSS: max(attributes.get(semconv.CODE_MAX_RSS, 0), usage.ru_maxrss * _RSS_UNIT),
                    semconv.CODE_PROCESS_COUNT: attributes.get(semconv.CODE_PROCESS_COUNT, 0) + 1,
                }
            )
    except Exception as exc:  # noqa: BLE001
        log_internal_error("code child usage", exc)


def instrument_code_children(patches: PatchSet) -> None:
    """Wrap ``subprocess.Popen.__init__`` (environment) and, where it exists, ``Popen._try_wait`` (rusage)."""
    if _ENV_INDEX is None:
        return
    patches.wrap(subprocess.Popen, "__init__", _popen_init)
    if "_try_wait" in vars(subprocess.Popen):  # POSIX, CPython 3.8-3.14; elsewhere: no usage figures
        patches.wrap(subprocess.Popen, "_try_wait", _try_wait)
