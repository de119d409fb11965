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
import io
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from opentelemetry.sdk.trace import SpanProcessor

import otel_cmbagent as oc
from otel_cmbagent.table.rows import row_kind
from otel_cmbagent.testing.scripted_llm import Reply, ScriptedLLM, code, text, tool_call

__all__ = [
    "DEMO_DIR_NAME",
    "RUN_NAME",
    "ConvergenceError",
    "DemoResult",
    "LiveView",
    "code_result",
    "db_work_dir",
    "run_demo",
    "scripted_reply",
]

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


def db_work_dir(db_path: str | os.PathLike[str]) -> str:
    """``<db dir>/otel_cmbagent_demo``: the work dir to pass as ``run_demo(work_dir=...)`` to keep files by the DB."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(db_path))), DEMO_DIR_NAME)


# --------------------------------------------------------------------------------------------
# The code the engineer and the plotter write (standard library only: zlib + struct for PNGs)
# --------------------------------------------------------------------------------------------

_PNG_HELPER = '''
import math, struct, zlib

def write_png(path, width, height, points, line=()):
    """A small grayscale PNG: white background, black data points, a grey line."""
    rows = [bytearray(b"\\xff" * width) for _ in range(height)]
    for x, y in line:
        if 0 <= x < width and 0 <= y < height:
            rows[y][x] = 128
    for x, y in points:
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                if 0 <= x + dx < width and 0 <= y + dy < height:
                    rows[y + dy][x + dx] = 0
    raw = b"".join(b"\\x00" + bytes(row) for row in rows)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))

def to_pixels(xs, ys, width, height, margin=4):
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    px = lambda v: int((v - x0) / ((x1 - x0) or 1) * (width - 2 * margin - 1)) + margin
    py = lambda v: height - 1 - (int((v - y0) / ((y1 - y0) or 1) * (height - 2 * margin - 1)) + margin)
    return [(px(x), py(y)) for x, y in zip(xs, ys)]
'''.strip("\n")

SPECTRUM_CODE = _PNG_HELPER + '''

# A mock CMB-like band-power spectrum: D_ell = A (ell / 100)^n with a small deterministic ripple.
A_TRUE, N_TRUE, ELL0 = 2500.0, -0.9, 100.0
ells = list(range(30, 1500, 20))
d_ell = [A_TRUE * (ell / ELL0) ** N_TRUE * (1 + 0.04 * math.sin(0.7 * ell)) for ell in ells]
with open("spectrum.csv", "w") as handle:
    handle.write("ell,D_ell\\n")
    handle.writelines(f"{ell},{d:.6f}\\n" for ell, d in zip(ells, d_ell))
log_l = [math.log10(ell) for ell in ells]
log_d = [math.log10(d) for d in d_ell]
write_png("spectrum.png", 160, 96, to_pixels(log_l, log_d, 160, 96))
print(f"wrote spectrum.csv ({len(ells)} multipoles) and spectrum.png (160x96, log-log)")
'''


def plot_code(amplitude: float, index: float) -> str:
    """The plotter's code: data points and the fitted power law, log-log, into ``fit.png``."""
    return _PNG_HELPER + f'''

AMPLITUDE, INDEX, ELL0 = {amplitude!r}, {index!r}, 100.0
with open("spectrum.csv") as handle:
    pairs = [tuple(map(float, line.split(","))) for line in handle.read().splitlines()[1:] if line]
ells = [ell for ell, _ in pairs]
log_l = [math.log10(ell) for ell in ells]
log_d = [math.log10(d) for _, d in pairs]
grid = [log_l[0] + (log_l[-1] - log_l[0]) * i / 159 for i in range(160)]
model = [math.log10(AMPLITUDE) + INDEX * (g - 2.0) for g in grid]
pixels = to_pixels(log_l + grid, log_d + model, 160, 96)
write_png("fit.png", 160, 96, pixels[:len(log_l)], line=pixels[len(log_l):])
residual = max(abs(d - (math.log10(AMPLITUDE) + INDEX * (l - 2.0))) for l, d in zip(log_l, log_d))
print(f"wrote fit.png; max |log residual| = {{residual:.3f}}")
'''


# --------------------------------------------------------------------------------------------
# Agents' instructions (also how the scripted LLM knows who is asking)
# --------------------------------------------------------------------------------------------

