"""The live server fed by pushes: ``exporters.websocket.serve()`` returns one.

The same server as the viewer (Starlette on uvicorn, the same :class:`.guard.Guard`, the same
:class:`.hub.Hub` and ``/ws`` route); only the source differs: here each ``callback(event_type, data)``
- a :class:`~otel_cmbagent.exporters.websocket.WebsocketCallbackProcessor` callback - is broadcast, where
the viewer broadcasts what it reads from the table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from ..table.encoding import dumps
from ..table.envelope import envelope
from .hub import Hub
from .net import bind_socket, check_bind, url
from .runner import ServerThread

WS_PATH = "/ws"


def hub_lifespan(hub: Hub, start: Callable[[], Awaitable[None]] | None = None,
                 stop: Callable[[], Awaitable[None]] | None = None) -> Callable[[Any], Any]:
    """A Starlette lifespan that gives ``hub`` the server's loop and closes it at shutdown (clients: 1001)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        if start is not None:
            await start()
        try:
            yield
        finally:
            if stop is not None:
                await stop()
            hub.close()

    return lifespan


def live_app(hub: Hub, token: str | None) -> Any:
    """The ASGI app: ``/ws`` only, behind the guard."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import WebSocketRoute

    from .guard import Guard

    return Starlette(
        routes=[WebSocketRoute(WS_PATH, hub.serve)],
        middleware=[Middleware(Guard, token=token, on_refused=hub.count_refused)],
        lifespan=hub_lifespan(hub),
    )


class LiveServer:
    """A websocket server (in a daemon thread) that broadcasts every event it is handed to all its clients.

    ``callback`` is the non-blocking sync ``callback(event_type, data)`` of a ``WebsocketCallbackProcessor``;
    each event reaches every connected client of ``url`` (``ws://host:port/ws``) as the JSON of
    :func:`~otel_cmbagent.table.envelope.envelope`. A client that stops reading is disconnected; at most
    ``max_pending`` events wait for the server's loop (more are dropped and counted).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None, *,
                 max_pending: int = 10_000, start_timeout: float = 10.0) -> None:
        check_bind(host, token, "serve()")
        self.hub = Hub(max_pending)
        self.host = host
        sock = bind_socket(host, port)
        self.port: int = sock.getsockname()[1]
        self.url = url(host, self.port, "ws", WS_PATH)
        self._server = ServerThread(live_app(self.hub, token), sock, name="otel-cmbagent-websocket-server")
        self._server.start(start_timeout)
        self._closed = False

    def callback(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Hand one event to the server (never blocks)."""
        self.hub.publish_threadsafe(dumps(envelope(data, event_type)))

    @property
    def client_count(self) -> int:
        """How many clients are connected (handshake done, not disconnected)."""
        return 0 if self._closed else len(self.hub.clients)

    @property
    def stats(self) -> dict[str, int]:
        """``{"sent"`` (messages written, one per client), ``"dropped"``, ``"rejected"`` (refused connections)``}``."""
        return {"sent": self.hub.sent, "dropped": self.hub.dropped, "rejected": self.hub.refused}

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect every client (1001 going away), stop the server and its thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = self.hub.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(_close(self.hub), loop).result(timeout)
        self._server.stop(timeout)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LiveServer {self.url} clients={self.client_count}>"


async def _close(hub: Hub) -> None:
    hub.close()
    await asyncio.sleep(0)  # let the clients' senders send their close frames
