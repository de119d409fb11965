"""A traced cmbagent-style research run with real AG2 agents: ``run_demo(db_path)``.

The workflow is a small DAG inside one ``oc.run``:

1. ``plan``   - a group chat (executor -> planner -> engineer -> executor -> reviewer): the engineer
                writes Python, the executor runs it with ``LocalCommandLineCodeExecutor``; the code writes
                ``spectrum.csv`` and ``spectrum.png`` (a tiny PNG built with zlib + struct);
2. ``fit``    - tool calls: ``fit_power_law`` fails to converge the first time, the assistant retries
                with other arguments and it succeeds;
3. ``plot`` and ``report`` - two short two-agent chats run in parallel in a ``ThreadPoolExecutor``
                (the threading instrumentation keeps them in the run).

By default every LLM answer comes from an embedded :class:`~otel_cmbagent.testing.ScriptedLLM` on
127.0.0.1 (no API key, deterministic, a few ms per reply); its script is a function of the request
(which agent is asking and what the conversation holds), so the parallel steps never race over a
shared reply list. ``llm_url``/``model`` point the same agents at a real OpenAI-compatible endpoint
(``OPENAI_API_KEY``, else ``"none"``); every chat is bounded by ``max_turns``/``max_round``.

Everything is traced with :func:`otel_cmbagent.setup_tracing` into a SQLite file (``execution_events``),
optionally OTLP, and - with ``live=True`` - a websocket-callback sink that prints each event as it
starts and ends on a ``rich`` console.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import otel_cmbagent as oc

from ...table import store
from ...testing.scripted_llm import ScriptedLLM
from .live_view import LiveView, SpanNames, quiet_ag2, quiet_process, working_directory
from .script import SYSTEM, code_result, content_of, make_fit_tool, make_report_tool, scripted_reply

RUN_NAME = "cmb-demo: power spectrum fit"
DEMO_DIR_NAME = "otel_cmbagent_demo"
DEFAULT_REAL_MODEL = "gpt-4o-mini"
SCRIPTED_MODEL = "scripted-cmb-llm"

# Bounds that make every chat terminate, whatever a real model answers.
PLAN_MAX_ROUND = 8
FIT_MAX_TURNS = 5
SIDE_MAX_TURNS = 3


@dataclass
class DemoResult:
    """What one demo run produced (the rows are in the SQLite file at ``db_path``)."""

    run_id: str
    trace_id: str
    wall_time_s: float
    stats: dict[str, dict[str, int]]
    work_dir: str
    db_path: str = ""
    live_events: dict[str, int] = field(default_factory=dict)  # events shown live, by type (live=True)
    live_failed: dict[str, int] = field(default_factory=dict)  # of which failed, by type


def db_work_dir(db_path: str | os.PathLike[str]) -> str:
    """``<db dir>/otel_cmbagent_demo``: the work dir to pass as ``run_demo(work_dir=...)`` to keep files by the DB."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(db_path))), DEMO_DIR_NAME)

# --------------------------------------------------------------------------------------------
# The workflow
# --------------------------------------------------------------------------------------------


def _is_termination(message: dict[str, Any]) -> bool:
    return "TERMINATE" in (content_of(message) or "")


def _executor(work_dir: str) -> Any:
    from autogen.coding import LocalCommandLineCodeExecutor

    return LocalCommandLineCodeExecutor(work_dir=work_dir, timeout=60)


@contextlib.contextmanager
def _this_python_on_path(run_dir: str) -> Iterator[None]:
    """AG2's local executor runs ``python`` from $PATH (cmbagent's fork from the process's own environment), which
    a shell without the virtualenv activated (``make demo``) may not have at all (Debian has only ``python3``):
    for the run, $PATH starts with a folder whose ``python`` is this interpreter."""
    bin_path = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bin_path, "python")):  # e.g. /usr/bin/python3 alone: a link named python
        bin_path = os.path.join(run_dir, ".bin")
        os.makedirs(bin_path, exist_ok=True)
        if not os.path.lexists(os.path.join(bin_path, "python")):
            os.symlink(sys.executable, os.path.join(bin_path, "python"))
    previous = os.environ.get("PATH")
    os.environ["PATH"] = bin_path + (os.pathsep + previous if previous else "")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = previous


