"""``otel-cmbagent``: look at traced cmbagent runs in the terminal, and ship stored runs to Jaeger/Tempo.

    otel-cmbagent runs                                   # newest runs: status, events, agents, tokens, cost
    otel-cmbagent tree last                              # the nested event tree of the newest run
    otel-cmbagent timeline 3f2a                          # a waterfall of a run (a unique id prefix works)
    otel-cmbagent events last --type tool_call --json    # rows as JSON Lines, for jq
    otel-cmbagent export last --otlp http://localhost:4318   # backfill with the ORIGINAL trace/span ids
    otel-cmbagent replay otel_cmbagent.spill.jsonl       # write spilled rows back
    otel-cmbagent serve --port 8765                      # the live run viewer (web page, API, websocket)
    otel-cmbagent demo                                   # a traced multi-agent run, no API key needed

The database is ``--db`` (a SQLite path or a SQLAlchemy URL), else ``$OTEL_CMBAGENT_SQL_URL``, else
``./otel_cmbagent.db``. Errors a person can hit are one line on stderr (``otel-cmbagent: error: ...``),
exit code 1 (2 for usage errors); ``-v`` shows library logs. The entry point is :func:`.main.main`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from ...table import store
from ...table.schema import KINDS, MESSAGE_KIND, unknown_kinds
from ...table.store import StoreError
from ...version import __version__
from . import demo_command, render
from .export import export_run
from .terminal import PROG, console, for_terminal, jsonl, printable
from .timeline import timeline_lines

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def db_option(func: Any) -> Any:
    return click.option(
        "--db",
        "db",
        metavar="PATH|URL",
        default=None,
        help=f"SQLite file or SQLAlchemy URL [default: ${store.SQL_URL_ENV} or ./{store.DEFAULT_DB}]",
    )(func)


def _db(db: str | None) -> str:
    return db or store.default_db()


def _open(db: str | None) -> tuple[Any, str]:
    target = _db(db)
    return store.open_store(target), target


def _resolve(engine: Any, ref: str) -> str:
    try:
        return store.resolve_run(engine, ref)
    except store.RunNotFoundError as exc:
        if ref.strip().lower() in ("last", "latest"):
            raise
        raise StoreError(f"{exc} (list them with: {PROG} runs)") from None


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.option("-v", "--verbose", is_flag=True, help="Show library logs (OTLP exporter, SQLAlchemy, ...) on stderr.")
def cli(verbose: bool) -> None:
    """Look at traced cmbagent/AG2 runs stored in the execution_events table, and export them over OTLP.

    RUN_ID arguments take a full run id, a unique prefix of one, a trace id, or `last`.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:  # library warnings would add lines (and tracebacks) to our one-line errors
        logging.getLogger().addHandler(logging.NullHandler())
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


@cli.command(context_settings=_CONTEXT)
@db_option
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(min=1), help="How many runs.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one run per line, every field.")
def runs(db: str | None, limit: int, as_json: bool) -> None:
    """The newest runs: id, start, duration, status (and failed events), events, agents, tokens, cost."""
    engine, target = _open(db)
    found = store.list_runs(engine, limit=limit)
    if as_json:
        jsonl(found)
    elif not found:
        console.print(Text(f"no runs in {printable(target)} yet"))
    else:
        console.print(render.runs_table(for_terminal(found), f"runs in {printable(target)}", console.width))


PAGE = 500  # rows the tree, the timeline and the events table show by default (a page; --limit 0: all)


def page_options(func: Any) -> Any:
    """``--limit``/``--offset``: a 100,000-row run prints its first page in under 2 s, in bounded memory."""
    func = click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Skip this many rows (in execution order) first: the next page.")(func)
    return click.option("--limit", "-n", type=click.IntRange(min=0), default=None,
                        help=f"Show at most this many rows, 0 for all [default: {PAGE}; with --json: all].")(func)


def _page_note(engine: Any, run_id: str, shown: int, limit: int, offset: int, total: int | None = None,
               **filters: Any) -> Text | None:
    """``rows 1-500 of 100,000 ...`` when the page is not the whole run (counted only then, unless known)."""
    if limit == 0 or (shown < limit and not offset):
        return None
    if total is None:
        total = store.count_events(engine, run_id, **filters)
    if not offset and shown >= total:
        return None
    first = f"{offset + 1:,}–{offset + shown:,}" if shown else "none"
    hint = f"next page: --offset {offset + shown}; " if offset + shown < total else ""
    return Text(f"rows {first} of {total:,} ({hint}all: --limit 0)", style="dim")


