"""Live events for a UI: every span start/end and every message, as cmbagent's ``event_captured`` websocket events.

    import otel_cmbagent as oc
    from otel_cmbagent.exporters.websocket import WebsocketCallbackProcessor, serve

    provider.add_span_processor(oc.SequencingSpanProcessor())      # first: stamps ids and orders
    provider.add_span_processor(WebsocketCallbackProcessor(ws_emit_callback))
    # or, with no server of your own (the live server the viewer runs on):
    server = serve()                                                # ws://127.0.0.1:<port>/ws
    provider.add_span_processor(WebsocketCallbackProcessor(server.callback))

The callback has the signature of cmbagent's ``ws_emit_callback``: ``callback("event_captured", data)``
where ``data`` is the event's ``execution_events`` row (built by :mod:`otel_cmbagent.table.rows`,
so the websocket and the SQL sink show the same ids and orders) in the shape of
:mod:`otel_cmbagent.table.envelope`, with every value JSON-serialisable.

Nothing here runs on the agent's thread except a snapshot of the span: sync callbacks run on a
:class:`~otel_cmbagent.exporters.worker.BackgroundWorker` thread, async callbacks are scheduled on the
given event loop from that thread. The queue is bounded; whatever a slow or hung callback makes the
processor miss is counted in :attr:`WebsocketCallbackProcessor.stats`, never waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_cmbagent.pipeline.listeners import add_message_listener, remove_message_listener
from otel_cmbagent.pipeline.values import log_internal_error
from otel_cmbagent.table.envelope import DATA_FIELDS, EVENT_CAPTURED, envelope, event_data
from otel_cmbagent.table.rows import message_row, snapshot, span_at_end, span_row

from .worker import SHUTDOWN_TIMEOUT_ENV, BackgroundWorker, is_coroutine_callable, shutdown_timeout

if TYPE_CHECKING:
    from otel_cmbagent.server.live import LiveServer

__all__ = ["DATA_FIELDS", "EVENT_CAPTURED", "WebsocketCallbackProcessor", "envelope", "serve"]

_logger = logging.getLogger("otel_cmbagent.exporters.websocket")

# A raising callback is logged on its 1st failure and then once every this many failures.
FAILURE_LOG_EVERY = 100

_KIND_START = "start"
_KIND_END = "end"
_KIND_MESSAGE = "message"


def _silence_after_fork(processor_ref: weakref.ref[WebsocketCallbackProcessor]) -> None:
    processor = processor_ref()
    if processor is not None:
        processor._lock = threading.Lock()
        processor._closed = True
        processor._open.clear()


def _span_key(span: Any) -> tuple[int, int]:
    context = span.get_span_context()
    return context.trace_id, context.span_id


class WebsocketCallbackProcessor(SpanProcessor):
    """Call ``callback("event_captured", data)`` for every span start, span end and live message event.

    ``callback`` is a sync callable (run on a background thread) or a coroutine function (scheduled with
    :func:`asyncio.run_coroutine_threadsafe` on ``loop``, which must be running in another thread; each call
    is given ``callback_timeout`` seconds, then cancelled and counted as failed). Message events are sent
    only for spans this processor saw start. Add it after :class:`otel_cmbagent.SequencingSpanProcessor`.

    The queue holds ``max_queue`` events; events that do not fit are dropped and counted. A raising
    callback never reaches the agent: it is counted as failed and logged (once per ``FAILURE_LOG_EVERY``).
    ``shutdown`` waits at most ``shutdown_timeout_millis`` (default ``$OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS`` or
    5,000) for a slow or hung callback; then every event it did not get is counted as dropped (the one it
    hangs in as failed), logged once, and never delivered later.
    ``stats`` -> ``{"enqueued", "processed", "dropped", "failed"}`` (processed = delivered without error;
    dropped = never given to the callback: queue full, left at shutdown, or after shutdown).
    """

    def __init__(
        self,
        callback: Callable[[str, dict[str, Any]], Any],
        *,
        capture_content: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
        max_queue: int = 10_000,
        callback_timeout: float = 10.0,
        shutdown_timeout_millis: int | None = None,
    ) -> None:
        if not callable(callback):
            raise TypeError(
                f"WebsocketCallbackProcessor: callback must be callable as callback(event_type, data), "
                f"got {type(callback).__name__} {callback!r}"
            )
        self._async = is_coroutine_callable(callback)
        if self._async and loop is None:
            raise ValueError(
                "WebsocketCallbackProcessor: callback is a coroutine function, so pass the event loop to run it on "
                "(loop=...; a loop running in another thread, e.g. your web server's loop)"
            )
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"WebsocketCallbackProcessor: loop must be an asyncio event loop, got {loop!r}")
        if not isinstance(max_queue, int) or max_queue <= 0:
            raise ValueError(f"WebsocketCallbackProcessor: max_queue must be a positive int, got {max_queue!r}")
        if callback_timeout <= 0:
            raise ValueError(f"WebsocketCallbackProcessor: callback_timeout must be positive, got {callback_timeout!r}")
        self.callback = callback
        self.capture_content = bool(capture_content)
        self.loop = loop
        self.callback_timeout = float(callback_timeout)
        self.shutdown_timeout_millis = shutdown_timeout(shutdown_timeout_millis) * 1000
        self._processed = 0
        self._failed = 0
        self._dropped_at_shutdown = 0
        self._in_callback = False
        self._abandoned = False
        self._open: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._worker = BackgroundWorker(
            "otel-cmbagent-websocket", self._handle, max_queue=max_queue, max_batch=64, delay=0.05
        )
        add_message_listener(self._on_message)
        if hasattr(os, "register_at_fork"):  # the callback and its loop stay in the parent: a child sends nothing
            os.register_at_fork(after_in_child=functools.partial(_silence_after_fork, weakref.ref(self)))

    # --- agent side: snapshot and queue, nothing else ---------------------------------
    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        if self._closed:
            return
        try:
            key = _span_key(span)
            with self._lock:
                self._open.add(key)
            self._worker.put((_KIND_START, snapshot(span), None, None))
        except Exception as exc:  # noqa: BLE001
            log_internal_error("WebsocketCallbackProcessor.on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed:
            return
        try:
            key = _span_key(span)
            with self._lock:
                if key not in self._open:
                    return  # started before this processor was added (or after it was shut down)
                self._open.discard(key)
            self._worker.put((_KIND_END, span_at_end(span), None, None))  # plain values, shared with the other sinks
        except Exception as exc:  # noqa: BLE001
            log_internal_error("WebsocketCallbackProcessor.on_end", exc)

    def _on_message(self, span: Any, attributes: Mapping[str, Any], timestamp_ns: int) -> None:
        if self._closed:
            return
        try:
            if _span_key(span) not in self._open:
                return
            self._worker.put((_KIND_MESSAGE, snapshot(span), dict(attributes), timestamp_ns))
        except Exception as exc:  # noqa: BLE001
            log_internal_error("WebsocketCallbackProcessor message listener", exc)

    # --- worker side ----------------------------------------------------------------
    def _row(self, kind: str, span: ReadableSpan, attributes: Mapping[str, Any] | None, timestamp_ns: int | None):
        if kind == _KIND_MESSAGE:
            return message_row(span, attributes or {}, timestamp_ns or 0, capture_content=self.capture_content)
        return span_row(span, ended=kind == _KIND_END, capture_content=self.capture_content)

    def _handle(self, batch: list[Any]) -> None:
        for kind, span, attributes, timestamp_ns in batch:
            if self._abandoned:  # shutdown gave up and counted the rest of this batch
                return
            try:
                data = event_data(self._row(kind, span, attributes, timestamp_ns))
                self._in_callback = True
                if self._async:
                    self._call_async(data)
                else:
                    self.callback(EVENT_CAPTURED, data)
            except Exception as exc:  # noqa: BLE001 - a callback's failure is counted, never raised
                with self._lock:
                    self._in_callback = False
                    if self._abandoned:
                        return
                self._failure(exc)
            else:
                with self._lock:
                    self._in_callback = False
                    if self._abandoned:
                        return
                    self._processed += 1

    def _call_async(self, data: dict[str, Any]) -> None:
        loop = self.loop
        assert loop is not None
        if loop.is_closed():
            raise RuntimeError("the event loop given to WebsocketCallbackProcessor is closed")
        coroutine = self.callback(EVENT_CAPTURED, data)
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except Exception:
            coroutine.close()
            raise
        try:
            future.result(timeout=self.callback_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"async callback did not finish within {self.callback_timeout} s") from None

    def _failure(self, exc: BaseException) -> None:
        self._failed += 1
        if self._failed % FAILURE_LOG_EVERY == 1 or FAILURE_LOG_EVERY == 1:
            _logger.warning(
                "otel-cmbagent: websocket callback %r failed (%d failures so far; logged once per %d): %s: %s",
                self.callback,
                self._failed,
                FAILURE_LOG_EVERY,
                type(exc).__name__,
                exc,
                exc_info=self._failed == 1,
            )

    # --- SpanProcessor --------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """``{"enqueued", "processed", "dropped", "failed"}``: queued, delivered, never given to the callback
        (queue full, left at shutdown, after shutdown), failed (raised, timed out, or hung at shutdown)."""
        worker = self._worker.stats
        return {
            "enqueued": worker.enqueued,
            "processed": self._processed,
            "dropped": worker.dropped + self._dropped_at_shutdown,
            "failed": self._failed,
        }

    @property
    def open_spans(self) -> int:
        """How many spans this processor saw start and not yet end."""
        return len(self._open)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait (at most ``timeout_millis``) until every queued event went to the callback."""
        return self._worker.flush(max(0.0, timeout_millis / 1000))

    def shutdown(self, timeout_millis: int | None = None) -> bool:
        """Stop listening, deliver what is queued (at most ``timeout_millis``) and stop the worker. Idempotent."""
        with self._lock:
            if self._closed:
                return True
            self._closed = True
            self._open.clear()
        remove_message_listener(self._on_message)
        timeout = (self.shutdown_timeout_millis if timeout_millis is None else timeout_millis) / 1000
        deadline = time.monotonic() + max(0.0, timeout)
        flushed = self._worker.flush(max(0.0, timeout))
        # The worker's own shutdown flushes and joins, each up to its timeout: give it only what is left.
        self._worker.shutdown(max(0.0, deadline - time.monotonic()), abandon=True)
        if not flushed:
            self._give_up(timeout)
        return flushed

    def _give_up(self, timeout: float) -> None:
        """Shutdown waited long enough: count every event the callback did not get (and the one it hangs in)."""
        cleared = self._worker.abandoned  # queued events the worker dropped (already in its ``dropped``)
        with self._lock:
            self._abandoned = True
            in_batch = max(0, self._worker.stats.enqueued - self._processed - self._failed - cleared)
            hung = 1 if self._in_callback and in_batch else 0
            self._failed += hung
            self._dropped_at_shutdown += in_batch - hung
        if cleared or in_batch:
            _logger.warning(
                "otel-cmbagent: websocket callback %r did not finish within %.1f s at shutdown (%s): %d events "
                "not delivered (counted as dropped), %d hanging in the callback (counted as failed)",
                self.callback, timeout, SHUTDOWN_TIMEOUT_ENV, cleared + in_batch - hung, hung,
            )


# --- the live server ----------------------------------------------------------------------
def serve(host: str = "127.0.0.1", port: int = 0, token: str | None = None, **options: Any) -> LiveServer:
    """Start the live server (the viewer's websocket server) broadcasting every event handed to its ``callback``.

    Binding anything but loopback (127.0.0.0/8, ::1, localhost) needs ``token``; with a token, clients must
    present it (``?token=...``, ``Authorization: Bearer ...`` or ``X-Token``; else HTTP 401 at the handshake).
    Pass ``server.callback`` to :class:`WebsocketCallbackProcessor`; ``server.url`` (``ws://host:port/ws``) is
    the address to connect to; ``server.close()`` stops it. Options: ``max_pending``, ``start_timeout``.
    """
    from otel_cmbagent.server.live import LiveServer

    return LiveServer(host, port, token, **options)