def _plan_step(llm_config: dict[str, Any], analysis_dir: str, run_dir: str) -> None:
    from autogen import ConversableAgent, GroupChat, GroupChatManager

    def agent(name: str) -> Any:
        return ConversableAgent(name, system_message=SYSTEM[name], llm_config=llm_config, human_input_mode="NEVER")

    planner, engineer, reviewer = agent("planner"), agent("engineer"), agent("reviewer")
    executor = ConversableAgent(
        "executor", llm_config=False, human_input_mode="NEVER", default_auto_reply="No code block to run.",
        code_execution_config={"executor": _executor(analysis_dir)},
    )

    def next_speaker(last_speaker: Any, groupchat: Any) -> Any:
        """executor (task) -> planner -> engineer -> executor -> reviewer; a failed run goes back to the engineer."""
        if last_speaker is executor:
            if len(groupchat.messages) <= 1:
                return planner
            return reviewer if code_result(content_of(groupchat.messages[-1])) else engineer
        # After the reviewer: None ends the chat (a TERMINATE from the reviewer ends it before this is asked).
        return {planner: engineer, engineer: executor}.get(last_speaker)

    groupchat = GroupChat(
        agents=[planner, engineer, executor, reviewer], messages=[], max_round=PLAN_MAX_ROUND,
        speaker_selection_method=next_speaker,
    )
    manager = GroupChatManager(
        groupchat=groupchat, llm_config=False, silent=True, human_input_mode="NEVER", is_termination_msg=_is_termination
    )
    task = (
        "Task: simulate the CMB band powers D_ell for 30 <= ell < 1500, save them to spectrum.csv and plot them "
        "to spectrum.png. Planner, make the plan; engineer, write the code; executor, run it; reviewer, check it."
    )
    with oc.step(node_id="n1", step_id="plan", name="Plan and simulate the power spectrum"), working_directory(run_dir):
        executor.initiate_chat(manager, message=task, silent=True)


def _fit_step(llm_config: dict[str, Any], analysis_dir: str, fit: dict[str, Any]) -> None:
    from autogen import ConversableAgent, register_function

    fitter = ConversableAgent(
        "fitter", system_message=SYSTEM["fitter"], llm_config=llm_config, human_input_mode="NEVER"
    )
    admin = ConversableAgent(
        "admin", llm_config=False, human_input_mode="NEVER", is_termination_msg=_is_termination,
        default_auto_reply="Please fit the spectrum with fit_power_law.",
    )
    register_function(
        make_fit_tool(analysis_dir, fit), caller=fitter, executor=admin, name="fit_power_law",
        description="Fit D_ell = A (ell/100)^n to the band powers in data_file; returns JSON with amplitude and index.",
    )
    with oc.step(node_id="n2", step_id="fit", name="Fit a power law"):
        admin.initiate_chat(
            fitter, message="Fit a power law to the band powers in spectrum.csv.", max_turns=FIT_MAX_TURNS, silent=True
        )


def _fit_summary(fit: dict[str, Any]) -> str:
    if "amplitude" in fit:
        return f"Fit result: amplitude = {fit['amplitude']}, index = {fit['index']} (D_ell = A (ell/100)^n)."
    return "The fit did not converge; use amplitude = 2500, index = -0.9 as a reference model."


