"""The live run viewer: a read-only Starlette app over the ``execution_events`` table.

    from otel_cmbagent.viewer.app import create_app, serve_viewer

    serve_viewer("otel_cmbagent.db")                       # http://127.0.0.1:8765/ until Ctrl-C
    app = create_app("sqlite:///runs.db", token="s3cret")  # an ASGI app to mount or run yourself

Routes (every one GET/HEAD or websocket; nothing writes or deletes):

- ``/``                            the page (HTML + CSS + plain JS, inlined from ``static/``; no CDN, no build)
- ``/api/config``                  ``{"jaeger_url", "poll_interval", "version", "db"}``
- ``/api/runs?limit=N``            runs, newest first (:func:`otel_cmbagent.store.list_runs`)
- ``/api/runs/{run}``              one run's summary plus ``by_type``
- ``/api/runs/{run}/events``       the run's rows in ``execution_order`` (every column, JSON decoded, ISO times);
  ``?after=N`` only rows with ``execution_order > N``, plus (``&running=id1,id2``) the current rows of the given
  ids, i.e. what a client holding those rows as ``running`` needs to catch up; ``?type=``/``?agent=`` filter.
  ``{run}`` is a run id, a unique prefix of one, a trace id, or ``last`` (URL-encoded; ``/`` in it may be
  sent as ``%2F`` or plain); unknown -> 404 ``{"error": ...}``; a bad ``after`` -> 400.
- ``/ws``                          a websocket broadcasting ``exporters.websocket.envelope`` messages
  (``event_type="event_captured"``) for every new or changed row of any run, including rows written by
  other processes: the table is polled every ``poll_interval`` seconds (new orders per recently active run,
  gaps in a run's gapless order, and every row last seen ``running``).

Security: :func:`serve_viewer` binds 127.0.0.1 and refuses any non-loopback address without a token. With a
token every HTTP and websocket request must present it (``Authorization: Bearer``, ``X-Token`` or
``?token=``; compared with :func:`hmac.compare_digest`), else 401. Without a token only loopback ``Host``
headers are served (no DNS rebinding) and a browser websocket must come from a loopback origin (no
cross-site websocket hijacking). Responses carry a strict Content-Security-Policy and ``no-referrer``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from otel_cmbagent import store
from otel_cmbagent.exporters import writers
from otel_cmbagent.exporters.websocket import DATA_FIELDS, envelope
from otel_cmbagent.version import __version__

__all__ = ["ViewerServer", "check_bind", "create_app", "serve_viewer"]

_logger = logging.getLogger("otel_cmbagent.viewer")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_HEADER = "x-token"

_RUNNING = "running"
# how far back (by row timestamp) the poller looks for activity; a full scan of run ids runs every
# FULL_SCAN_SECONDS as a safety net for rows whose timestamps fall outside the window (clock skew)
RECENT_WINDOW = timedelta(minutes=10)
FULL_SCAN_SECONDS = 15.0
GAP_TTL_SECONDS = 30.0
LIVENESS_SECONDS = 2.0  # how often the writers of running rows are checked (a killed process: "interrupted")
MAX_GAPS = 2_000
CLIENT_QUEUE = 50_000
MAX_RUNNING_IDS = 1_000


# --- security helpers ----------------------------------------------------------------------------
def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    lowered = host.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Raise ValueError for a non-loopback ``host`` without a token, or an empty token."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("the viewer token must be a non-empty string (or None on a loopback address)")
    if token is None and not _is_loopback(host):
        raise ValueError(
            f"refusing to serve the viewer on {host!r} without a token: anyone who can reach that address "
            "would read every run's messages, tool arguments and code. Bind 127.0.0.1 (the default), or "
            "pass a token (clients then send 'Authorization: Bearer <token>', 'X-Token: <token>' or ?token=<token>)"
        )


def _host_of(header: str) -> str:
    """The host part of a Host header (``[::1]:8765`` -> ``::1``, ``localhost:80`` -> ``localhost``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _check_jaeger_url(url: str | None) -> str | None:
    if url is None or not str(url).strip():
        return None
    url = str(url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"jaeger_url must be an http(s) URL such as http://localhost:16686, not {url!r}")
    return url


# --- JSON ----------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: ISO datetimes, lists for tuples/sets, non-finite floats as text."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _jsonable(value)
    raise TypeError  # anything else: the slow path converts it


def _dumps(value: Any) -> str:
    try:  # the fast path: plain rows (datetimes through ``default``)
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_default)
    except (TypeError, ValueError):  # tuples-as-keys, bytes, NaN, ...
        return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _dumps(content).encode("utf-8")


