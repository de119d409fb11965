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
# Text past the cut is still scanned this far, so a secret straddling the cut is found whole.
_MIN_SCRUB_MARGIN = 64

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD, so every sink can store and encode it.

    PostgreSQL rejects NUL in text; UTF-8 encoders (protobuf, database drivers) reject lone
    surrogates, which ``json.loads`` happily produces from a ``"\\udcff"`` escape in an LLM's tool
    call. Plain ASCII without NUL - almost every value - costs one O(1) check and one ``memchr``.
    """
    if text.isascii():
        return text.replace("\x00", REPLACEMENT) if "\x00" in text else text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _UNSTORABLE.sub(REPLACEMENT, text)
    return text.replace("\x00", REPLACEMENT) if "\x00" in text else text


def register_secret(value: Any) -> None:
    """Remember a secret value so it is scrubbed from any text we record (e.g. an ``api_key`` seen in ``llm_config``).

    Its escaped spellings (JSON, Python ``repr``) are remembered too: a password with ``"`` or ``\\``
    in text that already holds JSON (a tool's JSON result, a repr in a traceback) is found as well.
    """
    global _known_secrets_sorted
    if not isinstance(value, str) or len(value) < _MIN_SECRET_LENGTH or value in _known_secrets:
        return
    forms = {value, storable(value), *_escaped_forms(value)}
    with _known_secrets_lock:
        _known_secrets.update(form for form in forms if len(form) >= _MIN_SECRET_LENGTH)
        # Longest first, so a secret that contains another is replaced whole.
        _known_secrets_sorted = tuple(sorted(_known_secrets, key=len, reverse=True))


def _escaped_forms(value: str) -> set[str]:
    forms = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    try:
        forms.add(repr(value)[1:-1])
    except Exception:  # noqa: BLE001
        pass
    return forms


def register_secrets_from_environment(environ: Mapping[str, str] | None = None) -> None:
    """Treat the values of ``*_API_KEY``/``*_TOKEN``/``*_SECRET``/``*_PASSWORD`` variables as secrets."""
    for name, value in list((environ if environ is not None else os.environ).items()):
        if _SECRET_ENV_NAME.search(name):
            register_secret(value)


# What os.environ held when it was last scanned. A variable set later (``os.environ[...] = ...``,
# e.g. a key loaded after setup) is noticed by the next scrub: comparing the raw mapping to this
# copy costs ~0.5 µs for 40 variables (most values compare by identity); a change triggers a rescan.
_environ_seen: dict[Any, Any] | None = None
_environ_lock = threading.Lock()


def notice_environment() -> None:
    """Register secret-named variables that appeared in ``os.environ`` since the last look (cheap when none did)."""
    global _environ_seen
    current = getattr(os.environ, "_data", None)
    if not isinstance(current, dict):  # not CPython's os._Environ: compare a copy (slower, still correct)
        current = dict(os.environ)
    if current == _environ_seen:
        return
    with _environ_lock:
        snapshot = dict(current)
        register_secrets_from_environment()
        _environ_seen = snapshot


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


def _scrub_known(text: str) -> str:
    if len(text) < _MIN_SECRET_LENGTH:  # shorter than any registered secret or credential pattern
        return text
    for secret in _known_secrets_sorted:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if _SECRET_VALUE.search(text):
        text = _SECRET_VALUE.sub(REDACTED, text)
    return text


def scrub(text: str) -> str:
    """Remove known secrets (including environment variables set since the last look) and credential-looking values."""
    notice_environment()
    return _scrub_known(text)


def truncate(text: str, limit: int, total: int | None = None) -> str:
    """``text`` cut at ``limit`` with the mark; ``total`` is the original length when ``text`` is already a prefix."""
    total = len(text) if total is None else total
    if len(text) <= limit and total <= len(text):
        return text
    return text[:limit] + TRUNCATION_MARK.format(total=total)


# The last long value cleaned on this thread, its result, and the secrets it was scrubbed with: a message's
# text is cleaned when it becomes a message part and again when the parts are serialised; the second pass
# (same object in, or the first pass's result in) is free. The credential regex costs ~10-30 ns per char.
_recent = threading.local()
_CACHED_LENGTH = 64


def _clean(text: str, limit: int) -> str:
    """Storable, scrubbed, then cut - in that order, so a secret straddling the cut is removed whole.

    Only ``limit`` plus a margin (the longest known secret) is scanned: a huge value costs O(limit).
    """
    if len(text) <= limit and len(text) < _CACHED_LENGTH:
        return _scrub_known(storable(text))
    secrets = _known_secrets_sorted
    last = getattr(_recent, "entry", None)
    if last is not None and (last[0] is text or last[1] is text) and last[2] == limit and last[3] is secrets:
        return last[1]
    if len(text) > limit:
        longest = len(secrets[0]) if secrets else 0
        window = text[: limit + max(longest, _MIN_SCRUB_MARGIN)]
        result = truncate(_scrub_known(storable(window)), limit, total=len(text))
    else:
        result = _scrub_known(storable(text))
    _recent.entry = (text, result, limit, secrets)
    return result


def clean_text(text: str, limit: int) -> str:
    """A string as it may be recorded: NUL/lone surrogates replaced, secrets scrubbed, then cut at ``limit``."""
    notice_environment()
    return _clean(text, limit)


def safe_text(value: Any, limit: int) -> str:
    """A value as scrubbed, bounded text (strings as they are, anything else as JSON)."""
    if isinstance(value, str):
        return clean_text(value, limit)
    return to_json(value, limit)


def to_json(value: Any, limit: int) -> str:
    """JSON for any value: never raises, never loops, bounded and scrubbed.

    Every string (keys included) is made storable and scrubbed *before* serialisation: scrubbing the
    JSON text would miss a secret whose JSON spelling differs (a ``"`` or ``\\`` in it).
    """
    notice_environment()
    try:
        text = json.dumps(jsonable(value, limit), ensure_ascii=False, separators=(",", ":"))
    except Exception as exc:  # noqa: BLE001 - last resort: never let serialisation fail the host
        text = json.dumps(f"<unserialisable {type(value).__name__}: {type(exc).__name__}>")
    return truncate(text, limit)


def jsonable(value: Any, limit: int, _depth: int = 0, _seen: set[int] | None = None) -> Any:
    """A JSON-safe copy: secret-named keys redacted, strings cleaned (:func:`clean_text`), bytes/cycles/unknown
    objects replaced by markers.

    Strings are cut at ``limit`` so a huge message costs O(limit), not O(size).
    """
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            # NaN and infinities are not JSON: keep them readable as strings
            return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
        return value
    if isinstance(value, str):
        return _clean(value, limit)
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
            name = _clean(key if isinstance(key, str) else safe_str(key), limit)
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
    return _clean(safe_repr(value), limit)


def safe_repr(value: Any) -> str:
    """``repr(value)``, or ``<TypeName>`` when its ``__repr__`` raises."""
    try:
        return repr(value)
    except Exception:  # noqa: BLE001
        return f"<{type(value).__name__}>"


def safe_str(value: Any) -> str:
    """``str(value)``; when its ``__str__`` raises, a marked placeholder (logged once per type)."""
    try:
        return str(value)
    except Exception as exc:  # noqa: BLE001
        log_internal_error(f"str() of a {type(value).__name__} value", exc)
        return f"<unprintable {type(value).__name__}: str() raised {type(exc).__name__}>"


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
