"""Class-level wrapt patches that can be undone exactly.

We record the raw ``__dict__`` entry of each patched attribute and put that very
object back on uninstrument (or delete the attribute if the class never had its
own), so ``Class.__dict__[name] is original`` holds afterwards.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import wrapt

_MISSING = object()
_MARK = "_self_otel_cmbagent_patch"  # "_self_" keeps it on the proxy, off the original


class PatchSet:
    def __init__(self) -> None:
        self._applied: list[tuple[type, str, Any]] = []
        self._lock = threading.Lock()

    def wrap(self, owner: type, name: str, wrapper: Callable[..., Any]) -> bool:
        """Wrap ``owner.name`` where ``owner`` itself defines it; skip inherited or already-wrapped attributes."""
        with self._lock:
            original = owner.__dict__.get(name, _MISSING)
            if original is _MISSING:
                return False
            if getattr(original, _MARK, False):
                return False
            patched = wrapt.FunctionWrapper(original, wrapper)
            setattr(patched, _MARK, True)
            setattr(owner, name, patched)
            self._applied.append((owner, name, original))
            return True

    def restore(self) -> None:
        with self._lock:
            while self._applied:
                owner, name, original = self._applied.pop()
                setattr(owner, name, original)

    @property
    def patched(self) -> list[tuple[type, str, Any]]:
        return list(self._applied)
