"""The run viewer in a real headless Chromium (playwright): a live AG2 run, XSS, filters, another process.

Needs Debian's chromium at /usr/bin/chromium (or $OTEL_CMBAGENT_CHROMIUM); skipped without it, failed
under CI. With $OTEL_CMBAGENT_SCREENSHOT set, the demo-run screenshot is also copied to docs/viewer.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from otel_cmbagent.table import store
from otel_cmbagent.table.schema import is_message
from otel_cmbagent.apps.viewer import ViewerServer
from test_viewer import SYNTHETIC_WRITER, XSS, tracing_for, xss_run

from conftest import FAKE_KEY

CHROMIUM = os.environ.get("OTEL_CMBAGENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "viewer.png"
JAEGER = "http://localhost:16686"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"CI: no Chromium at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set OTEL_CMBAGENT_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.errors = errors
    yield page
    context.close()


def bars(page, selector=""):
    return page.locator(f'[data-testid="bar"]{selector}')


def visible_types(page):
    return set(page.eval_on_selector_all('[data-testid="bar"]', "els => els.map(e => e.dataset.type)"))


def bar_width(page, event_id):
    return page.eval_on_selector(f'[data-testid="bar"][data-event-id="{event_id}"]',
                                 "e => e.getBoundingClientRect().width")


def test_live_run_in_the_browser(tmp_path, scripted_llm, browser, page):
    db = tmp_path / "live.db"
    tracing = tracing_for(db)  # creates the table: the viewer opens it at once
    gate, reached, start = threading.Event(), threading.Event(), threading.Event()
    with ViewerServer(str(db), poll_interval=0.2, jaeger_url=JAEGER) as server, ThreadPoolExecutor(1) as pool:
        try:
            page.goto(server.url)
            page.wait_for_selector('[data-testid="connection"][data-state="open"]')
            page.wait_for_selector(".run-empty")  # nothing traced yet

            future = pool.submit(xss_run, scripted_llm, gate=gate, reached=reached, start_gate=start, delay=0.2)
            # the run appears in the list, marked live, and (nothing else being selected) opens
            live_row = page.locator('[data-testid="run-row"][data-live="true"]')
            live_row.wait_for()
            assert live_row.locator('[data-testid="run-status"]').inner_text().strip() == "LIVE"
            live_row.click()
            page.wait_for_selector('[data-testid="waterfall"][data-ready="true"]')
            bars(page, '[data-type="run"][data-status="running"]').wait_for()
            early = bars(page).count()
            start.set()  # the chat begins

            # the tool blocks on the gate: its bar is running, and it grows with the clock
            assert reached.wait(30), "the tool was never called"
            tool = bars(page, '[data-type="tool_call"][data-status="running"]')
            tool.wait_for()
            tool_id = tool.get_attribute("data-event-id")
            assert bars(page).count() > early, "the waterfall gained bars while the run ran"
            assert page.locator('[data-testid="run-header"]').get_attribute("data-status") == "running"
            width_before = bar_width(page, tool_id)
            time.sleep(0.8)
            assert bar_width(page, tool_id) > width_before + 2, "a running bar grows"
            page.screenshot(path=str(tmp_path / "viewer-live.png"))

            gate.set()
            future.result(timeout=60)
            page.wait_for_selector(f'[data-testid="bar"][data-event-id="{tool_id}"][data-status="completed"]')
            page.wait_for_selector('[data-testid="run-header"][data-status="completed"]')
            page.wait_for_selector('[data-testid="run-row"][data-status="completed"]')
        finally:
            start.set()
            gate.set()
            tracing.shutdown()

        rows = store.run_events(store.open_store(str(db)), future.result().run_id)
        spans = [r for r in rows if not is_message(r)]
        page.wait_for_function(f"() => window.__viewer.eventCount() === {len(rows)}")
        assert bars(page).count() == len(spans)
        assert bars(page, '[data-status="running"]').count() == 0

        # details of the tool call: arguments and result
        page.click(f'[data-testid="bar"][data-event-id="{tool_id}"]')
        details = page.locator('[data-testid="details"]')
        details.wait_for()
        page.wait_for_selector(f'[data-testid="details"][data-event-id="{tool_id}"]')
        assert page.locator('[data-testid="details-tool"]').inner_text().startswith("add")
        assert page.locator('[data-testid="details-status"]').inner_text() == "completed"
        inputs = page.locator('[data-testid="details-inputs"]').inner_text()
        assert '"a": 20' in inputs and '"b": 22' in inputs
        assert "42" in page.locator('[data-testid="details-outputs"]').inner_text()
        assert page.locator('[data-testid="details-agent"]').inner_text() in ("user", "assistant")

        # the XSS payload of the first message is shown as text, and never runs
        page.click('[data-testid="bar"][data-type="conversation"]')
        message = page.locator('[data-testid="details-message"]').first
        message.wait_for()
        assert XSS in message.inner_text()
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.locator('[data-testid="details"] img, [data-testid="details"] script').count() == 0
        assert FAKE_KEY not in page.locator("body").inner_text()

        # the Jaeger link of the run
        link = page.locator('[data-testid="run-header"] [data-testid="jaeger-link"]')
        assert link.get_attribute("href") == f"{JAEGER}/trace/{rows[0]['trace_id']}"

        # filters: by type, then by agent
        page.select_option('[data-testid="filter-type"]', "tool_call")
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="bar"]')]
                                   .every(e => e.dataset.type === 'tool_call')""")
        assert bars(page).count() == sum(1 for r in spans if r["event_type"] == "tool_call") >= 1
        page.select_option('[data-testid="filter-type"]', "")
        page.wait_for_function(f"() => document.querySelectorAll('[data-testid=\"bar\"]').length === {len(spans)}")
        page.select_option('[data-testid="filter-agent"]', "assistant")
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="bar"]')]
                                   .every(e => e.dataset.agent === 'assistant')""")
        assert bars(page).count() == sum(1 for r in spans if r["agent_name"] == "assistant") >= 1
        assert "llm_call" in visible_types(page)
        page.select_option('[data-testid="filter-agent"]', "")
        page.wait_for_function(f"() => document.querySelectorAll('[data-testid=\"bar\"]').length === {len(spans)}")

        # escaping alone (no Content-Security-Policy to fall back on) keeps the payload inert
        bare = browser.new_context(bypass_csp=True).new_page()
        bare.goto(f"{server.url}#/run/{rows[0]['run_id']}")
        bare.click('[data-testid="bar"][data-type="conversation"]')
        assert XSS in bare.locator('[data-testid="details-message"]').first.inner_text()
        bare.click('[data-testid="bar"][data-type="llm_call"]')
        assert XSS in bare.locator('[data-testid="details-inputs"]').inner_text()
        assert bare.evaluate("typeof window.__xss") == "undefined"
        bare.context.close()

        page.click(f'[data-testid="bar"][data-event-id="{tool_id}"]')
        page.wait_for_selector(f'[data-testid="details"][data-event-id="{tool_id}"]')
        page.screenshot(path=str(tmp_path / "viewer.png"))
        assert (tmp_path / "viewer.png").stat().st_size > 10_000
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert not page.errors, page.errors


def test_run_from_another_process_appears_live(tmp_path, page):
    db = tmp_path / "other.db"
    subprocess.run([sys.executable, "-c", SYNTHETIC_WRITER, str(db), "first-run", "1", "0"], check=True, timeout=60)
    with ViewerServer(str(db), poll_interval=0.2) as server:
        page.goto(server.url)
        page.wait_for_selector('[data-testid="waterfall"][data-ready="true"][data-run-id="first-run"]')
        gate = tmp_path / "gate"  # the writer's second step waits for "gate.1": the page sees the run grow
        writer = subprocess.Popen([sys.executable, "-c", SYNTHETIC_WRITER, str(db), "second-run", "6", "0.4", str(gate)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            row = page.locator('[data-testid="run-row"][data-run-id="second-run"]')
            row.wait_for()
            page.wait_for_selector('[data-testid="run-row"][data-run-id="second-run"][data-live="true"]')
            assert page.locator('[data-testid="run-row"]').first.get_attribute("data-run-id") == "second-run"
            row.click()
            page.wait_for_selector('[data-testid="waterfall"][data-ready="true"][data-run-id="second-run"]')
            page.wait_for_selector('[data-testid="bar"][data-status="running"]')
            counts = [bars(page).count()]
            for step in range(1, 6):
                (tmp_path / f"gate.{step}").touch()
            for _ in range(50):
                time.sleep(0.3)
                counts.append(bars(page).count())
                if counts[-1] > counts[0]:
                    break
            assert counts[-1] > counts[0], f"the waterfall never grew: {counts}"
            assert writer.wait(60) == 0, writer.stderr.read()
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        rows = store.run_events(store.open_store(str(db)), "second-run")
        page.wait_for_selector('[data-testid="run-header"][data-status="completed"]')
        page.wait_for_function(f"() => window.__viewer.eventCount() === {len(rows)}")
        assert bars(page).count() == sum(1 for r in rows if not is_message(r))
        assert bars(page, '[data-status="running"]').count() == 0
        page.wait_for_selector('[data-testid="run-row"][data-run-id="second-run"][data-status="completed"]')
        assert not page.errors, page.errors


def test_a_killed_run_turns_interrupted_in_the_page(tmp_path, page):
    """A run shown live (written by another process, waiting in its second step) whose process is killed with
    SIGKILL: the page's header and run list switch from LIVE to an "interrupted" badge, and no bar stays
    running (before, it stayed LIVE with its duration growing)."""
    db = tmp_path / "killed.db"
    writer = subprocess.Popen([sys.executable, "-c", SYNTHETIC_WRITER, str(db), "killed-run", "3", "0",
                               str(tmp_path / "never")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (db.exists() and _has_running_run(db, "killed-run")):
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never got going"
            time.sleep(0.1)
        with ViewerServer(str(db), poll_interval=0.2) as server:
            page.goto(server.url + "#/run/killed-run")
            header = '[data-testid="run-header"]'
            page.wait_for_selector(f'{header}[data-status="running"]')
            assert page.locator(f"{header} .badge").first.inner_text() == "LIVE"
            writer.kill()
            writer.wait(30)
            page.wait_for_selector(f'{header}[data-status="interrupted"]')
            assert page.locator(f"{header} .badge.interrupted").inner_text() == "interrupted"
            row = '[data-testid="run-row"][data-run-id="killed-run"]'
            page.wait_for_selector(f'{row}[data-status="interrupted"][data-live="false"]')
            assert page.locator(f'{row} [data-testid="run-status"]').inner_text() == "interrupted"
            assert bars(page, '[data-status="running"]').count() == 0
            assert bars(page, '[data-status="interrupted"]').count() >= 1
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert not page.errors, page.errors


def _has_running_run(db, run_id):
    try:
        runs = store.list_runs(store.open_store(str(db)))
        return any(r["status"] == "running" for r in runs if r["run_id"] == run_id)
    except store.StoreError:
        return False


def test_demo_run_screenshot(tmp_path, page, monkeypatch):
    """The README screenshot: cmbagent's demo workflow (group chat, code, files, a failed tool call)."""
    from otel_cmbagent.apps.demo import run_demo

    monkeypatch.chdir(tmp_path)
    db = "otel_cmbagent.db"  # shown as given in the page's top bar
    run_demo(db, live=False)
    page.set_viewport_size({"width": 1600, "height": 1000})
    with ViewerServer(str(db), jaeger_url=JAEGER) as server:
        page.goto(server.url)
        page.wait_for_selector('[data-testid="waterfall"][data-ready="true"]')
        assert page.locator('[data-testid="run-row"]').count() == 1
        # every event type the demo wrote is in the waterfall (the type filter shows its bars)
        demo_types = {"run", "step", "conversation", "agent_call", "llm_call", "tool_call", "code_exec", "file_gen",
                      "handoff"}
        for event_type in sorted(demo_types):
            page.select_option('[data-testid="filter-type"]', event_type)
            page.wait_for_function(f"""() => {{ const b = [...document.querySelectorAll('[data-testid="bar"]')];
                                       return b.length > 0 && b.every(e => e.dataset.type === '{event_type}'); }}""")
        assert page.locator('.legend-item[data-type="message"]:not(.absent)').count() == 1
        # a tool call's details show its arguments
        page.select_option('[data-testid="filter-type"]', "tool_call")
        bars(page, '[data-type="tool_call"][data-status="completed"]').first.click()
        page.wait_for_selector('[data-testid="details"][data-type="tool_call"]')
        assert "max_iter" in page.locator('[data-testid="details-inputs"]').inner_text() or "report" in page.locator(
            '[data-testid="details-inputs"]').inner_text()
        page.select_option('[data-testid="filter-type"]', "")
        failed = bars(page, '[data-type="tool_call"][data-status="failed"]')
        assert failed.count() == 1
        failed.click()
        page.wait_for_selector('[data-testid="details"][data-status="failed"]')
        assert "did not converge" in page.locator('[data-testid="details-error"]').inner_text()
        file_bar = bars(page, '[data-type="file_gen"]').first
        file_bar.click()
        page.wait_for_selector('[data-testid="details"][data-type="file_gen"]')
        path = page.locator('[data-testid="details-file"]').inner_text()
        assert path.endswith(("spectrum.csv", "spectrum.png", "fit.png")) and os.sep in path
        failed.click()
        page.wait_for_selector('[data-testid="details"][data-status="failed"]')
        page.mouse.move(0, 0)
        shot = tmp_path / "viewer-demo.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("OTEL_CMBAGENT_SCREENSHOT"):
            README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, README_SCREENSHOT)
        assert not page.errors, page.errors


