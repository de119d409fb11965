"""What we use from ``opentelemetry-instrumentation`` (contrib), with built-in equivalents.

Contrib releases pin an exact ``opentelemetry-semantic-conventions`` (hence an exact API) and
often lag an SDK patch release, so a hard dependency on them can make a plain ``pip install``
unresolvable. They are optional: when ``opentelemetry-instrumentation`` is installed (zero-code
``opentelemetry-instrument`` needs it anyway) its ``BaseInstrumentor`` is the base class;
otherwise :class:`BuiltinBaseInstrumentor`, with the same public surface.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Collection
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from packaging.requirements import InvalidRequirement, Requirement

_logger = logging.getLogger(__name__)

# The API's own key; contrib's ``suppress_instrumentation()`` also sets the plain string for older callers.
SUPPRESS_INSTRUMENTATION_KEY = _SUPPRESS_INSTRUMENTATION_KEY
_SUPPRESS_INSTRUMENTATION_KEY_PLAIN = "suppress_instrumentation"


def is_instrumentation_enabled() -> bool:
    """False inside ``suppress_instrumentation()`` (exporters, our sink workers): same test as contrib's."""
    return not (
        otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY)
        or otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY_PLAIN)
    )


def dependency_conflict(requirements: Collection[str]) -> str | None:
    """Why the installed distributions do not satisfy ``requirements`` (None when they do)."""
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            return f'invalid requirement "{text}"'
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            return f'requested "{text}" but found none'
        if not requirement.specifier.contains(installed, prereleases=True):
            return f'requested "{text}" but found "{requirement.name} {installed}"'
    return None


class BuiltinBaseInstrumentor(ABC):
    """Contrib's ``BaseInstrumentor`` contract without the contrib package.

    A singleton per class; ``instrument(**kwargs)`` checks ``instrumentation_dependencies()``
    (``skip_dep_check=True`` skips it), calls ``_instrument`` once; ``uninstrument`` undoes it.
    """

    _instance: Any = None
    _is_instrumented_by_opentelemetry = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        return self._is_instrumented_by_opentelemetry

    @abstractmethod
    def instrumentation_dependencies(self) -> Collection[str]:
        """Requirements (``"name >= x, < y"``) that must be installed for ``instrument()`` to patch."""

    def _instrument(self, **kwargs: Any) -> Any:
        """Instrument the library."""

    @abstractmethod
    def _uninstrument(self, **kwargs: Any) -> Any:
        """Undo ``_instrument``."""

    def instrument(self, **kwargs: Any) -> Any:
        if self._is_instrumented_by_opentelemetry:
            _logger.warning("Attempting to instrument while already instrumented")
            return None
        skip_dep_check = kwargs.pop("skip_dep_check", False)
        kwargs.pop("raise_exception_on_conflict", None)  # the zero-code loader's flag; that loader needs contrib
        if not skip_dep_check:
            conflict = dependency_conflict(self.instrumentation_dependencies())
            if conflict:
                _logger.error("%s: DependencyConflict: %s", type(self).__name__, conflict)
                return None
        result = self._instrument(**kwargs)
        self._is_instrumented_by_opentelemetry = True
        return result

    def uninstrument(self, **kwargs: Any) -> Any:
        if self._is_instrumented_by_opentelemetry:
            result = self._uninstrument(**kwargs)
            self._is_instrumented_by_opentelemetry = False
            return result
        _logger.warning("Attempting to uninstrument while already uninstrumented")
        return None


try:
    from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
        BaseInstrumentor as BaseInstrumentor,
    )

    CONTRIB_BASE = True
except ImportError:
    BaseInstrumentor = BuiltinBaseInstrumentor  # type: ignore[assignment,misc]
    CONTRIB_BASE = False
