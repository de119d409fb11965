"""The built wheel installs from the package index into fresh virtualenvs, and resolves next to cmbagent.

Each virtualenv gets the newest pip and ``pip install <wheel> [AG2 line]`` with no pins of ours; then
``tests/install_probe.py`` runs in it (``import otel_cmbagent``, ``instrument()``, a thread pool, a
one-turn AG2 chat) and reports JSON. Marker ``install``: deselected in the per-AG2-line runs and run
once per CI run by ``make test-install``. It needs the package index; nothing here is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.install, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("install_probe.py")
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input")
CMBAGENT = "cmbagent==0.0.1.post63"
PYTHON312_ENV = "OTEL_CMBAGENT_PYTHON312"


class Failed(Exception):
    """A subprocess failed: its command and the tail of its output."""


def _run(*command: str | os.PathLike, cwd: Path | None = None, timeout: float = 900) -> str:
    done = subprocess.run([os.fspath(part) for part in command], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise Failed(f"{' '.join(map(os.fspath, command))} exited {done.returncode}:\n{output}")
    return done.stdout


def _fresh_venv(path: Path, python: str = sys.executable) -> Path:
    """A new virtualenv at ``path`` with the newest pip; returns its python."""
    _run(python, "-m", "venv", path)
    venv_python = path / "bin" / "python"
    _run(venv_python, *PIP, "install", "-q", "--upgrade", "pip")
    return venv_python


def _probe(python: Path, cwd: Path) -> dict[str, Any]:
    return json.loads(_run(python, PROBE, cwd=cwd).strip().splitlines()[-1])


# What each virtualenv gets next to the wheel (a leading "[...]" is an extra of the wheel).
ENVIRONMENTS: dict[str, tuple[str, ...]] = {
    "bare": (),
    "contrib-threading": ("[contrib]", "opentelemetry-instrumentation-threading"),
    "autogen-0.14.1": ("autogen[openai]==0.14.1",),
    "ag2-0.14.0": ("ag2[openai]==0.14.0",),
    "cmbagent-autogen": ("cmbagent-autogen==0.0.91.post11",),
    "ag2-1.2.1": ("ag2==1.2.1",),
    "zero-code": ("[contrib]", "ag2[openai]==0.14.0"),
}


def _install(root: Path, wheel: Path, name: str) -> dict[str, Any]:
    """Create the virtualenv ``name``, install the wheel (+ its companions), probe it; the results by step."""
    spec = list(ENVIRONMENTS[name])
    extra = spec.pop(0) if spec and spec[0].startswith("[") else ""
    venv = root / name
    python = _fresh_venv(venv)
    _run(python, *PIP, "install", "-q", f"otel-cmbagent{extra} @ {wheel.as_uri()}", *spec)
    work = root / f"{name}-work"
    work.mkdir()
    results: dict[str, Any] = {"python": python, "work": work}
    if name == "cmbagent-autogen":
        # The fork imports IPython without declaring it: first what instrument() says then, then the real set-up.
        results["without_ipython"] = _probe(python, work)
        _run(python, *PIP, "install", "-q", "ipython")
    results["probe"] = _probe(python, work)
    return results


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once (pip's isolated PEP 517 build; no extra build tools)."""
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, *PIP, "wheel", "-q", "--no-deps", "--wheel-dir", out, ROOT)
    (built,) = out.glob("otel_cmbagent-*.whl")
    return built


@pytest.fixture(scope="module")
def installs(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """Every virtualenv, installed two at a time in the background; each test waits only for its own."""
    root = tmp_path_factory.mktemp("venvs")
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="venv")
    futures = {"next-to-cmbagent": pool.submit(_resolve_next_to_cmbagent, root / "next-to-cmbagent", wheel)}
    futures.update({name: pool.submit(_install, root, wheel, name) for name in ENVIRONMENTS})
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _result(installs: dict[str, Future], name: str) -> dict[str, Any]:
    try:
        return installs[name].result()
    except Failed as exc:
        pytest.fail(f"{name}: {exc}", pytrace=False)


def _one_line_about_autogen(report: dict[str, Any], *expected: str) -> str:
    assert not report["instrumented"]
    (line,) = report["instrument_log"]  # exactly one line, and instrument() did not raise
    assert line.startswith("ERROR otel_cmbagent.instrumentation.instrumentor: otel-cmbagent: ")
    for text in expected:
        assert text in line
    return line


def test_bare_install_resolves_and_threads_inherit_context_without_contrib(installs):
    """No extras, newest pip: it resolves; instrument() without AG2 says what to install; pools propagate."""
    report = _result(installs, "bare")["probe"]
    assert not report["contrib_base"] and not report["contrib_threading"]
    assert report["versions"]["opentelemetry-instrumentation"] is None
    _one_line_about_autogen(report, "no `autogen` module", 'pip install "ag2[openai]==0.14.0"', "autogen==0.14.1")
    assert report["pool_parent"] == "parent"  # the built-in propagation
    assert report["threads_restored"]


@pytest.mark.parametrize("name", ["autogen-0.14.1", "ag2-0.14.0", "cmbagent-autogen"])
def test_ag2_line_is_traced_through_a_thread_pool(installs, name):
    """Each classic AG2 line: instrument() patches it, a chat run in a pool nests under the caller's span."""
    report = _result(installs, name)["probe"]
    assert report["instrumented"] and report["instrument_log"] == []
    assert not report["contrib_base"] and not report["contrib_threading"]  # built-in base and propagation
    assert {"ConversableAgent.generate_reply", "ConversableAgent.initiate_chat", "OpenAIWrapper.create"} <= set(
        report["patched"]
    )
    assert report["pool_parent"] == "parent"
    spans = report["ag2_spans"]
    assert spans["conversation user"] == "parent"
    assert spans["invoke_agent assistant"] == "conversation user"
    assert [parent for span, parent in spans.items() if span.startswith("chat ")] == ["invoke_agent assistant"]
    assert report["ag2_restored"] and report["threads_restored"]
    assert report["versions"]["wrapt"].split(".")[0] == "2"  # the newest wrapt, not held below 2