@pytest.mark.parametrize(
    "token, run_id",
    [("s3cret-viewer-token", "token-run"), ("s3crét-令牌-token", "token/run")],
    ids=["ascii", "non-ascii-token-and-slash-in-run-id"],
)
def test_token_protected_page(tmp_path, page, token, run_id):
    """With a token the page is opened as /?token=... and sends it with every API request and the websocket;
    without it the server answers 401. A non-ASCII token and a run id with "/" work too (issue 10)."""
    from urllib.parse import quote

    db = tmp_path / "token.db"
    subprocess.run([sys.executable, "-c", SYNTHETIC_WRITER, str(db), run_id, "2", "0"], check=True, timeout=60)
    with ViewerServer(str(db), token=token) as server:
        bare = page.context.new_page()
        response = bare.goto(server.url)
        assert response.status == 401 and "token" in response.json()["error"]
        bare.close()
        refused = []
        page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
        page.goto(f"{server.url}?token={quote(token)}")
        page.wait_for_selector(f'[data-testid="waterfall"][data-ready="true"][data-run-id="{run_id}"]')
        page.wait_for_selector('[data-testid="connection"][data-state="open"]')
        assert page.locator('[data-testid="run-row"]').count() == 1
        page.reload()
        page.wait_for_selector(f'[data-testid="waterfall"][data-ready="true"][data-run-id="{run_id}"]')
        page.wait_for_selector('[data-testid="connection"][data-state="open"]')
        assert not refused and not page.errors, (refused, page.errors)


