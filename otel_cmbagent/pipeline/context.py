"""Run and step scopes, carried by OpenTelemetry's own (contextvars-based) context.

A run's identity rides the OTel context, so it follows the current span into
asyncio tasks, into threads started through ``propagate_context`` or the
threading instrumentation, and never leaks into a concurrent run.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import threading
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from ..version import __version__
from . import semconv
from .config import DEFAULT_MAX_VALUE_LENGTH
from .errors import record_exception
from .openinference import add_start_keys, mark_ok
from .values import clean_text, log_internal_error, safe_str, safe_text

_IDENTITY_KEY = otel_context.create_key("cmbagent.identity")
_USAGE_KEY = otel_context.create_key("cmbagent.usage")
_CONVERSATION_KEY = otel_context.create_key("cmbagent.conversation_id")
_SCOPES_KEY = otel_context.create_key("cmbagent.scope_spans")

F = TypeVar("F", bound=Callable[..., Any])


# ``next()`` on an ``itertools.count`` is atomic under the GIL; a free-threaded build gets a lock.
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


class OrderSequence:
    """The gapless ``execution_order`` counter of one run (or one trace when there is no run).

    Only the increment is serialised: measured here, a lock around the whole processor
    hook costs 5-17 µs per span under thread contention, and even a lock around the
    increment alone adds up with 8 threads; ``itertools.count`` needs none under the GIL.
    When work of the run leaves the process, :meth:`share` hands the counting over to a
    counter every process of the run uses (:mod:`otel_cmbagent.pipeline.order_source`).
    """

    __slots__ = ("_counter", "_last", "_lock", "_boundary", "shared", "open_spans", "__weakref__")

    def __init__(self) -> None:
        self._counter: Any = itertools.count(1)
        self._last = 0
        self._lock = None if _GIL else threading.Lock()
        self._boundary = 0  # the first number of the shared counter (set by share)
        self.shared: Any = None  # the cross-process counter, once work of the run left the process
        self.open_spans = 0

    def next(self) -> int:
        counter = self._counter
        if self._lock is None:
            value = next(counter)
        else:
            with self._lock:
                counter = self._counter
                value = next(counter)
        if counter is not self._counter:  # handed over to the shared counter while we took this one
            value = self._after_handover(value)
        self._last = value  # informational (stats); orders come from the counter
        return value

    def _after_handover(self, value: int) -> int:
        shared = self.shared
        if shared is None:  # continue_after replaced the in-process counter: its numbers are as good
            return value
        with shared.lock:  # share() holds it until the boundary is known
            boundary = self._boundary
        return value if value < boundary else next(shared)

    def share(self, counter: Any) -> None:
        """From now on take numbers from ``counter``, after every number this process has handed out.

        A thread that loaded the in-process counter just before the swap and takes a number from it
        afterwards sees the swap and takes a shared number instead (numbers below the boundary it keeps).
        """
        with counter.lock, self._lock or contextlib.nullcontext():  # shared takers wait for the boundary
            if self.shared is not None:
                return
            old = self._counter
            self.shared = counter
            self._counter = counter
            boundary = next(old)  # no number >= this was handed out before the swap
            counter.start_after_locked(boundary - 1)
            self._boundary = boundary

    @property
    def last(self) -> int:
        return self._last

    def continue_after(self, value: int) -> None:
        """Go on from ``value`` (a run resumed by a new captor or process: its orders stay unique)."""
        if self.shared is not None:
            self.shared.continue_after(value)
        elif value > self._last:
            self._counter = itertools.count(value + 1)
        self._last = max(self._last, value)


# One sequence per live run id: two scopes that share a run id share one order.
# Weak values: a run's counter is released as soon as no context refers to it.
_run_sequences: weakref.WeakValueDictionary[str, OrderSequence] = weakref.WeakValueDictionary()
_run_sequences_lock = threading.Lock()


def sequence_for_run(run_id: str) -> OrderSequence:
    """The live order counter of ``run_id`` (created on first use)."""
    with _run_sequences_lock:
        sequence = _run_sequences.get(run_id)
        if sequence is None:
            sequence = OrderSequence()
            _run_sequences[run_id] = sequence
        return sequence


def live_run_count() -> int:
    """How many run counters are alive (for memory checks)."""
    return len(_run_sequences)


@dataclass(frozen=True)
class RunIdentity:
    """What every span started inside a run/step inherits."""

    run_id: str | None
    session_id: str | None
    node_id: str | None = None
    step_id: str | None = None
    sequence: OrderSequence | None = None

    @functools.cached_property
    def attributes(self) -> dict[str, str]:
        """The identity attributes every span of this scope carries (computed once per scope)."""
        values = {
            semconv.RUN_ID: self.run_id,
            semconv.SESSION_ID: self.session_id,
            semconv.NODE_ID: self.node_id,
            semconv.STEP_ID: self.step_id,
        }
        return {key: value for key, value in values.items() if value is not None}

    @functools.cached_property
    def span_attributes(self) -> dict[str, str]:
        """The identity plus OpenInference's ``session.id`` (Phoenix files a trace under the first one it sees)."""
        if self.session_id is None:
            return self.attributes
        return {**self.attributes, semconv.OI_SESSION_ID: self.session_id}


