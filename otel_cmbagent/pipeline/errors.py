"""Recording a user's exception on a span without leaking secrets or raising."""

from __future__ import annotations

import traceback
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from . import semconv
from .values import clean_text, log_internal_error, safe_str

_MAX_ERROR_TEXT = 8 * 1024


def error_type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def record_exception(span: Span, exc: BaseException) -> None:
    """Status ERROR, ``error.type`` and an ``exception`` event - messages scrubbed of secrets.

    The SDK's own ``record_exception`` would copy the raw message (which, for
    provider errors, can quote the API key), so we build the event ourselves.
    Every text is made storable (NUL, lone surrogates), scrubbed, then cut.
    """
    try:
        message = clean_text(safe_str(exc), _MAX_ERROR_TEXT)
        type_name = error_type_name(exc)
        stack = clean_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), _MAX_ERROR_TEXT)
        span.set_attribute(semconv.ERROR_TYPE, type_name)
        span.add_event(
            "exception",
            {
                "exception.type": type_name,
                "exception.message": message,
                "exception.stacktrace": stack,
                "exception.escaped": True,
            },
        )
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"[:1024]))
    except Exception as error:  # noqa: BLE001
        log_internal_error("record_exception", error)


def mark_failed(span: Span, error_type: str, message: Any) -> None:
    """A failure AG2 caught itself (tool error, non-zero exit code): no exception to record."""
    try:
        text = clean_text(message if isinstance(message, str) else safe_str(message), _MAX_ERROR_TEXT)
        span.set_attribute(semconv.ERROR_TYPE, error_type)
        span.set_attribute(semconv.ERROR_MESSAGE, text)
        span.set_status(Status(StatusCode.ERROR, text[:1024]))
    except Exception as error:  # noqa: BLE001
        log_internal_error("mark_failed", error)
