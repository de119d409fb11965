"""Work that leaves the process stays in the run: process pools, ``multiprocessing.Process``, executors.

``instrument()`` wraps ``ProcessPoolExecutor.submit`` (so ``map`` and ``loop.run_in_executor`` too) and
``multiprocessing.Process.start`` (class-level, exactly undone by ``uninstrument()``). The callable is
pickled together with a small :class:`Carrier`: the W3C context of the span current at submit/start
(``traceparent``, ``tracestate``, ``baggage``), the run identity, the parent span's depth, a reference to
the run's shared order counter (:mod:`otel_cmbagent.pipeline.order_source`) and how the parent set up its sinks.
In the worker - forked, spawned or started by a fork server - the carrier sets up the same sinks once
per process, runs the callable under the parent span with the run's identity and order, and flushes
before the result goes back, so the rows are in the table when the parent continues.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing.util
import os
import threading
import weakref
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing import process as mp_process
from typing import Any, Callable, Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from ..pipeline import semconv
from ..pipeline.context import RunIdentity, _IDENTITY_KEY, _TracerSource, OrderSequence, current_identity, sequence_for_run
from ..pipeline.errors import mark_failed
from ..pipeline.order_source import KIND_DATABASE, OrderRef, new_file_counter, open_counter, shared_kind, DatabaseCounter
from .patching import PatchSet
from ..pipeline.processor import trace_sequence
from ..pipeline.values import log_internal_error

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSetup:
    """What ``setup_tracing()`` built, as a worker process can rebuild it (no engine, no callback)."""

    service_name: str | None = None
    sql_url: str | None = None
    sql_table: tuple[str, str | None] | None = None  # (name, schema) of a user's table; None: ours
    otlp: bool = False
    capture_content: bool | None = None
    write_on_start: bool = True
    spill_path: str | None = None
    instrument: bool = True
    metrics: bool = False  # as the caller decided (each process exports its own series: service.instance.id)
    logs: bool = False

    def apply(self) -> Any:
        """``setup_tracing()`` with these settings (in a worker process)."""
        from ..tracing import setup_tracing

        table = None
        if self.sql_url and self.sql_table is not None:
            import sqlalchemy as sa

            from otel_cmbagent.exporters.sql import make_engine

            name, schema = self.sql_table
            table = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=make_engine(self.sql_url))
        return setup_tracing(
            service_name=self.service_name, sql_url=self.sql_url, sql_table=table, otlp=self.otlp,
            capture_content=self.capture_content, write_on_start=self.write_on_start, spill_path=self.spill_path,
            instrument=self.instrument, metrics=self.metrics, logs=self.logs,
        )


def worker_setup(sql_sink: Any, **settings: Any) -> WorkerSetup:
    """The :class:`WorkerSetup` of a ``setup_tracing()`` call (its SQL sink gives the URL and table)."""
    url = table = None
    if sql_sink is not None:
        engine_url = sql_sink.engine.url
        database = engine_url.database or ""
        if engine_url.get_backend_name() == "sqlite" and (database in ("", ":memory:") or "mode=memory" in database):
            _logger.info("otel-cmbagent: an in-memory SQLite database cannot be shared: worker processes write no rows")
        else:
            url = engine_url.render_as_string(hide_password=False)  # only ever pickled to our own workers
            if not getattr(sql_sink, "_create_table", True):
                table = (sql_sink.table.name, sql_sink.table.schema)
    spill = settings.pop("spill_path", None)
    return WorkerSetup(sql_url=url, sql_table=table, spill_path=os.fspath(spill) if spill else None, **settings)


class _RemoteParent(trace.NonRecordingSpan):
    """The parent span as a worker sees it: its context, and its depth (children sit one below)."""

    def __init__(self, span_context: trace.SpanContext, depth: int | None) -> None:
        super().__init__(span_context)
        self.attributes = {semconv.DEPTH: depth} if depth is not None else {}


@dataclass(frozen=True)
class Carrier:
    """What a worker process needs to continue the caller's run (small, picklable)."""

    headers: dict[str, str]
    run_id: str | None = None
    session_id: str | None = None
    node_id: str | None = None
    step_id: str | None = None
    depth: int | None = None
    order: OrderRef | None = None
    setup: WorkerSetup | None = None
    instrumented: bool = False  # AG2 was instrumented in the caller
    origin_pid: int = field(default_factory=os.getpid)

    def context(self) -> otel_context.Context:
        """The caller's context rebuilt here: remote parent span, baggage, run identity and shared order."""
        ctx = propagate.extract(self.headers, context=otel_context.Context())
        parent = trace.get_current_span(ctx).get_span_context()
        if parent.is_valid:
            ctx = trace.set_span_in_context(_RemoteParent(parent, self.depth), ctx)
        sequence = _sequence_here(self.run_id, self.order)
        if self.run_id is not None or sequence is not None:
            identity = RunIdentity(self.run_id, self.session_id, self.node_id, self.step_id, sequence=sequence)
            ctx = otel_context.set_value(_IDENTITY_KEY, identity, ctx)
        return ctx


