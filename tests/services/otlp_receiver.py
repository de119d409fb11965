"""Real OTLP trace receivers on loopback, for tests: what an exporter sends, decoded into plain dicts.
The HTTP receiver also takes metrics (``/v1/metrics``) and logs (``/v1/logs``): ``rx.metrics``, ``rx.logs``
(decoded as described in ``otlp_signals``), ``rx.wait_until(predicate)``; ``rx.base_url`` is
``http://HOST:PORT`` (what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes).

    with OTLPHTTPReceiver() as rx:                       # POST http://127.0.0.1:PORT/v1/traces
        exporter = OTLPSpanExporter(endpoint=rx.endpoint)
        ...
        spans = rx.wait_for(2, timeout=5)               # [{"name", "trace_id", "parent_span_id", ...}]

    with OTLPGRPCReceiver() as rx:                       # grpc TraceService on 127.0.0.1:PORT
        exporter = OTLPSpanExporter(endpoint=rx.endpoint, insecure=True)

Each received span is a dict: ``name``, ``trace_id`` / ``span_id`` (hex), ``parent_span_id`` (hex or
None), ``kind`` ("INTERNAL", "CLIENT", ...), ``start_time_unix_nano`` / ``end_time_unix_nano``,
``attributes`` (python values: str/int/float/bool/bytes, lists for arrays, dicts for kvlists),
``events`` ([{"name", "attributes", "time_unix_nano"}]), ``links`` ([{"trace_id", "span_id",
"attributes"}]), ``status_code`` ("UNSET" / "OK" / "ERROR"), ``status_message``, ``resource``
(attribute dict), ``scope`` (instrumentation scope name) and ``scope_version``.

Fault knob ``mode``: "ok" (accept), "fail" (HTTP 503 / gRPC UNAVAILABLE; nothing recorded),
"hang" (hold the request until ``release()`` or ``stop()``). ``release()`` wakes held requests and
sets the mode back to "ok", so they are then accepted as usual.

Needs ``opentelemetry-proto`` (HTTP) and ``grpcio`` (gRPC), both brought by
``pip install opentelemetry-exporter-otlp``.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("tests.services.otlp_receiver needs opentelemetry-proto: "
                      "pip install opentelemetry-exporter-otlp") from exc

from .otlp_signals import SIGNALS  # noqa: E402 - after the import check above

__all__ = ["MODES", "OTLPGRPCReceiver", "OTLPHTTPReceiver", "decode_request"]

MODES = ("ok", "fail", "hang")
_STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}
_KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


# ---- decoding ---------------------------------------------------------------------------
def _any_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)  # string_value, bool_value, int_value, double_value, bytes_value


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def decode_request(request: "trace_service_pb2.ExportTraceServiceRequest") -> list[dict[str, Any]]:
    """Flatten an ``ExportTraceServiceRequest`` into the span dicts described in the module docstring."""
    spans: list[dict[str, Any]] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope, scope_version = scope_spans.scope.name, scope_spans.scope.version
            for span in scope_spans.spans:
                spans.append({
                    "name": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex() or None,
                    "kind": _KIND_NAMES.get(span.kind, str(span.kind)),
                    "start_time_unix_nano": span.start_time_unix_nano,
                    "end_time_unix_nano": span.end_time_unix_nano,
                    "attributes": _attributes(span.attributes),
                    "events": [{"name": e.name, "attributes": _attributes(e.attributes),
                                "time_unix_nano": e.time_unix_nano} for e in span.events],
                    "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                               "attributes": _attributes(link.attributes)} for link in span.links],
                    "status_code": _STATUS_NAMES.get(span.status.code, str(span.status.code)),
                    "status_message": span.status.message,
                    "resource": resource,
                    "scope": scope,
                    "scope_version": scope_version,
                })
    return spans


# ---- shared state -----------------------------------------------------------------------
class _ReceiverBase:
    kind = "OTLP"

    def __init__(self, host: str, port: int, mode: str) -> None:
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._spans: list[dict[str, Any]] = []
        self._metrics: list[dict[str, Any]] = []
        self._logs: list[dict[str, Any]] = []
        self._requests = 0
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        self._mode = "ok"
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {value!r}")
        if value == "hang":
            self._release.clear()
        self._mode = value

    def release(self) -> None:
        """Wake requests held by "hang" mode and switch back to "ok" (they are then accepted)."""
        self._mode = "ok"
        self._release.set()

    @property
    def spans(self) -> list[dict[str, Any]]:
        """Snapshot of all spans received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Snapshot of every metric point received so far (each export's points; cumulative by default)."""
        with self._lock:
            return list(self._metrics)

    @property
    def logs(self) -> list[dict[str, Any]]:
        """Snapshot of every log record received so far, in arrival order."""
        with self._lock:
            return list(self._logs)

    def wait_until(self, predicate: Any, timeout: float = 10.0, what: str = "the condition") -> None:
        """Poll until ``predicate(self)`` is true, or raise ``TimeoutError`` naming ``what``."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.kind} receiver at {self.endpoint}: no {what} in {timeout:g}s "
                                   f"({self.requests} request(s))")
            time.sleep(0.02)

    @property
    def requests(self) -> int:
        """Number of export requests received (in any mode)."""
        with self._lock:
            return self._requests

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._metrics.clear()
            self._logs.clear()
            self._requests = 0

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll until at least ``count`` spans arrived; returns them, or raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans
            if len(spans) >= count:
                return spans
            if time.monotonic() >= deadline:
                names = [s["name"] for s in spans]
                raise TimeoutError(f"{self.kind} receiver at {self.endpoint} got {len(spans)} span(s) {names} "
                                   f"from {self.requests} request(s) in {timeout:g}s; wanted at least {count}")
            time.sleep(0.02)

    @property
    def endpoint(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def _hold(self, still_wanted: Any = None) -> bool:
        """Block a "hang" request; True when it should then be processed, False when stopping/abandoned."""
        while not self._stopping.is_set():
            if self._release.wait(0.05):
                return True
            if still_wanted is not None and not still_wanted():
                return False
        return False

    def _record_signal(self, items: list[dict[str, Any]], into: str) -> None:
        with self._lock:
            getattr(self, into).extend(items)

    def _record(self, request: "trace_service_pb2.ExportTraceServiceRequest") -> None:
        spans = decode_request(request)
        with self._lock:
            self._spans.extend(spans)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# ---- OTLP/HTTP --------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # silence http.server
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/x-protobuf") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(chunks)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = self.headers.get("Content-Encoding", "").lower().strip()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding not in ("", "identity"):
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        return body

    def do_POST(self) -> None:
        receiver = self.server.receiver
        try:
            body = self._read_body()
        except Exception as exc:
            self._send(400, str(exc).encode(), "text/plain")
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/traces" and path not in SIGNALS:
            self._send(404, b"only /v1/traces, /v1/metrics and /v1/logs are served", "text/plain")
            return
        if "json" in self.headers.get("Content-Type", "").lower():
            self._send(415, b"OTLP/JSON is not supported; send application/x-protobuf", "text/plain")
            return
        receiver._count_request()
        if receiver.mode == "hang" and not receiver._hold():
            self.close_connection = True
            try:
                self._send(503, b"receiver stopping", "text/plain")
            except OSError:
                pass
            return
        if receiver.mode == "fail":
            self._send(503, b"receiver in fail mode", "text/plain")
            return
        request_class, response_class, decode, into = SIGNALS.get(path) or (
            trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse, None, "")
        request = request_class()
        try:
            request.ParseFromString(body)
        except Exception as exc:
            self._send(400, f"bad protobuf: {exc}".encode(), "text/plain")
            return
        if decode is None:
            receiver._record(request)
        else:
            receiver._record_signal(decode(request), into)
        self._send(200, response_class().SerializeToString())


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: "OTLPHTTPReceiver"

    def handle_error(self, request: Any, client_address: Any) -> None:  # no tracebacks on broken pipes
        pass


class OTLPHTTPReceiver(_ReceiverBase):
    """OTLP/HTTP (protobuf) trace receiver: ``POST {endpoint}`` with ``endpoint = http://HOST:PORT/v1/traces``."""

    kind = "OTLP/HTTP"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, mode: str = "ok") -> None:
        super().__init__(host, port, mode)
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/v1/traces"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "OTLPHTTPReceiver":
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _HTTPServer((self.host, self.port), _Handler)
        server.receiver = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"otlp-http-receiver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ---- OTLP/gRPC --------------------------------------------------------------------------