def _page_rows(engine: Any, run_id: str, limit: int, offset: int, **filters: Any) -> list[dict[str, Any]]:
    return store.run_events(engine, run_id, limit=limit or None, offset=offset, **filters)


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@db_option
@click.option("--messages/--no-messages", default=True, show_default=True, help="Show message events.")
@click.option("--max-depth", type=click.IntRange(min=1), default=None, help="Cut the tree below this depth.")
@page_options
def tree(run_id: str, db: str | None, messages: bool, max_depth: int | None, limit: int | None, offset: int) -> None:
    """The nested event tree of a run: order, type, name, agent, duration, status.

    Failed events are red, running ones are marked live. A run over 500 rows shows its first 500 (a
    parent comes before its children, so they are a whole tree) and says how to page. RUN_ID: an id, a unique
    prefix, or `last`.
    """
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    limit = PAGE if limit is None else limit
    summary = for_terminal(store.run_summary(engine, resolved, by_type=False, figures=False))
    filters = {} if messages else {"exclude": MESSAGE_KIND}
    rows = _page_rows(engine, resolved, limit, offset, **filters)
    console.print(render.event_tree(summary, store.event_tree(for_terminal(rows)), messages=messages,
                                    max_depth=max_depth))
    total = None if filters else summary["events"]  # the run's rows: the summary counted them already
    note = _page_note(engine, resolved, len(rows), limit, offset, total, **filters)
    if note is not None:
        console.print(note)


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@db_option
@click.option("--width", "-w", type=click.IntRange(min=10), default=None,
              help="Width of the bar area in characters [default: fit the terminal].")
@click.option("--messages", is_flag=True, help="Also show messages, as ticks.")
@page_options
def timeline(run_id: str, db: str | None, width: int | None, messages: bool, limit: int | None, offset: int) -> None:
    """A waterfall of a run: one line per span, indented by depth, bars on the run's time axis.

    Bars show each span's start offset and duration, coloured by event type; failed spans end in ✗,
    interrupted ones (their process was stopped or is gone) in ⏹, live (still running) spans in ▸.
    A run over 500 rows shows its first 500 on their own time axis and says how to page.
    RUN_ID: an id, a unique prefix, or `last`.
    """
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    limit = PAGE if limit is None else limit
    console.print(render.run_header(for_terminal(store.run_summary(engine, resolved, by_type=False, figures=False))))
    filters = {} if messages else {"exclude": MESSAGE_KIND}
    rows = _page_rows(engine, resolved, limit, offset, **filters)
    for line in timeline_lines(store.event_tree(for_terminal(rows)), console, width):
        console.print(line, soft_wrap=True)
    note = _page_note(engine, resolved, len(rows), limit, offset, **filters)
    if note is not None:
        console.print(note)


def _event_types(values: tuple[str, ...]) -> list[str] | None:
    """The ``--type`` values (repeated or comma-separated); an unknown one is a usage error listing the valid."""
    kinds = [part.strip() for value in values for part in value.split(",") if part.strip()]
    unknown = unknown_kinds(kinds)
    if unknown:
        raise click.BadParameter(f"unknown event type {', '.join(map(repr, unknown))}; valid: {', '.join(KINDS)}",
                                 param_hint="'--type'")
    return kinds or None


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@db_option
@click.option("--type", "-t", "event_types", multiple=True, metavar="TYPE",
              help=f"Only these event types (repeat, or comma-separate): {', '.join(KINDS)}.")
@click.option("--agent", "-a", "agents", multiple=True, metavar="NAME", help="Only events of these agents.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one row per line, every column, ISO times.")
@page_options
def events(run_id: str, db: str | None, event_types: tuple[str, ...], agents: tuple[str, ...], as_json: bool,
           limit: int | None, offset: int) -> None:
    """The rows of a run in execution order (a table, or JSON Lines for piping).

    The table shows 500 rows at a time (--limit, --offset); --json streams every row (bounded memory).
    RUN_ID: an id, a unique prefix, or `last`.
    """
    kinds = _event_types(event_types)
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    filters = {"event_type": kinds, "agent": agents or None}
    if as_json:
        jsonl(store.iter_run_events(engine, resolved, limit=limit or None, offset=offset, **filters))
        return
    limit = PAGE if limit is None else limit
    rows = _page_rows(engine, resolved, limit, offset, **filters)
    console.print(render.events_table(for_terminal(rows), console.width))
    note = _page_note(engine, resolved, len(rows), limit, offset, **filters)
    console.print(note if note is not None else Text(f"{len(rows)} events", style="dim"))