# --- what a new user hit (issue 11) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    """One demo run (a group chat, code, files, a fit_power_law call that fails once and is retried)."""
    from otel_cmbagent.apps.demo import db_work_dir, run_demo

    db = tmp_path_factory.mktemp("newcomer") / "demo.db"
    run_demo(str(db), live=False, work_dir=db_work_dir(db))
    return db


def _open_demo_run(page, server):
    page.goto(server.url)
    page.wait_for_selector('[data-testid="waterfall"][data-ready="true"]')


def test_an_unknown_run_shows_no_status_and_no_name(demo_db, page):
    """``#/run/<unknown>``: "No such run", without the green "completed" badge and "(unnamed run)" it used to
    show next to it."""
    with ViewerServer(str(demo_db)) as server:
        page.goto(server.url + "#/run/no-such-run")
        page.wait_for_function("() => document.getElementById('wf-loading').textContent.startsWith('No such run')")
        header = page.locator('[data-testid="run-header"]')
        page.wait_for_function("() => document.querySelector('[data-testid=\"run-header\"]').dataset.status === 'missing'")
        assert header.locator(".badge").count() == 0
        assert "(unnamed run)" not in header.inner_text() and "completed" not in header.inner_text()
        assert page.locator('[data-testid="run-name"]').inner_text() == "No such run"
        assert [e for e in page.errors if "status of 404" not in e] == [], page.errors  # the API's 404 is the answer


