"""The live server's edge: who may talk to it, how a refusal looks, the headers every response carries.

Without a token only loopback ``Host`` headers are served (no DNS rebinding) and a browser websocket must
come from a loopback origin (no cross-site websocket hijacking); with a token every HTTP and websocket
request must present it (:func:`.net.token_ok`), else 401. Only GET/HEAD and websockets pass: the server is
read-only.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.websockets import WebSocket

from ..table.encoding import dumps
from .net import TOKEN_HINT, host_of, is_loopback, token_ok

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class JSONResponse(Response):
    """A response whose body is :func:`otel_cmbagent.table.encoding.dumps` of the content."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def error_response(status: int, message: str, **extra: Any) -> Response:
    return JSONResponse({"error": message, **extra}, status_code=status)


# uvicorn's sans-I/O websocket protocol logs "ASGI callable returned without completing handshake." at
# ERROR after a websocket *denial response* (our 401/403 with a JSON body), though the client got exactly
# that answer. The flag marks the connection's own task, so only that record is dropped.
_DENIED_HANDSHAKE: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_cmbagent_denied", default=False)


class _DeniedHandshakeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_DENIED_HANDSHAKE.get() and "without completing handshake" in str(record.msg))


_DENIED_FILTER = _DeniedHandshakeFilter()


def quiet_denied_handshakes() -> None:
    """Install the filter above on uvicorn's error logger (idempotent; call after uvicorn set up logging)."""
    logger = logging.getLogger("uvicorn.error")
    if _DENIED_FILTER not in logger.filters:
        logger.addFilter(_DENIED_FILTER)


class Guard:
    """ASGI middleware: token, loopback Host/Origin without a token, read-only methods, security headers.

    ``on_refused(status)`` is called for every refused request (counted by the server's stats).
    """

    def __init__(self, app: Any, token: str | None, allowed_hosts: Sequence[str] | None = None,
                 on_refused: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts is not None else None
        self.on_refused = on_refused

    def _host_ok(self, host_header: str | None) -> bool:
        if self.allowed_hosts is not None:
            return "*" in self.allowed_hosts or host_of(host_header or "").lower() in self.allowed_hosts
        if self.token is not None:
            return True
        return is_loopback(host_of(host_header or ""))

    def _origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        if origin is None or self.token is not None:
            return True
        parts = urlsplit(origin)
        if parts.netloc and host_header and parts.netloc.lower() == host_header.strip().lower():
            return True
        return is_loopback(parts.hostname or "")

    def problem(self, scope: dict) -> tuple[int, str] | None:
        """Why this request is refused (status, message), or None."""
        kind = scope["type"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self._host_ok(headers.get("host")):
            return 403, "this server only answers requests addressed to a loopback host (start it with a token to serve others)"
        if self.token is not None and not token_ok(scope, self.token):
            return 401, f"a valid token is required: send {TOKEN_HINT}"
        if kind == "websocket" and not self._origin_ok(headers.get("origin"), headers.get("host")):
            return 403, "cross-origin websocket refused"
        if kind == "http" and scope.get("method") not in ("GET", "HEAD"):
            return 405, "read-only: only GET (and HEAD) requests and the /ws websocket are served"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is not None:
            await self._refuse(scope, receive, send, *problem)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers if kind == "http" else send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        if self.on_refused is not None:
            self.on_refused(status)
        extra: dict[str, str] = {}
        if status == 401:
            extra["WWW-Authenticate"] = 'Bearer realm="otel-cmbagent"'
        if status == 405:
            extra["Allow"] = "GET, HEAD"
        response = JSONResponse({"error": message}, status_code=status, headers=extra)
        if scope["type"] == "websocket":
            websocket = WebSocket(scope, receive, send)
            if "websocket.http.response" in scope.get("extensions", {}):
                await websocket.send_denial_response(response)
                _DENIED_HANDSHAKE.set(True)
            else:
                await websocket.close(code=1008, reason=message[:120])
            return
        for key, value in SECURITY_HEADERS:
            response.headers[key.decode()] = value.decode()
        await response(scope, receive, send)