# --- the caller's side --------------------------------------------------------------------------
_share_lock = threading.Lock()


def share_order(sequence: OrderSequence, key: str, sql_url: str | None) -> OrderRef:
    """Hand ``sequence`` over to a counter every process can reach (once; later calls return the same)."""
    with _share_lock:
        if sequence.shared is None:
            counter: Any = None
            if shared_kind() == KIND_DATABASE:
                if sql_url:
                    counter = DatabaseCounter(sql_url, key)
                else:
                    _logger.warning("otel-cmbagent: a database order needs a SQL sink; using an order file")
            sequence.share(counter or new_file_counter(key, owner=sequence))
        return sequence.shared.ref()


@dataclass
class _Captured:
    """A carrier plus what stays in the caller: its context (for a worker's death) and the run's counter."""

    carrier: Carrier
    context: otel_context.Context
    sequence: OrderSequence | None  # kept alive until the work is done: its order file outlives no caller


def capture() -> _Captured | None:
    """The carrier of the current context (None when there is nothing to carry: no span, run or setup)."""
    ctx = otel_context.get_current()
    span = trace.get_current_span(ctx)
    span_context = span.get_span_context()
    identity = current_identity(ctx)
    captor_sinks = _captor_sql_sinks(identity.run_id if identity else None)
    setup = _with_captor_sink(_current_setup(span), captor_sinks)
    if identity is None and not span_context.is_valid and setup is None:
        return None
    sequence, key = None, None
    if identity is not None and identity.sequence is not None:
        sequence, key = identity.sequence, f"run:{identity.run_id}"
    elif span_context.is_valid:
        sequence, key = trace_sequence(span_context.trace_id), f"trace:{span_context.trace_id:032x}"
    order = share_order(sequence, key, setup.sql_url if setup else None) if sequence is not None else None
    headers: dict[str, str] = {}
    propagate.inject(headers, context=ctx)
    depth = (getattr(span, "attributes", None) or {}).get(semconv.DEPTH)
    carrier = Carrier(
        headers=headers,
        run_id=identity.run_id if identity else None,
        session_id=identity.session_id if identity else None,
        node_id=identity.node_id if identity else None,
        step_id=identity.step_id if identity else None,
        depth=depth if isinstance(depth, int) else None,
        order=order,
        setup=setup,
        instrumented=_instrumented(),
    )
    _flush_linked_rows([t.sql for t in _live_tracings()] + captor_sinks)
    return _Captured(carrier, ctx, sequence)


def _instrumented() -> bool:
    from .instrumentor import AG2Instrumentor

    return bool(AG2Instrumentor().is_instrumented_by_opentelemetry)


def _live_tracings() -> list[Any]:
    from ..tracing import _live_tracings as live

    return [t for t in list(live) if not t._shut_down]


def _current_setup(span: Any) -> WorkerSetup | None:
    """The settings of the ``setup_tracing()`` whose provider made ``span`` (else the one ``oc.run`` and the
    instrumentation report to, else the global provider's)."""
    tracings = [t for t in _live_tracings() if getattr(t, "worker_setup", None) is not None]
    made_by = getattr(span, "_span_processor", None)
    for tracing in tracings:
        if made_by is not None and getattr(tracing.tracer_provider, "_active_span_processor", None) is made_by:
            return tracing.worker_setup
    for provider in (_TracerSource.provider, trace.get_tracer_provider()):
        for tracing in tracings:
            if tracing.tracer_provider is provider:
                return tracing.worker_setup
    return None


# Where a run's own sinks are found besides setup_tracing's: compat's captor router registers its lookup here, so
# this layer needs neither an import of the layer above it nor that layer's module path.
_run_sink_lookups: list[Callable[[str], Iterable[Any]]] = []


def register_run_sinks(lookup: Callable[[str], Iterable[Any]]) -> None:
    """``lookup(run_id)`` gives the sinks a run writes to of its own (once per lookup)."""
    if lookup not in _run_sink_lookups:
        _run_sink_lookups.append(lookup)