def _error(status: int, message: str, **extra: Any) -> Response:
    return _JSON({"error": message, **extra}, status_code=status)


# --- reading rows --------------------------------------------------------------------------------
def event_data(row: Mapping[str, Any], run_key: str | None = None) -> dict[str, Any]:
    """The websocket ``data`` of a decoded row: ``exporters.websocket.DATA_FIELDS`` first (``event_id`` is
    the row's ``id``), then the row's other columns (``meta``, ``started_at``, ``completed_at``, ...) and
    ``run_key`` (the run id, or the trace id of rows written outside a run)."""
    data = {field: row.get("id" if field == "event_id" else field) for field in DATA_FIELDS}
    for key, value in row.items():
        if key not in data:
            data[key] = value
    data["run_key"] = run_key if run_key is not None else (row.get("run_id") or row.get("trace_id"))
    return _jsonable(data)


class _Source:
    """The database, opened lazily (a viewer may start before the first run creates the file)."""

    def __init__(self, db: str | Engine, table: str) -> None:
        self.db = db
        self.table_name = table
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        """The engine on the event table; raises :class:`store.StoreError` while it does not exist."""
        with self._lock:
            if self._engine is None:
                self._engine = store.open_store(self.db, table=self.table_name)
            return self._engine

    def table(self) -> sa.Table:
        return store.events_table(self.engine(), self.table_name)

    def describe(self) -> str:
        if isinstance(self.db, Engine):
            return self.db.url.render_as_string(hide_password=True)
        text = str(self.db)
        if "://" in text:
            with contextlib.suppress(Exception):
                return sa.engine.make_url(text).render_as_string(hide_password=True)
        return text

    # --- queries shared by the API and the poller ---
    def key_column(self, table: sa.Table) -> Any:
        c = table.c
        if "trace_id" in c:
            return sa.func.coalesce(c.run_id, c.trace_id)
        return c.run_id

    def where_run(self, table: sa.Table, run_key: str) -> Any:
        c = table.c
        if "trace_id" in c:
            return sa.or_(c.run_id == run_key, sa.and_(c.run_id.is_(None), c.trace_id == run_key))
        return c.run_id == run_key

    def rows_after(
        self,
        run_key: str,
        after: int,
        running_ids: Sequence[str] = (),
        event_types: Sequence[str] = (),
        agents: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        table = self.table()
        c = table.c
        changed = c.execution_order > after
        if running_ids:
            changed = sa.or_(changed, c.id.in_(list(running_ids)))
        statement = sa.select(table).where(self.where_run(table, run_key), changed)
        if event_types:
            statement = statement.where(store.kinds_condition(c, event_types))
        if agents:
            statement = statement.where(c.agent_name.in_(list(agents)))
        statement = statement.order_by(c.execution_order, c.timestamp, c.id)
        with self.engine().connect() as connection:
            rows = [store.decode_row(row._mapping) for row in connection.execute(statement)]
        return store.mark_interrupted(self.engine(), rows, table=table)


# --- live feed: poll the table, broadcast what changed --------------------------------------------
class _RunState:
    __slots__ = ("max_order", "gaps")

    def __init__(self, max_order: int) -> None:
        self.max_order = max_order
        self.gaps: dict[int, float] = {}  # missing order -> when it was first missed (monotonic)


class _Poller:
    """Finds new and changed rows since the previous poll (runs in a worker thread, one poll at a time).

    Per run: the highest ``execution_order`` seen and the orders missing below it (orders are gapless
    per run, so a missing one is a row still on its way: e.g. a message enqueued just after its
    neighbours); and every row last seen ``running``. Each poll reads the runs with recent rows
    (``timestamp`` index), fetches their rows above the known order or in a gap, and re-reads the
    running rows by id. The first poll only records the state.
    """

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.runs: dict[str, _RunState] = {}
        self.running: dict[str, str] = {}  # row id -> run key
        self.writers: dict[str, str] = {}  # running row id -> the process that wrote it
        self._last_liveness = 0.0
        self.ready = False
        self._last_full_scan = 0.0
        self.polls = 0
        self.broadcast_rows = 0

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            engine = self.source.engine()
            table = self.source.table()
        except store.StoreError:
            return []
        key = self.source.key_column(table).label("run_key")
        c = table.c
        now = datetime.now(timezone.utc)
        since = now - RECENT_WINDOW
        monotonic = time.monotonic()
        out: list[tuple[str, dict[str, Any]]] = []
        self.polls += 1
        with engine.connect() as connection:
            recent = sa.select(key, sa.func.max(c.execution_order)).where(c.timestamp >= since).group_by(key)
            maxima: dict[str, int] = {k: m for k, m in connection.execute(recent) if k is not None and m is not None}
            if monotonic - self._last_full_scan >= FULL_SCAN_SECONDS:
                self._last_full_scan = monotonic
                full = (
                    sa.select(c.run_id, sa.func.max(c.execution_order))
                    .where(c.run_id.is_not(None))
                    .group_by(c.run_id)
                )
                for k, m in connection.execute(full):
                    if m is not None and m > maxima.get(k, -1):
                        maxima[k] = m
            if not self.ready:
                for k, m in maxima.items():
                    self.runs[k] = _RunState(m)
                if "status" in c:
                    statement = sa.select(table).where(c.status == _RUNNING)
                    for raw in connection.execute(statement):
                        row = store.decode_row(raw._mapping)
                        k = row.get("run_id") or row.get("trace_id")
                        if k is not None:
                            self._track(row, k)
                self.ready = True
                return []
            for k, highest in maxima.items():
                state = self.runs.get(k)
                if state is None:
                    state = self.runs[k] = _RunState(0)
                for order, first in list(state.gaps.items()):
                    if monotonic - first > GAP_TTL_SECONDS:
                        del state.gaps[order]  # a row that never came (dropped by a full queue, skipped)
                if highest <= state.max_order and not state.gaps:
                    continue
                wanted = c.execution_order > state.max_order
                if state.gaps:
                    wanted = sa.or_(wanted, c.execution_order.in_(sorted(state.gaps)))
                statement = (
                    sa.select(table)
                    .where(self.source.where_run(table, k), wanted)
                    .order_by(c.execution_order, c.timestamp, c.id)
                )
                rows = [store.decode_row(row._mapping) for row in connection.execute(statement)]
                if not rows:
                    continue
                seen = {row.get("execution_order") for row in rows}
                top = max((o for o in seen if isinstance(o, int)), default=state.max_order)
                if top > state.max_order:
                    missing = set(range(state.max_order + 1, top)) - seen
                    if len(state.gaps) + len(missing) <= MAX_GAPS:
                        for order in missing:
                            state.gaps[order] = monotonic
                    state.max_order = top
                for order in seen:
                    state.gaps.pop(order, None)
                for row in rows:
                    self._track(row, k)
                    out.append((k, row))
            if self.running and "status" in c:
                fresh = {row_id for _k, row in out for row_id in (row.get("id"),)}
                ids = [row_id for row_id in self.running if row_id not in fresh]
                finished: list[tuple[str, dict[str, Any]]] = []
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    statement = sa.select(table).where(c.id.in_(chunk), c.status != _RUNNING)
                    for raw in connection.execute(statement):
                        row = store.decode_row(raw._mapping)
                        k = self.running.get(row["id"])
                        if k is not None:
                            self._track(row, k)
                            finished.append((k, row))
                finished.sort(key=lambda item: (item[0], item[1].get("execution_order") or 0))
                out.extend(finished)
        out.extend(self._interrupted(engine, table, monotonic))
        self.broadcast_rows += len(out)
        return out

    def _track(self, row: Mapping[str, Any], run_key: str) -> None:
        """Remember a running row (and its writer), forget a final one."""
        if row.get("status") == _RUNNING:
            self.running[row["id"]] = run_key
            meta = row.get("meta")
            writer = meta.get(writers.WRITER_KEY) if isinstance(meta, dict) else None
            if isinstance(writer, str):
                self.writers[row["id"]] = writer
        else:
            self.running.pop(row["id"], None)
            self.writers.pop(row["id"], None)

    def _interrupted(self, engine: Engine, table: sa.Table, monotonic: float) -> list[tuple[str, dict[str, Any]]]:
        """Every LIVENESS_SECONDS: the running rows whose writer is gone (killed), as ``interrupted`` rows."""
        if not self.writers or monotonic - self._last_liveness < LIVENESS_SECONDS:
            return []
        self._last_liveness = monotonic
        gone = writers.gone(engine, set(self.writers.values()))
        ids = [row_id for row_id, writer in self.writers.items() if writer in gone]
        if not ids:
            return []
        with engine.connect() as connection:
            statement = sa.select(table).where(table.c.id.in_(ids[:500]), table.c.status == _RUNNING)
            rows = [store.decode_row(raw._mapping) for raw in connection.execute(statement)]
        out = []
        for row in store.mark_interrupted(engine, rows, table=table):
            k = self.running.get(row["id"])
            if k is not None and row.get("status") != _RUNNING:
                self._track(row, k)
                out.append((k, row))
        return out


class _Client:
    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=CLIENT_QUEUE)