def current_identity(ctx: otel_context.Context | None = None) -> RunIdentity | None:
    return otel_context.get_value(_IDENTITY_KEY, ctx)  # type: ignore[return-value]


@dataclass
class UsageTotals:
    """Tokens and cost of the LLM calls under one conversation or run (per call, never cumulative)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    llm_calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, input_tokens: int, output_tokens: int, cost: float) -> None:
        with self._lock:
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
            self.cost += cost
            self.llm_calls += 1

    def as_attributes(self) -> dict[str, Any]:
        if not self.llm_calls:
            return {}
        return {
            semconv.GEN_AI_USAGE_INPUT_TOKENS: self.input_tokens,
            semconv.GEN_AI_USAGE_OUTPUT_TOKENS: self.output_tokens,
            semconv.GEN_AI_USAGE_COST: self.cost,
        }


def usage_chain(ctx: otel_context.Context | None = None) -> tuple[UsageTotals, ...]:
    return otel_context.get_value(_USAGE_KEY, ctx) or ()  # type: ignore[return-value]


def with_new_usage(values: tuple[tuple[str, Any], ...] = ()) -> tuple[UsageTotals, tuple[tuple[str, Any], ...]]:
    totals = UsageTotals()
    return totals, values + ((_USAGE_KEY, (totals, *usage_chain())),)


def current_conversation_id() -> str | None:
    return otel_context.get_value(_CONVERSATION_KEY)  # type: ignore[return-value]


def top_level_scopes() -> tuple[trace.Span, ...]:
    """The run/step spans around the current span when it is one of them (a top-level conversation's
    enclosing scopes, outermost first), else ``()``: what a run root's input/output are taken from."""
    scopes: tuple[trace.Span, ...] = otel_context.get_value(_SCOPES_KEY) or ()  # type: ignore[assignment]
    return scopes if scopes and scopes[-1] is trace.get_current_span() else ()


def conversation_values(conversation_id: str) -> tuple[tuple[str, Any], ...]:
    return ((_CONVERSATION_KEY, conversation_id),)


class _TracerSource:
    """The tracer provider that ``run``/``step`` use: the instrumented one, else the global one."""

    provider: trace.TracerProvider | None = None
    _cached: tuple[trace.TracerProvider, trace.Tracer] | None = None

    @classmethod
    def tracer(cls) -> trace.Tracer:
        provider = cls.provider or trace.get_tracer_provider()
        cached = cls._cached
        # Compare the provider object itself: an id() can be reused by a new provider.
        if cached is not None and cached[0] is provider:
            return cached[1]
        tracer = trace.get_tracer("otel_cmbagent", __version__, tracer_provider=provider)
        cls._cached = (provider, tracer)
        return tracer


def _new_id() -> str:
    return str(uuid.uuid4())


def _text(value: Any) -> str:
    """A user-given id or name as recordable text: never raises (a failing ``__str__`` gives a marked
    placeholder, logged once), storable and scrubbed."""
    return clean_text(value if isinstance(value, str) else safe_str(value), DEFAULT_MAX_VALUE_LENGTH)


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


_PLAIN = (bool, int, float)


