"""Safe serialisation, secret scrubbing and the log-once guard.

Everything that turns user data into an attribute goes through here, so that
bytes, cycles, huge values and secrets are handled the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

_logger = logging.getLogger("otel_cmbagent")

REDACTED = "[REDACTED]"
TRUNCATION_MARK = "…[truncated by otel-cmbagent: {total} chars in total]"
_MAX_DEPTH = 32

# A key that names a secret: "api_key", "x-api-key", "Authorization", "github_token", "password"...
# (but not "max_tokens" or "completion_tokens").
_SECRET_KEY = re.compile(
    r"(?:^|[_\-. ])(?:api[_\-]?key|apikey|token|access[_\-]?token|refresh[_\-]?token|secret|client[_\-]?secret|"
    r"password|passwd|pwd|authorization|auth|credentials?|private[_\-]?key|session[_\-]?key|cookie)$",
    re.IGNORECASE,
)
# Values that look like credentials whatever key they sit under.
_SECRET_VALUE = re.compile(
    r"(?:\bsk-[A-Za-z0-9_\-]{12,}"  # OpenAI / Anthropic style keys
    r"|\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}"  # Authorization header values
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack tokens
    r"|\bAIza[0-9A-Za-z_\-]{30,})"  # Google API keys
)
_SECRET_ENV_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
_MIN_SECRET_LENGTH = 8

_known_secrets: set[str] = set()
_known_secrets_lock = threading.Lock()
_known_secrets_sorted: tuple[str, ...] = ()


def register_secret(value: Any) -> None:
    """Remember a secret value so it is scrubbed from any text we record (e.g. an ``api_key`` seen in ``llm_config``)."""
    global _known_secrets_sorted
    if not isinstance(value, str) or len(value) < _MIN_SECRET_LENGTH or value in _known_secrets:
        return
    with _known_secrets_lock:
        _known_secrets.add(value)
        # Longest first, so a secret that contains another is replaced whole.
        _known_secrets_sorted = tuple(sorted(_known_secrets, key=len, reverse=True))


def register_secrets_from_environment(environ: Mapping[str, str] | None = None) -> None:
    """Treat the values of ``*_API_KEY``/``*_TOKEN``/``*_SECRET``/``*_PASSWORD`` variables as secrets."""
    for name, value in (environ if environ is not None else os.environ).items():
        if _SECRET_ENV_NAME.search(name):
            register_secret(value)


def register_secrets_from_config(config: Any) -> None:
    """Register every secret-named value found in an ``llm_config``/``config_list``-like structure."""
    for key, value in _walk_items(config, 0, set()):
        if isinstance(key, str) and _SECRET_KEY.search(key):
            register_secret(value if isinstance(value, str) else _secret_str(value))


def _secret_str(value: Any) -> Any:
    # pydantic SecretStr and friends
    getter = getattr(value, "get_secret_value", None)
    if callable(getter):
        try:
            return getter()
        except Exception:  # noqa: BLE001
            return None
    return None


def _walk_items(value: Any, depth: int, seen: set[int]) -> Iterable[tuple[Any, Any]]:
    if depth > _MAX_DEPTH or id(value) in seen:
        return
    if isinstance(value, Mapping):
        seen.add(id(value))
        for key, item in list(value.items()):
            yield key, item
            yield from _walk_items(item, depth + 1, seen)
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        for item in value:
            yield from _walk_items(item, depth + 1, seen)
    elif hasattr(value, "model_dump"):
        seen.add(id(value))
        try:
            dumped = value.model_dump()
        except Exception:  # noqa: BLE001
            return
        # model_dump turns SecretStr into SecretStr objects; keep walking.
        yield from _walk_items(dumped, depth + 1, seen)


def scrub(text: str) -> str:
    """Remove known secrets and credential-looking values from a string."""
    for secret in _known_secrets_sorted:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if _SECRET_VALUE.search(text):
        text = _SECRET_VALUE.sub(REDACTED, text)
    return text


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + TRUNCATION_MARK.format(total=len(text))


def safe_text(value: Any, limit: int) -> str:
    """A value as scrubbed, bounded text (strings as they are, anything else as JSON)."""
    text = value if isinstance(value, str) else to_json(value, limit)
    return truncate(scrub(text), limit)


def to_json(value: Any, limit: int) -> str:
    """JSON for any value: never raises, never loops, bounded and scrubbed."""
    try:
        text = json.dumps(jsonable(value, limit), ensure_ascii=False, separators=(",", ":"))
    except Exception as exc:  # noqa: BLE001 - last resort: never let serialisation fail the host
        text = json.dumps(f"<unserialisable {type(value).__name__}: {type(exc).__name__}>")
    return truncate(scrub(text), limit)


def jsonable(value: Any, limit: int, _depth: int = 0, _seen: set[int] | None = None) -> Any:
    """A JSON-safe copy: secret-named keys redacted, bytes/cycles/unknown objects replaced by markers.

    Strings are cut at ``limit`` so a huge message costs O(limit), not O(size).
    """
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            # NaN and infinities are not JSON: keep them readable as strings
            return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
        return value
    if isinstance(value, str):
        return truncate(value, limit)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<binary {len(value)} bytes>"
    if _depth >= _MAX_DEPTH:
        return "<max depth>"
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return "<cycle>"
    if isinstance(value, Mapping):
        seen.add(id(value))
        out: dict[str, Any] = {}
        for key, item in list(value.items()):
            name = key if isinstance(key, str) else str(key)
            if _SECRET_KEY.search(name) and item not in (None, ""):
                out[name] = REDACTED
            else:
                out[name] = jsonable(item, limit, _depth + 1, seen)
        seen.discard(id(value))
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seen.add(id(value))
        out_list = [jsonable(item, limit, _depth + 1, seen) for item in list(value)]
        seen.discard(id(value))
        return out_list
    getter = getattr(value, "get_secret_value", None)
    if callable(getter):
        return REDACTED
    if hasattr(value, "model_dump") and callable(value.model_dump):
        try:
            return jsonable(value.model_dump(), limit, _depth + 1, seen)
        except Exception:  # noqa: BLE001
            pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            return jsonable(dataclasses.asdict(value), limit, _depth + 1, seen)
        except Exception:  # noqa: BLE001
            pass
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        text = f"<{type(value).__name__}>"
    return truncate(text, limit)


class LogOnce:
    """Log an internal error once per kind, so a broken hook cannot flood the host's logs."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, where: str, exc: BaseException) -> None:
        kind = f"{where}:{type(exc).__name__}"
        with self._lock:
            if kind in self._seen:
                return
            self._seen.add(kind)
        try:
            _logger.warning("otel-cmbagent: internal error in %s (%s); tracing continues", where, exc, exc_info=exc)
        except Exception:  # noqa: BLE001
            pass


log_internal_error = LogOnce()