class _Feed:
    """Polls in the background and broadcasts envelopes to every connected websocket client."""

    def __init__(self, source: _Source, poll_interval: float) -> None:
        self.poller = _Poller(source)
        self.poll_interval = poll_interval
        self.clients: set[_Client] = set()
        self._task: asyncio.Task | None = None
        self.dropped_clients = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="otel-cmbagent-viewer-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for client in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                client.queue.put_nowait(None)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                changes = await run_in_threadpool(self.poller.poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad poll (database busy, server down) is retried
                _logger.warning("otel-cmbagent viewer: polling the event table failed: %s: %s", type(exc).__name__, exc)
                changes = []
            if changes and self.clients:
                messages = [json.dumps(envelope(event_data(row, k)), ensure_ascii=False) for k, row in changes]
                for client in list(self.clients):
                    for message in messages:
                        try:
                            client.queue.put_nowait(message)
                        except asyncio.QueueFull:  # a client that does not read: drop it, it resyncs on reconnect
                            self.dropped_clients += 1
                            self.clients.discard(client)
                            with contextlib.suppress(asyncio.QueueEmpty):
                                while True:
                                    client.queue.get_nowait()
                            client.queue.put_nowait(None)
                            break
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.02, self.poll_interval - elapsed))

    async def serve(self, websocket: WebSocket) -> None:
        await websocket.accept()
        client = _Client(websocket)
        self.clients.add(client)

        async def sender() -> None:
            while True:
                message = await client.queue.get()
                if message is None:
                    await websocket.close(code=1013)  # try again later: the client reloads what it missed
                    return
                await websocket.send_text(message)

        async def receiver() -> None:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return

        tasks = [asyncio.create_task(sender()), asyncio.create_task(receiver())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.clients.discard(client)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, Exception):
                    await task


