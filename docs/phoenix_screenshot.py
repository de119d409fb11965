"""docs/phoenix.png: the demo run (content on) in a throwaway Arize Phoenix, its span list in Chromium.

    OTEL_CMBAGENT_PHOENIX=.venv/phoenix/bin/phoenix .venv/ag2/bin/python docs/phoenix_screenshot.py

Also prints the span kinds, how many spans have an input and an output, and the bytes of the trace's
span attributes as Phoenix returns them (json.dumps of each span's attributes).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services.phoenix import PhoenixServer  # noqa: E402

PROJECT = "otel-cmbagent-demo"
CHROMIUM = os.environ.get("OTEL_CMBAGENT_CHROMIUM", "/usr/bin/chromium")


def _demo(phoenix: PhoenixServer, work: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix.base_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={PROJECT}",
        "OTEL_SERVICE_NAME": "otel-cmbagent-demo",
    })
    cli = Path(sys.executable).with_name("otel-cmbagent")
    subprocess.run([str(cli), "demo", "--db", "demo.db", "--no-live"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _project_id(phoenix: PhoenixServer) -> str:
    with urllib.request.urlopen(f"{phoenix.base_url}/v1/projects") as response:
        projects = json.loads(response.read())["data"]
    return next(p["id"] for p in projects if p["name"] == PROJECT)


def _report(spans: list[dict]) -> None:
    kinds = collections.Counter(s["span_kind"] for s in spans)
    inputs = sum(1 for s in spans if s["attributes"].get("input.value"))
    outputs = sum(1 for s in spans if "output.value" in s["attributes"])
    size = sum(len(json.dumps(s["attributes"])) for s in spans)
    print(f"{len(spans)} spans, kinds {dict(kinds)}, input {inputs}/{len(spans)}, output {outputs}/{len(spans)}, "
          f"attributes {size / 1024:.1f} KB")
    print("  no input:", sorted(s["name"] for s in spans if not s["attributes"].get("input.value")))
    print("  no output:", sorted(s["name"] for s in spans if "output.value" not in s["attributes"]))


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as work, PhoenixServer() as phoenix:
        _demo(phoenix, work)
        spans = phoenix.wait_for_spans(40, project=PROJECT, timeout=60)
        _report(spans)
        url = f"{phoenix.base_url}/projects/{_project_id(phoenix)}/spans"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, wait_until="networkidle")
            page.get_by_text("invoke_workflow", exact=False).first.wait_for(timeout=90_000)
            page.mouse.click(843, 328)  # clear the default filter (root spans only): every span
            page.wait_for_timeout(1500)
            page.mouse.click(1165, 328)  # close the project info panel
            page.mouse.click(283, 22)  # collapse the navigation
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ROOT / "docs" / "phoenix.png"))
            browser.close()
        print("wrote docs/phoenix.png from", url)


if __name__ == "__main__":
    main()
