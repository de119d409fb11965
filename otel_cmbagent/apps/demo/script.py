"""The demo's research team as the scripted LLM plays it: the code the agents write, their instructions,
the replies (a pure function of each request), and the tools they call."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable

from ...testing.scripted_llm import Reply, code, text, tool_call

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


def content_of(message: dict[str, Any]) -> str:
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
    joined = "\n".join(content_of(m) for m in messages)
    amplitude = re.search(r"\bamplitude\b[^-+\d]{0,8}" + _NUMBER, joined)
    index = re.search(r"\bindex\b[^-+\d]{0,8}" + _NUMBER, joined)
    return (float(amplitude.group(1)) if amplitude else 2500.0, float(index.group(1)) if index else -0.9)


def scripted_reply(request: dict[str, Any]) -> Reply:
    """Decide the reply from who is asking (the system message) and the state of the conversation."""
    messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
    system = next((content_of(m) for m in messages if m.get("role") == "system"), "")
    role = _ROLE_BY_SYSTEM.get(system)
    tool_results = [content_of(m) for m in messages if m.get("role") == "tool"]

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
        ok = any(code_result(content_of(m)) for m in messages)
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
        if any(code_result(content_of(m)) is not None for m in messages):
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