SYSTEM = {
    "planner": (
        "You are the planner of a cosmology research team. Given a task, write a short numbered plan "
        "(at most 4 steps) for the engineer. Do not write code."
    ),
    "engineer": (
        "You are the engineer. Write ONE self-contained Python code block (standard library only, no "
        "matplotlib or numpy) that carries out the plan: write the data file spectrum.csv (columns ell,D_ell) "
        "and a PNG plot spectrum.png in the current directory, and print what it wrote."
    ),
    "reviewer": (
        "You are the reviewer. Check the executor's output: if the files were written reply with a one-line "
        "approval that ends with TERMINATE; otherwise say what failed."
    ),
    "fitter": (
        "You fit power laws D_ell = A (ell/100)^n to band powers by calling the tool fit_power_law. "
        "Call it first with data_file='spectrum.csv', amplitude_guess=1.0, index_guess=0.0, max_iter=20. "
        "If it fails to converge, call it again with max_iter=500 and better guesses (amplitude_guess=1000, "
        "index_guess=-1). When a fit succeeds, state A and n in one sentence and end with TERMINATE."
    ),
    "plotter": (
        "You are the plotting agent. Write ONE Python code block (standard library only) that reads "
        "spectrum.csv and writes fit.png showing the data and the fitted power law. After it ran, reply "
        "with one sentence and TERMINATE."
    ),
    "writer": (
        "You are the report writer. Call the tool save_report once with a title and a short markdown "
        "report of the fit, then reply with one sentence and TERMINATE."
    ),
}
_ROLE_BY_SYSTEM = {message: role for role, message in SYSTEM.items()}


# --------------------------------------------------------------------------------------------
# The scripted LLM: a pure function of the request
# --------------------------------------------------------------------------------------------

_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def _content(message: dict[str, Any]) -> str:
    value = message.get("content")
    if isinstance(value, list):
        return " ".join(part.get("text") or "" for part in value if isinstance(part, dict))
    return value if isinstance(value, str) else ""


def code_result(content: str) -> bool | None:
    """True/False when ``content`` reports a successful/failed code run, None when it is no code result.

    AG2 says ``exitcode: N (execution succeeded|failed)``; cmbagent's fork says ``Execution results:`` on
    success and ``execution results:`` on failure.
    """
    match = re.search(r"exitcode: (-?\d+)", content)
    if match:
        return match.group(1) == "0"
    if "Execution results:" in content:
        return True
    if "execution results:" in content:
        return False
    return None


def _fit_numbers(messages: list[dict[str, Any]]) -> tuple[float, float]:
    """Amplitude and index quoted in the conversation (the fit result), else the true values."""
    joined = "\n".join(_content(m) for m in messages)
    amplitude = re.search(r"\bamplitude\b[^-+\d]{0,8}" + _NUMBER, joined)
    index = re.search(r"\bindex\b[^-+\d]{0,8}" + _NUMBER, joined)
    return (float(amplitude.group(1)) if amplitude else 2500.0, float(index.group(1)) if index else -0.9)


def scripted_reply(request: dict[str, Any]) -> Reply:
    """Decide the reply from who is asking (the system message) and the state of the conversation."""
    messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
    system = next((_content(m) for m in messages if m.get("role") == "system"), "")
    role = _ROLE_BY_SYSTEM.get(system)
    tool_results = [_content(m) for m in messages if m.get("role") == "tool"]

    if role == "planner":
        return text(
            "Plan:\n1. engineer: simulate band powers D_ell for 30 <= ell < 1500 and save spectrum.csv.\n"
            "2. engineer: draw a log-log plot of the band powers to spectrum.png.\n"
            "3. executor: run the code.\n4. reviewer: check that both files exist.",
            delay=0.006,
        )
    if role == "engineer":
        return code(SPECTRUM_CODE, preamble="Here is the code for steps 1 and 2:", delay=0.008)
    if role == "reviewer":
        ok = any(code_result(_content(m)) for m in messages)
        verdict = "Approved: spectrum.csv and spectrum.png are in place. TERMINATE" if ok else "The code failed."
        return text(verdict, delay=0.004)
    if role == "fitter":
        if not tool_results:
            arguments = {"data_file": "spectrum.csv", "amplitude_guess": 1.0, "index_guess": 0.0, "max_iter": 20}
            return tool_call("fit_power_law", arguments, delay=0.007)
        last = tool_results[-1]
        if last.startswith("Error") or "did not converge" in last:
            arguments = {"data_file": "spectrum.csv", "amplitude_guess": 1000.0, "index_guess": -1.0, "max_iter": 500}
            return tool_call("fit_power_law", arguments, delay=0.009)
        amplitude, index = _fit_numbers([{"content": last}])
        return text(f"Best fit: amplitude A = {amplitude:.1f}, index n = {index:.4f}. TERMINATE", delay=0.005)
    if role == "plotter":
        if any(code_result(_content(m)) is not None for m in messages):
            return text("fit.png shows the band powers and the fitted power law. TERMINATE", delay=0.003)
        amplitude, index = _fit_numbers(messages)
        return code(plot_code(amplitude, index), preamble="Plotting the fit:", delay=0.008)
    if role == "writer":
        if tool_results:
            return text("The report is saved as report.md. TERMINATE", delay=0.003)
        amplitude, index = _fit_numbers(messages)
        report = (
            "# Power-spectrum fit\n\n"
            f"Band powers D_ell for 30 <= ell < 1500 follow D_ell = A (ell/100)^n with A = {amplitude:.1f} "
            f"and n = {index:.4f}.\n\nFiles: spectrum.csv, spectrum.png, fit.png.\n"
        )
        return tool_call("save_report", {"title": "Power-spectrum fit", "markdown": report}, delay=0.006)
    return text("TERMINATE", delay=0.002)


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------