def _attribute(value: Any) -> Any:
    """A user-given attribute value as a valid OTel attribute: numbers and bools as they are, strings
    (and lists of them) cleaned, anything else as scrubbed JSON/repr text instead of being dropped."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, (list, tuple)) and value and len({type(item) for item in value}) == 1:
        if isinstance(value[0], str):
            return [_text(item) for item in value]
        if isinstance(value[0], _PLAIN):
            return list(value)
    return safe_text(value, DEFAULT_MAX_VALUE_LENGTH)


def _attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    return {key: _attribute(value) for key, value in attributes.items() if value is not None}


class _Scope:
    """A span that is current for the duration of a ``with``/``async with`` block."""

    span: trace.Span
    _token: object | None

    usage: UsageTotals | None = None

    def _start(self, name: str, identity: RunIdentity, attributes: dict[str, Any]) -> None:
        ctx = otel_context.set_value(_IDENTITY_KEY, identity)
        if self.usage is not None:
            ctx = otel_context.set_value(_USAGE_KEY, (self.usage, *usage_chain()), ctx)
        self.span = _TracerSource.tracer().start_span(name, context=ctx, attributes=add_start_keys(attributes))
        scopes = (*(otel_context.get_value(_SCOPES_KEY) or ()), self.span)  # type: ignore[misc]
        ctx = otel_context.set_value(_SCOPES_KEY, scopes, trace.set_span_in_context(self.span, ctx))
        self._token = otel_context.attach(ctx)

    def _finish(self, exc: BaseException | None) -> None:
        try:
            if exc is not None:
                record_exception(self.span, exc)
            else:
                mark_ok(self.span)
            if self.usage is not None:
                self.span.set_attributes(self.usage.as_attributes())
            self.span.end()
        except Exception as error:  # noqa: BLE001
            log_internal_error("scope end", error)
        finally:
            if self._token is not None:
                otel_context.detach(self._token)
                self._token = None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._finish(exc)

    async def __aenter__(self) -> Any:
        return self.__enter__()  # type: ignore[attr-defined]

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._finish(exc)

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")


class run(_Scope):  # noqa: N801 - used like a function: ``with oc.run(): ...``
    """Open the root span of a cmbagent run (``invoke_workflow {name}``).

    Every span started inside - in this thread, in asyncio tasks it spawns, in
    threads started with ``propagate_context`` or a ``ThreadPoolExecutor`` (the
    threading instrumentation) - carries this run's ids and takes its order from
    this run's gapless sequence. Usable as ``with`` and ``async with``.
    """

    def __init__(
        self, run_id: str | None = None, session_id: str | None = None, name: str | None = None, **attributes: Any
    ) -> None:
        self.run_id = _text(run_id) if run_id is not None else _new_id()
        self._given_session_id = _optional_text(session_id)
        self.session_id = self._given_session_id or ""
        self.name = _optional_text(name)
        self.attributes = _attributes(attributes)
        self._token = None
        self.usage = UsageTotals()

    def __enter__(self) -> run:
        # A nested run inherits the session of the run it is entered in (not created in).
        outer = current_identity()
        inherited = outer.session_id if outer is not None else None
        self.session_id = self._given_session_id or inherited or _new_id()
        identity = RunIdentity(self.run_id, self.session_id, sequence=sequence_for_run(self.run_id))
        attributes = {
            **self.attributes,
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_WORKFLOW,
            semconv.EVENT_TYPE: semconv.EVENT_RUN,
            semconv.RUN_ID: self.run_id,
            semconv.SESSION_ID: self.session_id,
        }
        if self.name:
            attributes[semconv.GEN_AI_WORKFLOW_NAME] = self.name
            attributes[semconv.RUN_NAME] = self.name
        self._start(f"invoke_workflow {self.name}" if self.name else "invoke_workflow", identity, attributes)
        return self


class step(_Scope):  # noqa: N801
    """Open a ``step {step_id or name}`` span for a DAG node/step inside a run.

    Spans inside it carry ``cmbagent.node_id``/``cmbagent.step_id`` (and the
    enclosing run's ids). Usable as ``with`` and ``async with``.
    """

    def __init__(
        self, node_id: str | None = None, step_id: str | None = None, name: str | None = None, **attributes: Any
    ) -> None:
        self.node_id = _optional_text(node_id)
        self.step_id = _optional_text(step_id)
        self.name = _optional_text(name)
        self.attributes = _attributes(attributes)
        self._token = None

    def __enter__(self) -> step:
        outer = current_identity() or RunIdentity(None, None)
        identity = replace(outer, node_id=self.node_id or outer.node_id, step_id=self.step_id or outer.step_id)
        attributes: dict[str, Any] = {
            **self.attributes,
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_STEP,
            semconv.EVENT_TYPE: semconv.EVENT_STEP,
        }
        if self.name:
            attributes[semconv.STEP_NAME] = self.name
        label = self.step_id or self.name
        self._start(f"step {label}" if label else "step", identity, attributes)
        return self


def propagate_context(fn: F) -> F:
    """Wrap ``fn`` so it runs in the OTel context current *now* (for threads and executors)."""
    captured = otel_context.get_current()

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            token = otel_context.attach(captured)
            try:
                return await fn(*args, **kwargs)
            finally:
                otel_context.detach(token)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = otel_context.attach(captured)
        try:
            return fn(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return wrapper  # type: ignore[return-value]
