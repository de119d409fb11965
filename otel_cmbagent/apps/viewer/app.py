"""The live run viewer as an ASGI app: the page and JSON API (:mod:`.api`) and ``/ws`` (:mod:`.feed`) on the
live server (:mod:`otel_cmbagent.server`: its guard, its websocket hub).

    from otel_cmbagent.apps.viewer import create_app, serve_viewer

    serve_viewer("otel_cmbagent.db")                       # http://127.0.0.1:8765/ until Ctrl-C
    app = create_app("sqlite:///runs.db", token="s3cret")  # an ASGI app to mount or run yourself

Every route is GET/HEAD or the websocket; nothing writes or deletes. ``/ws`` broadcasts
:func:`otel_cmbagent.table.envelope.envelope` messages (``event_type="event_captured"``) for every new or
changed row of any run, including rows written by other processes: the table is polled every
``poll_interval`` seconds (new orders per recently active run, gaps in a run's gapless order, and every row
last seen ``running``).

Security (:mod:`otel_cmbagent.server.guard`): with a token every HTTP and websocket request must present it
(``Authorization: Bearer``, ``X-Token`` or ``?token=``; compared as bytes in constant time), else 401. Without a
token only loopback ``Host`` headers are served (no DNS rebinding) and a browser websocket must come from a
loopback origin (no cross-site websocket hijacking). Responses carry a strict Content-Security-Policy and
``no-referrer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from ...server.guard import Guard, quiet_denied_handshakes
from ...server.hub import Hub
from ...server.live import WS_PATH, hub_lifespan
from ...table.schema import DEFAULT_TABLE
from ...version import __version__
from .api import Api
from .feed import Feed
from .source import Source


def _check_jaeger_url(url: str | None) -> str | None:
    if url is None or not str(url).strip():
        return None
    url = str(url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"jaeger_url must be an http(s) URL such as http://localhost:16686, not {url!r}")
    return url


def _check(db: Any, token: Any, poll_interval: Any) -> None:
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("the viewer token must be a non-empty string, or None")
    if not isinstance(poll_interval, (int, float)) or isinstance(poll_interval, bool) or not poll_interval > 0:
        raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval!r}")
    if isinstance(db, Engine):
        return
    if not isinstance(db, str) or not db.strip():
        raise ValueError("db must be a SQLite path, a SQLAlchemy URL or an Engine")
    if "://" in db:
        try:
            sa.engine.make_url(db)
        except sa.exc.ArgumentError:
            raise ValueError(f"invalid database URL {db!r}") from None


def create_app(
    db: str | Engine,
    *,
    token: str | None = None,
    jaeger_url: str | None = None,
    poll_interval: float = 0.5,
    table: str = DEFAULT_TABLE,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The viewer as a Starlette app (read-only; see the module docstring for the routes).

    ``db``: a SQLite path, a SQLAlchemy URL or an Engine; it may not exist yet (the API answers 503 and
    the page waits until it does). ``token``: required on every request when given. ``jaeger_url``: adds
    "open in Jaeger" links (``{jaeger_url}/trace/{trace_id}``). ``allowed_hosts``: Host names served
    (default: loopback names only without a token, any with one; ``["*"]`` for any).
    """
    _check(db, token, poll_interval)
    quiet_denied_handshakes()
    source = Source(db, table)
    config = {"jaeger_url": _check_jaeger_url(jaeger_url), "poll_interval": float(poll_interval),
              "version": __version__, "db": source.describe(), "token_required": token is not None}
    api, hub = Api(source, table, config), Hub()
    feed = Feed(source, float(poll_interval), hub)
    app = Starlette(
        routes=[
            Route("/", api.index, methods=["GET"]),
            Route("/api/config", api.api_config, methods=["GET"]),
            Route("/api/runs", api.api_runs, methods=["GET"]),
            Route("/api/runs/{run_ref:path}", api.api_run_or_events, methods=["GET"]),
            Route("/api/events/{event_id:path}", api.api_event, methods=["GET"]),
            WebSocketRoute(WS_PATH, hub.serve),
        ],
        middleware=[Middleware(Guard, token=token, allowed_hosts=allowed_hosts, on_refused=hub.count_refused)],
        lifespan=hub_lifespan(hub, feed.start, feed.stop),
        exception_handlers={404: api.not_found, 405: api.method_not_allowed, 500: api.server_error},
    )
    app.state.feed, app.state.source, app.state.config, app.state.hub = feed, source, config, hub
    return app