def test_a_run_with_a_failed_tool_call_shows_its_failure_count(demo_db, page):
    """The demo's run completes, but its first fit_power_law call failed: the list and the header say
    "1 failed" (they said plain "completed")."""
    with ViewerServer(str(demo_db)) as server:
        _open_demo_run(page, server)
        item = page.locator('[data-testid="run-row"]').first
        assert item.locator('[data-testid="run-status"]').inner_text() == "completed"
        assert item.locator('[data-testid="run-failed"]').inner_text() == "1 failed"
        assert page.locator('[data-testid="run-header"] [data-testid="run-failed"]').inner_text() == "1 failed"


def test_opening_the_details_at_1400px_moves_nothing_and_keeps_the_selected_row_in_view(demo_db, page):
    """At 1400 px the details pane narrowed the run view: its header wrapped onto more lines and pushed the
    waterfall, and the row just clicked, down and out of view."""
    page.set_viewport_size({"width": 1400, "height": 900})
    with ViewerServer(str(demo_db)) as server:
        _open_demo_run(page, server)
        body_top = "() => document.getElementById('wf-body').getBoundingClientRect().top"
        before = page.evaluate(body_top)
        rows = page.locator(".wf-row")
        visible = page.evaluate("""() => { const b = document.getElementById('wf-body').getBoundingClientRect();
            return [...document.querySelectorAll('.wf-row')].filter(r => r.getBoundingClientRect().bottom <= b.bottom)
                     .map(r => r.dataset.eventId); }""")
        target = visible[-1]  # the lowest row fully on screen
        rows.and_(page.locator(f'[data-event-id="{target}"]')).click()
        page.wait_for_selector(f'[data-testid="details"][data-event-id="{target}"]')
        page.wait_for_timeout(300)  # a frame for any late layout change (the check is on positions, not time)
        assert page.evaluate(body_top) == before, "the waterfall moved down when the details pane opened"
        inside = page.evaluate(f"""() => {{ const b = document.getElementById('wf-body').getBoundingClientRect();
            const r = document.querySelector('.wf-row[data-event-id="{target}"]').getBoundingClientRect();
            return r.top >= b.top && r.bottom <= b.bottom; }}""")
        assert inside, "the selected row is out of view"


