"""The AG2 distributions this instrumentation supports (all import as ``autogen``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# Contrib convention: any one of these satisfies the instrumentation.
_instruments_any = (
    "ag2 >= 0.9, < 0.15",
    "autogen >= 0.9, < 0.15",
    "pyautogen >= 0.9, < 0.15",
    "cmbagent-autogen >= 0.0.91",
)
_instruments: tuple[str, ...] = ()


def installed_requirement() -> str:
    """The requirement of the AG2 distribution that is installed (the first candidate when none is)."""
    for requirement in _instruments_any:
        name = requirement.split()[0]
        try:
            version(name)
        except PackageNotFoundError:
            continue
        return requirement
    return _instruments_any[0]