class ConvergenceError(RuntimeError):
    """The iterative fit stopped before the gradient fell below the tolerance."""


def make_fit_tool(data_dir: str, results: dict[str, Any]) -> Callable[..., str]:
    def fit_power_law(
        data_file: str = "spectrum.csv", amplitude_guess: float = 1.0, index_guess: float = 0.0, max_iter: int = 20
    ) -> str:
        """Fit D_ell = A (ell/100)^n to the band powers in data_file (gradient descent in log-log space)."""
        path = os.path.join(data_dir, os.path.basename(str(data_file)))
        with open(path, encoding="utf-8") as handle:
            pairs = [tuple(map(float, line.split(","))) for line in handle.read().splitlines()[1:] if line.strip()]
        xs = [math.log10(ell / 100.0) for ell, _ in pairs]
        ys = [math.log10(d) for _, d in pairs]
        if amplitude_guess <= 0:
            raise ValueError(f"amplitude_guess must be positive, got {amplitude_guess}")
        log_a, index, count = math.log10(amplitude_guess), float(index_guess), len(xs)
        gradient = float("inf")
        for iteration in range(1, int(max_iter) + 1):
            grad_a = sum(2 * (log_a + index * x - y) for x, y in zip(xs, ys)) / count
            grad_n = sum(2 * (log_a + index * x - y) * x for x, y in zip(xs, ys)) / count
            log_a, index = log_a - 0.5 * grad_a, index - 0.5 * grad_n
            gradient = math.hypot(grad_a, grad_n)
            if gradient < 1e-6:
                chi2 = sum((log_a + index * x - y) ** 2 for x, y in zip(xs, ys)) / max(count - 2, 1)
                result = {"amplitude": round(10**log_a, 3), "index": round(index, 5), "iterations": iteration,
                          "chi2_per_dof_log": round(chi2, 8), "n_points": count}
                results.update(result)
                return json.dumps(result)
        raise ConvergenceError(
            f"fit did not converge in {max_iter} iterations (|gradient| = {gradient:.3g} > 1e-06); "
            "increase max_iter or start from better guesses"
        )

    return fit_power_law