def test_durations_are_the_clis(demo_db, page):
    """Every bar shows its span's duration as the CLI does (one rounding rule: the row's duration_ms,
    truncated); they differed by 1 ms, and "<1 ms" vs "0 ms"."""
    from otel_cmbagent.apps.cli.terminal import fmt_duration

    engine = store.open_store(str(demo_db))
    run_id = store.resolve_run(engine, "last")
    rows = {row["id"]: row for row in store.run_events(engine, run_id) if not is_message(row)}
    with ViewerServer(str(demo_db)) as server:
        _open_demo_run(page, server)
        shown = page.eval_on_selector_all(
            '.wf-row', "rows => rows.map(r => [r.dataset.eventId, r.querySelector('.bar-dur').textContent])")
        assert len(shown) > 20
        assert {event_id: text for event_id, text in shown} == {
            event_id: fmt_duration(rows[event_id]["duration_ms"]) for event_id, _ in shown}
        summary = store.run_summary(engine, run_id)
        assert page.locator('[data-testid="run-duration"]').inner_text() == fmt_duration(summary["duration_ms"])


def test_a_20000_event_run_opens_whole_and_details_come_on_click(tmp_path, page):
    """A 20,001-row run opens from /columns: every event is in the page, the last span's bar is drawn at the
    bottom of the waterfall, its tokens are in the header, and a click fetches the span's inputs (/api/events)."""
    from big_run import write_big_run

    db = tmp_path / "big.db"
    total = write_big_run(db, "big-run", 4000)
    engine = store.open_store(str(db))
    rows = store.run_events(engine, "big-run")
    assert len(rows) == total == 20_201
    spans = [row for row in rows if not is_message(row)]
    last = spans[-1]
    tokens_in = sum(row["meta"]["gen_ai.usage.input_tokens"] for row in rows if row["event_type"] == "llm_call")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    with ViewerServer(str(db)) as server:
        page.goto(f"{server.url}#/run/big-run")
        page.wait_for_selector('[data-testid="waterfall"][data-ready="true"]', timeout=60_000)
        assert page.evaluate("() => [window.__viewer.eventCount(), window.__viewer.spanCount()]") == [
            total, len(spans)]
        assert page.locator("#wf-count").text_content() == f"{len(spans)} spans"
        assert page.locator('[data-testid="run-events"]').inner_text() == f"{total:,}"
        assert page.locator('[data-testid="run-tokens"]').inner_text().startswith(f"{tokens_in:,} / ")
        assert any(url.endswith("/api/runs/big-run/columns") for url in requests)
        assert not any(url.endswith("/events") for url in requests), "the whole run was fetched row by row"
        page.evaluate("() => { const b = document.getElementById('wf-body'); b.scrollTop = b.scrollHeight; }")
        bar = page.locator(f'[data-testid="bar"][data-event-id="{last["id"]}"]')
        bar.wait_for()
        assert bar.get_attribute("data-type") == "tool_call"
        bar.click()
        page.wait_for_selector(f'[data-testid="details"][data-event-id="{last["id"]}"][data-loaded="true"]')
        assert '"unit": 3999' in page.locator('[data-testid="details-inputs"]').inner_text()
        assert any(url.endswith(f"/api/events/{last['id']}") for url in requests)
    assert not page.errors


