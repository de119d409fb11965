"""cmbagent's ``emit_event_callback``: ``await callback(websocket, event, run_id)`` for each captured event.

cmbagent's ``EventCaptureManager(..., websocket=ws, emit_event_callback=cb)`` hands its web
backend each new ``ExecutionEvent`` ORM object. Here ``event`` is a :class:`CapturedEvent` with
the same attributes (``id``, ``run_id``, ``event_type``, ``event_subtype``, ``agent_name``,
``timestamp``, ``execution_order``, ``depth``, ``inputs``, ``outputs``, ``meta``, ``status``, ...),
built from the row the SQL sink writes. Unlike cmbagent (``asyncio.create_task`` from the
capturing thread, so nothing is sent from worker threads), a coroutine callback is scheduled on
the event loop that was running where the captor was created, from whichever thread captured;
nothing waits for it, and failures are counted, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_cmbagent.pipeline import semconv
from otel_cmbagent.pipeline.listeners import add_message_listener, remove_message_listener
from otel_cmbagent.pipeline.values import log_internal_error
from otel_cmbagent.table.rows import message_row, snapshot, span_at_end, span_row

from .worker import BackgroundWorker, is_coroutine_callable

_logger = logging.getLogger("otel_cmbagent.exporters")


@dataclass(frozen=True)
class CapturedEvent:
    """The attributes of cmbagent's ``ExecutionEvent`` for one row (start or final form)."""

    id: str
    run_id: str | None
    session_id: str | None
    node_id: str | None
    step_id: str | None
    parent_event_id: str | None
    event_type: str
    event_subtype: str | None
    agent_name: str | None
    agent_role: str | None
    timestamp: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None
    inputs: Any
    outputs: Any
    error_message: str | None
    meta: Any
    execution_order: int | None
    depth: int
    status: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CapturedEvent:
        return cls(**{field.name: row.get(field.name) for field in fields(cls)})


class EventObjectCallbackProcessor(SpanProcessor):
    """Calls cmbagent's ``emit_event_callback`` for every span start/end and message of the spans it is given.

    ``websocket``: a callable returning the current websocket (cmbagent sends nothing while it is
    falsy). ``loop``: where a coroutine callback runs (None: the loop running now, if any).
    ``stats``: ``{"emitted", "failed", "skipped"}`` (skipped: no websocket or no loop).
    """

    def __init__(self, callback: Callable[..., Any], websocket: Callable[[], Any], run_id: str,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.callback = callback
        self.websocket = websocket
        self.run_id = run_id
        try:
            self.loop = loop or asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self._is_async = is_coroutine_callable(callback)
        self.emitted = self.failed = self.skipped = 0
        self._warned = False
        self._worker = BackgroundWorker("otel-cmbagent-emit-event", self._handle, max_queue=10_000, max_batch=64, delay=0.02)
        add_message_listener(self._on_message)

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        if self.websocket():
            self._worker.put((span_row, snapshot(span), False))

    def on_end(self, span: ReadableSpan) -> None:
        if self.websocket():
            self._worker.put((span_row, span_at_end(span), True))

    def _on_message(self, span: Any, attributes: Mapping[str, Any], timestamp_ns: int) -> None:
        if (getattr(span, "attributes", None) or {}).get(semconv.RUN_ID) == self.run_id and self.websocket():
            self._worker.put((message_row, span, (dict(attributes), timestamp_ns)))

    def _handle(self, items: list[tuple[Any, Any, Any]]) -> None:
        for build, span, extra in items:
            try:
                row = build(span, ended=extra) if build is span_row else build(span, *extra)
                self._emit(CapturedEvent.from_row(row))
            except Exception as exc:  # noqa: BLE001 - the UI's failure never reaches the agent
                self.failed += 1
                log_internal_error("emit_event_callback", exc)

    def _emit(self, event: CapturedEvent) -> None:
        websocket = self.websocket()
        if not websocket:
            self.skipped += 1
            return
        if not self._is_async:
            self.callback(websocket, event, self.run_id)
            self.emitted += 1
            return
        if self.loop is None or self.loop.is_closed():
            self.skipped += 1
            if not self._warned:
                self._warned = True
                _logger.warning(
                    "otel-cmbagent: emit_event_callback is async but no event loop was running where the "
                    "EventCaptureManager was created; events are not sent (create it inside the loop)"
                )
            return
        future = asyncio.run_coroutine_threadsafe(self.callback(websocket, event, self.run_id), self.loop)
        future.add_done_callback(self._done)

    def _done(self, future: Any) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
            if future.exception() is not None:
                log_internal_error("emit_event_callback", future.exception())
        else:
            self.emitted += 1

    @property
    def stats(self) -> dict[str, int]:
        return {"emitted": self.emitted, "failed": self.failed, "skipped": self.skipped}

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._worker.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        remove_message_listener(self._on_message)
        self._worker.shutdown()