# --- the page ------------------------------------------------------------------------------------
def _static(name: str) -> str:
    return resources.files("otel_cmbagent.viewer").joinpath("static", name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


class _Page:
    """index.html with style.css and app.js inlined (one request, no token in sub-resource URLs)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        style = _static("style.css")
        script = _static("app.js")
        template = _static("index.html")
        # JSON in a data block: '<' escaped so no value can close the element
        config_json = json.dumps(_jsonable(config)).replace("<", "\\u003c").replace(">", "\\u003e")
        self.body = (
            template.replace("/*__STYLE__*/", style)
            .replace("/*__SCRIPT__*/", script)
            .replace("__CONFIG_JSON__", config_json)
        ).encode("utf-8")
        self.csp = "; ".join(
            [
                "default-src 'none'",
                f"script-src '{_sha256(script)}'",
                f"style-src '{_sha256(style)}'",
                "img-src 'self' data:",
                "connect-src 'self'",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            ]
        )


# --- the app -------------------------------------------------------------------------------------
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def _presented_tokens(scope: Mapping[str, Any]) -> list[bytes]:
    """The token as sent, in bytes: ``Authorization: Bearer``, ``X-Token`` (raw, as curl/httpx send UTF-8, and
    percent-decoded, as the page sends a non-ASCII token), then ``?token=`` (percent-decoded)."""
    headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
    presented: list[bytes] = []
    scheme, _, credentials = headers.get("authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer" and credentials.strip():
        presented.append(credentials.strip())
    if headers.get(TOKEN_HEADER, b"").strip():
        raw = headers[TOKEN_HEADER].strip()
        presented.extend({raw, unquote_to_bytes(raw)})
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), encoding="latin-1")
    if query.get("token"):
        presented.append(query["token"][0].encode("latin-1"))
    return presented


def _token_ok(scope: Mapping[str, Any], token: bytes) -> bool:
    """Any presented spelling equals the token (each compared in constant time)."""
    matches = [hmac.compare_digest(candidate, token) for candidate in _presented_tokens(scope)]
    return any(matches)


# uvicorn's sans-I/O websocket protocol logs "ASGI callable returned without completing handshake." at
# ERROR after a websocket *denial response* (our 401/403 with a JSON body), though the client got exactly
# that answer. The flag marks the connection's own task, so only that record is dropped.
_DENIED_HANDSHAKE: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_cmbagent_denied", default=False)


class _DeniedHandshakeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_DENIED_HANDSHAKE.get() and "without completing handshake" in str(record.msg))


_DENIED_FILTER = _DeniedHandshakeFilter()


def _quiet_denied_handshakes() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _DENIED_FILTER not in logger.filters:
        logger.addFilter(_DENIED_FILTER)


class _Guard:
    """ASGI middleware: token, loopback Host/Origin without a token, read-only methods, security headers."""

    def __init__(self, app: Any, token: str | None, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts is not None else None

    def _host_ok(self, host_header: str | None) -> bool:
        if self.allowed_hosts is not None:
            return "*" in self.allowed_hosts or _host_of(host_header or "").lower() in self.allowed_hosts
        if self.token is not None:
            return True
        return _is_loopback(_host_of(host_header or ""))

    def _origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        if origin is None or self.token is not None:
            return True
        parts = urlsplit(origin)
        if parts.netloc and host_header and parts.netloc.lower() == host_header.strip().lower():
            return True
        return _is_loopback(parts.hostname or "")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem: tuple[int, str] | None = None
        if not self._host_ok(headers.get("host")):
            problem = (403, "this viewer only answers requests addressed to a loopback host "
                            "(start it with a token to serve others)")
        elif self.token is not None:
            if not _token_ok(scope, self.token):
                problem = (401, "a valid token is required: send 'Authorization: Bearer <token>', "
                                "'X-Token: <token>' or ?token=<token>")
        if problem is None and kind == "websocket" and not self._origin_ok(headers.get("origin"), headers.get("host")):
            problem = (403, "cross-origin websocket refused")
        if problem is None and kind == "http" and scope.get("method") not in ("GET", "HEAD"):
            problem = (405, "the viewer is read-only: only GET (and HEAD) requests and the /ws websocket are served")

        if problem is not None:
            status, message = problem
            extra: dict[str, str] = {}
            if status == 401:
                extra["WWW-Authenticate"] = 'Bearer realm="otel-cmbagent"'
            if status == 405:
                extra["Allow"] = "GET, HEAD"
            response = _JSON({"error": message}, status_code=status, headers=extra)
            if kind == "websocket":
                websocket = WebSocket(scope, receive, send)
                if "websocket.http.response" in scope.get("extensions", {}):
                    await websocket.send_denial_response(response)
                    _DENIED_HANDSHAKE.set(True)
                else:
                    await websocket.close(code=1008, reason=message[:120])
                return
            await self._with_headers(response)(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in _SECURITY_HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers if kind == "http" else send)

    @staticmethod
    def _with_headers(response: Response) -> Response:
        for key, value in _SECURITY_HEADERS:
            response.headers[key.decode()] = value.decode()
        return response


_MAX_INT = 2**63 - 1  # the largest integer SQL (SQLite, PostgreSQL bigint) compares with


def _ints(value: str | None, name: str, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {value[:40]!r}") from None
    if not 0 <= number <= _MAX_INT:
        raise ValueError(f"{name} must be between 0 and {_MAX_INT}")
    return number


_RUNS_PREFIX = "/api/runs/"
_EVENTS_SUFFIX = "/events"


def _run_reference(request: Request) -> tuple[str, bool]:
    """``(run reference, events?)`` from ``/api/runs/{run}`` or ``/api/runs/{run}/events``.

    Read from the raw path, so a run id containing ``/`` works sent as ``%2F`` (``a%2Fb/events``) or plain
    (``a/b/events``); a run id that itself ends in ``/events`` must be sent with ``%2F``.
    """
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        path = raw.decode("latin-1")
        tail = path[path.find(_RUNS_PREFIX) + len(_RUNS_PREFIX):]
        events = tail.endswith(_EVENTS_SUFFIX)
        reference = unquote(tail[: -len(_EVENTS_SUFFIX)] if events else tail, encoding="utf-8", errors="replace")
        return reference, events
    reference = request.path_params["run_ref"]
    events = reference.endswith(_EVENTS_SUFFIX)
    return (reference[: -len(_EVENTS_SUFFIX)] if events else reference), events


def _csv(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def create_app(
    db: str | Engine,
    *,
    token: str | None = None,
    jaeger_url: str | None = None,
    poll_interval: float = 0.5,
    table: str = store.DEFAULT_TABLE,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The viewer as a Starlette app (read-only; see the module docstring for the routes).

    ``db``: a SQLite path, a SQLAlchemy URL or an Engine; it may not exist yet (the API answers 503 and
    the page waits until it does). ``token``: required on every request when given. ``jaeger_url``: adds
    "open in Jaeger" links (``{jaeger_url}/trace/{trace_id}``). ``allowed_hosts``: Host names served
    (default: loopback names only without a token, any with one; ``["*"]`` for any).
    """
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("the viewer token must be a non-empty string, or None")
    if not isinstance(poll_interval, (int, float)) or isinstance(poll_interval, bool) or not poll_interval > 0:
        raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval!r}")
    if not isinstance(db, Engine):
        if not isinstance(db, str) or not db.strip():
            raise ValueError("db must be a SQLite path, a SQLAlchemy URL or an Engine")
        if "://" in db:
            try:
                sa.engine.make_url(db)
            except sa.exc.ArgumentError:
                raise ValueError(f"invalid database URL {db!r}") from None
    jaeger_url = _check_jaeger_url(jaeger_url)
    _quiet_denied_handshakes()
    source = _Source(db, table)
    feed = _Feed(source, float(poll_interval))
    config = {
        "jaeger_url": jaeger_url,
        "poll_interval": float(poll_interval),
        "version": __version__,
        "db": source.describe(),
        "token_required": token is not None,
    }
    page = _Page(config)

    async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    async def index(request: Request) -> Response:
        return Response(
            page.body,
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": page.csp},
        )

    async def api_config(request: Request) -> Response:
        return _JSON(config)

    async def api_runs(request: Request) -> Response:
        try:
            limit = _ints(request.query_params.get("limit"), "limit", 100)
        except ValueError as exc:
            return _error(400, str(exc))
        limit = min(max(1, limit or 100), 5_000)
        try:
            runs = await _call(lambda: store.list_runs(source.engine(), limit=limit, table=table))
        except store.StoreError as exc:
            return _error(503, str(exc))
        return _JSON(runs)

    async def _resolve(ref: str) -> str | Response:
        try:
            return await _call(lambda: store.resolve_run(source.engine(), ref, table=table))
        except store.AmbiguousRunError as exc:
            return _error(409, str(exc), candidates=list(exc.candidates))
        except store.RunNotFoundError as exc:
            return _error(404, str(exc))
        except store.StoreError as exc:
            return _error(503, str(exc))

    async def api_run_or_events(request: Request) -> Response:
        reference, events = _run_reference(request)
        return await (api_events(request, reference) if events else api_run(request, reference))

    async def api_run(request: Request, reference: str) -> Response:
        run_key = await _resolve(reference)
        if isinstance(run_key, Response):
            return run_key
        try:
            summary = await _call(lambda: store.run_summary(source.engine(), run_key, table=table))
        except store.RunNotFoundError as exc:
            return _error(404, str(exc))
        except store.StoreError as exc:
            return _error(503, str(exc))
        return _JSON(summary)

    async def api_events(request: Request, reference: str) -> Response:
        params = request.query_params
        try:
            after = _ints(params.get("after"), "after")
        except ValueError as exc:
            return _error(400, str(exc))
        running = _csv(params.getlist("running"))
        if len(running) > MAX_RUNNING_IDS:
            return _error(400, f"at most {MAX_RUNNING_IDS} running ids")
        types = _csv(params.getlist("type"))
        agents = _csv(params.getlist("agent"))
        run_key = await _resolve(reference)
        if isinstance(run_key, Response):
            return run_key
        try:
            if after is None and not running:
                rows = await _call(
                    lambda: store.run_events(source.engine(), run_key, types or None, agents or None, table=table)
                )
            else:
                rows = await _call(source.rows_after, run_key, after or 0, running, types, agents)
        except store.StoreError as exc:
            return _error(503, str(exc))
        return _JSON(rows, headers={"X-Run-Id": run_key})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no such page: {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _JSON(
            {"error": "the viewer is read-only: only GET (and HEAD) requests are served"},
            status_code=405,
            headers={"Allow": "GET, HEAD"},
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        _logger.exception("otel-cmbagent viewer: %s failed", request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")

    async def websocket_endpoint(websocket: WebSocket) -> None:
        await feed.serve(websocket)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await feed.start()
        try:
            yield
        finally:
            await feed.stop()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/config", api_config, methods=["GET"]),
        Route("/api/runs", api_runs, methods=["GET"]),
        Route("/api/runs/{run_ref:path}", api_run_or_events, methods=["GET"]),
        WebSocketRoute("/ws", websocket_endpoint),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, token=token, allowed_hosts=allowed_hosts)],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )
    app.state.feed = feed
    app.state.source = source
    app.state.config = config
    return app


