"""The websocket clients of the live server and the messages broadcast to them.

Each client has a bounded queue; a client that stops reading is disconnected (code 1013, "try again later":
the viewer's page reloads what it missed) instead of making the server buffer without bound, and the
messages it did not get are counted as dropped. Everything here runs on the server's event loop except
:meth:`Hub.publish_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable

from starlette.websockets import WebSocket, WebSocketDisconnect

CLIENT_QUEUE = 50_000  # messages waiting for one client
TRY_AGAIN_LATER = 1013
GOING_AWAY = 1001


class _Client:
    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[str | int] = asyncio.Queue(maxsize=CLIENT_QUEUE)


class Hub:
    """Broadcast text messages to every connected websocket client.

    ``stats``: ``sent`` (messages written, one per client), ``dropped`` (messages a client did not get: it was
    too slow, the hub was closed or more than ``max_pending`` waited for the loop), ``refused`` (requests the
    server's guard turned away), ``dropped_clients``.
    """

    def __init__(self, max_pending: int = 10_000) -> None:
        self.clients: set[_Client] = set()
        self.max_pending = max_pending
        self.sent = 0
        self.dropped = 0
        self.refused = 0
        self.dropped_clients = 0
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the server starts
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "refused": self.refused,
                "dropped_clients": self.dropped_clients}

    def count_refused(self, status: int) -> None:
        self.refused += 1

    # --- the loop's side ----------------------------------------------------------------------------
    def publish(self, messages: Iterable[str]) -> None:
        """Queue messages for every client (on the loop)."""
        messages = list(messages)
        if self.closed:
            self.dropped += len(messages)
            return
        for client in list(self.clients):
            for number, message in enumerate(messages):
                try:
                    client.queue.put_nowait(message)
                except asyncio.QueueFull:  # a client that does not read: drop it, it resyncs on reconnect
                    self.dropped += len(messages) - number
                    self._disconnect(client, TRY_AGAIN_LATER)
                    break

    def _disconnect(self, client: _Client, code: int) -> None:
        if client in self.clients:
            self.clients.discard(client)
            self.dropped_clients += code == TRY_AGAIN_LATER
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                if isinstance(client.queue.get_nowait(), str):
                    self.dropped += 1
        client.queue.put_nowait(code)

    def close(self) -> None:
        """Disconnect every client (1001 going away); later messages are dropped. Idempotent."""
        self.closed = True
        for client in list(self.clients):
            self._disconnect(client, GOING_AWAY)

    async def serve(self, websocket: WebSocket) -> None:
        """One client, until it disconnects or is disconnected."""
        await websocket.accept()
        if self.closed:
            await websocket.close(code=GOING_AWAY)
            return
        client = _Client(websocket)
        self.clients.add(client)
        tasks = [asyncio.create_task(self._send(client)), asyncio.create_task(self._receive(websocket))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.clients.discard(client)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, Exception):
                    await task

    async def _send(self, client: _Client) -> None:
        while True:
            message = await client.queue.get()
            if isinstance(message, int):  # a close code
                await client.websocket.close(code=message)
                return
            self.sent += 1
            await client.websocket.send_text(message)

    @staticmethod
    async def _receive(websocket: WebSocket) -> None:
        """Read (and ignore) what the client sends, so pings and closes are processed."""
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return

    # --- any thread -----------------------------------------------------------------------------------
    def publish_threadsafe(self, message: str) -> None:
        """Hand one message to the loop (never blocks; dropped and counted when closed or too far behind)."""
        loop = self.loop
        with self._lock:
            if self.closed or loop is None or self._pending >= self.max_pending:
                self.dropped += 1
                return
            self._pending += 1
        try:
            loop.call_soon_threadsafe(self._publish_one, message)
        except RuntimeError:  # the loop closed meanwhile
            with self._lock:
                self._pending -= 1
                self.dropped += 1

    def _publish_one(self, message: str) -> None:
        with self._lock:
            self._pending -= 1
        self.publish((message,))
