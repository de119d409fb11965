"""The spans still open, so a process being stopped (SIGTERM, exit) can end them as interrupted.

Without this a stopped run's spans never end: their rows stay ``running`` and readers show the run live,
its duration growing, forever. :meth:`OpenSpans.end_all` ends each open span - children first - with
``cmbagent.interrupted`` set to the reason and an ERROR status, so every sink gets its final form (the SQL
rows: status and ``event_subtype`` ``interrupted``).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import Status, StatusCode

from . import semconv
from .values import log_internal_error


class OpenSpans(SpanProcessor):
    """Tracks the spans started and not yet ended (a dict store and pop per span, no lock).

    A processor of its own, or kept by the sequencer (``SequencingSpanProcessor(open_spans=...)``, as
    ``setup_tracing`` does: two hook calls per span fewer). ``spans`` (span id -> span) is what sinks read of it:
    the SQL sink's running rows.
    """

    def __init__(self) -> None:
        self.spans: dict[int, Span] = {}  # the same dict for the object's life (a fork clears it): sinks hold it
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):  # a forked child (a pool worker) never ends its parent's spans
            os.register_at_fork(after_in_child=functools.partial(_forget_after_fork, weakref.ref(self)))

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.spans[span.context.span_id] = span  # a dict store is atomic: no lock on the agent's path

    def on_end(self, span: ReadableSpan) -> None:  # a ReadableSpan copy of the Span: keyed by span id
        self.spans.pop(span.context.span_id, None)

    def __len__(self) -> int:
        return len(self.spans)

    def end_all(self, reason: str) -> int:
        """End every open span as interrupted by ``reason`` (latest started first); returns how many."""
        with self._lock:  # one caller at a time; list() of a dict's values is atomic against the hooks' stores
            spans = sorted(list(self.spans.values()), key=_start_time, reverse=True)
            for span in spans:
                self.spans.pop(span.context.span_id, None)
        ended = 0
        for span in spans:
            try:
                if not span.is_recording():  # ended meanwhile by its own thread
                    continue
                span.set_attribute(semconv.INTERRUPTED, reason)
                span.set_status(Status(StatusCode.ERROR, f"interrupted by {reason}"))
                span.end()
                ended += 1
            except Exception as exc:  # noqa: BLE001
                log_internal_error("ending open spans", exc)
        return ended


def _forget_after_fork(open_spans_ref: weakref.ref[OpenSpans]) -> None:
    open_spans = open_spans_ref()
    if open_spans is not None:
        open_spans._lock = threading.Lock()
        open_spans.spans.clear()  # not a new dict: the sinks that read it hold this one


def _start_time(span: Any) -> int:
    return getattr(span, "start_time", None) or 0