def test_usage_lands_on_its_row_when_orders_have_a_gap(tmp_path, page):
    """/columns names an LLM call's usage by execution order: with a row missing (orders no longer 1..n, e.g. a
    row dropped by a full queue) every call's tokens still reach the header, none lands on a neighbour."""
    import sqlite3

    from big_run import write_big_run

    db = tmp_path / "gap.db"
    write_big_run(db, "gap-run", 40)
    with sqlite3.connect(db) as connection:  # the first message row goes: every later order is off by one
        connection.execute("DELETE FROM execution_events WHERE execution_order = "
                           "(SELECT min(execution_order) FROM execution_events WHERE event_subtype = 'message')")
    engine = store.open_store(str(db))
    rows = store.run_events(engine, "gap-run")
    llm = [row for row in rows if row["event_type"] == "llm_call"]
    tokens_in = sum(row["meta"]["gen_ai.usage.input_tokens"] for row in llm)
    with ViewerServer(str(db)) as server:
        page.goto(f"{server.url}#/run/gap-run")
        page.wait_for_selector('[data-testid="waterfall"][data-ready="true"]', timeout=60_000)
        assert page.evaluate("() => window.__viewer.eventCount()") == len(rows)
        assert page.locator('[data-testid="run-tokens"]').inner_text().startswith(f"{tokens_in:,} / ")
    assert not page.errors