def _plot_step(llm_config: dict[str, Any], analysis_dir: str, fit: dict[str, Any], start: threading.Barrier) -> None:
    from autogen import ConversableAgent

    with quiet_ag2(), oc.step(node_id="n3", step_id="plot", name="Plot the fit"):
        _wait(start)
        plotter = ConversableAgent(
            "plotter", system_message=SYSTEM["plotter"], llm_config=llm_config, human_input_mode="NEVER"
        )
        runner = ConversableAgent(
            "plot_executor", llm_config=False, human_input_mode="NEVER", is_termination_msg=_is_termination,
            default_auto_reply="No code block to run.",
            code_execution_config={"executor": _executor(analysis_dir)},
        )
        runner.initiate_chat(
            plotter, message=f"Plot spectrum.csv with the fitted model to fit.png. {_fit_summary(fit)}",
            max_turns=SIDE_MAX_TURNS, silent=True,
        )


def _report_step(llm_config: dict[str, Any], report_dir: str, fit: dict[str, Any], start: threading.Barrier) -> None:
    from autogen import ConversableAgent, register_function

    with quiet_ag2(), oc.step(node_id="n4", step_id="report", name="Write the report"):
        _wait(start)
        writer = ConversableAgent(
            "writer", system_message=SYSTEM["writer"], llm_config=llm_config, human_input_mode="NEVER"
        )
        archivist = ConversableAgent(
            "archivist", llm_config=False, human_input_mode="NEVER", is_termination_msg=_is_termination,
            default_auto_reply="Please save the report with save_report.",
        )
        register_function(
            make_report_tool(report_dir), caller=writer, executor=archivist, name="save_report",
            description="Save a markdown report (title, markdown) as report.md.",
        )
        archivist.initiate_chat(
            writer, message=f"Write the report of the power-spectrum fit. {_fit_summary(fit)}",
            max_turns=SIDE_MAX_TURNS, silent=True,
        )


def _wait(barrier: threading.Barrier) -> None:
    """Plot and report start together: they are parallel branches of the DAG."""
    try:
        barrier.wait(timeout=10)
    except threading.BrokenBarrierError:
        pass


def _llm_config(llm: ScriptedLLM | None, llm_url: str | None, model: str | None) -> dict[str, Any]:
    if llm is not None:
        return llm.llm_config(api_key="none", price=[0, 0])
    api_key = os.environ.get("OPENAI_API_KEY") or "none"
    entry = {"model": model or DEFAULT_REAL_MODEL, "base_url": llm_url, "api_key": api_key}
    return {"config_list": [entry], "cache_seed": None}


def _new_run_dir(work_dir: str | os.PathLike[str] | None, run_id: str) -> str:
    if work_dir is None:
        return tempfile.mkdtemp(prefix="otel-cmbagent-demo-")
    path = os.path.join(os.path.abspath(os.fspath(work_dir)), f"run-{run_id[:8]}")
    os.makedirs(path, exist_ok=True)
    return path


def _workflow(config: dict[str, Any], run_id: str, run_dir: str) -> str:
    """The DAG inside one ``oc.run``: plan, fit, then plot and report in parallel threads; returns the trace id."""
    analysis_dir, report_dir = os.path.join(run_dir, "analysis"), os.path.join(run_dir, "report")
    for path in (analysis_dir, report_dir, os.path.join(run_dir, "chats")):
        os.makedirs(path, exist_ok=True)
    fit: dict[str, Any] = {}
    with _this_python_on_path(run_dir), quiet_ag2(), oc.run(run_id=run_id, name=RUN_NAME) as run:
        _plan_step(config, analysis_dir, run_dir)
        _fit_step(config, analysis_dir, fit)
        start_together = threading.Barrier(2)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cmb-demo-step") as pool:
            futures = [
                pool.submit(_plot_step, config, analysis_dir, fit, start_together),
                pool.submit(_report_step, config, report_dir, fit, start_together),
            ]
            for future in futures:
                future.result()
    return run.trace_id


def _announce(console: Any, run_id: str, llm: ScriptedLLM | None, llm_url: str | None, model: str | None) -> None:
    source = f"scripted LLM at {llm.base_url}" if llm else f"{model or DEFAULT_REAL_MODEL} at {llm_url}"
    console.print(f"[bold]{RUN_NAME}[/]  run [cyan]{run_id}[/]  ({source})", highlight=False)
    console.print(f"[dim]{'#':>4}   {'type':<12} {'agent':<14} event[/]", highlight=False)


