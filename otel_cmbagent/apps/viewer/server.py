"""Running the viewer: in a background thread (:class:`ViewerServer`) or until Ctrl-C (:func:`serve_viewer`)."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from ...server.net import bind_socket, check_bind, url
from ...server.runner import ServerThread, run_until_interrupted
from ...table import store
from .app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class ViewerServer(ServerThread):
    """The viewer on uvicorn in a background thread (tests, benchmarks, notebooks, ``demo --serve``)::

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
        check_bind(host, token)
        app = create_app(db, token=token, jaeger_url=jaeger_url, poll_interval=poll_interval)
        sock = bind_socket(host, port)
        super().__init__(app, sock, log_level=log_level, name="otel-cmbagent-viewer")
        self.host = host
        self.port: int = sock.getsockname()[1]
        self.url = url(host, self.port)

    def __enter__(self) -> ViewerServer:
        self.start()
        return self

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
    ``jaeger_url`` or ``poll_interval``; OSError naming the address when the port is taken.
    """
    check_bind(host, token)
    app = create_app(db, token=token, jaeger_url=jaeger_url, poll_interval=poll_interval)
    sock = bind_socket(host, port)
    if not quiet:
        try:
            app.state.source.engine()
            note = ""
        except store.StoreError as exc:
            note = f"  (waiting for the database: {exc})"
        print(f"otel-cmbagent viewer on {url(host, sock.getsockname()[1])}  db: {app.state.source.describe()}{note}",
              flush=True)
        if token:
            print("  open it with ?token=<token> (or send 'Authorization: Bearer <token>')", flush=True)
        print("  Ctrl-C to stop", flush=True)
    run_until_interrupted(app, sock, log_level=log_level)
