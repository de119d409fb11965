"""Running the live server's ASGI app on uvicorn: in a background thread, or blocking until Ctrl-C."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from .guard import quiet_denied_handshakes


def _uvicorn_server(app: Any, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
    quiet_denied_handshakes()  # after uvicorn configured its loggers
    return uvicorn.Server(config)


class ServerThread:
    """``app`` on uvicorn in a daemon thread, on an already bound socket (so the port is known at once)."""

    def __init__(self, app: Any, sock: socket.socket, *, log_level: str = "warning", name: str = "otel-cmbagent-server"):
        self.app = app
        self._socket = sock
        self._server = _uvicorn_server(app, log_level)
        self._name = name
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> ServerThread:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._socket.close()


def run_until_interrupted(app: Any, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` in this thread until Ctrl-C / SIGTERM."""
    server = _uvicorn_server(app, log_level)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the server has already shut down
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()
