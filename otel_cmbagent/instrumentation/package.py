"""The AG2 distributions this instrumentation supports (all import as ``autogen``)."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from packaging.version import InvalidVersion, Version

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


INSTALL_HINT = 'pip install "ag2[openai]==0.14.0" (or autogen==0.14.1, or cmbagent-autogen)'


def classic_api_problem() -> str | None:
    """One line saying why the classic ``autogen`` API cannot be used and what to install (None when it can)."""
    try:
        importlib.import_module("autogen")
        return None
    except ModuleNotFoundError as exc:
        if exc.name != "autogen":  # e.g. cmbagent-autogen imports IPython without declaring it
            return f"importing autogen failed ({_one_line(exc)}): pip install {exc.name}"
    except Exception as exc:  # noqa: BLE001 - whatever a broken install raises: still one line
        return f"importing autogen failed ({type(exc).__name__}: {_one_line(exc)})"
    try:
        ag2_version = version("ag2")
    except PackageNotFoundError:
        return f"AG2 is not installed (no `autogen` module); otel-cmbagent traces the classic AG2 API: {INSTALL_HINT}"
    if _major(ag2_version) >= 1:
        return (
            f"ag2 {ag2_version} has no `autogen` module (AG2 1.x is a different framework, with its own OpenTelemetry "
            f'middleware); otel-cmbagent traces the classic AG2 API: pip install "ag2[openai]<0.15" '
            "(or autogen==0.14.1, or cmbagent-autogen)"
        )
    return f"ag2 {ag2_version} is installed but its `autogen` module is missing; reinstall it: {INSTALL_HINT}"


def _major(text: str) -> int:
    try:
        return Version(text).major
    except InvalidVersion:
        return 0


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
