"""The overflow file: what a full queue cannot take is appended here instead of being dropped, and the worker
reads it back, in order, once it has caught up.

One file per process, ``<spill stem>.overflow-<pid>.jsonl`` next to the failure spill file (whose role differs:
rows the *database* could not take, for ``replay()``). Lines are JSON rows, the spill file's format, so a file
left behind by a process that died mid-burst is replayed like a spill file: ``replay(path, url)``. The agent's
thread pays one JSON line and one ``write`` per item, only while the queue is full; the file is removed once
read to its end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from otel_cmbagent.table.encoding import dumps


class OverflowFile:
    """An append-only JSON Lines file of items, read back from where the last read stopped.

    ``encode(item)`` makes the JSON object written for an item (on the caller's thread); ``decode(obj)`` the
    item read back. Not thread-safe on its own: the worker calls ``append``/``pending``/``reset`` under its
    lock, and ``read`` from its own thread only.
    """

    def __init__(self, base: Path, encode: Callable[[Any], Mapping[str, Any]], decode: Callable[[dict], Any]) -> None:
        self.base = base
        self._encode = encode
        self._decode = decode
        self.path: Path | None = None
        self._fd: int | None = None
        self._reader: BinaryIO | None = None
        self._written_to = 0  # bytes appended (the file's end)
        self._read_to = 0  # bytes read back

    def _open(self) -> int:
        if self._fd is None:
            self.path = self.base.with_name(f"{self.base.stem}.overflow-{os.getpid()}.jsonl")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._written_to = os.fstat(self._fd).st_size  # a file left by a dead process with our pid: read too
            self._read_to = 0
        return self._fd

    def append(self, item: Any) -> None:
        """One line, written whole with one ``write`` (raises OSError or an encoding error; nothing half kept)."""
        line = (dumps(self._encode(item)) + "\n").encode("utf-8", "surrogatepass")
        fd = self._open()
        written = os.write(fd, line)
        if written != len(line):  # a short write (disk full): end the line so the reader can skip it
            self._written_to += written + os.write(fd, b"\n")
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
        self._written_to += written

    @property
    def pending(self) -> bool:
        """Appended lines not read back yet."""
        return self._written_to > self._read_to

    def read(self, max_items: int) -> list[Any]:
        """Up to ``max_items`` items after the last read, in the order they were appended (whole lines only)."""
        if self._fd is None:
            return []
        if self._reader is None:
            self._reader = open(self.path, "rb")  # noqa: SIM115 - kept open while the file is drained
        self._reader.seek(self._read_to)
        items: list[Any] = []
        while len(items) < max_items and self._read_to < self._written_to:
            line = self._reader.readline()
            if not line.endswith(b"\n"):
                break
            self._read_to += len(line)
            try:
                items.append(self._decode(json.loads(line)))
            except ValueError:  # a line cut short by a failed write: nothing of it was counted as appended
                continue
        return items

    def reset(self) -> None:
        """Everything was read back: close and remove the file (a new one is made by the next overflow)."""
        opened = self._fd is not None
        self.close()
        if opened and self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass

    def close(self) -> None:
        """Close the file, leaving it where it is (for ``replay()`` if lines were not read back)."""
        if self._fd is not None:
            os.close(self._fd)
        if self._reader is not None:
            self._reader.close()
        self._fd, self._reader = None, None  # ``path`` stays: the log names the last file
        self._written_to = self._read_to = 0

    def after_fork(self) -> None:
        """In a forked child: the parent's file stays the parent's; the child makes its own when it overflows."""
        self.close()
