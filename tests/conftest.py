"""Shared fixtures of this project's tests: a provider with the sequencer and an in-memory exporter, AG2
instrumented on it, real PostgreSQL.

The package's pytest plugin (``otel_cmbagent.testing.pytest_plugin``, loaded here too) gives ``span_exporter``,
``scripted_llm`` and ``otel_tracer_provider``; no fixture here reuses those names: ``memory_exporter`` is a bare
exporter behind ``tracer_provider`` (AG2 instrumented only by ``instrument_with_content``/``_no_content``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc

# AG2 1.x's tests run only where AG2 1.x is installed (make test-ag2x); the classic lines leave the module out.
collect_ignore = [] if oc.ag2x.installed() else ["test_ag2x.py"]

# A suite started in the background by a shell without job control (``make test &`` in a script, some CI
# runners) inherits SIGINT ignored, and so would every child a test stops with SIGINT as Ctrl-C does: such a
# child never sees the KeyboardInterrupt and the test times out. Python's own handler here gives the children
# the default disposition back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A recognisable fake key: it must never appear in any span, attribute or event.
FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdefXYZ"


@pytest.fixture
def memory_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(memory_exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(oc.SequencingSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(memory_exporter))
    yield provider
    provider.shutdown()


def _instrument(tracer_provider: TracerProvider, **options: object) -> Iterator[oc.AG2Instrumentor]:
    instrumentor = oc.AG2Instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, **options)
    try:
        yield instrumentor
    finally:
        instrumentor.uninstrument()


@pytest.fixture
def instrument_with_content(tracer_provider: TracerProvider) -> Iterator[oc.AG2Instrumentor]:
    yield from _instrument(tracer_provider, capture_content=True)


@pytest.fixture
def instrument_no_content(tracer_provider: TracerProvider) -> Iterator[oc.AG2Instrumentor]:
    yield from _instrument(tracer_provider, capture_content=False)


@pytest.fixture
def chats_cwd(tmp_path, monkeypatch) -> str:
    """A temp cwd with ``chats/`` (cmbagent's AG2 fork writes group chats there) and ``coding/``."""
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)
    return os.fspath(tmp_path)


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL cluster on 127.0.0.1 for the session (initdb/pg_ctl; never skipped)."""
    from services.postgres import PostgresServer

    server = PostgresServer().start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def sqlite_or_postgres_url(request, tmp_path) -> str:
    """The test runs twice: on a SQLite file, and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database per test on the session cluster (restarted first if a fault test stopped it)."""
    import uuid

    import sqlalchemy as sa

    if not postgres_server.running:
        postgres_server.restart()
        postgres_server.wait_ready()
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"create database {name}"))
    admin.dispose()
    return postgres_server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def tracer(tracer_provider, monkeypatch):
    """A test tracer on the fixture provider, which oc.run()/oc.step() also use (no instrumentation)."""
    import otel_cmbagent.pipeline.context as oc_context

    monkeypatch.setattr(oc_context._TracerSource, "provider", tracer_provider)
    return tracer_provider.get_tracer("test")


# --- markers: what `make test-fast` leaves out ----------------------------------------------------------
# postgres: a real PostgreSQL cluster (initdb/pg_ctl, apt package postgresql); browser: Chromium; phoenix: Arize
# Phoenix in its own virtualenv; slow: subprocesses and real services (marked where they are); install: the wheel.
_SERVICE_MODULES = {"test_viewer_browser": "browser", "test_phoenix_e2e": "phoenix"}


def _uses_postgres(item: pytest.Item) -> bool:
    """Asks for the PostgreSQL fixtures, or has postgres in its name or parameter ids (fixtures that pick the
    database by parameter, such as ``cmbagent_db[postgresql]``)."""
    return bool({"postgres_url", "postgres_server"} & set(getattr(item, "fixturenames", ()))) or "postgres" in item.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = _SERVICE_MODULES.get(item.module.__name__ if item.module else "")
        if marker:
            item.add_marker(marker)
        if _uses_postgres(item):
            item.add_marker("postgres")

