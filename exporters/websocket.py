"""Live events for a UI: every span start/end and every message, as cmbagent's ``event_captured`` websocket events.

    import otel_cmbagent as oc
    from otel_cmbagent.exporters.websocket import WebsocketCallbackProcessor, serve

    provider.add_span_processor(oc.SequencingSpanProcessor())      # first: stamps ids and orders
    provider.add_span_processor(WebsocketCallbackProcessor(ws_emit_callback))
    # or, with no server of your own:
    broadcaster = serve()                                           # ws://127.0.0.1:<port>/
    provider.add_span_processor(WebsocketCallbackProcessor(broadcaster.callback))

The callback has the signature of cmbagent's ``ws_emit_callback``: ``callback("event_captured", data)``
where ``data`` is the event's ``execution_events`` row (built by :mod:`otel_cmbagent.exporters.rows`,
so the websocket and the SQL sink show the same ids and orders), with every value JSON-serialisable.

Nothing here runs on the agent's thread except a snapshot of the span: sync callbacks run on a
:class:`~otel_cmbagent.exporters.worker.BackgroundWorker` thread, async callbacks are scheduled on the
given event loop from that thread. The queue is bounded; whatever a slow or hung callback makes the
processor miss is counted in :attr:`WebsocketCallbackProcessor.stats`, never waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import inspect
import ipaddress
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_cmbagent.live import add_message_listener, remove_message_listener
from otel_cmbagent.utils import log_internal_error

from .rows import message_row, snapshot, span_row
from .worker import SHUTDOWN_TIMEOUT_ENV, BackgroundWorker, shutdown_timeout

__all__ = [
    "EVENT_CAPTURED",
    "DATA_FIELDS",
    "WebsocketBroadcaster",
    "WebsocketCallbackProcessor",
    "envelope",
    "serve",
]

_logger = logging.getLogger("otel_cmbagent.exporters.websocket")

EVENT_CAPTURED = "event_captured"

# Keys of ``data`` (in this order): the event's identity, then its content-policy fields.
# ``event_id`` is the row's ``id``; everything else has the row's own name.
DATA_FIELDS = (
    "event_id",
    "run_id",
    "session_id",
    "node_id",
    "event_type",
    "event_subtype",
    "agent_name",
    "timestamp",
    "execution_order",
    "depth",
    "status",
    "inputs",
    "outputs",
    "error_message",
    "duration_ms",
    "parent_event_id",
    "trace_id",
    "span_id",
)

# A raising callback is logged on its 1st failure and then once every this many failures.
FAILURE_LOG_EVERY = 100

_KIND_START = "start"
_KIND_END = "end"
_KIND_MESSAGE = "message"


def _jsonable(value: Any) -> Any:
    """``value`` with datetimes as ISO strings, tuples/sets as lists, non-finite floats and other objects as text."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _data(row: Mapping[str, Any]) -> dict[str, Any]:
    """The websocket ``data`` of an ``execution_events`` row."""
    return {field: _jsonable(row.get("id" if field == "event_id" else field)) for field in DATA_FIELDS}


def envelope(data: Mapping[str, Any], event_type: str = EVENT_CAPTURED) -> dict[str, Any]:
    """The message cmbagent's UI receives for one event.

    ``{"event_type": "event_captured", "timestamp": <now, ISO 8601>, "run_id", "session_id", "data": data}``
    """
    return {
        "event_type": event_type,
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "run_id": data.get("run_id"),
        "session_id": data.get("session_id"),
        "data": data,
    }


def _is_coroutine_callable(callback: Any) -> bool:
    if inspect.iscoroutinefunction(callback):
        return True
    call = getattr(callback, "__call__", None)  # noqa: B004 - an object with ``async def __call__``
    return call is not None and inspect.iscoroutinefunction(call)


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
        self._async = _is_coroutine_callable(callback)
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
            self._worker.put((_KIND_END, span, None, None))  # an ended span no longer changes
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
                data = _data(self._row(kind, span, attributes, timestamp_ns))
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


# --- optional server ------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False  # "" / None: every interface
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _presented_token(request: Any) -> str | None:
    query = parse_qs(urlsplit(request.path).query)
    if query.get("token"):
        return query["token"][0]
    authorization = request.headers.get("Authorization")
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


