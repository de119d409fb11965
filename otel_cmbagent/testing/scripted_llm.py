"""Scripted OpenAI-compatible HTTP server for tests, benchmarks and demos.

Real AG2 agents drive the real ``openai`` SDK (via ``OpenAIWrapper``) against
this server, so spans are produced by the genuine code paths instead of mocks.
Standard library only; binds to 127.0.0.1 on a random free port by default.

Retries: the ``openai`` SDK retries 408/409/429/5xx twice by default, each retry
consuming another scripted reply after a back-off sleep. Scripted errors therefore
carry ``x-should-retry: false`` (which the SDK obeys) unless ``error(..., retryable=True)``.
With upstream AG2 (0.14) you may also pass ``llm_config(max_retries=0)``; the
cmbagent-autogen fork (AG2 0.9) rejects that key (pydantic extra_forbidden), so
error tests should rely on the header rather than on ``max_retries``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

__all__ = ["Reply", "ScriptedLLM", "code", "error", "text", "tool_call", "tool_calls"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class Reply:
    """One scripted answer to a chat completion request; build with the helper functions."""

    content: str | None = None
    tool_calls: tuple[tuple[str | None, str, str], ...] = ()  # (call_id, name, json arguments)
    status: int = 200
    error_message: str = ""
    delay: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    retryable: bool = False  # False => "x-should-retry: false" so the SDK does not re-send


ScriptFn = Callable[[dict], Union[Reply, str]]


def _args(arguments: dict | str) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def text(content: str, *, delay: float = 0.0, prompt_tokens: int | None = None,
         completion_tokens: int | None = None) -> Reply:
    """Plain assistant text (finish_reason "stop")."""
    return Reply(content=content, delay=delay, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def tool_call(name: str, arguments: dict | str, *, call_id: str | None = None, delay: float = 0.0) -> Reply:
    """Assistant message with a single tool call (finish_reason "tool_calls")."""
    return Reply(tool_calls=((call_id, name, _args(arguments)),), delay=delay)


def tool_calls(calls: list[tuple[str, dict | str]], *, delay: float = 0.0) -> Reply:
    """Assistant message with several parallel tool calls in one message."""
    return Reply(tool_calls=tuple((None, n, _args(a)) for n, a in calls), delay=delay)


def code(source: str, language: str = "python", *, preamble: str = "", delay: float = 0.0) -> Reply:
    """Text reply containing one fenced code block, for code-executor flows."""
    body = f"```{language}\n{source.strip(chr(10))}\n```"
    return text(f"{preamble}\n\n{body}" if preamble else body, delay=delay)


def error(status: int = 500, message: str = "scripted failure", *, delay: float = 0.0,
          retryable: bool = False) -> Reply:
    """HTTP error with an OpenAI-style ``{"error": {...}}`` body; not retried unless ``retryable``."""
    return Reply(status=status, error_message=message, delay=delay, retryable=retryable)


def _content_chars(messages: Any) -> int:
    """Characters of all message contents (str or list-of-parts) for default token counts."""
    total = 0
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def _error_body(status: int, message: str) -> dict:
    etype = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": etype, "code": str(status)}}


class _Server(ThreadingHTTPServer):
    """Threading server that tracks live connections so stop() can cut keep-alive sockets."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], owner: ScriptedLLM) -> None:
        self.owner = owner
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # headers and body go out at once: no delayed-ACK stalls
    """Routes the few OpenAI endpoints AG2 uses; everything else is 404."""

    protocol_version = "HTTP/1.1"  # keep-alive for httpx; every response sends Content-Length
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr noise
        pass

    def _path(self) -> str:
        path = self.path.split("?", 1)[0].rstrip("/")
        return path[3:] if path.startswith("/v1/") else path

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self._path() == "/models":
            owner = self.server.owner
            model = {"id": owner.model, "object": "model", "created": 0, "owned_by": "scripted"}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._send(404, _error_body(404, f"unknown path {self.path}"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if self._path() != "/chat/completions":
            self._send(404, _error_body(404, f"unknown path {self.path}"))
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as exc:
            self._send(400, _error_body(400, f"malformed JSON body: {exc}"))
            return
        status, payload, delay, retry = self.server.owner._answer(body)
        if delay > 0:
            time.sleep(delay)
        self._send(status, payload, None if retry else {"x-should-retry": "false"})


class ScriptedLLM:
    """OpenAI-compatible server answering chat completions from a script.

    ``script`` is a list of Reply (consumed in order; ``default`` once exhausted,
    which defaults to ``text("TERMINATE")``) or a thread-safe callable
    ``(request_json) -> Reply | str`` invoked per request.
    """

    def __init__(self, script: list[Reply] | ScriptFn | None = None, *, default: Reply | None = None,
                 model: str = "scripted-model", host: str = "127.0.0.1", port: int = 0) -> None:
        self._fn: ScriptFn | None = script if callable(script) else None
        self._queue: deque[Reply] = deque([] if callable(script) or script is None else script)
        self.default = default if default is not None else text("TERMINATE")
        self.model = model
        self.host, self.port = host, port
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``; the port is only known after start()."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> ScriptedLLM:
        """Bind and serve on a daemon thread (no-op when already running)."""
        if self._server is None:
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"ScriptedLLM:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop idle keep-alive connections; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with server.conns_lock:
            conns = list(server.conns)
        for conn in conns:  # unblock handler threads parked in readline() on keep-alive sockets
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config_list(self, api_key: str = "sk-scripted-not-a-real-key", **extra: Any) -> list[dict]:
        """AG2 ``config_list`` pointing at this server; ``extra`` is merged into the entry."""
        return [{"model": self.model, "base_url": self.base_url, "api_key": api_key, **extra}]

    def llm_config(self, api_key: str = "sk-scripted-not-a-real-key", **extra: Any) -> dict:
        """AG2 ``llm_config`` with caching disabled so every turn hits the server."""
        return {"config_list": self.config_list(api_key, **extra), "cache_seed": None}

    def push(self, *replies: Reply) -> None:
        """Append replies to a list script at runtime."""
        if self._fn is not None:
            raise TypeError("push() needs a list script, not a callable one")
        with self._lock:
            self._queue.extend(replies)

    def _next_reply(self, body: dict) -> Reply:
        if self._fn is not None:
            reply = self._fn(body)
            return text(reply) if isinstance(reply, str) else reply
        with self._lock:
            return self._queue.popleft() if self._queue else self.default

    def _answer(self, body: dict) -> tuple[int, dict, float, bool]:
        """Build (status, JSON payload, delay, retryable) for one chat completion request."""
        with self._lock:
            self.requests.append(body)
            self._counter += 1
            n = self._counter
        if body.get("stream"):
            return 400, _error_body(400, "streaming is not scripted by ScriptedLLM"), 0.0, False
        try:
            reply = self._next_reply(body)
        except Exception as exc:  # a broken script callable surfaces as a 500, not a hung client
            return 500, _error_body(500, f"script callable raised {exc!r}"), 0.0, False
        if reply.status >= 400:
            return reply.status, _error_body(reply.status, reply.error_message), reply.delay, reply.retryable
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        produced = reply.content or ""
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": cid or f"call_{n}_{i}", "type": "function", "function": {"name": name, "arguments": args}}
                for i, (cid, name, args) in enumerate(reply.tool_calls)
            ]
            produced = "".join(args for _, _, args in reply.tool_calls)
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else _content_chars(body.get("messages")) // 4 + 1
        completion = reply.completion_tokens if reply.completion_tokens is not None else len(produced) // 4 + 1
        payload = {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        return 200, payload, reply.delay, False
