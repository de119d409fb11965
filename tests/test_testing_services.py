"""The test services themselves: a throwaway PostgreSQL cluster and real OTLP receivers (HTTP, gRPC)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import StatusCode

from services import postgres as pg_mod
from services.otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver
from services.postgres import PostgresServer, find_postgres_bin

# ---- PostgresServer ---------------------------------------------------------------------


def _need_postgres() -> None:
    pytest.importorskip("sqlalchemy", minversion="2")
    pytest.importorskip("psycopg")
    try:
        find_postgres_bin("initdb")
        find_postgres_bin("pg_ctl")
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise  # CI must install the server binaries (apt-get install postgresql)
        pytest.skip(str(exc))


def test_find_postgres_bin_missing_names_apt(monkeypatch):
    monkeypatch.setattr(pg_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(pg_mod.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        find_postgres_bin("initdb")


def test_postgres_lifecycle_with_fault():
    _need_postgres()
    from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
    from sqlalchemy.exc import OperationalError

    server = PostgresServer()
    assert server.running is False
    t0 = time.perf_counter()
    with server:
        started = time.perf_counter() - t0
        assert server.running and started < 30
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/postgres"
        assert server.data_dir.is_dir() and (server.data_dir / "PG_VERSION").exists()
        base_dir, port = server.base_dir, server.port
        server.start()  # idempotent
        assert server.port == port

        meta = MetaData()
        items = Table("items", meta, Column("id", Integer, primary_key=True), Column("name", String(50)))
        engine = create_engine(server.url)
        with engine.begin() as conn:
            meta.create_all(conn)
            conn.execute(insert(items), [{"id": 1, "name": "alpha"}, {"id": 2, "name": "beta"}])
        with engine.connect() as conn:
            assert conn.execute(select(items.c.name).order_by(items.c.id)).scalars().all() == ["alpha", "beta"]
        engine.dispose()

        server.stop_server()
        assert not server.running and server.data_dir.is_dir()
        down = create_engine(server.url, connect_args={"connect_timeout": 2})
        with pytest.raises(OperationalError):
            with down.connect() as conn:
                conn.execute(select(1))
        down.dispose()
        server.stop_server()  # idempotent

        server.restart()
        assert server.running and server.port == port
        engine = create_engine(server.url)
        with engine.connect() as conn:
            assert conn.execute(select(items.c.name).order_by(items.c.id)).scalars().all() == ["alpha", "beta"]
        engine.dispose()
    assert not server.running
    assert not base_dir.exists()
    server.stop()  # idempotent after the context manager


def test_postgres_keep_leaves_data_dir():
    _need_postgres()
    server = PostgresServer(keep=True).start()
    try:
        server.wait_ready(timeout=5)
        base_dir = server.base_dir
    finally:
        server.stop()
    try:
        assert (base_dir / "data" / "PG_VERSION").exists()
        assert (base_dir / "postgres.log").exists()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


# ---- OTLP receivers ---------------------------------------------------------------------


def _http_exporter(rx, timeout=10.0, gzip=False):
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=rx.endpoint, timeout=timeout,
                            compression=Compression.Gzip if gzip else Compression.NoCompression)


def _grpc_exporter(rx, timeout=10.0, gzip=False):
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=rx.endpoint, insecure=True, timeout=timeout,
                            compression=grpc.Compression.Gzip if gzip else None)


VARIANTS = [
    pytest.param(OTLPHTTPReceiver, _http_exporter, False, id="http"),
    pytest.param(OTLPHTTPReceiver, _http_exporter, True, id="http-gzip"),
    pytest.param(OTLPGRPCReceiver, _grpc_exporter, False, id="grpc"),
    pytest.param(OTLPGRPCReceiver, _grpc_exporter, True, id="grpc-gzip"),
]


def _emit(exporter) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("receiver.test", "1.2.3")
    with tracer.start_as_current_span("parent", attributes={"run.id": "r1", "n": 3}) as parent:
        parent.set_status(StatusCode.OK)
        with tracer.start_as_current_span("child") as child:
            child.set_attribute("ratio", 0.5)
            child.set_attribute("ok", True)
            child.set_attribute("tags", ["a", "b"])
            child.set_attribute("nums", [1, 2, 3])
            child.add_event("tool.result", {"size": 42, "text": "done"})
    provider.shutdown()


@pytest.mark.parametrize(("receiver_cls", "make_exporter", "gzip"), VARIANTS)
def test_receiver_gets_parent_and_child(receiver_cls, make_exporter, gzip):
    with receiver_cls() as rx:
        assert rx.endpoint.startswith(f"http://127.0.0.1:{rx.port}")
        _emit(make_exporter(rx, gzip=gzip))
        spans = rx.wait_for(2, timeout=10)
        by_name = {s["name"]: s for s in spans}
        parent, child = by_name["parent"], by_name["child"]
        assert len(parent["trace_id"]) == 32 and len(parent["span_id"]) == 16
        assert parent["parent_span_id"] is None
        assert child["parent_span_id"] == parent["span_id"]
        assert child["trace_id"] == parent["trace_id"]
        assert parent["attributes"] == {"run.id": "r1", "n": 3}
        assert parent["status_code"] == "OK" and child["status_code"] == "UNSET"
        assert child["attributes"] == {"ratio": 0.5, "ok": True, "tags": ["a", "b"], "nums": [1, 2, 3]}
        assert child["events"][0]["name"] == "tool.result"
        assert child["events"][0]["attributes"] == {"size": 42, "text": "done"}
        for span in spans:
            assert span["resource"]["service.name"] == "receiver-test"
            assert span["scope"] == "receiver.test" and span["scope_version"] == "1.2.3"
            assert span["kind"] == "INTERNAL"
        assert rx.requests == 2  # SimpleSpanProcessor: one request per span
        rx.clear()
        assert rx.spans == []


@pytest.mark.parametrize(("receiver_cls", "make_exporter"),
                         [(OTLPHTTPReceiver, _http_exporter), (OTLPGRPCReceiver, _grpc_exporter)],
                         ids=["http", "grpc"])
def test_fail_mode_reports_failure_without_raising(receiver_cls, make_exporter):
    with receiver_cls(mode="fail") as rx:
        exporter = make_exporter(rx, timeout=1.0)
        provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("receiver.test")
        with tracer.start_as_current_span("lost") as span:
            pass  # SimpleSpanProcessor exports on end; the failure is logged, never raised
        result = exporter.export([span])  # the same span, directly: the result is reported
        assert result is SpanExportResult.FAILURE
        assert rx.requests >= 2 and rx.spans == []

        rx.mode = "ok"
        assert exporter.export([span]) is SpanExportResult.SUCCESS
        assert [s["name"] for s in rx.wait_for(1, timeout=5)] == ["lost"]
        provider.shutdown()


@pytest.mark.parametrize(("receiver_cls", "make_exporter"),
                         [(OTLPHTTPReceiver, _http_exporter), (OTLPGRPCReceiver, _grpc_exporter)],
                         ids=["http", "grpc"])
def test_hang_mode_times_out_and_release(receiver_cls, make_exporter):
    with receiver_cls() as rx:
        rx.mode = "hang"
        exporter = make_exporter(rx, timeout=0.5)
        provider = TracerProvider()
        tracer = provider.get_tracer("receiver.test")
        with tracer.start_as_current_span("slow") as span:
            pass
        t0 = time.monotonic()
        assert exporter.export([span]) is SpanExportResult.FAILURE
        assert time.monotonic() - t0 < 5
        assert rx.requests >= 1
        rx.release()
        assert rx.mode == "ok"
        assert exporter.export([span]) is SpanExportResult.SUCCESS
        assert "slow" in [s["name"] for s in rx.wait_for(1, timeout=5)]
        exporter.shutdown()


def test_wait_for_timeout_message_and_bad_mode():
    with OTLPHTTPReceiver() as rx:
        with pytest.raises(TimeoutError, match="got 0 span"):
            rx.wait_for(1, timeout=0.1)
        with pytest.raises(ValueError):
            rx.mode = "sideways"
    rx.stop()  # idempotent


def test_hang_is_released_by_stop():
    """A request held in "hang" mode does not keep stop() waiting."""
    rx = OTLPGRPCReceiver(mode="hang").start()
    exporter = _grpc_exporter(rx, timeout=2.0)
    tracer = TracerProvider().get_tracer("receiver.test")
    with tracer.start_as_current_span("held") as span:
        pass
    results = []
    t = threading.Thread(target=lambda: results.append(exporter.export([span])))
    t.start()
    deadline = time.monotonic() + 5
    while rx.requests == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    rx.stop()
    assert time.monotonic() - t0 < 3
    t.join(timeout=10)
    assert results == [SpanExportResult.FAILURE]
