"""The guarded span lifecycle every wrapper shares.

A wrapper describes an operation with two callbacks - ``start`` (name and
attributes, from the call's arguments) and ``finish`` (attributes from the
result). This module runs them so that an error in either is logged once and
swallowed, the wrapped call always runs exactly once, and a user exception
passes through as the same object after being recorded on the span.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from ..pipeline import semconv
from ..pipeline.config import InstrumentationConfig
from ..pipeline.errors import record_exception
from ..pipeline.listeners import notify_message
from ..pipeline.openinference import add_start_keys, mark_ok
from ..pipeline.processor import next_event_order
from ..pipeline.values import log_internal_error
from .contrib import is_instrumentation_enabled


class SpanStart(NamedTuple):
    name: str
    attributes: dict[str, Any]
    kind: SpanKind = SpanKind.INTERNAL
    # Extra context values for the span's children (usage totals, conversation id).
    context_values: tuple[tuple[str, Any], ...] = ()


StartFn = Callable[[Any, tuple, dict], "SpanStart | None"]
FinishFn = Callable[[trace.Span, Any, tuple, dict, Any], None]


@dataclass
class Runtime:
    """What the wrappers of one ``instrument()`` share."""

    tracer: trace.Tracer
    config: InstrumentationConfig


class _Open(NamedTuple):
    span: trace.Span
    token: object


def _open(runtime: Runtime, start: StartFn, instance: Any, args: tuple, kwargs: dict) -> _Open | None:
    try:
        spec = start(instance, args, kwargs)
        if spec is None:
            return None
        span = runtime.tracer.start_span(spec.name, kind=spec.kind, attributes=add_start_keys(spec.attributes))
        ctx = trace.set_span_in_context(span)
        for key, value in spec.context_values:
            ctx = otel_context.set_value(key, value, ctx)
        return _Open(span, otel_context.attach(ctx))
    except Exception as exc:  # noqa: BLE001
        log_internal_error(f"start of {getattr(start, '__name__', 'span')}", exc)
        return None


def _close(
    opened: _Open,
    finish: FinishFn | None,
    instance: Any,
    args: tuple,
    kwargs: dict,
    result: Any = None,
    exc: BaseException | None = None,
) -> None:
    try:
        if exc is not None:
            record_exception(opened.span, exc)
        else:
            if finish is not None:
                finish(opened.span, instance, args, kwargs, result)
            mark_ok(opened.span)
    except Exception as error:  # noqa: BLE001
        log_internal_error(f"end of {getattr(finish, '__name__', 'span')}", error)
    try:
        opened.span.end()
    except Exception as error:  # noqa: BLE001
        log_internal_error("span.end", error)
    try:
        otel_context.detach(opened.token)
    except Exception as error:  # noqa: BLE001
        log_internal_error("context.detach", error)


def traced(runtime: Runtime, start: StartFn, finish: FinishFn | None, original: Any) -> Callable[..., Any]:
    """A wrapt wrapper that runs ``original`` inside a span (async twin for coroutine functions)."""
    if inspect.iscoroutinefunction(original):

        async def async_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
            if not is_instrumentation_enabled():
                return await wrapped(*args, **kwargs)
            opened = _open(runtime, start, instance, args, kwargs)
            if opened is None:
                return await wrapped(*args, **kwargs)
            try:
                result = await wrapped(*args, **kwargs)
            except BaseException as exc:
                _close(opened, finish, instance, args, kwargs, exc=exc)
                raise
            _close(opened, finish, instance, args, kwargs, result)
            return result

        return async_wrapper

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        opened = _open(runtime, start, instance, args, kwargs)
        if opened is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _close(opened, finish, instance, args, kwargs, exc=exc)
            raise
        _close(opened, finish, instance, args, kwargs, result)
        return result

    return wrapper


def before_call(hook: Callable[[Any, tuple, dict], None], original: Any) -> Callable[..., Any]:
    """A wrapt wrapper that runs ``hook`` (guarded) before ``original``, without a span of its own.

    For a coroutine function too the hook runs at call time and the original's own coroutine is returned
    (no coroutine of ours around it): a caller that never awaits it - cmbagent's fork replays history in
    ``GroupChatManager.a_resume`` with ``agent.a_send(...)`` un-awaited - still has the call recorded, and
    Python's "never awaited" warning names AG2's method, not this wrapper.
    """

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if is_instrumentation_enabled():
            try:
                hook(instance, args, kwargs)
            except Exception as exc:  # noqa: BLE001
                log_internal_error(getattr(hook, "__name__", "hook"), exc)
        return wrapped(*args, **kwargs)

    return wrapper


def add_ordered_event(span: trace.Span, name: str, attributes: dict[str, Any]) -> None:
    """A span event that takes the next order of the run and sits one level below its span."""
    order = next_event_order(span)
    if order is not None:
        attributes[semconv.EXECUTION_ORDER] = order
    span_attributes = getattr(span, "attributes", None)
    depth = span_attributes.get(semconv.DEPTH) if span_attributes is not None else None
    if isinstance(depth, int):
        attributes[semconv.DEPTH] = depth + 1
    timestamp = time.time_ns()
    span.add_event(name, attributes, timestamp=timestamp)
    notify_message(span, attributes, timestamp)


def argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A call argument given either by position (``index``, not counting self) or by keyword."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    return default


def agent_name(agent: Any) -> str:
    name = getattr(agent, "name", None)
    return name if isinstance(name, str) else type(agent).__name__