def make_report_tool(report_dir: str) -> Callable[..., str]:
    def save_report(title: str, markdown: str) -> str:
        """Save the markdown report as report.md."""
        os.makedirs(report_dir, exist_ok=True)
        body = markdown if markdown.lstrip().startswith("#") else f"# {title}\n\n{markdown}"
        path = os.path.join(report_dir, "report.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(body)
        return f"saved report.md ({len(body.encode('utf-8'))} bytes)"

    return save_report


# --------------------------------------------------------------------------------------------
# Quiet AG2 console
# --------------------------------------------------------------------------------------------


class _QuietIOStream:
    """An AG2 IOStream that prints nothing (the demo shows its own live view)."""

    def print(self, *objects: Any, sep: str = " ", end: str = "\n", flush: bool = False) -> None:
        pass

    def send(self, message: Any) -> None:
        pass

    def input(self, prompt: str = "", *, password: bool = False) -> str:
        return "exit"


@contextlib.contextmanager
def _quiet_ag2() -> Iterator[None]:
    """Silence AG2's IOStream in this thread (a ContextVar: each worker thread enters it itself)."""
    from autogen.io import IOStream

    with IOStream.set_default(_QuietIOStream()):  # type: ignore[arg-type]
        yield


@contextlib.contextmanager
def _quiet_process(console: Any) -> Iterator[None]:
    """For the whole demo: AG2's own prints (cmbagent's fork prints cost tables and code output with
    ``print``) go to a buffer, its warnings and log lines below ERROR are hidden; all restored after.

    ``sys.stdout`` is process-wide, so a rich console that writes to "whatever sys.stdout is" is pinned to
    the real stream first (and unpinned after): the live view keeps printing.
    """
    unpin = False
    if console is not None and getattr(console, "_file", ...) is None:
        console.file = console.file  # resolves to the real sys.stdout/sys.stderr now
        unpin = True
    loggers = [logging.getLogger(name) for name in ("autogen", "ag2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if unpin:
            console.file = None


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    """cmbagent's AG2 fork writes group chats to ``chats/*.json`` under the CWD."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


# --------------------------------------------------------------------------------------------
# Live view: fed by the websocket-callback sink
# --------------------------------------------------------------------------------------------


class _SpanNames(SpanProcessor):
    """Remembers each span's name by span id (the websocket data carries ids and types, not names)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.names[format(span.get_span_context().span_id, "016x")] = span.name


_STATUS_STYLE = {"running": ("▶", "yellow"), "completed": ("✔", "green"), "failed": ("✘", "bold red")}


def _short(value: str, limit: int) -> str:
    value = " ".join(value.split())
    return value[: limit - 1] + "…" if len(value) > limit else value


def _message_text(content: Any) -> str:
    """A one-line view of a message's recorded parts (text, tool calls, tool results)."""
    if not isinstance(content, list):
        return "" if content is None else str(content)
    pieces = []
    for part in content:
        if not isinstance(part, dict):
            pieces.append(str(part))
        elif part.get("type") == "tool_call":
            arguments = part.get("arguments")
            arguments = json.dumps(arguments) if isinstance(arguments, (dict, list)) else str(arguments or "")
            pieces.append(f"call {part.get('name')}({_short(arguments, 40)})")
        elif part.get("type") == "tool_call_response":
            pieces.append(f"result: {part.get('response')}")
        else:
            pieces.append(str(part.get("content") if part.get("content") is not None else ""))
    return " | ".join(pieces)


class LiveView:
    """``callback(event_type, data)`` for the websocket sink: one console line per event start/end/message."""

    def __init__(self, console: Any, names: _SpanNames) -> None:
        self.console = console
        self.names = names
        self.counts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _label(self, data: dict[str, Any]) -> str:
        kind = row_kind(data)
        inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
        if kind == "message":
            return _short(_message_text(inputs.get("content")), 56)
        if kind == "handoff" and inputs.get("from_agent") and inputs.get("to_agent"):
            return f"handoff {inputs['from_agent']} -> {inputs['to_agent']}"
        return self.names.names.get(str(data.get("span_id")), kind)

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        from rich.markup import escape

        kind = row_kind(data)
        status = str(data.get("status") or "")
        is_message = kind == "message"
        with self._lock:
            if is_message or status == "running":
                self.counts[kind] += 1
            if status == "failed":
                self.failed[kind] += 1
        mark, style = ("✉", "cyan") if is_message else _STATUS_STYLE.get(status, ("•", "white"))
        order = data.get("execution_order")
        indent = "  " * min(int(data.get("depth") or 0), 8)
        duration = data.get("duration_ms")
        ended = status in ("completed", "failed") and not is_message
        tail = f" {duration} ms" if ended and duration is not None else ""
        if status == "failed" and data.get("error_message"):
            tail += " " + " ".join(str(data["error_message"]).split())[:70]
        agent = f"{str(data.get('agent_name') or '-')[:14]:<14}"
        line = (
            f"[dim]{order if order is not None else '?':>4}[/] [{style}]{mark}[/] [bold]{kind:<12}[/] "
            f"[magenta]{escape(agent)}[/] {indent}{escape(self._label(data))} "
            f"[{style}]{'sent' if is_message else status}{escape(tail)}[/]"
        )
        self.console.print(line, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# The workflow
# --------------------------------------------------------------------------------------------


def _is_termination(message: dict[str, Any]) -> bool:
    return "TERMINATE" in (_content(message) or "")


def _plan_step(llm_config: dict[str, Any], analysis_dir: str, run_dir: str) -> None:
    from autogen import ConversableAgent, GroupChat, GroupChatManager
    from autogen.coding import LocalCommandLineCodeExecutor

    def agent(name: str) -> Any:
        return ConversableAgent(name, system_message=SYSTEM[name], llm_config=llm_config, human_input_mode="NEVER")

    planner, engineer, reviewer = agent("planner"), agent("engineer"), agent("reviewer")
    executor = ConversableAgent(
        "executor", llm_config=False, human_input_mode="NEVER", default_auto_reply="No code block to run.",
        code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=analysis_dir, timeout=60)},
    )

    def next_speaker(last_speaker: Any, groupchat: Any) -> Any:
        """executor (task) -> planner -> engineer -> executor -> reviewer; a failed run goes back to the engineer."""
        if last_speaker is executor:
            if len(groupchat.messages) <= 1:
                return planner
            return reviewer if code_result(_content(groupchat.messages[-1])) else engineer
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
    with oc.step(node_id="n1", step_id="plan", name="Plan and simulate the power spectrum"), _cwd(run_dir):
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
    from autogen.coding import LocalCommandLineCodeExecutor

    with _quiet_ag2(), oc.step(node_id="n3", step_id="plot", name="Plot the fit"):
        _wait(start)
        plotter = ConversableAgent(
            "plotter", system_message=SYSTEM["plotter"], llm_config=llm_config, human_input_mode="NEVER"
        )
        runner = ConversableAgent(
            "plot_executor", llm_config=False, human_input_mode="NEVER", is_termination_msg=_is_termination,
            default_auto_reply="No code block to run.",
            code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir=analysis_dir, timeout=60)},
        )
        runner.initiate_chat(
            plotter, message=f"Plot spectrum.csv with the fitted model to fit.png. {_fit_summary(fit)}",
            max_turns=SIDE_MAX_TURNS, silent=True,
        )


