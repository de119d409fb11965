"""The examples run as users run them (subprocess), and produce what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(args: list[str], tmp_path: Path, **env: str) -> str:
    completed = subprocess.run(
        args, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_quickstart_prints_a_gapless_tree(tmp_path):
    """quickstart.py: every span type of a chat with a tool and a code run, orders 1..N."""
    out = run([sys.executable, str(ROOT / "examples" / "quickstart.py")], tmp_path)
    rows = re.findall(r"^\s+(\d+)  (\w+)", out, re.MULTILINE)
    orders = [int(order) for order, _ in rows]
    assert orders == list(range(1, len(orders) + 1))
    kinds = {kind for _, kind in rows}
    assert {"run", "conversation", "agent_call", "llm_call", "tool_call", "code_exec", "file_gen", "message"} <= kinds
    assert "file result.json" in out


def test_zero_code_instrumentation(tmp_path):
    """`opentelemetry-instrument python app.py` traces AG2 with no code change, ordered by the sequencer."""
    out = run(
        [str(BIN / "opentelemetry-instrument"), sys.executable, str(ROOT / "examples" / "zero_code" / "app.py")],
        tmp_path,
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="zero-code-test",
    )
    assert "chat finished" in out
    assert '"name": "invoke_agent assistant"' in out
    assert '"name": "chat scripted-model"' in out
    assert '"cmbagent.execution_order": 1' in out
    assert '"service.name": "zero-code-test"' in out
