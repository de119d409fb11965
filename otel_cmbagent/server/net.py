"""Network and auth helpers of the live server: which addresses are loopback, the token a request presents,
binding, URLs. The one copy of each (the viewer and ``exporters.websocket.serve()`` are the same server)."""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

TOKEN_HEADER = "x-token"
TOKEN_HINT = "'Authorization: Bearer <token>', 'X-Token: <token>' or ?token=<token>"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (with or without brackets or a zone) and the ``localhost`` names (RFC 6761:
    ``localhost`` and ``*.localhost`` always mean this machine). False for "" and None (every interface)."""
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


def check_bind(host: str, token: str | None, what: str = "the viewer") -> None:
    """Raise ValueError for a non-loopback ``host`` without a token, or a token that is not a non-empty string."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"{what}: the token must be a non-empty string (or None on a loopback address)")
    if token is None and not is_loopback(host):
        raise ValueError(
            f"{what}: refusing to bind {host!r} without a token: anyone who can reach that address would read "
            "every run's messages, tool arguments and code. Bind 127.0.0.1 (the default), or pass a token "
            f"(clients then send {TOKEN_HINT})"
        )


def host_of(header: str) -> str:
    """The host part of a Host header (``[::1]:8765`` -> ``::1``, ``localhost:80`` -> ``localhost``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def presented_tokens(scope: Mapping[str, Any]) -> list[bytes]:
    """Every spelling of the token an ASGI request sends, as bytes: ``Authorization: Bearer``, ``X-Token`` (raw,
    as curl/httpx send UTF-8, and percent-decoded, as the page sends a non-ASCII token), then ``?token=``
    (percent-decoded)."""
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


def token_ok(scope: Mapping[str, Any], token: bytes) -> bool:
    """Any presented spelling equals the token (UTF-8 bytes; each compared in constant time)."""
    matches = [hmac.compare_digest(candidate, token) for candidate in presented_tokens(scope)]
    return any(matches)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: any free one). OSError names the address."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when ``sock.proto`` says TCP;
    # with proto 0, Nagle + delayed ACK cost every keep-alive request ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url(host: str, port: int, scheme: str = "http", path: str = "/") -> str:
    """The URL clients use for a server bound to ``host:port`` (every-interface addresses shown as loopback)."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)  # noqa: S104
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"{scheme}://{shown}:{port}{path}"
