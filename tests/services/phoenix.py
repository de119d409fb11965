"""A throwaway Arize Phoenix server on loopback: a real OTLP trace backend for end-to-end tests.

    with PhoenixServer() as phoenix:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = phoenix.base_url       # OTLP/HTTP: base_url + /v1/traces
        # or: OTEL_EXPORTER_OTLP_PROTOCOL=grpc, OTEL_EXPORTER_OTLP_ENDPOINT=phoenix.otlp_grpc_endpoint
        ...
        spans = phoenix.wait_for_spans(5, project="default", timeout=60)   # [{"name", "context", ...}]

Phoenix (PyPI ``arize-phoenix``) has many dependencies of its own, so it runs as a separate server
process from its own virtualenv, as in production, and is never imported here. The program is found,
in this order:

1. ``$OTEL_CMBAGENT_PHOENIX``: the ``phoenix`` script of that virtualenv, its ``python`` (run as
   ``python -m phoenix.server.main serve``) or the virtualenv directory itself;
2. ``.venv/phoenix/bin/phoenix`` in the repository root (where ``make`` creates it);
3. ``phoenix`` on ``PATH``.

``find_phoenix()`` raises ``PhoenixNotFound`` (a ``RuntimeError``) naming all three when none exists.

The server runs ``phoenix serve`` with ``PHOENIX_HOST=127.0.0.1``, two free ports
(``PHOENIX_PORT`` for HTTP: UI, REST API and OTLP/HTTP at ``/v1/traces``; ``PHOENIX_GRPC_PORT`` for
OTLP/gRPC), ``PHOENIX_WORKING_DIR`` in a fresh temp dir (its SQLite database lives there) and
telemetry and other outbound requests off. The gRPC port is bound by Phoenix itself on all interfaces
(``[::]``, not configurable in Phoenix); everything here talks to it on 127.0.0.1 only.
The server's output goes to ``phoenix.log`` in the temp dir; its tail is included in every error.
``stop()`` terminates the whole process group and removes the temp dir (unless ``keep=True``).

Spans are read back with the REST API ``GET /v1/projects/{project}/spans`` (paged with
``next_cursor``). Each is a dict as Phoenix returns it: ``name``, ``context`` (``trace_id``,
``span_id``, hex), ``parent_id`` (hex or None), ``span_kind``, ``start_time`` / ``end_time`` (ISO 8601),
``status_code``, ``status_message``, ``attributes`` (flat dotted keys; ``openinference.span.kind`` is
moved to ``span_kind``) and ``events`` (``[{"name", "timestamp", "attributes"}]``). The project of a
span is the resource attribute ``openinference.project.name`` (e.g. via
``OTEL_RESOURCE_ATTRIBUTES=openinference.project.name=NAME``), else ``default``. Ingestion is
asynchronous: use ``wait_for_spans()``.

Standard library only (subprocess, urllib).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from pathlib import Path
from typing import Any

__all__ = ["PHOENIX_ENV", "PhoenixNotFound", "PhoenixServer", "find_phoenix"]

PHOENIX_ENV = "OTEL_CMBAGENT_PHOENIX"
REPO_VENV = Path(__file__).resolve().parents[2] / ".venv" / "phoenix"

_INSTALL_HINT = (
    "create it with `make .venv/phoenix/.ready` (or `python3 -m venv .venv/phoenix && "
    ".venv/phoenix/bin/pip install arize-phoenix` in the repository root), or set "
    f"{PHOENIX_ENV} to the phoenix script or python of a virtualenv that has arize-phoenix"
)

# Settings for a quiet, self-contained test server; callers may override any of them with ``env=``.
_DEFAULT_SETTINGS = {
    "PHOENIX_TELEMETRY_ENABLED": "false",
    "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",  # no public-internet requests (fonts, WASM download...)
    "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
    "PHOENIX_ALLOWED_SANDBOX_PROVIDERS": "NONE",
    "PHOENIX_ENABLE_MCP_SERVER": "false",
    "PHOENIX_DB_LOGGING_LEVEL": "warning",
}

_LIVE: "weakref.WeakSet[PhoenixServer]" = weakref.WeakSet()


class PhoenixNotFound(RuntimeError):
    """No Phoenix program: neither ``$OTEL_CMBAGENT_PHOENIX``, ``.venv/phoenix`` nor ``phoenix`` on PATH."""


def _command_for(path: Path) -> list[str]:
    """The ``serve`` command for a phoenix script, a python of a venv, or a venv directory."""
    if path.is_dir():
        for candidate in (path / "bin" / "phoenix", path / "Scripts" / "phoenix.exe"):
            if candidate.is_file():
                return [str(candidate), "serve"]
        raise PhoenixNotFound(f"{path} is a directory without bin/phoenix: {_INSTALL_HINT}")
    if path.name.startswith("python"):
        return [str(path), "-m", "phoenix.server.main", "serve"]
    return [str(path), "serve"]


def find_phoenix() -> list[str]:
    """The command that starts a Phoenix server (``[..., "serve"]``); raises ``PhoenixNotFound``."""
    configured = os.environ.get(PHOENIX_ENV, "").strip()
    if configured:
        # absolute (the server runs in its temp dir) but not resolved: a venv's python is a symlink
        path = Path(os.path.abspath(os.path.expanduser(configured)))
        if not path.exists():
            raise PhoenixNotFound(f"{PHOENIX_ENV}={configured!r} does not exist: {_INSTALL_HINT}")
        if path.is_file() and not os.access(path, os.X_OK):
            raise PhoenixNotFound(f"{PHOENIX_ENV}={configured!r} is not executable: {_INSTALL_HINT}")
        return _command_for(path)
    script = REPO_VENV / "bin" / "phoenix"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "serve"]
    found = shutil.which("phoenix")
    if found:
        return [found, "serve"]
    raise PhoenixNotFound(
        f"Phoenix (arize-phoenix) was not found: {PHOENIX_ENV} is unset, {script} does not exist and "
        f"there is no `phoenix` on PATH; {_INSTALL_HINT}"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _child_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without what could leak into Phoenix (its own venv decides its imports)."""
    dropped = ("PHOENIX_", "OTEL_")
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(dropped) and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    }
    env.update(settings)
    return env