@cli.command(context_settings=_CONTEXT)
@click.argument("run_id")
@click.option("--otlp", "endpoint", metavar="ENDPOINT", default=None,
              help="OTLP endpoint, e.g. http://localhost:4318 (HTTP: /v1/traces is appended when missing) or "
                   "http://localhost:4317 with --protocol grpc [default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                   "$OTEL_EXPORTER_OTLP_ENDPOINT].")
@click.option("--protocol", type=click.Choice(["grpc", "http/protobuf", "http"]), default=None,
              help="OTLP protocol [default: $OTEL_EXPORTER_OTLP_PROTOCOL or http/protobuf].")
@db_option
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to keep trying an export.")
@click.option("--content/--no-content", default=None,
              help="Also send message text, tool arguments/results, code and output [default: only when "
                   "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true].")
@click.option("--service-name", default=None, help="Resource service.name [default: $OTEL_SERVICE_NAME or cmbagent].")
def export(run_id: str, endpoint: str | None, protocol: str | None, db: str | None, timeout: float,
           content: bool | None, service_name: str | None) -> None:
    """Backfill a stored run to an OTLP endpoint (Jaeger, Tempo, a Collector) as the original trace.

    Spans keep their trace ids, span ids, parent links and timestamps, so the trace is the same one
    that live OTLP export would have produced; messages become `cmbagent.message` span events; spans
    of a run that never ended get end = now and `cmbagent.incomplete=true`. RUN_ID: an id, a unique
    prefix, or `last`.
    """
    from ...pipeline.config import CAPTURE_CONTENT_ENV, parse_bool_env

    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        raise click.UsageError("missing --otlp ENDPOINT (e.g. --otlp http://localhost:4318)")
    engine, _target = _open(db)
    resolved = _resolve(engine, run_id)
    result = export_run(
        engine, resolved, endpoint, protocol=protocol, timeout=timeout,
        content=parse_bool_env(CAPTURE_CONTENT_ENV, False) if content is None else content,
        service_name=service_name or os.environ.get("OTEL_SERVICE_NAME") or "cmbagent",
    )
    console.print(Text(f"exported {result['spans']} spans ({result['message_events']} message events) of run "
                       f"{printable(resolved)} to {printable(result['endpoint'])} ({result['protocol']})"),
                  soft_wrap=True)
    for trace_id in result["trace_ids"]:
        console.print(f"trace id: {trace_id}", soft_wrap=True)
        console.print(f"Jaeger: /trace/{trace_id}  (e.g. http://localhost:16686/trace/{trace_id})", soft_wrap=True)


def _line_numbers(numbers: Sequence[int], shown: int = 20) -> str:
    text = ", ".join(map(str, numbers[:shown]))
    more = f", … ({len(numbers) - shown} more)" if len(numbers) > shown else ""
    return f"line {text}" if len(numbers) == 1 else f"lines {text}{more}"


def _print_replay(report: Any, path: Path, target: str, keep: bool) -> None:
    console.print(Text(f"replayed {report.written} rows from {printable(str(path))} into {printable(target)}"),
                  soft_wrap=True)
    for lines, what in ((report.unreadable, "not a spilled row"), (report.refused, "refused by the database")):
        if lines:
            console.print(Text(f"skipped {len(lines)} {'line' if len(lines) == 1 else 'lines'} ({what}): "
                               f"{_line_numbers(lines)}"), soft_wrap=True)
    if report.first_error:
        console.print(Text(f"first error: {printable(report.first_error)}"), soft_wrap=True)
    if report.held:
        console.print(f"{report.held} rows wait for their run/session row", soft_wrap=True)
    if report.incomplete:
        console.print(f"{report.incomplete} rows lack a value the table requires (e.g. a run id): not written",
                      soft_wrap=True)
    if report.left_in is not None:
        console.print(Text(f"what was not written is left in {printable(str(report.left_in))}"), soft_wrap=True)
    elif not keep:
        console.print(f"(the spill file is now {path.name}.replayed)", style="dim", soft_wrap=True)


@cli.command(context_settings=_CONTEXT)
@click.argument("spill_file", metavar="SPILL_FILE")
@db_option
@click.option("--keep", is_flag=True, help="Leave the spill file as it is (default: rename it *.replayed).")
def replay(spill_file: str, db: str | None, keep: bool) -> None:
    """Write rows spilled while the database was down back into it (idempotent upserts).

    Lines that are not rows (a last line cut short by a crash) and rows the database refuses are skipped and
    reported by line number; every valid row is written; what was not written stays in the file (exit code 1
    when lines were skipped).
    """
    from otel_cmbagent.exporters.spill import replay_report

    path = Path(spill_file).expanduser()
    if not path.exists():
        raise StoreError(f"no spill file at {path}")
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a spill file")
    target = _db(db)
    report = replay_report(path, store.db_url(target), remove=not keep)
    _print_replay(report, path, target, keep)
    if report.unreadable or report.refused:
        sys.exit(1)


