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
import math
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa

from otel_cmbagent.utils import storable

_MARK = "\u2026"  # then 8 hex digits
_DIGEST_LENGTH = 8
_MAX_DEPTH = 64
_FLOATS = {math.inf: "Infinity", -math.inf: "-Infinity"}


def fit_text(text: str, length: int) -> str:
    """``text`` cut to ``length`` characters, ending in ``…`` + 8 hex digits of its SHA-256 (when longer)."""
    if len(text) <= length:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_LENGTH]
    if length <= _DIGEST_LENGTH + 1:
        return digest[:length]
    return text[: length - _DIGEST_LENGTH - 1] + _MARK + digest


def decoded(value: bytes | bytearray | memoryview) -> str:
    return storable(bytes(value).decode("utf-8", errors="replace"))


# The C encoder, strict: what it encodes without NUL (escaped as \u0000) or a lone surrogate is already safe.
_strict_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def json_ok(value: Any) -> bool:
    """True when every JSON column takes ``value`` as it is (checked by the C encoder)."""
    try:
        text = _strict_json(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return "\\u0000" not in text and (text.isascii() or _utf8(text))


def json_safe(value: Any) -> Any:
    """``value`` as every JSON column takes it (the same object when it already is)."""
    return value if json_ok(value) else _json_walk(value)


def json_text(value: Any) -> str:
    """JSON text every database takes: the ``json_serializer`` of the engines the SQL sink makes, so their
    JSON values are made safe while they are serialised anyway (no second pass)."""
    try:
        text = _strict_json(value)
    except (TypeError, ValueError, RecursionError):
        return _strict_json(_json_walk(value))
    if "\\u0000" in text or not (text.isascii() or _utf8(text)):
        return _strict_json(_json_walk(value))
    return text


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_walk(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return storable(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _FLOATS.get(value, "NaN")
    if depth >= _MAX_DEPTH:
        return "<max depth>"
    if isinstance(value, Mapping):
        items = [(_json_key(key), _json_walk(item, depth + 1)) for key, item in value.items()]
        same = isinstance(value, dict) and all(a is k and b is v for (a, b), (k, v) in zip(items, value.items()))
        return value if same else dict(items)
    if isinstance(value, (list, tuple)):
        items = [_json_walk(item, depth + 1) for item in value]
        same = isinstance(value, list) and all(a is b for a, b in zip(items, value))
        return value if same else items
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decoded(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return storable(str(value))


def _json_key(key: Any) -> Any:
    if isinstance(key, str):
        return storable(key)
    if key is None or isinstance(key, (bool, int, float)):
        return key
    return storable(str(key))


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

    def fit(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` (mapped onto the table) with every value storable; changed in place, and returned."""
        kept: dict[str, Any] = {}
        documents = []
        for name, value in row.items():
            if value is None:
                continue
            if name in self.lengths:
                length = self.lengths[name]
                if type(value) is str and value.isascii() and "\x00" not in value and (
                        length is None or len(value) <= length):
                    continue  # almost every value
                row[name] = self._text(name, value, kept)
            elif name in self.json:
                documents.append(name)
            elif name in self.integers and isinstance(value, int) and not isinstance(value, bool):
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