# --- running it ----------------------------------------------------------------------------------
def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when ``sock.proto`` says TCP;
    # with proto 0, Nagle + delayed ACK cost every keep-alive request ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)  # noqa: S104
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


class ViewerServer:
    """The viewer on uvicorn in a background thread (tests, benchmarks, notebooks)::

        with ViewerServer("runs.db") as server:      # port 0: a free port
            print(server.url)
    """

    def __init__(
        self,
        db: str | Engine,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        token: str | None = None,
        jaeger_url: str | None = None,
        poll_interval: float = 0.5,
        log_level: str = "warning",
    ) -> None:
        import uvicorn

        check_bind(host, token)
        self.app = create_app(db, token=token, jaeger_url=jaeger_url, poll_interval=poll_interval)
        self.host = host
        self._socket = _bind_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self.url = _url(host, self.port)
        config = uvicorn.Config(self.app, log_level=log_level, access_log=False, lifespan="on")
        _quiet_denied_handshakes()  # after uvicorn configured its loggers
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> ViewerServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="otel-cmbagent-viewer", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the viewer server stopped during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the viewer server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._socket.close()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_viewer(
    db: str | Engine,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    jaeger_url: str | None = None,
    *,
    poll_interval: float = 0.5,
    log_level: str = "warning",
    quiet: bool = False,
) -> None:
    """Serve the viewer until Ctrl-C / SIGTERM (blocking, uvicorn).

    Raises ValueError before binding anything for a non-loopback ``host`` without a ``token``, a bad
    ``jaeger_url`` or ``poll_interval``; OSError when the port is taken.
    """
    import uvicorn

    check_bind(host, token)
    app = create_app(db, token=token, jaeger_url=jaeger_url, poll_interval=poll_interval)
    sock = _bind_socket(host, port)
    url = _url(host, sock.getsockname()[1])
    if not quiet:
        try:
            app.state.source.engine()
            note = ""
        except store.StoreError as exc:
            note = f"  (waiting for the database: {exc})"
        print(f"otel-cmbagent viewer on {url}  db: {app.state.source.describe()}{note}", flush=True)
        if token:
            print("  open it with ?token=<token> (or send 'Authorization: Bearer <token>')", flush=True)
        print("  Ctrl-C to stop", flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
    _quiet_denied_handshakes()
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the server has already shut down
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()
