"""The viewer's small defects from issue 10 item 7, against the real server (uvicorn on loopback, real HTTP
and websocket clients): an out-of-range ``after``, a run id with ``/``, a non-ASCII token in a header,
TCP_NODELAY on keep-alive connections, and no ERROR line per rejected websocket."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from otel_cmbagent.apps.viewer import ViewerServer
from test_viewer import SYNTHETIC_WRITER

RUN_ID = "team/analysis/run-1"
TOKEN = "s3crét-令牌-token"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A run written by another process, whose id contains "/"."""
    path = tmp_path_factory.mktemp("viewer-hardening") / "runs.db"
    subprocess.run([sys.executable, "-c", SYNTHETIC_WRITER, str(path), RUN_ID, "2", "0"], check=True, timeout=60)
    return path


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def watched():
    """``watched(server)``: the server, with every record of its loggers collected in ``watched.records``
    (attached after uvicorn configured its loggers, which removes earlier handlers; they do not propagate)."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "otel_cmbagent.viewer")]

    def watch(server: ViewerServer) -> ViewerServer:
        for logger in loggers:
            logger.addHandler(handler)
        return server

    watch.records = handler.records  # type: ignore[attr-defined]
    yield watch
    for logger in loggers:
        logger.removeHandler(handler)


def test_after_beyond_64_bits_is_a_clear_400_not_a_500(db, watched):
    with watched(ViewerServer(str(db))) as server:
        for value in ("9223372036854775808", "99999999999999999999999", "-1"):
            response = httpx.get(f"{server.url}api/runs/last/events", params={"after": value})
            assert response.status_code == 400, (value, response.text)
            assert "after must be between 0 and 9223372036854775807" in response.json()["error"]
        top = httpx.get(f"{server.url}api/runs/last/events", params={"after": str(2**63 - 1)})
        assert top.status_code == 200 and top.json() == []
    assert not [r for r in watched.records if r.levelno >= logging.ERROR or r.exc_info], watched.records


def test_a_run_id_with_slashes_can_be_opened(db):
    with ViewerServer(str(db)) as server:
        for spelled in ("team%2Fanalysis%2Frun-1", "team/analysis/run-1"):
            summary = httpx.get(f"{server.url}api/runs/{spelled}")
            assert summary.status_code == 200 and summary.json()["run_id"] == RUN_ID, summary.text
            events = httpx.get(f"{server.url}api/runs/{spelled}/events")
            assert events.status_code == 200 and {e["run_id"] for e in events.json()} == {RUN_ID}
            assert events.headers["x-run-id"] == RUN_ID
            later = httpx.get(f"{server.url}api/runs/{spelled}/events", params={"after": 2})
            assert [e["execution_order"] for e in later.json()] == [e["execution_order"] for e in events.json()][2:]
        assert httpx.get(f"{server.url}api/runs/team%2Fother/events").status_code == 404


def test_a_non_ascii_token_works_in_every_place_it_is_accepted(db):
    utf8 = TOKEN.encode("utf-8")
    with ViewerServer(str(db), token=TOKEN) as server:
        url = f"{server.url}api/runs"
        accepted = {
            "bearer (UTF-8 bytes)": httpx.get(url, headers={"Authorization": b"Bearer " + utf8}),
            "x-token (UTF-8 bytes)": httpx.get(url, headers={"X-Token": utf8}),
            "x-token (percent-encoded, as the page sends it)": httpx.get(
                url, headers={"X-Token": "s3cr%C3%A9t-%E4%BB%A4%E7%89%8C-token"}),
            "query": httpx.get(url, params={"token": TOKEN}),
        }
        assert {where: r.status_code for where, r in accepted.items()} == dict.fromkeys(accepted, 200)
        refused = [
            httpx.get(url, headers={"Authorization": b"Bearer " + utf8[:-1]}),
            httpx.get(url, headers={"X-Token": TOKEN.encode("utf-8").replace(b"t", b"T")}),
            httpx.get(url, params={"token": TOKEN.upper()}),
            httpx.get(url),
        ]
        assert [r.status_code for r in refused] == [401] * 4
        ws_url = server.url.replace("http://", "ws://") + "ws"
        with connect(f"{ws_url}?token={quote(TOKEN)}", open_timeout=10):
            pass


def test_keep_alive_connections_have_tcp_nodelay(db):
    """The pre-bound socket is created as TCP, so asyncio sets TCP_NODELAY on every accepted connection
    (without it, Nagle and delayed ACKs made each keep-alive request wait ~40 ms)."""
    with ViewerServer(str(db)) as server, httpx.Client() as client:
        for _ in range(3):
            assert client.get(f"{server.url}api/config").status_code == 200  # one kept-alive connection
        connections = list(server._server.server_state.connections)
        assert connections
        sockets = [c.transport.get_extra_info("socket") for c in connections]
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


def test_rejected_websockets_log_no_error(db, watched):
    with watched(ViewerServer(str(db), token=TOKEN, log_level="info")) as server:
        ws_url = server.url.replace("http://", "ws://") + "ws"
        for attempt in ("", "?token=wrong", "?token=also-wrong"):
            with pytest.raises(InvalidStatus) as refused:
                connect(ws_url + attempt, open_timeout=10)
            assert refused.value.response.status_code == 401
        with connect(f"{ws_url}?token={quote(TOKEN)}", open_timeout=10):
            pass
    messages = [(r.levelno, r.getMessage()) for r in watched.records]
    assert [m for m in messages if "WebSocket /ws" in m[1]], messages  # the handler sees the server's lines
    assert not [m for m in messages if m[0] >= logging.ERROR], messages