def _report_step(llm_config: dict[str, Any], report_dir: str, fit: dict[str, Any], start: threading.Barrier) -> None:
    from autogen import ConversableAgent, register_function

    with _quiet_ag2(), oc.step(node_id="n4", step_id="report", name="Write the report"):
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
    - ``work_dir``: where the run's files go (a ``run-<id>`` directory is made in it); default a fresh
      temp dir. ``db_work_dir(db_path)`` is ``<db dir>/otel_cmbagent_demo``.

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
    analysis_dir, report_dir = os.path.join(run_dir, "analysis"), os.path.join(run_dir, "report")
    for path in (analysis_dir, report_dir, os.path.join(run_dir, "chats")):
        os.makedirs(path, exist_ok=True)

    names = _SpanNames()
    view = LiveView(console, names) if live else None
    llm: ScriptedLLM | None = None
    tracing = None
    try:
        if not llm_url:
            llm = ScriptedLLM(scripted_reply, model=model or SCRIPTED_MODEL).start()
        if live:
            source = f"scripted LLM at {llm.base_url}" if llm else f"{model or DEFAULT_REAL_MODEL} at {llm_url}"
            console.print(f"[bold]{RUN_NAME}[/]  run [cyan]{run_id}[/]  ({source})", highlight=False)
            console.print(f"[dim]{'#':>4}   {'type':<12} {'agent':<14} event[/]", highlight=False)
        started = time.perf_counter()
        with _quiet_process(console):
            tracing = oc.setup_tracing(
                sql_url=f"sqlite:///{db_path}", otlp=otlp, ws_callback=view, set_global=False, handle_sigterm=False
            )
            tracing.tracer_provider.add_span_processor(names)
            config = _llm_config(llm, llm_url, model)
            fit: dict[str, Any] = {}
            with _quiet_ag2(), oc.run(run_id=run_id, name=RUN_NAME) as run:
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
            trace_id = run.trace_id
            tracing.shutdown()  # flushes the SQL rows and the live events before we return
        wall_time = time.perf_counter() - started  # tracing setup + workflow + flush of every sink
    finally:
        if tracing is not None:
            tracing.shutdown()
        if llm is not None:
            llm.stop()
    result = DemoResult(
        run_id=run_id, trace_id=trace_id, wall_time_s=wall_time, stats=tracing.stats, work_dir=run_dir,
        db_path=db_path, live_events=dict(view.counts) if view is not None else {},
    )
    if live:
        _print_summary(console, result, view)
    return result


def _print_summary(console: Any, result: DemoResult, view: LiveView | None) -> None:
    """One closing line (callers such as the CLI print their own tree and summary after it)."""
    shown = sum(view.counts.values()) if view is not None else 0
    failed = sum(view.failed.values()) if view is not None else 0
    sql = result.stats.get("sql", {})
    console.print(
        f"[bold green]done[/] run [cyan]{result.run_id}[/]: {shown} events ({failed} failed) "
        f"in {result.wall_time_s:.2f} s; {sql.get('processed', '?')} rows in {result.db_path}",
        highlight=False,
    )