def run_demo(
    db_path: str,
    *,
    llm_url: str | None = None,
    model: str | None = None,
    otlp: bool | None = None,
    live: bool = True,
    console: Any = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> DemoResult:
    """Run the traced cmb-demo workflow with real AG2 agents into the SQLite file ``db_path``.

    - ``llm_url``/``model``: a real OpenAI-compatible endpoint (key from ``OPENAI_API_KEY``, else ``"none"``);
      default: the embedded scripted LLM on 127.0.0.1 (``model`` then only names it).
    - ``otlp``: passed to :func:`setup_tracing` (None: on when ``OTEL_EXPORTER_OTLP_*`` is set).
    - ``live``: print every event as it starts and ends on ``console`` (a ``rich`` Console; default stdout).
    - ``work_dir``: where the run's files go (a ``run-<id>`` directory is made in it and kept);
      default: a temp dir, removed before this returns. ``db_work_dir(db_path)`` is ``<db dir>/otel_cmbagent_demo``.

    Tracing is set up with ``set_global=False, handle_sigterm=False`` and shut down (every sink flushed)
    before this returns.
    """
    import autogen  # noqa: F401 - imported up front (about a second), outside the timed workflow

    with contextlib.suppress(ImportError):  # the openai SDK imports its resources lazily on the 1st call (~0.5 s)
        import openai.resources  # noqa: F401

    if live and console is None:
        from rich.console import Console

        console = Console()
    db_path = os.path.abspath(os.fspath(db_path))
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    run_id = str(uuid.uuid4())
    run_dir = _new_run_dir(work_dir, run_id)
    try:
        result = _traced_run(db_path, run_id, run_dir, llm_url, model, otlp, console if live else None)
    finally:
        if work_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    if live:
        _print_summary(console, result)
    return result


def _traced_run(db_path: str, run_id: str, run_dir: str, llm_url: str | None, model: str | None,
                otlp: bool | None, console: Any) -> DemoResult:
    names = SpanNames()
    view = LiveView(console, names) if console is not None else None
    llm: ScriptedLLM | None = None
    tracing = None
    try:
        if not llm_url:
            llm = ScriptedLLM(scripted_reply, model=model or SCRIPTED_MODEL).start()
        if view is not None:
            _announce(console, run_id, llm, llm_url, model)
        started = time.perf_counter()
        with quiet_process(console):
            tracing = oc.setup_tracing(
                sql_url=f"sqlite:///{db_path}", otlp=otlp, ws_callback=view, set_global=False, handle_sigterm=False
            )
            tracing.tracer_provider.add_span_processor(names)
            trace_id = _workflow(_llm_config(llm, llm_url, model), run_id, run_dir)
            tracing.shutdown()  # flushes the SQL rows and the live events before we return
        wall_time = time.perf_counter() - started  # tracing setup + workflow + flush of every sink
    finally:
        if tracing is not None:
            tracing.shutdown()
        if llm is not None:
            llm.stop()
    return DemoResult(
        run_id=run_id, trace_id=trace_id, wall_time_s=wall_time, stats=tracing.stats, work_dir=run_dir,
        db_path=db_path, live_events=dict(view.counts) if view is not None else {},
        live_failed=dict(view.failed) if view is not None else {},
    )


def _print_summary(console: Any, result: DemoResult) -> None:
    """One closing line (callers such as the CLI print their own tree and summary after it): the events shown
    live and the rows the run has in the table (a row is written at start and rewritten at end: the sink's
    write count is not the row count)."""
    shown, failed = sum(result.live_events.values()), sum(result.live_failed.values())
    rows = store.run_summary(store.open_store(result.db_path), result.run_id)["events"]
    console.print(
        f"[bold green]done[/] run [cyan]{result.run_id}[/]: {shown} events ({failed} failed) "
        f"in {result.wall_time_s:.2f} s; {rows} rows in {result.db_path}",
        highlight=False,
    )