class OTLPGRPCReceiver(_ReceiverBase):
    """OTLP/gRPC trace receiver (TraceService/Export); ``endpoint = http://HOST:PORT`` (use ``insecure=True``)."""

    kind = "OTLP/gRPC"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, mode: str = "ok", max_workers: int = 8) -> None:
        super().__init__(host, port, mode)
        self.max_workers = max_workers
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``HOST:PORT`` (what ``grpc.insecure_channel`` takes)."""
        return f"{self.host}:{self.port}"

    def start(self) -> "OTLPGRPCReceiver":
        if self._server is not None:
            return self
        try:
            from concurrent import futures

            import grpc
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("OTLPGRPCReceiver needs grpcio: pip install opentelemetry-exporter-otlp") from exc

        receiver = self

        class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                receiver._count_request()
                if receiver.mode == "hang" and not receiver._hold(context.is_active):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "receiver stopping")
                if receiver.mode == "fail":
                    context.abort(grpc.StatusCode.UNAVAILABLE, "receiver in fail mode")
                receiver._record(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._stopping.clear()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers,
                                                        thread_name_prefix="otlp-grpc-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(), server)
        port = server.add_insecure_port(f"{self.host}:{self.port}")
        if not port:
            raise RuntimeError(f"OTLPGRPCReceiver could not bind {self.host}:{self.port}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.stop(grace=0.2).wait(5)