def _captor_sql_sinks(run_id: str | None) -> list[Any]:
    """The SQL sinks of a compat captor's run (cmbagent's ``EventCaptureManager`` writing its own tables)."""
    if run_id is None:
        return []
    sinks = [sink for lookup in _run_sink_lookups for sink in lookup(run_id)]
    return [sink for sink in sinks if hasattr(sink, "engine") and hasattr(sink, "table")]


def _with_captor_sink(setup: WorkerSetup | None, captor_sinks: list[Any]) -> WorkerSetup | None:
    """Workers of a captor's run write where the captor writes (cmbagent's table), besides any other sink."""
    if not captor_sinks:
        return setup
    own = worker_setup(captor_sinks[0], write_on_start=captor_sinks[0].write_on_start)
    if setup is None:
        return own
    return dataclasses.replace(setup, sql_url=own.sql_url, sql_table=own.sql_table)


def _flush_linked_rows(sinks: list[Any], timeout_millis: int = 1_000) -> None:
    """On a table with foreign keys (cmbagent's), the caller's open rows go in first: a worker's rows point at
    them (``parent_event_id``). Bounded; a database that is down is the sink's business (retried, spilled)."""
    for sink in sinks:
        if sink is not None and getattr(sink, "table", None) is not None and sink.table.foreign_keys:
            sink.force_flush(timeout_millis)


# --- the worker's side --------------------------------------------------------------------------
_ready_pid: int | None = None
_ready_lock = threading.Lock()
_built_here: list[Any] = []  # the tracing a worker built from its carrier (shut down at its exit)
# Traces without a run: this process's sequence per shared counter (weak: released with the last context).
_trace_sequences_here: weakref.WeakValueDictionary[OrderRef, OrderSequence] = weakref.WeakValueDictionary()


def _sequence_here(run_id: str | None, order: OrderRef | None) -> OrderSequence | None:
    """This process's sequence of the run (or trace), counting with the shared counter ``order``."""
    if order is None:
        return sequence_for_run(run_id) if run_id is not None else None
    if run_id is not None:
        sequence = sequence_for_run(run_id)
    else:
        sequence = _trace_sequences_here.get(order) or _trace_sequences_here.setdefault(order, OrderSequence())
    if sequence.shared is None:
        with _share_lock:
            if sequence.shared is None:
                sequence.share(open_counter(order))
    return sequence


def ensure_worker_tracing(carrier: Carrier) -> None:
    """Once per process: use the tracing this process has (forked, or set up by an initializer), else
    rebuild the caller's from its setup; flush at exit (multiprocessing children skip ``atexit`` after fork)."""
    global _ready_pid
    if _ready_pid == os.getpid():
        return
    with _ready_lock:
        if _ready_pid == os.getpid():
            return
        try:
            if not _tracing_in_place(carrier.instrumented) and carrier.setup is not None:
                _built_here.append(carrier.setup.apply())
        except Exception as exc:  # noqa: BLE001 - the work runs regardless, untraced
            log_internal_error("tracing setup in a worker process", exc)
        multiprocessing.util.Finalize(None, _at_worker_exit, exitpriority=100)
        _ready_pid = os.getpid()


def _tracing_in_place(instrumented: bool) -> bool:
    if _live_tracings():
        return True
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return False
    if instrumented:  # the user's own provider (an initializer set it up): trace AG2 into it, ordered
        from .instrumentor import instrument

        instrument(tracer_provider=provider)
    return True


def flush_process(timeout_millis: int | None = None) -> bool:
    """Flush the providers this process's spans go to - the instrumented one (``oc.run``'s) and the global
    one - bounded by ``$OTEL_CMBAGENT_SHUTDOWN_TIMEOUT_MS``. Other providers a fork inherited are left alone."""
    from otel_cmbagent.exporters.worker import shutdown_timeout

    millis = timeout_millis if timeout_millis is not None else int(shutdown_timeout() * 1000)
    providers = {id(p): p for p in (_TracerSource.provider, trace.get_tracer_provider()) if p is not None}
    for tracing in _live_tracings():  # then the metrics these spans recorded, and the logs
        providers.update({id(p): p for p in (tracing.meter_provider, tracing.logger_provider) if p is not None})
    flushed = True
    for provider in providers.values():
        flush = getattr(provider, "force_flush", None)
        if callable(flush):
            try:
                flushed = bool(flush(millis)) and flushed
            except Exception as exc:  # noqa: BLE001
                log_internal_error("flush in a worker process", exc)
                flushed = False
    return flushed