def test_cmbagent_fork_without_its_undeclared_ipython_gets_one_line(installs):
    """cmbagent-autogen imports IPython without declaring it: instrument() logs one line, does not raise."""
    report = _result(installs, "cmbagent-autogen")["without_ipython"]
    _one_line_about_autogen(report, "importing autogen failed", "IPython", "pip install IPython")


def test_contrib_extra_with_the_threading_package_cooperates_with_zero_code(installs):
    """[contrib] + opentelemetry-instrumentation-threading: contrib's classes are used, never two layers."""
    report = _result(installs, "contrib-threading")["probe"]
    assert report["contrib_base"] and report["contrib_threading"]
    _one_line_about_autogen(report, "no `autogen` module")  # the contrib base adds no DependencyConflict line
    assert report["pool_parent"] == "parent" and report["threads_restored"]
    assert report["zero_code"] == {
        "ours_used_contrib": True,
        "then_zero_code_added_no_layer": True,
        "zero_code_first_then_ours_noop": True,
    }


def test_ag2_1x_gets_one_line_from_instrument_and_from_the_demo(installs):
    """ag2 >= 1.0 has no `autogen` module: instrument() says AG2 1.x's middleware is used (one line) and turns on
    thread propagation; the demo (classic AG2) says what to install."""
    result = _result(installs, "ag2-1.2.1")
    report = result["probe"]
    (line,) = report["instrument_log"]  # exactly one line, and instrument() did not raise
    assert line.startswith("WARNING otel_cmbagent.instrumentation.instrumentor: otel-cmbagent: AG2 1.x is installed")
    assert "classic AG2 patches are not applied" in line and "TelemetryMiddleware" in line
    assert report["instrumented"] and report["patched"] == []  # no patches; threads carry the context:
    assert report["pool_parent"] == "parent" and report["threads_restored"]
    cli = Path(result["python"]).with_name("otel-cmbagent")
    done = subprocess.run([cli, "demo", "--db", "demo.db", "--no-live"], cwd=result["work"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("otel-cmbagent: error: ag2 1.2.1 has no `autogen` module")
    assert 'pip install "ag2[openai]<0.15"' in line and "autogen==0.14.1" in line


def _python312() -> str:
    candidates = [os.environ.get(PYTHON312_ENV, ""), shutil.which("python3.12") or ""]
    candidates += sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    raise Failed(f"no Python 3.12 found (set {PYTHON312_ENV}); cmbagent needs it")


def _resolve_next_to_cmbagent(path: Path, wheel: Path) -> dict[str, Any]:
    """``pip install --dry-run --report`` of cmbagent and the wheel together, on Python 3.12 with the newest pip."""
    python = _fresh_venv(path, _python312())
    report_path = path / "report.json"
    _run(python, *PIP, "install", "-q", "--dry-run", "--report", report_path,
         CMBAGENT, f"otel-cmbagent @ {wheel.as_uri()}", timeout=1200)
    return json.loads(report_path.read_text())


def test_resolves_next_to_cmbagent_on_python_312(installs):
    """cmbagent==0.0.1.post63 and the wheel resolve together with no pins: wrapt 2.x, one consistent OTel set."""
    report = _result(installs, "next-to-cmbagent")
    resolved = {item["metadata"]["name"].lower(): item for item in report["install"]}
    assert {name for name, item in resolved.items() if item.get("requested")} == {"cmbagent", "otel-cmbagent"}
    versions = {name: item["metadata"]["version"] for name, item in resolved.items()}
    assert versions["cmbagent"] == CMBAGENT.split("==")[1] and versions["wrapt"].split(".")[0] == "2"
    assert versions["opentelemetry-api"] == versions["opentelemetry-sdk"]  # the SDK pins its API exactly
    assert "opentelemetry-instrumentation-threading" not in versions
    ours = resolved["otel-cmbagent"]["metadata"]["requires_dist"]
    assert not [requirement for requirement in ours if "==" in requirement and "extra ==" not in requirement]


def test_zero_code_run_reaches_a_real_otlp_receiver_in_order(installs):
    """``pip install otel-cmbagent[contrib]`` + AG2, then ``opentelemetry-instrument python app.py``: no code change,
    every AG2 step arrives over OTLP with the run's gapless order (the sequencer added by the entry point)."""
    from services.otlp_receiver import OTLPHTTPReceiver

    result = _result(installs, "zero-code")
    instrument = Path(result["python"]).with_name("opentelemetry-instrument")
    app = ROOT / "examples" / "zero_code" / "app.py"
    with OTLPHTTPReceiver() as receiver:
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
               "OTEL_LOGS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "zero-code-app"}
        done = subprocess.run([instrument, result["python"], app], cwd=result["work"], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "chat finished" in done.stdout
        spans = receiver.wait_for(3, timeout=30)
    names = [span["name"] for span in spans]
    assert "conversation user" in names and "invoke_agent assistant" in names
    assert any(name.startswith("chat ") for name in names)
    # spans and their message events share the run's one gapless sequence
    orders = [span["attributes"]["cmbagent.execution_order"] for span in spans]
    orders += [event["attributes"]["cmbagent.execution_order"] for span in spans for event in span["events"]
               if event["name"] == "cmbagent.message"]
    assert len(orders) > len(spans) and sorted(orders) == list(range(1, len(orders) + 1))
