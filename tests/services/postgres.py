"""A throwaway PostgreSQL cluster on loopback, for tests, benchmarks and users' own tests.

Uses the machine's PostgreSQL server binaries (``initdb`` / ``pg_ctl``): found on ``PATH``,
else the newest ``/usr/lib/postgresql/*/bin``. Nothing is downloaded.

    with PostgresServer() as pg:
        engine = sqlalchemy.create_engine(pg.url)   # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
        ...
        pg.stop_server()    # the database goes away mid-run (data kept)
        pg.restart()        # ... and comes back on the same port with the same data

The cluster lives in a fresh temporary directory (``trust`` auth, superuser ``postgres``,
listening on 127.0.0.1 only, Unix socket inside the temp dir). It is tuned for speed, not
durability (``fsync=off``, ``full_page_writes=off``; pass ``settings={}`` to keep the server defaults): a
``stop_server()`` / ``restart()`` cycle keeps committed data because the OS keeps the files.

``initdb`` refuses to run as root, so as root the server programs run as the unprivileged
user ``nobody`` (the temp dir is handed to that user). Readiness is checked with a real
connection through psycopg 3 (``pip install "psycopg[binary]"``).
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "find_postgres_bin"]

_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH nor in /usr/lib/postgresql/*/bin; "
    "install them with `apt-get install postgresql` (Debian/Ubuntu) or put their bin directory on PATH"
)

# Fast, throwaway defaults: nothing here must survive an OS crash. synchronous_commit stays on:
# with it off, commits still in WAL buffers are lost by an immediate stop (stop_server()).
_FAST_SETTINGS = {"fsync": "off", "full_page_writes": "off"}

_LIVE: "weakref.WeakSet[PostgresServer]" = weakref.WeakSet()


def _version_key(path: str) -> tuple:
    version = Path(path).parent.parent.name  # /usr/lib/postgresql/<version>/bin/<prog>
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-]", version))


def find_postgres_bin(name: str) -> str:
    """Absolute path of a PostgreSQL server program (``initdb``, ``pg_ctl``, ``postgres``...).

    Looks on ``PATH`` first, then in the newest ``/usr/lib/postgresql/*/bin``; raises
    ``RuntimeError`` (naming ``apt-get install postgresql``) when it is nowhere.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = [p for p in glob.glob(f"/usr/lib/postgresql/*/bin/{name}") if os.access(p, os.X_OK)]
    if candidates:
        return max(candidates, key=_version_key)
    raise RuntimeError(f"{_INSTALL_HINT} (missing: {name})")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class PostgresServer:
    """A throwaway PostgreSQL cluster on ``127.0.0.1:port`` (see the module docstring).

    Attributes (valid once started): ``port``, ``url`` (SQLAlchemy URL for psycopg 3),
    ``dsn`` (libpq URI for ``psycopg.connect``), ``data_dir`` (PGDATA), ``base_dir`` (the temp
    dir holding data, socket and logs), ``log_path`` (server log).

    ``start()`` / ``stop()`` are idempotent and the object is a context manager. ``stop()``
    removes the temp dir unless ``keep=True``. ``stop_server()`` / ``restart()`` take the
    server down and bring it back (same port, same data) for fault tests.
    """

    user = "postgres"
    database = "postgres"

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1", keep: bool = False,
                 settings: dict[str, Any] | None = None, startup_timeout: float = 60.0,
                 run_as: str = "nobody", base_dir: str | os.PathLike | None = None) -> None:
        self.host = host
        self.keep = keep
        self.settings = dict(_FAST_SETTINGS if settings is None else settings)
        self.startup_timeout = startup_timeout
        self.run_as = run_as
        self._requested_port = port
        self._parent_dir = os.fspath(base_dir) if base_dir is not None else None
        self.port: int | None = port
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self._cmd_log: Path | None = None
        self._running = False
        self._lock = threading.RLock()
        self._uid: int | None = None
        self._gid: int | None = None

    # ---- public API -------------------------------------------------------------------
    @property
    def url(self) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self._need_port()}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq connection URI (for ``psycopg.connect``): ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://{self.user}@{self.host}:{self._need_port()}/{self.database}"

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> "PostgresServer":
        """Create the cluster (first time) and start the server; no-op when already running."""
        with self._lock:
            if self._running:
                return self
            self._resolve_bins()
            if self.base_dir is None or not self.base_dir.exists():
                self._make_cluster()
            self._start_server()
            _LIVE.add(self)
            return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m immediate``) and remove the temp dir unless ``keep``. Idempotent."""
        with self._lock:
            try:
                if self._running:
                    self.stop_server()
            finally:
                _LIVE.discard(self)
                if self.base_dir is not None and not self.keep:
                    shutil.rmtree(self.base_dir, ignore_errors=True)
                    self.base_dir = self.data_dir = self.log_path = self._cmd_log = None
                    self.port = self._requested_port

    def stop_server(self) -> None:
        """Stop the server abruptly (``pg_ctl stop -m immediate``), keeping the data dir and port."""
        with self._lock:
            if not self._running or self.data_dir is None:
                self._running = False
                return
            self._running = False
            result = self._run([self._pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w",
                                "-t", "30", "stop"], check=False)
            if result.returncode != 0 and self._pid_alive():
                self._fail("pg_ctl stop failed", result)

    def restart(self) -> "PostgresServer":
        """Start the server again on the same port and data dir (stopping it first if it is up)."""
        with self._lock:
            if self.data_dir is None or not self.data_dir.exists():
                raise RuntimeError("PostgresServer.restart(): no cluster (never started, or stopped and removed)")
            if self._running:
                self.stop_server()
            self._start_server()
            _LIVE.add(self)
            return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll with a real psycopg connection until the server accepts connections."""
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError('PostgresServer needs psycopg 3: pip install "psycopg[binary]"') from exc
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"PostgreSQL on {self.host}:{self.port} did not accept connections within {timeout:.0f}s: "
                    f"{last}\n--- server log tail ---\n{self._log_tail()}")
            time.sleep(0.05)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PostgresServer {self.host}:{self.port} {state} data_dir={self.data_dir}>"

    # ---- internals --------------------------------------------------------------------
    def _need_port(self) -> int:
        if self.port is None:
            raise RuntimeError("PostgresServer has no port yet: call start() first")
        return self.port

    def _resolve_bins(self) -> None:
        self._initdb = find_postgres_bin("initdb")
        self._pg_ctl = find_postgres_bin("pg_ctl")
        geteuid = getattr(os, "geteuid", None)
        if geteuid is not None and geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(self.run_as)
            except KeyError as exc:
                raise RuntimeError(f"running as root, PostgresServer needs the unprivileged user {self.run_as!r} "
                                   "(initdb refuses to run as root)") from exc
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        else:
            self._uid = self._gid = None

    def _make_cluster(self) -> None:
        parent = self._parent_dir
        if parent is None and self._uid is not None:
            # The unprivileged user must be able to reach the temp dir: the default tempdir may
            # be under a root-only path (e.g. TMPDIR=/root/tmp); /tmp always works.
            parent = tempfile.gettempdir()
            if not _world_traversable(parent):
                parent = "/tmp"
        self.base_dir = Path(tempfile.mkdtemp(prefix="otel-cmbagent-pg-", dir=parent))
        if self._uid is not None:
            os.chown(self.base_dir, self._uid, self._gid)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self._cmd_log = self.base_dir / "commands.log"
        if self.port is None:
            self.port = _free_port(self.host)
        result = self._run([self._initdb, "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
                            "-E", "UTF8", "--locale=C", "--no-sync"], check=False)
        if result.returncode != 0:
            self._fail("initdb failed", result)

    def _start_server(self) -> None:
        assert self.data_dir is not None and self.base_dir is not None
        opts = [f"-p {self.port}", f"-k {self.base_dir}", f"-c listen_addresses={self.host}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        result = self._run([self._pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_path),
                            "-o", " ".join(opts), "-w", "-t", str(int(self.startup_timeout)), "start"],
                           check=False, new_session=True)
        if result.returncode != 0:
            self._fail(f"pg_ctl start failed (port {self.port})", result)
        self._running = True
        try:
            self.wait_ready(timeout=self.startup_timeout)
        except Exception:
            self.stop_server()
            raise

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = str(self.base_dir)  # `nobody` has no writable home
        env.setdefault("LC_ALL", "C")
        return env

    def _run(self, cmd: list[str], *, check: bool, new_session: bool = False) -> subprocess.CompletedProcess:
        assert self._cmd_log is not None
        with open(self._cmd_log, "ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            kwargs: dict[str, Any] = {}
            if self._uid is not None:
                kwargs.update(user=self._uid, group=self._gid, extra_groups=[])
            # Output goes to a file, not a pipe: the daemonised postmaster must not hold our pipe open.
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=self._env(), cwd=str(self.base_dir), start_new_session=new_session,
                                    timeout=self.startup_timeout + 30, check=check, **kwargs)
            log.write(f"[exit {result.returncode}]\n".encode())
        return result

    def _pid_alive(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid" if self.data_dir else None
        try:
            pid = int(pid_file.read_text().splitlines()[0]) if pid_file else 0
        except (OSError, ValueError, IndexError):
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True

    def _log_tail(self) -> str:
        parts = []
        if self._cmd_log is not None:
            parts.append(_tail(self._cmd_log, 30))
        if self.log_path is not None:
            parts.append(_tail(self.log_path, 30))
        return "\n".join(p for p in parts if p)

    def _fail(self, what: str, result: subprocess.CompletedProcess) -> None:
        raise RuntimeError(f"PostgresServer: {what} (exit {result.returncode}; logs in {self.base_dir})\n"
                           f"--- log tail ---\n{self._log_tail()}")


def _world_traversable(path: str) -> bool:
    p = Path(path).resolve()
    for part in [p, *p.parents]:
        try:
            if not os.stat(part).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


@atexit.register
def _stop_all() -> None:  # never leave a postmaster behind when a test run ends abruptly
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:
            pass