class PhoenixServer:
    """A Phoenix server on ``127.0.0.1`` with its own temp working dir (see the module docstring).

    Attributes (valid once started): ``port`` (HTTP), ``grpc_port``, ``base_url``,
    ``otlp_http_endpoint``, ``otlp_grpc_endpoint``, ``working_dir`` (temp dir with the SQLite
    database) and ``log_path``. ``start()`` / ``stop()`` are idempotent; the object is a context manager.
    """

    def __init__(self, *, command: list[str] | None = None, host: str = "127.0.0.1", port: int | None = None,
                 grpc_port: int | None = None, startup_timeout: float = 120.0, env: dict[str, str] | None = None,
                 keep: bool = False, attempts: int = 3) -> None:
        self.command = list(command) if command is not None else None
        self.host = host
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.keep = keep
        self.attempts = max(1, attempts)
        self._requested = (port, grpc_port)
        self.port: int | None = port
        self.grpc_port: int | None = grpc_port
        self.working_dir: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._log_file: Any = None
        self._lock = threading.RLock()

    # ---- addresses ----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: UI, REST API (``/v1/...``) and, as OTEL_EXPORTER_OTLP_ENDPOINT, OTLP/HTTP."""
        return f"http://{self.host}:{self._need(self.port)}"

    @property
    def otlp_http_endpoint(self) -> str:
        """The OTLP/HTTP traces URL (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): ``base_url + /v1/traces``."""
        return f"{self.base_url}/v1/traces"

    @property
    def otlp_grpc_endpoint(self) -> str:
        """The OTLP/gRPC endpoint, plaintext: ``http://127.0.0.1:GRPC_PORT``."""
        return f"http://{self.host}:{self._need(self.grpc_port)}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "PhoenixServer":
        """Start ``phoenix serve`` and wait until ``/healthz`` answers and the gRPC port accepts."""
        with self._lock:
            if self.running:
                return self
            command = self.command if self.command is not None else find_phoenix()
            for attempt in range(1, self.attempts + 1):
                self._launch(command)
                try:
                    self._wait_ready()
                    _LIVE.add(self)
                    return self
                except _EarlyExit as exc:
                    # Most likely a port taken between choosing it and Phoenix binding it: try new ports.
                    retry = attempt < self.attempts and None in self._requested
                    message = str(exc)
                    self._terminate()
                    self._cleanup()
                    if not retry:
                        raise RuntimeError(message) from None
                except BaseException:
                    self.stop()
                    raise
            raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL) and remove the temp dir. Idempotent."""
        with self._lock:
            try:
                self._terminate()
            finally:
                _LIVE.discard(self)
                self._cleanup()

    def __enter__(self) -> "PhoenixServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PhoenixServer {self.host}:{self.port} grpc={self.grpc_port} {state} dir={self.working_dir}>"

    # ---- reading spans back -------------------------------------------------------------
    def version(self) -> str:
        """The server's version (``GET /arize_phoenix_version``)."""
        return self._get("/arize_phoenix_version").decode().strip()

    def spans(self, project: str = "default", *, limit: int = 1000) -> list[dict[str, Any]]:
        """Every span of ``project`` (``GET /v1/projects/{project}/spans``, all pages), oldest first.

        An unknown project (nothing ingested into it yet) gives ``[]``.
        """
        quoted = urllib.parse.quote(project, safe="")
        spans: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"limit": str(limit), "sort": "start_time", "order": "asc"}
            if cursor:
                query["cursor"] = cursor
            try:
                body = self._get(f"/v1/projects/{quoted}/spans?{urllib.parse.urlencode(query)}")
            except urllib.error.HTTPError as exc:
                if exc.code == 404 and not spans:
                    return []
                raise
            page = json.loads(body)
            spans.extend(page.get("data") or [])
            cursor = page.get("next_cursor")
            if not cursor:
                return spans

    def wait_for_spans(self, count: int, project: str = "default", timeout: float = 60.0,
                       interval: float = 0.25) -> list[dict[str, Any]]:
        """Poll ``spans(project)`` until at least ``count`` spans are there; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        spans: list[dict[str, Any]] = []
        while True:
            if not self.running:
                raise RuntimeError(f"Phoenix exited (code {self._returncode()}) while waiting for spans\n"
                                   f"--- phoenix log tail ---\n{_tail(self.log_path)}")
            spans = self.spans(project)
            if len(spans) >= count:
                return spans
            if time.monotonic() >= deadline:
                names = sorted(s.get("name", "?") for s in spans)
                raise TimeoutError(
                    f"Phoenix has {len(spans)} of {count} spans in project {project!r} after {timeout:.0f}s: "
                    f"{names}\n--- phoenix log tail ---\n{_tail(self.log_path)}")
            time.sleep(interval)

    # ---- internals ----------------------------------------------------------------------
    def _need(self, value: int | None) -> int:
        if value is None:
            raise RuntimeError("PhoenixServer has no port yet: call start() first")
        return value

    def _launch(self, command: list[str]) -> None:
        self.working_dir = Path(tempfile.mkdtemp(prefix="otel-cmbagent-phoenix-"))
        self.log_path = self.working_dir / "phoenix.log"
        self.port = self._requested[0] or _free_port(self.host)
        self.grpc_port = self._requested[1] or _free_port(self.host)
        while self.grpc_port == self.port:
            self.grpc_port = _free_port(self.host)
        settings = dict(_DEFAULT_SETTINGS)
        settings.update(self.extra_env)
        settings.update({
            "PHOENIX_HOST": self.host,
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_WORKING_DIR": str(self.working_dir),
        })
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(("$ " + " ".join(command) + "\n").encode())
        self._log_file.flush()
        self._started_at = time.monotonic()
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=_child_env(settings), cwd=str(self.working_dir), start_new_session=True,
            )
        except OSError as exc:
            self._cleanup()
            raise RuntimeError(f"PhoenixServer: cannot run {command[0]!r}: {exc}; {_INSTALL_HINT}") from exc

    def _wait_ready(self) -> None:
        deadline = self._started_at + self.startup_timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise _EarlyExit(f"Phoenix exited with code {self._process.returncode} before it was ready "
                                 f"(ports {self.port}, {self.grpc_port})\n--- phoenix log tail ---\n"
                                 f"{_tail(self.log_path)}")
            if self._healthy() and self._grpc_open():
                self.startup_seconds = time.monotonic() - self._started_at
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"Phoenix on {self.base_url} was not ready within {self.startup_timeout:.0f}s\n"
                                   f"--- phoenix log tail ---\n{_tail(self.log_path)}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _grpc_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self._need(self.grpc_port)), timeout=2):
                return True
        except OSError:
            return False

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(f"{self.base_url}{path}", headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def _returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(process.pid, sig)  # the session Popen started: phoenix and any children
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # the leader is gone; make sure nothing it started lingers
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _cleanup(self) -> None:
        if self._log_file is not None:
            try:
                self._log_file.close()
            finally:
                self._log_file = None
        if self.working_dir is not None and not self.keep:
            shutil.rmtree(self.working_dir, ignore_errors=True)
            self.working_dir = self.log_path = None
            self.port, self.grpc_port = self._requested


class _EarlyExit(RuntimeError):
    pass


@atexit.register
def _stop_all() -> None:  # never leave a Phoenix server behind when a test run ends abruptly
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:
            pass
