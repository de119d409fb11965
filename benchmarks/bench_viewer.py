"""Run viewer in headless Chromium: time to first render of a run, and JS cost per live event.

Run:  .venv/ag2/bin/python benchmarks/bench_viewer.py   (needs /usr/bin/chromium or $OTEL_CMBAGENT_CHROMIUM;
      --sizes 500,5000 --extra 1000 --repeat 3; timings are printed, never asserted)

For each run size N (baseline 500, then 5,000 events; ``--sizes 500,5000,100000`` for the issue-14 figures):

1. A writer process (setup_tracing into a temp SQLite file, no AG2: ``oc.run`` > ``oc.step`` > agent / LLM /
   tool spans with message events) writes N events of one run and keeps the run open (live).
2. The viewer (uvicorn, in this process) serves that file. Chromium opens ``/#/run/<id>`` ``--repeat`` times:
   first render = ``performance.now()`` (ms since navigation start) when the page's first complete waterfall
   of the run has been painted (the page records it in ``window.__viewer.stats.firstRender``); the page loads
   the run from ``GET /api/runs/{id}/columns``. The server time and size of that request are measured on their
   own, and of ``GET /api/runs/{id}/events`` (every column of every row: what the page loaded before) once.
3. With the page open, the writer streams ``--extra`` more events into the same run (paced, ~1,000/s); the
   viewer polls the table and broadcasts them; the page applies them. Reported:
   - JS per event: time inside the page's frame function (apply queued events + update the DOM) for frames
     that applied events, divided by the events applied (``window.__viewer.stats``);
   - main thread per event: Chromium's TaskDuration (CDP ``Performance.getMetrics``: all main-thread work,
     incl. websocket JSON parsing, style, layout, paint, and the running-bar animation) over the streaming
     window, divided by the events; an upper bound;
   - the longest frame.
Ratios 5,000 / 500 show how the cost grows with the size of the run on screen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from otel_cmbagent.table import columns, store
from otel_cmbagent.apps.viewer import ViewerServer

CHROMIUM = os.environ.get("OTEL_CMBAGENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# argv: db, run id, initial events, extra events, extra events per second
WRITER = r'''
import json, sys, time
import otel_cmbagent as oc
from otel_cmbagent.instrumentation.spans import add_ordered_event

db, run_id, initial, extra, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
tracing = oc.setup_tracing(sql_url="sqlite:///" + db, otlp=False, instrument=False, set_global=True,
                           handle_sigterm=False)
tracer = tracing.tracer_provider.get_tracer("bench-viewer")
count = 1  # the run span
agents = ["planner", "engineer", "executor", "reviewer"]

def message(span, sender, recipient, text):
    global count
    add_ordered_event(span, "cmbagent.message", {
        "cmbagent.message.sender": sender, "cmbagent.message.recipient": recipient,
        "cmbagent.message.content": json.dumps([{"type": "text", "content": text}])})
    count += 1

def unit(i, budget):
    """Up to 5 events: agent span, message, LLM span, tool span, message."""
    global count
    agent = agents[i % len(agents)]
    with tracer.start_as_current_span(f"invoke_agent {agent}", attributes={
            "cmbagent.event_type": "agent_call", "gen_ai.agent.name": agent}) as span:
        count += 1
        if count < budget:
            message(span, "chat_manager", agent, f"turn {i}: continue the analysis")
        if count < budget:
            with tracer.start_as_current_span("chat gpt-4o-mini", attributes={
                    "cmbagent.event_type": "llm_call", "gen_ai.agent.name": agent,
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.usage.input_tokens": 120 + i % 50, "gen_ai.usage.output_tokens": 40 + i % 20,
                    "gen_ai.usage.cost": 0.0001}):
                count += 1
        if count < budget:
            with tracer.start_as_current_span("execute_tool compute", attributes={
                    "cmbagent.event_type": "tool_call", "gen_ai.agent.name": agent, "gen_ai.tool.name": "compute",
                    "gen_ai.tool.call.arguments": json.dumps({"i": i}), "gen_ai.tool.call.result": str(i * i)}):
                count += 1
        if count < budget:
            message(span, agent, "chat_manager", f"result {i * i}")

def emit(budget, pace):
    """Without a pace: flushed every ~1,000 events, so the SQL sink's queue never overflows and every row
    of a 100,000-event run is written (a burst of 100,000 spans at once is the sink benchmark's business)."""
    global count
    i = 0
    flushed = count
    while count < budget:
        with oc.step(step_id=f"step-{count}"):
            count += 1
            for _ in range(20):
                if count >= budget:
                    break
                before = time.perf_counter()
                unit(i, budget)
                i += 1
                if not pace and count - flushed >= 1000:
                    tracing.force_flush()
                    flushed = count
                if pace:
                    time.sleep(max(0.0, 5 / pace - (time.perf_counter() - before)))

with oc.run(name=f"bench-viewer {initial}+{extra}", run_id=run_id):
    emit(initial, 0)
    tracing.force_flush()
    print("READY", count, flush=True)
    sys.stdin.readline()
    emit(initial + extra, rate)
tracing.shutdown()
print("DONE", count, flush=True)
'''


def _fetch_ms(server: ViewerServer, run_id: str, what: str, repeat: int = 3) -> tuple[list[float], float]:
    """Server side: ``GET /api/runs/{run}/{what}`` (ms per GET, payload KB)."""
    fetch = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = httpx.get(f"{server.url}api/runs/{run_id}/{what}", timeout=120)
        fetch.append((time.perf_counter() - started) * 1000)
    return fetch, len(response.content) / 1024


def _columns_cpu_ms(engine, run_id: str) -> float:
    """CPU time of what ``GET /columns`` computes (its JSON, made by the database), in this process: steadier than
    wall time on a loaded machine (median of 3)."""
    spent = []
    for _ in range(3):
        started = time.thread_time()  # this thread's: the viewer's poller runs in this process too
        columns.run_columns_json(engine, run_id)
        spent.append((time.thread_time() - started) * 1000)
    return statistics.median(spent)


def _first_renders(browser, server: ViewerServer, run_id: str, repeat: int) -> tuple[list[float], Any, Any, Any]:
    """Time to first render, ``repeat`` fresh pages; the last page (and its context) is left open."""
    first = []
    for index in range(repeat):
        context = browser.new_context(viewport={"width": 1500, "height": 900})
        page = context.new_page()
        page.goto(f"{server.url}#/run/{run_id}")
        page.wait_for_selector(f'[data-testid="waterfall"][data-ready="true"][data-run-id="{run_id}"]',
                               timeout=60_000)
        load = page.evaluate("() => window.__viewer.stats")
        first.append(load["firstRender"])
        breakdown = (load["fetchMs"], load["buildMs"], load["firstRender"] - load["runLoadedAt"])
        if index < repeat - 1:
            context.close()
    return first, breakdown, context, page


def _stream(writer, context, page, engine, run_id: str, rows: int) -> dict:
    """Live: the open page while the writer streams its extra events; what the page's main thread spent."""
    page.wait_for_function(f"() => window.__viewer.eventCount() >= {rows}", timeout=60_000)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    page.evaluate("() => window.__viewer.reset()")
    before = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    started = time.perf_counter()
    writer.stdin.write("go\n")
    writer.stdin.flush()
    done = writer.stdout.readline().split()
    assert done and done[0] == "DONE", f"writer failed: {done}"
    total = store.count_events(engine, run_id)
    page.wait_for_function(f"() => window.__viewer.eventCount() === {total}", timeout=120_000)
    page.wait_for_selector('[data-testid="run-header"][data-status="completed"]', timeout=60_000)
    elapsed = time.perf_counter() - started
    after = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    stats = page.evaluate("() => window.__viewer.stats")
    context.close()
    streamed = max(1, total - rows)
    applied = max(1, stats["applied"])
    return {
        "streamed": total - rows,
        "applied": stats["applied"],
        "js_ms_per_event": stats["applyMs"] / applied,
        "main_thread_ms_per_event": (after["TaskDuration"] - before["TaskDuration"]) * 1000 / streamed,
        "script_ms_per_event": (after["ScriptDuration"] - before["ScriptDuration"]) * 1000 / streamed,
        "max_frame_ms": stats["maxFrameMs"],
        "frames": stats["frames"],
        "stream_s": elapsed,
    }


def measure(browser, server: ViewerServer, db: Path, size: int, extra: int, repeat: int, rate: float) -> dict:
    run_id = f"bench-{size}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), run_id, str(size), str(extra), str(rate)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline().split()
        assert line and line[0] == "READY", f"writer failed: {line}"
        engine = store.open_store(str(db))
        deadline = time.monotonic() + 60
        while store.count_events(engine, run_id) < size and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = store.count_events(engine, run_id)
        fetch, payload_kb = _fetch_ms(server, run_id, "columns")
        cpu_ms = _columns_cpu_ms(engine, run_id)
        old_fetch, old_kb = _fetch_ms(server, run_id, "events", repeat=1)
        first, breakdown, context, page = _first_renders(browser, server, run_id, repeat)
        live = _stream(writer, context, page, engine, run_id, rows)
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    return {"size": rows, "fetch_ms": statistics.median(fetch), "payload_kb": payload_kb,
            "events_ms": old_fetch[0], "events_kb": old_kb, "cpu_ms": cpu_ms,
            "first_render_ms": statistics.median(first), "first_render_all": first, "breakdown": breakdown, **live}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,5000", help="run sizes (events), baseline first")
    parser.add_argument("--extra", type=int, default=1000, help="events streamed while the page is open")
    parser.add_argument("--rate", type=float, default=1000.0, help="streamed events per second")
    parser.add_argument("--repeat", type=int, default=3, help="page loads per size (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 and 2,000 events, 200 streamed, 1 load")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set OTEL_CMBAGENT_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    if args.quick:
        args.sizes, args.extra, args.repeat = "200,2000", 200, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp, sync_playwright() as playwright:
        db = Path(tmp) / "bench.db"
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # the table must exist before the viewer serves it: a tiny run first
            subprocess.run([sys.executable, "-c", WRITER, str(db), "warmup", "10", "0", "0"], input="\n",
                           text=True, check=True, capture_output=True)
            with ViewerServer(str(db), poll_interval=0.25) as server:
                for size in sizes:
                    results.append(measure(browser, server, db, size, args.extra, args.repeat, args.rate))
        finally:
            browser.close()

    print(f"viewer benchmark (headless Chromium {CHROMIUM}, poll interval 0.25 s, 1500x900)")
    header = (f"{'run events':>10} {'GET columns':>12} {'JSON':>8} {'first render':>13} {'streamed':>9} "
              f"{'JS/event':>9} {'main/event':>11} {'max frame':>10}  {'(GET events, JSON)':>20}")
    print(header)
    for r in results:
        print(f"{r['size']:>10} {r['fetch_ms']:>10.0f}ms {r['payload_kb']:>6.0f}KB {r['first_render_ms']:>11.0f}ms "
              f"{r['streamed']:>9} {r['js_ms_per_event'] * 1000:>7.1f}µs "
              f"{r['main_thread_ms_per_event'] * 1000:>9.1f}µs "
              f"{r['max_frame_ms']:>8.1f}ms  ({r['events_ms']:>7.0f}ms {r['events_kb']:>7.0f}KB)")
    for r in results:
        loads = ", ".join(f"{x:.0f}" for x in r["first_render_all"])
        fetch_ms, build_ms, paint_ms = r["breakdown"]
        print(f"  {r['size']} events: GET columns {r['cpu_ms']:.0f} ms of CPU; first render per load {loads} ms (last: fetch+parse {fetch_ms:.0f} ms, "
              f"tree {build_ms:.0f} ms, render+paint {paint_ms:.0f} ms); {r['applied']} live events applied in "
              f"{r['frames']} frames over {r['stream_s']:.1f} s; script {r['script_ms_per_event'] * 1000:.1f}µs/event")
    base, big = results[0], results[-1]
    if len(results) > 1:
        print(f"ratios {big['size']} / {base['size']} events ({big['size'] / base['size']:.0f}x the rows): "
              f"first render {big['first_render_ms'] / base['first_render_ms']:.2f}x, "
              f"GET columns {big['fetch_ms'] / base['fetch_ms']:.2f}x, "
              f"JS per live event {big['js_ms_per_event'] / base['js_ms_per_event']:.2f}x, "
              f"main thread per live event {big['main_thread_ms_per_event'] / base['main_thread_ms_per_event']:.2f}x")


if __name__ == "__main__":
    main()