def _at_worker_exit() -> None:
    flush_process()
    for tracing in _built_here:
        try:
            tracing.shutdown()
        except Exception as exc:  # noqa: BLE001
            log_internal_error("tracing shutdown in a worker process", exc)


class CarriedCall:
    """``fn`` as it travels to another process: called there in the caller's run, then flushed."""

    def __init__(self, captured: _Captured, fn: Callable[..., Any]) -> None:
        self.carrier = captured.carrier
        self.fn = fn
        self._captured: _Captured | None = captured  # caller-side only (never pickled)
        functools.update_wrapper(self, fn, updated=())

    def __getstate__(self) -> dict[str, Any]:
        return {"carrier": self.carrier, "fn": self.fn}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.carrier, self.fn, self._captured = state["carrier"], state["fn"], None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        carrier = self.carrier
        here = carrier.origin_pid == os.getpid()
        token = None
        try:
            if not here:
                ensure_worker_tracing(carrier)
            token = otel_context.attach(self._captured.context if here and self._captured else carrier.context())
        except Exception as exc:  # noqa: BLE001 - the work runs regardless
            log_internal_error("entering the caller's context in a worker", exc)
        try:
            return self.fn(*args, **kwargs)
        finally:
            if token is not None:
                otel_context.detach(token)
            if not here:
                flush_process()  # rows visible before the result (or the exception) reaches the caller


def carry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped to run in the current run in whichever process calls it (for pools that are not
    instrumented, e.g. ``multiprocessing.Pool``: ``pool.apply_async(oc.carry(work), ...)``). Picklable
    when ``fn`` is."""
    try:
        captured = capture()
    except Exception as exc:  # noqa: BLE001
        log_internal_error("capturing the context for another process", exc)
        captured = None
    return CarriedCall(captured, fn) if captured is not None else fn


# --- patches ------------------------------------------------------------------------------------
# The worker loops of ProcessPoolExecutor and multiprocessing.Pool: each task carries its own context.
_POOL_TARGETS = frozenset({("concurrent.futures.process", "_process_worker"), ("multiprocessing.pool", "worker")})


def _submit_carried(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not args:
        return wrapped(*args, **kwargs)
    try:
        captured = capture()
    except Exception as exc:  # noqa: BLE001
        log_internal_error("ProcessPoolExecutor.submit", exc)
        captured = None
    if captured is None:
        return wrapped(*args, **kwargs)
    future = wrapped(CarriedCall(captured, args[0]), *args[1:], **kwargs)
    future.add_done_callback(functools.partial(_record_worker_death, captured))
    return future


def _record_worker_death(captured: _Captured, future: futures.Future) -> None:
    """A worker that died (killed, crashed) under a task: an ``error`` row in the run says so."""
    try:
        if future.cancelled() or not isinstance(future.exception(), futures.process.BrokenProcessPool):
            return
        span = _TracerSource.tracer().start_span(
            "worker process died",
            context=captured.context,
            attributes={semconv.EVENT_TYPE: semconv.EVENT_ERROR, semconv.GEN_AI_OPERATION_NAME: "worker"},
        )
        mark_failed(span, "worker_process_died", str(future.exception()))
        span.end()
    except Exception as exc:  # noqa: BLE001
        log_internal_error("recording a worker's death", exc)


def _start_carried(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    target = getattr(instance, "_target", None)
    if (getattr(target, "__module__", None), getattr(target, "__name__", None)) in _POOL_TARGETS:
        return wrapped(*args, **kwargs)
    try:
        captured = capture()
        if captured is not None:
            if type(instance).run is mp_process.BaseProcess.run:
                instance._target = CarriedCall(captured, target) if target is not None else None
            else:  # a subclass with its own run(): the instance's run goes through the carrier
                instance.run = CarriedCall(captured, functools.partial(type(instance).run, instance))
    except Exception as exc:  # noqa: BLE001
        log_internal_error("Process.start", exc)
        captured = None
    result = wrapped(*args, **kwargs)
    if captured is not None:
        instance._otel_cmbagent_keep = captured  # after start: never pickled with the process object
    return result


def instrument_processes(patches: PatchSet) -> None:
    """Wrap ``ProcessPoolExecutor.submit`` and ``multiprocessing.Process.start`` into ``patches``."""
    patches.wrap(futures.ProcessPoolExecutor, "submit", _submit_carried)
    patches.wrap(mp_process.BaseProcess, "start", _start_carried)
