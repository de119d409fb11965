"""The viewer's HTTP routes: the page and the read-only JSON API over the event table.

- ``/``                       the page
- ``/api/config``             ``{"jaeger_url", "poll_interval", "version", "db", "token_required"}``
- ``/api/runs?limit=N``       runs, newest first (:func:`otel_cmbagent.table.store.list_runs`)
- ``/api/runs/{run}``         one run's summary plus ``by_type``
- ``/api/runs/{run}/columns`` what the waterfall draws, as columns (:func:`otel_cmbagent.table.columns.run_columns_json`:
  ids, parents (by order), order, depth, kind, status, agent, name, times, usage; JSON made by the database)
- ``/api/events/{id}``        one event with every column plus the messages sent during it (``{"event",
  "messages", "message_count"}``; the page's details pane, on demand)
- ``/api/runs/{run}/events``  the run's rows in ``execution_order`` (every column, JSON decoded, ISO times);
  ``?after=N`` only rows with ``execution_order > N``, plus (``&running=id1,id2``) the current rows of the given
  ids, i.e. what a client holding those rows as ``running`` needs to catch up; ``?type=``/``?agent=`` filter.
  ``{run}`` is a run id, a unique prefix of one, a trace id, or ``last`` (URL-encoded; ``/`` in it may be sent
  as ``%2F`` or plain); unknown -> 404 ``{"error": ...}``; a bad ``after`` -> 400.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ...server.guard import JSONResponse, error_response
from ...table import columns, store
from .page import Page
from .source import Source

_logger = logging.getLogger("otel_cmbagent.viewer")

MAX_RUNNING_IDS = 1_000
_MAX_INT = 2**63 - 1  # the largest integer SQL (SQLite, PostgreSQL bigint) compares with
_RUNS_PREFIX = "/api/runs/"
_SUFFIXES = ("/events", "/columns")


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


def _split_suffix(tail: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if tail.endswith(suffix):
            return tail[: -len(suffix)], suffix
    return tail, ""


def _run_reference(request: Request) -> tuple[str, str]:
    """``(run reference, "" | "/events" | "/columns")`` from ``/api/runs/{run}[/events|/columns]``.

    Read from the raw path, so a run id containing ``/`` works sent as ``%2F`` (``a%2Fb/events``) or plain
    (``a/b/events``); a run id that itself ends in ``/events`` or ``/columns`` must be sent with ``%2F``.
    """
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        path = raw.decode("latin-1")
        reference, suffix = _split_suffix(path[path.find(_RUNS_PREFIX) + len(_RUNS_PREFIX):])
        return unquote(reference, encoding="utf-8", errors="replace"), suffix
    return _split_suffix(request.path_params["run_ref"])


def _csv(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


class Api:
    """The handlers; every database read runs in the thread pool."""

    def __init__(self, source: Source, table: str, config: dict[str, Any]) -> None:
        self.source = source
        self.table = table
        self.config = config
        self.page = Page(config)

    async def index(self, request: Request) -> Response:
        return Response(self.page.body, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": self.page.csp})

    async def api_config(self, request: Request) -> Response:
        return JSONResponse(self.config)

    async def _read(self, fn: Any, *args: Any, **kwargs: Any) -> Any | Response:
        """``fn(engine, *args, table=..., **kwargs)`` in the thread pool; a missing run or database as JSON."""
        def call() -> Any:
            return fn(self.source.engine(), *args, table=self.table, **kwargs)

        try:
            return await run_in_threadpool(call)
        except store.AmbiguousRunError as exc:
            return error_response(409, str(exc), candidates=list(exc.candidates))
        except store.RunNotFoundError as exc:
            return error_response(404, str(exc))
        except store.StoreError as exc:
            return error_response(503, str(exc))

    async def api_runs(self, request: Request) -> Response:
        try:
            limit = _ints(request.query_params.get("limit"), "limit", 100)
        except ValueError as exc:
            return error_response(400, str(exc))
        runs = await self._read(store.list_runs, limit=min(max(1, limit or 100), 5_000))
        return runs if isinstance(runs, Response) else JSONResponse(runs)

    async def api_run_or_events(self, request: Request) -> Response:
        reference, suffix = _run_reference(request)
        if suffix == "/events":
            return await self._events(request, reference)
        run_key = await self._read(store.resolve_run, reference)
        if isinstance(run_key, Response):
            return run_key
        if suffix == "/columns":
            found = await self._read(columns.run_columns_json, run_key)  # JSON text made by the database
            return found if isinstance(found, Response) else Response(
                found.encode("utf-8"), media_type="application/json", headers={"X-Run-Id": run_key})
        summary = await self._read(store.run_summary, run_key)
        return summary if isinstance(summary, Response) else JSONResponse(summary)

    async def api_event(self, request: Request) -> Response:
        """One event's every column and its messages (the details pane asks when a span is selected)."""
        found = await self._read(columns.event_details, request.path_params["event_id"])
        return found if isinstance(found, Response) else JSONResponse(found)

    async def _events(self, request: Request, reference: str) -> Response:
        params = request.query_params
        try:
            after = _ints(params.get("after"), "after")
        except ValueError as exc:
            return error_response(400, str(exc))
        running = _csv(params.getlist("running"))
        if len(running) > MAX_RUNNING_IDS:
            return error_response(400, f"at most {MAX_RUNNING_IDS} running ids")
        types, agents = _csv(params.getlist("type")), _csv(params.getlist("agent"))
        run_key = await self._read(store.resolve_run, reference)
        if isinstance(run_key, Response):
            return run_key
        if after is None and not running:
            rows = await self._read(store.run_events, run_key, types or None, agents or None)
        else:
            try:
                rows = await run_in_threadpool(self.source.rows_after, run_key, after or 0, running, types, agents)
            except store.StoreError as exc:
                return error_response(503, str(exc))
        return rows if isinstance(rows, Response) else JSONResponse(rows, headers={"X-Run-Id": run_key})

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(404, f"no such page: {request.url.path}")

    async def method_not_allowed(self, request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "the viewer is read-only: only GET (and HEAD) requests are served"},
                            status_code=405, headers={"Allow": "GET, HEAD"})

    async def server_error(self, request: Request, exc: Exception) -> Response:
        _logger.exception("otel-cmbagent viewer: %s failed", request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")
