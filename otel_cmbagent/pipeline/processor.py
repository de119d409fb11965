"""The SpanProcessor that owns ordering: gapless per-run ``execution_order``, depth and identity."""

from __future__ import annotations

import collections
import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace.propagation import _SPAN_KEY  # the API's key of the context's span

from . import semconv
from .context import _IDENTITY_KEY, OrderSequence, current_identity
from .open_spans import OpenSpans
from .sdk_fields import SDK_LIVE_SPAN, SDK_READABLE_SPAN
from .values import log_internal_error

_trace_sequences: dict[int, OrderSequence] = {}
# Traces whose spans have all ended keep their counter a while, so a late span
# (a fire-and-forget task whose parent already ended) continues the order.
_ended_trace_sequences: collections.OrderedDict[int, OrderSequence] = collections.OrderedDict()
_MAX_ENDED_TRACES = 4096
_trace_sequences_lock = threading.Lock()


def _trace_sequence_start(trace_id: int) -> OrderSequence:
    with _trace_sequences_lock:
        sequence = _trace_sequences.get(trace_id)
        if sequence is None:
            sequence = _ended_trace_sequences.pop(trace_id, None) or OrderSequence()
            _trace_sequences[trace_id] = sequence
        sequence.open_spans += 1
        return sequence


def _trace_sequence_end(trace_id: int) -> None:
    with _trace_sequences_lock:
        sequence = _trace_sequences.get(trace_id)
        if sequence is not None:
            sequence.open_spans -= 1
            if sequence.open_spans <= 0:
                del _trace_sequences[trace_id]
                _ended_trace_sequences[trace_id] = sequence
                if len(_ended_trace_sequences) > _MAX_ENDED_TRACES:
                    _ended_trace_sequences.popitem(last=False)


def next_event_order(span: trace.Span) -> int | None:
    """Take the next order of ``span``'s run for a span event (messages share the run's sequence)."""
    identity = current_identity()
    if identity is not None and identity.sequence is not None:
        return identity.sequence.next()
    with _trace_sequences_lock:
        sequence = _trace_sequences.get(span.get_span_context().trace_id)
    return sequence.next() if sequence is not None else None


def trace_sequence(trace_id: int) -> OrderSequence | None:
    """The live counter of a trace without a run (None when none of its spans is open)."""
    with _trace_sequences_lock:
        return _trace_sequences.get(trace_id) or _ended_trace_sequences.get(trace_id)


def open_trace_sequences() -> int:
    """How many traces without a run have live counters (for memory checks)."""
    return len(_trace_sequences)


def _raw_attributes(span: Any) -> Any:
    """The span's attributes as a plain dict when the SDK keeps one (a ``get`` on the SDK's
    mapping raises and catches KeyError for a missing key: ~0.6 µs, measured here; iterating it
    takes its lock: ~2.6 µs to copy five keys). Reads ``span._attributes._dict`` (opentelemetry-sdk
    1.45.x); on an SDK without it, the public ``span.attributes``."""
    bounded = getattr(span, "_attributes", None)
    raw = getattr(bounded, "_dict", None)
    if isinstance(raw, dict):
        return raw
    return bounded if bounded is not None else getattr(span, "attributes", None)


raw_attributes = _raw_attributes  # for the sinks' span snapshots (bench_overhead swaps the private name)


def _depth_below(parent: Any, span: Span) -> int:
    parent_context = parent.get_span_context()
    if not parent_context.is_valid or parent_context.trace_id != span.get_span_context().trace_id:
        return 0
    parent_attributes = _raw_attributes(parent)
    parent_depth = parent_attributes.get(semconv.DEPTH) if parent_attributes is not None else None
    return parent_depth + 1 if isinstance(parent_depth, int) else 0


def _depth_under(parent: Any) -> int:
    """The depth of a child of ``parent``: the span in the context an SDK span started in (the SDK made it the
    new span's parent, so no check of trace ids as in :func:`_depth_below`)."""
    parent_attributes = getattr(getattr(parent, "_attributes", None), "_dict", None)
    if parent_attributes is None:
        parent_attributes = _raw_attributes(parent)
    parent_depth = parent_attributes.get(semconv.DEPTH) if parent_attributes is not None else None
    return parent_depth + 1 if isinstance(parent_depth, int) else 0


def _write_attributes(span: Span, identity: dict[str, Any] | None, order: int, depth: int) -> None:
    """Set our (already valid) attributes on a span that only this thread holds yet.

    The SDK's ``set_attributes`` validates every value under the span's lock (~3 µs
    for our four keys, measured here); our values are plain str/int, so while the
    mapping has room they go straight in. Anything unusual takes the public path.
    """
    bounded = getattr(span, "_attributes", None)
    raw = getattr(bounded, "_dict", None)
    maxlen = getattr(bounded, "maxlen", None)
    if isinstance(raw, dict) and not getattr(bounded, "_immutable", True) and (
        maxlen is None or len(raw) + len(identity or ()) + 2 <= maxlen
    ):
        if identity:
            raw.update(identity)
        raw[semconv.EXECUTION_ORDER] = order
        raw[semconv.DEPTH] = depth
    else:
        span.set_attributes({**(identity or {}), semconv.EXECUTION_ORDER: order, semconv.DEPTH: depth})


class SequencingSpanProcessor(SpanProcessor):
    """Stamp every span with ``cmbagent.execution_order``, ``cmbagent.depth`` and run identity.

    Add it to the ``TracerProvider`` before any exporting processor, so exporters
    see the attributes. Order is per run (the run id in context), or per trace
    when there is no run; strictly increasing in start order and gapless from 1.
    No I/O here, and no exception ever escapes a hook. ``open_spans``: the registry of open spans this
    processor keeps as well (in its own hooks: cheaper than a processor of its own, see :mod:`.open_spans`).
    """

    def __init__(self, open_spans: OpenSpans | None = None) -> None:
        self.open_spans = open_spans
        self._open = open_spans.spans if open_spans is not None else None

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        try:
            if self._open is not None:  # first: nothing below keeps a span out of the registry
                self._open[(span._context if type(span) is SDK_LIVE_SPAN else span.get_span_context()).span_id] = span
            ctx = parent_context if parent_context is not None else otel_context.get_current()
            identity = ctx.get(_IDENTITY_KEY)
            own = _raw_attributes(span)
            if identity is not None and identity.sequence is not None:
                order = identity.sequence.next()
            else:
                order = _trace_sequence_start(span.get_span_context().trace_id).next()
            if own is not None and own.get(semconv.EVENT_TYPE) == semconv.EVENT_RUN:
                depth = 0
            elif type(span) is SDK_LIVE_SPAN:  # the SDK's span: its parent is in the context it started in, or none
                depth = _depth_under(ctx.get(_SPAN_KEY)) if span._parent is not None else 0
            else:
                depth = _depth_below(trace.get_current_span(ctx), span)
            _write_attributes(span, identity.span_attributes if identity is not None else None, order, depth)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("SequencingSpanProcessor.on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            context = span._context if type(span) is SDK_READABLE_SPAN else span.get_span_context()
            if self._open is not None and context is not None:  # before any sink's on_end (this one runs first)
                self._open.pop(context.span_id, None)
            attributes = _raw_attributes(span)
            if (attributes is None or attributes.get(semconv.RUN_ID) is None) and context is not None:
                _trace_sequence_end(context.trace_id)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("SequencingSpanProcessor.on_end", exc)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
