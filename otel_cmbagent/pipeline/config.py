"""Instrumentation options, resolved in one place: explicit argument > environment > default."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

_logger = logging.getLogger(__name__)

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
MAX_VALUE_LENGTH_ENV = "OTEL_CMBAGENT_MAX_VALUE_LENGTH"
DEFAULT_MAX_VALUE_LENGTH = 16 * 1024
DEFAULT_MAX_TRACKED_FILES = 10_000

_TRUE = {"true", "1", "yes", "on", "span_only", "event_only", "span_and_event"}
_FALSE = {"false", "0", "no", "off", "no_content"}


def parse_bool_env(name: str, default: bool) -> bool:
    """Read a boolean variable; an unrecognised value is reported once and ignored (ambient config must not crash a run)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    _logger.warning("otel-cmbagent: ignoring %s=%r (expected true/false); using %s", name, raw, default)
    return default


def _parse_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
        if value > 0:
            return value
    except ValueError:
        pass
    _logger.warning("otel-cmbagent: ignoring %s=%r (expected a positive integer); using %s", name, raw, default)
    return default


@dataclass(frozen=True)
class InstrumentationConfig:
    """What the AG2 instrumentation records.

    ``capture_content`` covers message text, tool arguments/results, code and its
    output. It is on by default because cmbagent's own event store needs it;
    exporters that ship to shared backends (OTLP) apply their own policy on top.
    """

    capture_content: bool = True
    max_value_length: int = DEFAULT_MAX_VALUE_LENGTH
    track_files: bool = True
    max_tracked_files: int = DEFAULT_MAX_TRACKED_FILES

    @classmethod
    def resolve(
        cls,
        capture_content: bool | None = None,
        max_value_length: int | None = None,
        track_files: bool | None = None,
        max_tracked_files: int | None = None,
    ) -> InstrumentationConfig:
        if capture_content is not None and not isinstance(capture_content, bool):
            raise TypeError(f"capture_content must be True, False or None, not {capture_content!r}")
        for name, value in (("max_value_length", max_value_length), ("max_tracked_files", max_tracked_files)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if track_files is not None and not isinstance(track_files, bool):
            raise TypeError(f"track_files must be True, False or None, not {track_files!r}")
        return cls(
            capture_content=(
                capture_content if capture_content is not None else parse_bool_env(CAPTURE_CONTENT_ENV, True)
            ),
            max_value_length=(
                max_value_length
                if max_value_length is not None
                else _parse_int_env(MAX_VALUE_LENGTH_ENV, DEFAULT_MAX_VALUE_LENGTH)
            ),
            track_files=True if track_files is None else track_files,
            max_tracked_files=max_tracked_files or DEFAULT_MAX_TRACKED_FILES,
        )