class WebsocketBroadcaster:
    """A websocket server (``websockets`` asyncio API, own loop in a daemon thread) that broadcasts envelopes.

    Use :func:`serve` to create one. ``callback`` is a non-blocking sync ``callback(event_type, data)``
    for :class:`WebsocketCallbackProcessor`; each event reaches every connected client as the JSON of
    :func:`envelope`. Clients that do not read are skipped (counted in ``stats["dropped"]``) while more
    than ``max_client_buffer`` bytes wait in their write buffer; at most ``max_pending`` events wait for
    the server loop (more are dropped and counted).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        max_pending: int = 10_000,
        max_client_buffer: int = 4 * 2**20,
        start_timeout: float = 10.0,
    ) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("serve(): token must be a non-empty string (or None on a loopback address)")
        if token is None and not _is_loopback(host):
            raise ValueError(
                f"serve(): refusing to bind {host!r} without a token: anyone who can reach it would see the run's "
                "messages. Bind 127.0.0.1/::1/localhost, or pass token=... (clients then send ?token=... or "
                "'Authorization: Bearer ...')"
            )
        try:
            from websockets.asyncio.server import broadcast as ws_broadcast
            from websockets.asyncio.server import serve as ws_serve
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "otel_cmbagent.exporters.websocket.serve() needs the 'websockets' package (>= 13): "
                "pip install 'websockets>=13'"
            ) from exc
        self._ws_broadcast = ws_broadcast
        self.host = host
        self.token = token
        self.max_pending = max_pending
        self.max_client_buffer = max_client_buffer
        self._token_bytes = token.encode("utf-8") if token is not None else None
        self._sent = 0
        self._dropped = 0
        self._rejected = 0
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self._server: Any = None
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ws_serve, host, port), name="otel-cmbagent-websocket-server", daemon=True
        )
        self._thread.start()
        if not self._started.wait(start_timeout):
            self._stop_loop()
            raise RuntimeError(f"serve(): the websocket server did not start within {start_timeout} s")
        if self._error is not None:
            self._thread.join(timeout=start_timeout)
            raise self._error
        sockname = self._server.sockets[0].getsockname()
        self.port: int = sockname[1]
        url_host = sockname[0] if host in ("", "0.0.0.0", "::") else host  # noqa: S104
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self.url = f"ws://{url_host}:{self.port}/"

    # --- server loop thread -----------------------------------------------------------
    def _run(self, ws_serve: Any, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> Any:
            return await ws_serve(self._handler, host, port, process_request=self._process_request)

        try:
            self._server = self._loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001 - reported to serve()'s caller
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()

    def _process_request(self, connection: Any, request: Any) -> Any:
        if self._token_bytes is None:
            return None
        presented = _presented_token(request)
        if presented is not None and hmac.compare_digest(presented.encode("utf-8"), self._token_bytes):
            return None
        self._rejected += 1
        response = connection.respond(401, "Unauthorized: send ?token=... or 'Authorization: Bearer ...'\n")
        response.headers["WWW-Authenticate"] = 'Bearer realm="otel-cmbagent"'
        return response

    async def _handler(self, connection: Any) -> None:
        # Events only flow to the client; read (and ignore) what it sends so pings and closes are processed.
        async for _ in connection:
            pass

    def _broadcast(self, message: str) -> None:
        with self._pending_lock:
            self._pending -= 1
        server = self._server
        if server is None or self._closed:
            return
        recipients = []
        skipped = 0
        for connection in server.connections:
            transport = getattr(connection, "transport", None)
            if transport is not None and transport.get_write_buffer_size() > self.max_client_buffer:
                skipped += 1  # a client that does not read: skip it rather than buffer without bound
                continue
            recipients.append(connection)
        if recipients:
            self._ws_broadcast(recipients, message)
        with self._pending_lock:
            self._sent += len(recipients)
            self._dropped += skipped

    # --- any thread ---------------------------------------------------------------------
    def callback(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Hand one event to the server loop (never blocks; dropped and counted when the server is closed or behind)."""
        message = json.dumps(envelope(data, event_type), default=str)
        with self._pending_lock:
            if self._closed or self._pending >= self.max_pending:
                self._dropped += 1
                return
            self._pending += 1
        try:
            self._loop.call_soon_threadsafe(self._broadcast, message)
        except RuntimeError:  # loop closed meanwhile
            with self._pending_lock:
                self._pending -= 1
                self._dropped += 1

    @property
    def client_count(self) -> int:
        """How many clients are connected (handshake done, not closing)."""
        server = self._server
        return len(server.connections) if server is not None and not self._closed else 0

    @property
    def stats(self) -> dict[str, int]:
        """``{"sent"`` (messages written, one per client), ``"dropped"``, ``"rejected"`` (bad/missing token)``}``."""
        return {"sent": self._sent, "dropped": self._dropped, "rejected": self._rejected}

    def close(self, timeout: float = 10.0) -> None:
        """Close every connection (1001 going away), stop the server and its thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        server = self._server

        async def _close() -> None:
            server.close()
            await server.wait_closed()

        if server is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout)
            except Exception as exc:  # noqa: BLE001
                log_internal_error("WebsocketBroadcaster.close", exc)
        self._stop_loop()
        self._thread.join(timeout)

    def _stop_loop(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            pass  # already closed

    def __enter__(self) -> WebsocketBroadcaster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WebsocketBroadcaster {getattr(self, 'url', '?')} clients={self.client_count}>"


def serve(host: str = "127.0.0.1", port: int = 0, token: str | None = None, **options: Any) -> WebsocketBroadcaster:
    """Start a websocket server broadcasting every event's :func:`envelope` (JSON) to all connected clients.

    Binding anything but loopback (127.0.0.0/8, ::1, localhost) needs ``token``; with a token, clients must
    present it as ``?token=...`` or ``Authorization: Bearer ...`` (else HTTP 401 at the handshake).
    Pass ``broadcaster.callback`` to :class:`WebsocketCallbackProcessor`; ``broadcaster.url`` is the
    address to connect to; ``broadcaster.close()`` stops it.
    """
    return WebsocketBroadcaster(host, port, token, **options)
