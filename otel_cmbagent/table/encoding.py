"""Row values to and from text: the one JSON-safe conversion, and rows as the database returns them.

Every JSON a row becomes - the websocket sink's ``data``, the viewer's API and live feed, the CLI's
``--json``, spill files - goes through :func:`jsonable` / :func:`json_default` / :func:`dumps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import date, datetime, timezone
from typing import Any

from ..pipeline.values import storable
from .schema import JSON_COLUMNS, LINK_COLUMNS, TIME_COLUMNS

_MAX_DEPTH = 64
_FLOATS = {math.inf: "Infinity", -math.inf: "-Infinity"}


def decoded(value: bytes | bytearray | memoryview) -> str:
    """Bytes as storable text (invalid UTF-8 replaced)."""
    return storable(bytes(value).decode("utf-8", errors="replace"))


def jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON every database and client takes: strings and keys :func:`storable` (NUL and lone
    surrogates as U+FFFD), bytes decoded, NaN/infinities as ``"NaN"``/``"Infinity"``/``"-Infinity"``, datetimes
    and dates in ISO 8601, tuples and sets as lists, any other object as its text. The same object comes
    back when nothing had to change (the common case allocates nothing)."""
    if isinstance(value, str):
        return storable(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _FLOATS.get(value, "NaN")
    if _depth >= _MAX_DEPTH:
        return "<max depth>"
    if isinstance(value, Mapping):
        items = [(_key(key), jsonable(item, _depth + 1)) for key, item in value.items()]
        same = isinstance(value, dict) and all(a is k and b is v for (a, b), (k, v) in zip(items, value.items()))
        return value if same else dict(items)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(item, _depth + 1) for item in value]
        same = isinstance(value, list) and all(a is b for a, b in zip(items, value))
        return value if same else items
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decoded(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return storable(str(value))


def _key(key: Any) -> Any:
    if isinstance(key, str):
        return storable(key)
    if key is None or isinstance(key, (bool, int, float)):
        return key
    return storable(str(key))


def json_default(value: Any) -> Any:
    """``default=`` for :func:`json.dumps`: what :func:`jsonable` makes of a value JSON does not know."""
    return jsonable(value)


def _fast_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError  # anything else: the slow path converts the whole value


def dumps(value: Any) -> str:
    """Compact JSON text of ``value`` (UTF-8 kept, never NaN). Plain rows take a fast path; anything else
    (bytes, NaN, sets, objects) is converted by :func:`jsonable` first."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_fast_default)
    except (TypeError, ValueError):
        return json.dumps(jsonable(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# --- rows as the database returns them -------------------------------------------------------------
def decode_json(value: Any) -> Any:
    """A JSON column's value as data (drivers return text on some databases)."""
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def utc(value: Any) -> Any:
    """A timezone-aware UTC datetime for a datetime or ISO text (naive values are UTC); others unchanged."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A raw table row as readers use it: JSON decoded, UTC times, ``metadata`` as ``meta``, link ids filled
    from meta (cmbagent's own table has no trace_id/span_id columns)."""
    out = dict(row)
    if "meta" not in out and "metadata" in out:
        out["meta"] = out.pop("metadata")
    for key in JSON_COLUMNS:
        if key in out:
            out[key] = decode_json(out[key])
    for key in TIME_COLUMNS:
        if key in out:
            out[key] = utc(out[key])
    meta = out.get("meta") if isinstance(out.get("meta"), dict) else {}
    for key in LINK_COLUMNS:
        if out.get(key) is None:
            out[key] = meta.get(key)
    return out


def row_from_json(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from JSON (a spill file): its time columns as datetimes again."""
    for key in TIME_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    return row