@cli.command(context_settings=_CONTEXT)
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option("--token", default=None, envvar="OTEL_CMBAGENT_WS_TOKEN",
              help="Every request must send ?token=..., 'Authorization: Bearer ...' or X-Token (required off "
                   "loopback) [env: OTEL_CMBAGENT_WS_TOKEN].")
@click.option("--jaeger-url", default=None, metavar="URL",
              help="Base URL of a Jaeger UI: the viewer links each run to {URL}/trace/{trace_id}.")
def serve(db: str | None, host: str, port: int, token: str | None, jaeger_url: str | None) -> None:
    """Serve the live run viewer (web page, JSON API, websocket /ws) until Ctrl-C.

    The page lists runs and shows a live waterfall of a run's events; runs written by other processes
    into the same database appear and update live. /ws streams cmbagent's `event_captured` envelopes.
    """
    from ...server.net import check_bind
    from ..viewer import serve_viewer

    try:
        check_bind(host, token or None, f"{PROG} serve")
        serve_viewer(_db(db), host=host, port=port, token=token or None, jaeger_url=jaeger_url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console.print("stopped")


@cli.command(context_settings=_CONTEXT)
@db_option
@click.option("--llm-url", default=None, metavar="URL",
              help="An OpenAI-compatible endpoint to use instead of the embedded scripted LLM (key from "
                   "$OPENAI_API_KEY).")
@click.option("--model", default=None, metavar="NAME", help="Model name for --llm-url.")
@click.option("--otlp/--no-otlp", default=None,
              help="Also export over OTLP [default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set].")
@click.option("--live/--no-live", default=True, show_default=True, help="Print events as they happen.")
@click.option("--serve", "serve_port", default=None, is_flag=False, flag_value=8765, type=click.IntRange(0, 65535),
              metavar="[PORT]", help="Also start the web viewer (on 127.0.0.1, port 8765 or PORT) before the run, "
                                    "print its URL, and keep serving after the run until Ctrl-C.")
def demo(
    db: str | None, llm_url: str | None, model: str | None, otlp: bool | None, live: bool, serve_port: int | None
) -> None:
    """Run a traced multi-agent cmbagent-style workflow (group chat, code, tools, parallel steps).

    No API key needed: an embedded scripted LLM answers unless --llm-url is given. The files the agents write
    are kept next to the database (otel_cmbagent_demo/).
    """
    if model and not llm_url:
        raise click.UsageError("--model needs --llm-url (the embedded scripted LLM has its own model)")
    from ...instrumentation.package import classic_api_problem

    problem = classic_api_problem()  # e.g. ag2 1.x installed: say what to install, in one line
    if problem is not None:
        raise click.ClickException(problem)
    if llm_url:
        demo_command.check_llm_url(llm_url)
    target = _db(db)
    _run_demo(db, target, demo_command.sqlite_path(target), llm_url, model, otlp, live, serve_port)


def _run_demo(db: str | None, target: str, db_path: str, llm_url: str | None, model: str | None,
              otlp: bool | None, live: bool, serve_port: int | None) -> None:
    try:
        from .. import demo as demo_module
    except ImportError as exc:
        raise StoreError(f"the demo is not available in this installation ({exc})") from None
    viewer = None
    if serve_port is not None:
        from ..viewer import ViewerServer

        viewer = ViewerServer(db_path, port=serve_port).start()
        console.print(f"viewer: {viewer.url}  (the run appears there live)", soft_wrap=True)
    try:
        try:
            result = demo_module.run_demo(db_path, llm_url=llm_url, model=model, otlp=otlp, live=live,
                                          console=console, work_dir=demo_module.db_work_dir(db_path))
        except Exception as exc:  # noqa: BLE001 - an endpoint that failed mid-run: one line naming it
            failure = demo_command.llm_failure(exc, llm_url)
            if failure is None:
                raise
            raise failure from None
        demo_command.print_summary(result, db, target, db_path)
        if viewer is not None:
            console.print(f"\nviewer still serving on {viewer.url} - Ctrl-C to stop", soft_wrap=True)
            sys.stdout.flush()
            demo_command.wait_for_interrupt()
    finally:
        if viewer is not None:
            viewer.stop()
