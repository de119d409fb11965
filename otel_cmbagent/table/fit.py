"""Values made storable for one table's columns, so one bad value never fails a batch (every run's rows in it).

The instrumentation cleans what it records, but a row also carries what it did not make: attributes set by
host code or other instrumentations (bytes, NaN), exception texts (NUL, lone surrogates), ids and names from
hosts (longer than cmbagent's ``VARCHAR(36)``/``VARCHAR(100)``). Per column type:

- text: NUL and lone surrogates become U+FFFD (PostgreSQL rejects NUL, UTF-8 drivers lone surrogates), bytes
  are decoded; on a database that enforces lengths (not SQLite) a value longer than ``String(n)`` is cut to
  ``n`` characters ending in ``…`` and 8 hex digits of the full value's SHA-256 - deterministic, so every row
  of a run keeps one fitted ``run_id``, and two long ids with one prefix stay apart - and the full value is
  kept in ``meta["<column>_full"]``;
- JSON: the same for every string and key inside; bytes decoded; NaN and infinities (which PostgreSQL's
  ``json`` rejects) as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``; other objects as their text;
- integers beyond the column's range (PostgreSQL ``integer`` is 32-bit) become NULL, the value kept in meta.

A row whose values are all fine is returned as it is: the common case costs a type check per column.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from ..pipeline.values import storable
from .encoding import decoded, jsonable

_MARK = "\u2026"  # then 8 hex digits
_TEXT, _JSON, _INTEGER = "text", "json", "integer"  # how TableFit.fit treats a column
_DIGEST_LENGTH = 8


def fit_text(text: str, length: int) -> str:
    """``text`` cut to ``length`` characters, ending in ``…`` + 8 hex digits of its SHA-256 (when longer)."""
    if len(text) <= length:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_LENGTH]
    if length <= _DIGEST_LENGTH + 1:
        return digest[:length]
    return text[: length - _DIGEST_LENGTH - 1] + _MARK + digest


# The C encoder, strict: what it encodes without NUL (escaped as \u0000) or a lone surrogate is already safe.
_STRICT = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_strict_json = _STRICT.encode
_local = threading.local()


def _new_encoder() -> Callable[[Any, int], Any] | None:
    """The C encoder ``_strict_json`` makes on every call (``JSONEncoder.iterencode``'s one-shot path), made
    once per thread: making it is ~40% of encoding a row's ``meta`` (~1 µs of 2.6, measured here). None when
    this Python has no C encoder, or it does not encode as ``_strict_json`` does."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encoder = make({}, _STRICT.default, json.encoder.encode_basestring, None, _STRICT.key_separator,
                       _STRICT.item_separator, _STRICT.sort_keys, _STRICT.skipkeys, _STRICT.allow_nan)
        sample = {"a": [1, 2.5, True, None, "é\x00"], "b": {"c": -1e300}}
        if "".join(encoder(sample, 0)) != _strict_json(sample):
            return None
    except Exception:  # noqa: BLE001 - another signature: the ordinary encoder
        return None
    return encoder


def _strict(value: Any) -> str:
    """``_strict_json(value)``, with this thread's encoder (see :func:`_new_encoder`)."""
    encoder = getattr(_local, "encoder", None)
    if encoder is None:
        encoder = _local.encoder = _new_encoder() or False
    if encoder is False or type(value) is str:
        return _strict_json(value)
    try:
        return "".join(encoder(value, 0))
    except BaseException:
        _local.encoder = None  # its circular-reference markers may still hold this value's containers
        raise


def json_ok(value: Any) -> bool:
    """True when every JSON column takes ``value`` as it is (checked by the C encoder)."""
    try:
        text = _strict(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return "\\u0000" not in text and (text.isascii() or _utf8(text))


def json_safe(value: Any) -> Any:
    """``value`` as every JSON column takes it (the same object when it already is)."""
    return value if json_ok(value) else jsonable(value)


def json_text(value: Any) -> str:
    """JSON text every database takes: the ``json_serializer`` of the engines the SQL sink makes, so their
    JSON values are made safe while they are serialised anyway (no second pass)."""
    try:
        text = _strict(value)
    except (TypeError, ValueError, RecursionError):
        return _strict_json(jsonable(value))
    if "\\u0000" in text or not (text.isascii() or _utf8(text)):
        return _strict_json(jsonable(value))
    return text


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _integer_bounds(column: sa.Column, sqlite: bool) -> tuple[int, int]:
    if sqlite or isinstance(column.type, sa.BigInteger):
        bits = 64
    else:
        bits = 16 if isinstance(column.type, sa.SmallInteger) else 32
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class TableFit:
    """How values fit ``table``'s columns on ``dialect`` (SQLite enforces no lengths, and 64-bit integers)."""

    def __init__(self, table: sa.Table, dialect: sa.Dialect | str, meta_column: str | None = None) -> None:
        name = dialect if isinstance(dialect, str) else dialect.name
        sqlite = name == "sqlite"
        # an engine made by make_engine serialises JSON with json_text: nothing to check here
        self.json_checked = getattr(dialect, "_json_serializer", None) is json_text
        self.meta_column = meta_column
        self.lengths: dict[str, int | None] = {}
        self.json: set[str] = set()
        self.integers: dict[str, tuple[int, int]] = {}
        for column in table.c:
            kind = column.type
            if isinstance(kind, sa.JSON):
                self.json.add(column.name)
            elif isinstance(kind, sa.String):
                self.lengths[column.name] = None if sqlite else kind.length
            elif isinstance(kind, sa.Integer):
                self.integers[column.name] = _integer_bounds(column, sqlite)
        self._kinds = {**dict.fromkeys(self.integers, _INTEGER), **dict.fromkeys(self.lengths, _TEXT),
                       **dict.fromkeys(self.json, _JSON)}

    def fit(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` (mapped onto the table) with every value storable; changed in place, and returned."""
        kept: dict[str, Any] = {}
        documents = []
        lengths, kinds = self.lengths, self._kinds
        for name, value in row.items():
            if value is None:
                continue
            kind = kinds.get(name)  # one lookup per value: this runs for every column of every row
            if kind is _TEXT:
                length = lengths[name]
                if type(value) is str and value.isascii() and "\x00" not in value and (
                        length is None or len(value) <= length):
                    continue  # almost every value
                row[name] = self._text(name, value, kept)
            elif kind is _JSON:
                documents.append(name)
            elif kind is _INTEGER and isinstance(value, int) and not isinstance(value, bool):
                low, high = self.integers[name]
                if not low <= value <= high:
                    row[name], kept[name] = None, value
        if documents and not self.json_checked and not json_ok([row[name] for name in documents]):  # one check
            for name in documents:
                row[name] = json_safe(row[name])
        if kept:
            meta = row.get(self.meta_column) if self.meta_column else None
            if isinstance(meta, dict):
                meta.update({f"{name}_full": value for name, value in kept.items()})
        return row

    def _text(self, name: str, value: Any, kept: dict[str, Any]) -> str:
        length = self.lengths[name]
        if isinstance(value, str):
            text = storable(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            text = decoded(value)
        else:
            text = storable(str(value))
        if length is not None and len(text) > length:
            kept[name] = text
            text = fit_text(text, length)
        return text
