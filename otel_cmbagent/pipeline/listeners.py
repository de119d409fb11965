"""Live message events for sinks.

SpanProcessors only see spans start and end; message events are added to a span
in between. Sinks that show a run while it is live (SQL rows, websocket) register
here to get each message as it is recorded.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from .values import log_internal_error

MessageListener = Callable[[Any, Mapping[str, Any], int], None]

_listeners: tuple[MessageListener, ...] = ()
_lock = threading.Lock()


def add_message_listener(listener: MessageListener) -> None:
    global _listeners
    with _lock:
        if listener not in _listeners:
            _listeners = (*_listeners, listener)


def remove_message_listener(listener: MessageListener) -> None:
    global _listeners
    with _lock:
        _listeners = tuple(item for item in _listeners if item != listener)


def notify_message(span: Any, attributes: Mapping[str, Any], timestamp_ns: int) -> None:
    for listener in _listeners:
        try:
            listener(span, attributes, timestamp_ns)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("message listener", exc)
